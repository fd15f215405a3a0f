"""GPU behaviour: CUDA contexts freed on retire, NVML figures, rolling drain-first.

Needs a CUDA device (and NVML); every test here carries the ``gpu`` marker and skips
without one. The test process itself never touches CUDA: it reads memory through NVML,
as poold does, so its own context cannot disturb the figures.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from modelkit import make_big_factory, make_big_mlp, make_mlp, mlp_input, mlp_reference
from poolkit import Load, running_pool, start_pool, wait_for

from pool.gpu import Gpu

GPU = Gpu()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPU.count() == 0, reason="needs a CUDA device with NVML"),
]
MIB = 1 << 20
HIDDEN, LAYERS = 4096, 16  # 16 x 64 MiB fp32 = 1 GiB of weights


def used(index: int = 0) -> int:
    mem = GPU.memory(index)
    assert mem is not None
    return mem[0]


def big_input(i: int) -> np.ndarray:
    return np.full((1, HIDDEN), (i % 5) * 0.01, np.float32)


@pytest.fixture(scope="module")
def big_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    d = str(tmp_path_factory.mktemp("gpu"))
    os.makedirs(os.path.join(d, "models"))
    a = make_big_mlp(os.path.join(d, "models", "a.pt"), HIDDEN, LAYERS, seed=1)
    b = make_big_mlp(os.path.join(d, "models", "b.pt"), HIDDEN, LAYERS, seed=2)
    return d, a, b


@pytest.mark.parametrize("strategy", ["surge", "drain-first"])
def test_upgrades_of_a_1gib_model_return_every_byte(
    big_models: tuple[str, str, str], strategy: str
) -> None:
    d, a, b = big_models
    tmp = os.path.join(d, strategy)
    baseline = used()
    models = [{"name": "big", "path": a, "version": "a", "devices": ["cuda:0"], "max_batch": 8}]
    # As before hot standbys: each level is the whole device (see test_standby_* below).
    with (
        running_pool(tmp, models, boot_timeout_s=120, standby=False) as pool,
        Load(pool.frontend, "big", 8, make_input=big_input) as load,
    ):
        load.wait_ok(50)
        worker = pool.model("big")["workers"][0]
        assert worker["gpu_bytes"] is None or worker["gpu_bytes"] > 1024 * MIB
        levels = []
        for i in range(10):
            path, version = (b, "b") if i % 2 == 0 else (a, "a")
            res = pool.ctl(
                "upgrade",
                {"model": "big", "path": path, "version": version, "strategy": strategy},
                timeout_s=300,
            )
            assert res["ok"], res
            data = res["data"]
            assert data["strategy"] == strategy
            assert data["memory_back"] is True, data
            freed = data["bytes_freed"]["cuda:0"]
            assert freed > 1024 * MIB, data  # the whole old process: context + weights
            levels.append(used())
            load.wait_ok(10)
        load.stop()
        assert not load.errors, load.errors[:3]
        # Flat across upgrades: every level within 16 MiB of the first.
        assert max(levels) - min(levels) <= 16 * MIB, [x // MIB for x in levels]
    wait_for(lambda: abs(used() - baseline) <= 16 * MIB, 20, "device back to its baseline")


def test_auto_surges_when_the_gpu_has_room(big_models: tuple[str, str, str]) -> None:
    d, a, b = big_models
    models = [{"name": "big", "path": a, "version": "a", "devices": ["cuda:0"]}]
    with running_pool(os.path.join(d, "auto"), models) as pool:
        wait_for(lambda: pool.model("big")["workers"][0]["gpu_bytes"], 10, "NVML footprint")
        res = pool.ctl("upgrade", {"model": "big", "path": b, "version": "b"}, timeout_s=300)
        assert res["ok"] and res["data"]["strategy"] == "surge", res


def test_answers_from_the_gpu_match_the_cpu(tmp_path: object) -> None:
    d = str(tmp_path)
    m = make_mlp(os.path.join(d, "m", "m.pt"), seed=3)
    with running_pool(d, [{"name": "m", "path": m, "devices": ["cuda:0"], "max_batch": 16}]) as p:
        from router.client import Client

        with Client(p.frontend) as c:
            for n in (1, 5, 16):
                x = mlp_input(n, seed=n)
                np.testing.assert_allclose(
                    c.infer("m", x).outputs[0], mlp_reference(3, x), rtol=1e-3, atol=1e-4
                )


def test_sigkill_of_poold_frees_the_gpu(big_models: tuple[str, str, str]) -> None:
    d, a, _ = big_models
    baseline = used()
    pool = start_pool(os.path.join(d, "kill"), [{"name": "big", "path": a, "devices": ["cuda:0"]}])
    try:
        assert used() - baseline > 1024 * MIB
        pool.proc.send_signal(signal.SIGKILL)
        pool.proc.wait(10)
        t0 = time.monotonic()
        wait_for(lambda: abs(used() - baseline) <= 16 * MIB, 10, "GPU memory back")
        assert time.monotonic() - t0 < 5
    finally:
        try:
            os.killpg(pool.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(GPU.count() < 2, reason="needs two GPUs")
def test_drain_first_rolls_across_two_gpus_under_load(big_models: tuple[str, str, str]) -> None:
    d, a, b = big_models
    models = [{"name": "big", "path": a, "version": "a", "devices": ["cuda:0", "cuda:1"]}]
    with (
        running_pool(os.path.join(d, "two"), models) as pool,
        Load(pool.frontend, "big", 16, make_input=big_input) as load,
    ):
        load.wait_ok(100)
        for path, version in ((b, "b"), (a, "a")):
            res = pool.ctl(
                "upgrade",
                {"model": "big", "path": path, "version": version, "strategy": "drain-first"},
                timeout_s=300,
            )
            assert res["ok"], res
            assert set(res["data"]["bytes_freed"]) == {"cuda:0", "cuda:1"}
            load.wait_ok(50)
        load.stop()
        assert not load.errors, load.errors[:3]
        for versions in load.versions:  # a, then b, then a again: never back mid-upgrade
            runs = [v for i, v in enumerate(versions) if i == 0 or versions[i - 1] != v]
            assert runs == ["a", "b", "a"][: len(runs)], runs


# Run in a child so that this process never touches CUDA (see the module docstring).
FAST_PATH_CHECK = """
import sys, torch, safetensors.torch
from workers import weights
path = sys.argv[1]
want = safetensors.torch.load_file(path)
for kwargs in ({}, {"chunk_bytes": (1 << 20) + 3, "threads": 3, "ring_slots": 2}):
    got = weights.load_file(path, "cuda:0", **kwargs)
    assert got.keys() == want.keys(), kwargs
    for name, w in want.items():
        g = got[name]
        assert g.device == torch.device("cuda", 0) and g.is_contiguous(), (name, kwargs)
        assert (g.dtype, g.shape) == (w.dtype, w.shape), (name, kwargs)
        same = torch.equal(g.reshape(-1).view(torch.uint8).cpu(), w.reshape(-1).view(torch.uint8))
        assert same, (name, kwargs)
    del got
