"""The two model versions a stress run swaps between, and how to tell their answers apart.

``model_set`` has a child process write them (``python stresskit.py make-models DIR
SIZE``), so the driver never imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a plain script from anywhere: find pool/, router/, workers/
    sys.path.insert(0, ROOT)

STRESSKIT = os.path.join(HERE, "stresskit.py")  # the children's entry point
SIZES = {"small": (16, 32, 4, 1), "1gib": (4096, 4096, 4096, 16)}  # in, hidden, out, layers
VERSIONS = ("1", "2")


@dataclass
class ModelSet:
    dir: str
    paths: tuple[str, str]
    versions: tuple[str, str]
    x: np.ndarray  # the input every client sends
    refs: dict[str, np.ndarray]  # version -> expected output for x


def model_set(directory: str, size: str) -> ModelSet:
    """Two versions of a model in ``directory``, written by a child unless already there."""
    marker = os.path.join(directory, "stress-models.json")
    try:
        with open(marker) as f:
            fresh = json.load(f).get("size") != size
    except (OSError, ValueError):
        fresh = True
    if fresh:
        os.makedirs(directory, exist_ok=True)
        subprocess.run([sys.executable, STRESSKIT, "make-models", directory,
                        size], check=True)
    with np.load(os.path.join(directory, "refs.npz")) as refs:
        x, outs = refs["x"], {v: refs[f"out{v}"] for v in VERSIONS}
    paths = (os.path.join(directory, "v1.pt"), os.path.join(directory, "v2.pt"))
    return ModelSet(directory, paths, VERSIONS, x, outs)


def make_models(directory: str, size: str) -> None:
    """Child process: write v1.pt / v2.pt (TorchScript), their manifests and refs.npz."""
    import torch

    from workers.manifest import GoldenCase, InputSpec, write_manifest

    n_in, hidden, n_out, layers = SIZES[size]
    os.makedirs(directory, exist_ok=True)
    x = np.random.default_rng(0).random((1, n_in), dtype=np.float32)
    refs: dict[str, np.ndarray] = {"x": x}
    for i, version in enumerate(VERSIONS):
        gen = torch.Generator().manual_seed(1000 + i)
        blocks: list[torch.nn.Module] = []
        dims = [n_in] + [hidden] * layers + [n_out] if size == "small" else [hidden] * (layers + 1)
        with torch.no_grad():
            for j, (a, b) in enumerate(zip(dims, dims[1:], strict=False)):
                with torch.device("meta"):  # no default init over a GiB of weights
                    lin = torch.nn.Linear(a, b)
                lin = lin.to_empty(device="cpu")
                lin.weight.normal_(0.0, (2.0 / a) ** 0.5, generator=gen)
                lin.bias.normal_(0.0, 0.1, generator=gen)
                blocks.append(lin)
                if size == "1gib" or j < len(dims) - 2:
                    blocks.append(torch.nn.ReLU())
        net = torch.nn.Sequential(*blocks).eval()
        path = os.path.join(directory, f"v{version}.pt")
        torch.jit.script(net).save(path)
        with torch.inference_mode():
            out = net(torch.from_numpy(x)).numpy()
        refs[f"out{version}"] = out
        golden = None
        if size == "small":
            golden = [GoldenCase([x], [out])]
        write_manifest(os.path.join(directory, f"v{version}.toml"),
                       inputs=[InputSpec("float32", (1, n_in))],
                       warmup_batch_sizes=(1, 4) if size == "small" else (1,), golden=golden)
        del net, blocks
    np.savez(os.path.join(directory, "refs.npz"), **refs)  # type: ignore[arg-type]
    with open(os.path.join(directory, "stress-models.json"), "w") as f:
        json.dump({"size": size, "torch": torch.__version__}, f)


def output_problem(refs: dict[str, np.ndarray], version: str, out: np.ndarray) -> str | None:
    """Why an answer is wrong for the version that claims it, or None."""
    if not version:
        return "the answer names no version"
    ref = refs.get(version)
    if ref is None:
        return f"unknown version {version!r}"
    # Loose enough for a GPU's arithmetic, far too tight for the other version's weights.
    tol = 1e-2 * (float(np.abs(ref).max()) + 1e-6)
    if out.shape != ref.shape or not np.allclose(out, ref, rtol=1e-2, atol=tol):
        return f"output does not match version {version}"
    return None
