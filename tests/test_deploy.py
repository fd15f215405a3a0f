"""deploy/ (issue 21): the Kubernetes manifests validate against Kubernetes' own schemas,
say the same as poold's config and the image, and the image's layout holds together.

Two levels: every raw YAML file (always, so CI validates something without kubectl), and
what ``kubectl kustomize`` renders from the base and the CPU overlay (skipped, saying
why, where kubectl is absent). The image itself is built by deploy/test-image.sh (minutes;
``GPU_POOL_IMAGE_TEST=1`` runs it here).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
import zmq.auth
from modelkit import make_mlp

from pool.config import check_config

# A test extra; a host with only the runtime packages (the GPU host) skips this file.
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
# The oldest Kubernetes the manifests are for (preStop's sleep action is on by default
# from 1.30) and the newest schema kubernetes-validate ships.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@cache
def rendered(target: str) -> tuple[dict[str, Any], ...]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the rendered kustomization is not checked")
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return tuple(docs(done.stdout))


def one(objs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def pool_toml(target: str) -> dict[str, Any]:
    cm = one(rendered(target), "ConfigMap", "gpu-pool-config")
    return tomllib.loads(cm["data"]["pool.toml"])


def server_pod(target: str) -> dict[str, Any]:
    objs = rendered(target)
    kind = "DaemonSet" if target == "." else "Deployment"
    return dict(one(objs, kind)["spec"]["template"])


def port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


# -------------------------------------------------------------------- schemas
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", VERSIONS)
def test_every_raw_manifest_validates(path: Path, version: str) -> None:
    for doc in docs(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("target", [".", "overlays/cpu"])
@pytest.mark.parametrize("version", VERSIONS)
def test_the_rendered_kustomizations_validate(target: str, version: str) -> None:
    objs = rendered(target)
    for doc in objs:
        kubernetes_validate.validate(doc, version, strict=True)
    kinds = sorted(o["kind"] for o in objs)
    server = "DaemonSet" if target == "." else "Deployment"
    assert kinds == sorted(
        ["ConfigMap", server, "PodDisruptionBudget", "Service", "Service", "ServiceAccount"]
    )


def test_a_broken_manifest_is_caught() -> None:
    """The validator is not a rubber stamp: a misspelt field fails strict validation."""
    ds = docs((K8S / "base" / "daemonset.yaml").read_text())[0]
    ds["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, VERSIONS[-1], strict=True)


# ------------------------------------------------------- the manifests agree
@pytest.mark.parametrize("target", [".", "overlays/cpu"])
def test_ports_probes_and_annotations_match_the_config(target: str) -> None:
    pool = pool_toml(target)["pool"]
    pod = server_pod(target)
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["zmq"] == port(pool["frontend"]) and ports["control"] == port(pool["control"])
    assert ports["metrics"] == port(pool["metrics"])
    for key, name in (("http", "http"), ("grpc", "grpc")):  # where the config turns them on
        if key in pool:
            assert ports[name] == port(pool[key])
    http_py = (ROOT / "pool" / "http.py").read_text()
    for probe, path in (
        ("startupProbe", "/readyz"),
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
    ):
        assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}
        assert f'"{path}"' in http_py  # the daemon serves it
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert int(ann["prometheus.io/port"]) == ports["metrics"]


@pytest.mark.parametrize("target", [".", "overlays/cpu"])
def test_the_grace_period_covers_prestop_and_poolds_own_drain(target: str) -> None:
    pool = pool_toml(target)["pool"]
    spec = server_pod(target)["spec"]
    (c,) = spec["containers"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    # poold's shutdown: drain up to drain_timeout_s, stop workers within stop_timeout_s,
    # and it gives itself 10 s more for the last exits (pool/daemon_loop.py shutdown_step).
    needed = pre_stop + pool["drain_timeout_s"] + pool["stop_timeout_s"] + 10
    assert spec["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("target", [".", "overlays/cpu"])
def test_runs_as_the_images_user_without_privileges(target: str) -> None:
    spec = server_pod(target)["spec"]
    (c,) = spec["containers"]
    user = re.search(r"^USER (\d+):(\d+)$", CONTAINERFILE.read_text(), re.M)
    assert user is not None
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(user[1]) != 0
    assert spec["securityContext"]["runAsGroup"] == int(user[2])
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["readOnlyRootFilesystem"] is True
    assert spec["automountServiceAccountToken"] is False


@pytest.mark.parametrize("target", [".", "overlays/cpu"])
def test_services_and_budget_select_the_server_pods(target: str) -> None:
    objs = rendered(target)
    pod = server_pod(target)
    labels = pod["metadata"]["labels"]
    names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    hosts = one(objs, "Service", "gpu-pool-hosts")
    assert hosts["spec"]["clusterIP"] == "None"  # headless: DNS lists every pod
    assert {p["port"] for p in hosts["spec"]["ports"]} == {5555, 5556}
    for svc in (hosts, one(objs, "Service", "gpu-pool-http")):
        assert svc["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_gpu_and_cpu_variants_differ_only_where_they_must() -> None:
    gpu, cpu = server_pod("."), server_pod("overlays/cpu")
    (g,), (c,) = gpu["spec"]["containers"], cpu["spec"]["containers"]
    assert g["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert "nvidia.com/gpu" not in str(c["resources"]) and "nodeSelector" not in cpu["spec"]
    for key in (
        "args",
        "ports",
        "startupProbe",
        "readinessProbe",
        "livenessProbe",
        "lifecycle",
        "securityContext",
        "volumeMounts",
        "image",
    ):
        assert g[key] == c[key], key
    assert gpu["spec"]["securityContext"] == cpu["spec"]["securityContext"]
    for model in pool_toml(".")["models"]:
        assert all(d.startswith("cuda") for d in model["devices"])
    for model in pool_toml("overlays/cpu")["models"]:
        assert set(model["devices"]) == {"cpu"}


@pytest.mark.parametrize("target", [".", "overlays/cpu"])
def test_the_config_is_valid_for_poold_in_the_pods_filesystem(target: str, tmp_path: Path) -> None:
    """Every path pool.toml names lies on a volume the pod mounts (CURVE keys from their
    Secrets, models, state); laid out under tmp_path, poold's own check accepts it."""
    text = one(rendered(target), "ConfigMap", "gpu-pool-config")["data"]["pool.toml"]
    pool = tomllib.loads(text)
    (c,) = server_pod(target)["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in server_pod(target)["spec"]["volumes"]}
    p = pool["pool"]
    named = [
        p["state_dir"],
        p["curve_secret_key"],
        p["curve_authorized_keys"],
        p["oip_tls_cert"],
        p["oip_tls_key"],
        *p["model_roots"],
        *(m["path"] for m in pool["models"]),
    ]
    for path in named:
        assert any(path == m or path.startswith(m + "/") for m in mounts), path
    key_mount = next(m for m in mounts if p["curve_secret_key"].startswith(m + "/"))
    assert "secret" in volumes[mounts[key_mount]]
    assert "secret" in volumes[mounts[p["curve_authorized_keys"]]]
    assert "secret" in volumes[mounts[os.path.dirname(p["oip_tls_cert"])]]
    config_arg = c["args"][c["args"].index("--config") + 1]
    assert (
        os.path.dirname(config_arg) in mounts
        and "configMap" in volumes[mounts[os.path.dirname(config_arg)]]
    )

    def here(path: str) -> Path:
        return tmp_path / path.lstrip("/")

    here(os.path.dirname(p["curve_secret_key"])).mkdir(parents=True)
    _, secret = zmq.auth.create_certificates(
        str(here(os.path.dirname(p["curve_secret_key"]))), "server"
    )
    os.rename(secret, here(p["curve_secret_key"]))
    here(p["curve_authorized_keys"]).mkdir(parents=True)
    zmq.auth.create_certificates(str(here(p["curve_authorized_keys"])), "client1")
    for m in pool["models"]:
        make_mlp(str(here(m["path"])), seed=1)
    here(os.path.dirname(p["oip_tls_cert"])).mkdir(parents=True)
    for pem in (p["oip_tls_cert"], p["oip_tls_key"]):  # poold checks they exist; the
        here(pem).write_text("PEM\n")  # gateway reads them (its own tests use real ones)
    for root in (*p["model_roots"], p["state_dir"]):
        here(root).mkdir(parents=True, exist_ok=True)
    for path in sorted(set(named), key=len, reverse=True):
        text = text.replace(f'"{path}', f'"{here(path)}')
    config = tmp_path / "pool.toml"
    config.write_text(text)
    assert check_config(str(config)) == []


# ------------------------------------------------------------------ the image
def instructions() -> list[tuple[str, str]]:
    text = CONTAINERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_containerfile_copies_what_exists_and_runs_poold() -> None:
    steps = instructions()
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    assert ("ENTRYPOINT", '["poold"]') in steps
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {rest.split()[0] for word, rest in steps if word == "COPY"}
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.removesuffix("*") in copied, f"the image lacks the package {pattern}"
    scripts = project["project"]["scripts"]
    assert scripts["poold"] == "pool.poold:main"
    cmd = dict(steps)["CMD"]
    ds = docs((K8S / "base" / "daemonset.yaml").read_text())[0]
    (c,) = ds["spec"]["template"]["spec"]["containers"]
    assert cmd == '["' + '", "'.join(c["args"]) + '"]'  # the image's default = the pod's
    exposed = {int(x) for word, rest in steps if word == "EXPOSE" for x in rest.split()}
    assert exposed == {p["containerPort"] for p in c["ports"]}
    assert steps[0][0] == "ARG" and "cuda" in steps[0][1] and "runtime" in steps[0][1]
    # the build stage's import check names modules that exist
    check = re.search(r'-c "import ([^"]+)"', CONTAINERFILE.read_text())
    assert check is not None
    for module in check[1].split(", "):
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module
    # .containerignore keeps the venv and the git history out of the build context
    ignore = (ROOT / ".containerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore


def test_the_entry_point_runs() -> None:
    for argv in (["-m", "pool.poold", "--version"], ["-m", "pool.ctl.cli", "--version"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip(), done.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("GPU_POOL_IMAGE_TEST") != "1",
    reason="builds the image (minutes): set GPU_POOL_IMAGE_TEST=1 (needs root, buildah, "
    "debootstrap and a torch wheel directory)",
)
def test_the_image_builds_and_serves() -> None:
    done = subprocess.run(["bash", str(ROOT / "deploy" / "test-image.sh")], timeout=3600)
    assert done.returncode == 0