print("bit-identical", flush=True)
"""


def test_safetensors_fast_path_is_bit_identical_on_cuda(tmp_path: object) -> None:
    """~256 MiB through workers.weights' pinned ring onto cuda:0, bytes as safetensors has
    them. A 3-byte tensor first leaves every later tensor misaligned for its dtype."""
    layout = [
        ("tag", torch.uint8, (3,)),
        ("w0", torch.float32, (4096, 4096)),
        ("w1", torch.float32, (4096, 4096)),
        ("w2", torch.float32, (4096, 4095)),
        ("half", torch.bfloat16, (4097, 4095)),
        ("f16", torch.float16, (1001, 3)),
        ("i8", torch.int8, (25_000_001,)),
        ("f64", torch.float64, (1_000_003,)),
        ("scalar", torch.float32, ()),
        ("none", torch.float32, (0, 7)),
    ]
    names = {
        torch.uint8: "U8",
        torch.float32: "F32",
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.int8: "I8",
        torch.float64: "F64",
    }
    g = torch.Generator().manual_seed(0)
    header: dict[str, object] = {}
    blobs, pos = [], 0
    for name, dtype, shape in layout:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        blobs.append(torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes())
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    assert pos > 250 * MIB
    path = os.path.join(str(tmp_path), "big.safetensors")
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for blob in blobs:
            f.write(blob)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    res = subprocess.run(
        [sys.executable, "-c", FAST_PATH_CHECK, path],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and "bit-identical" in res.stdout, res.stderr[-3000:]


def level_without_standby(pool: object) -> tuple[int, int | None]:
    """(device used - the waiting standby's own NVML bytes, its pid), read together, once
    a standby waits: the level the retire proof compares (pool.standby)."""
    sb = wait_for(
        lambda: [
            s
            for s in pool.status()["standby"]["standbys"]  # type: ignore[attr-defined]
            if s["device"] == "cuda:0" and s["state"] == "waiting"
        ],
        60,
        "a waiting standby",
    )[0]
    procs = GPU.process_bytes(0) or {}
    return used() - procs.get(sb["pid"], 0), sb["pid"]


@pytest.mark.parametrize(
    "strategy,fmt", [("surge", "pt"), ("drain-first", "pt"), ("drain-first", "safetensors")]
)
def test_standby_retire_proof_returns_every_byte(
    big_models: tuple[str, str, str], strategy: str, fmt: str
) -> None:
    """With a hot standby on the device: every upgrade starts in it (drain-first stages
    the weights on the host first), the retire proof holds, model memory stays flat,
    and stopping poold gives the device back to its baseline (standbys included)."""
    d, a, b = big_models
    if fmt == "safetensors":
        a = make_big_factory(os.path.join(d, "models", "fa"), HIDDEN, LAYERS, seed=1)
        b = make_big_factory(os.path.join(d, "models", "fb"), HIDDEN, LAYERS, seed=2)
    tmp = os.path.join(d, f"standby-{strategy}-{fmt}")
    baseline = used()
    models = [{"name": "big", "path": a, "version": "a", "devices": ["cuda:0"], "max_batch": 8}]
    with (
        running_pool(
            tmp, models, boot_timeout_s=120, standby=True, model_roots=[os.path.join(d, "models")]
        ) as pool,
        Load(pool.frontend, "big", 8, make_input=big_input) as load,
    ):
        load.wait_ok(50)
        levels = [level_without_standby(pool)[0]]
        for i in range(4):
            path, version = (b, "b") if i % 2 == 0 else (a, "a")
            _, standby_pid = level_without_standby(pool)
            res = pool.ctl(
                "upgrade",
                {"model": "big", "path": path, "version": version, "strategy": strategy},
                timeout_s=300,
            )
            assert res["ok"], res
            data = res["data"]
            assert data["pids_started"] == [standby_pid], data
            assert data["standby"] == {"taken": 1, "staged": strategy == "drain-first"}, data
            assert data["memory_back"] is True, data
            assert data["bytes_freed"]["cuda:0"] > 1024 * MIB, data
            levels.append(level_without_standby(pool)[0])
            load.wait_ok(10)
        load.stop()
        assert not load.errors, load.errors[:3]
        assert max(levels) - min(levels) <= 16 * MIB, [x // MIB for x in levels]
    wait_for(lambda: abs(used() - baseline) <= 16 * MIB, 20, "device back to its baseline")


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_crash_replacement_from_a_preloaded_standby(
    big_models: tuple[str, str, str], fmt: str
) -> None:
    """The standby holds the serving version on the host (pool.preload, pinned): a
    kill -9 of the worker is replaced from it (no read of the file), it answers as the
    dead one did, and model memory on the device is where it was."""
    d, a, _ = big_models
    if fmt == "safetensors":
        a = make_big_factory(os.path.join(d, "models", "pa"), HIDDEN, LAYERS, seed=1)
    tmp = os.path.join(d, f"preload-{fmt}")
    models = [{"name": "big", "path": a, "version": "a", "devices": ["cuda:0"], "max_batch": 8}]
    with running_pool(
        tmp, models, boot_timeout_s=120, standby=True, standby_preload=True,
        model_roots=[os.path.join(d, "models")],
    ) as pool:  # fmt: skip

        def preloaded() -> list[dict[str, object]]:
            return [
                s
                for s in pool.status()["standby"]["standbys"]
                if s["state"] == "waiting" and (s.get("preload") or {}).get("state") == "loaded"
            ]

        sb = wait_for(preloaded, 120, "a standby holding version a")[0]
        with pool.client() as c:
            want = c.infer("big", big_input(3)).outputs[0]
        level = level_without_standby(pool)[0]
        (old,) = [w for w in pool.model("big")["workers"] if w["state"] == "ready"]
        os.kill(old["pid"], signal.SIGKILL)
        new = wait_for(
            lambda: [
                w
                for w in pool.model("big")["workers"]
                if w["state"] == "ready" and w["pid"] != old["pid"]
            ],
            120,
            "the replacement",
        )[0]
        assert new["pid"] == sb["pid"] and new["preloaded"], new
        with pool.client() as c:
            got = c.infer("big", big_input(3)).outputs[0]
        assert np.array_equal(got, want)
        wait_for(preloaded, 120, "the next standby holding version a")
        assert abs(level_without_standby(pool)[0] - level) <= 16 * MIB
