"""workers.demo: the built-in demo model, its manifests and its idempotent creation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from workers.demo import demo_input, make_demo_models
from workers.loader import load_model
from workers.manifest import InputSpec, load_manifest
from workers.warmup import example_inputs, validate, warm_up

CPU = torch.device("cpu")


def _stats(directory: Path) -> dict[str, tuple[int, int]]:
    stats = {n: os.stat(directory / n) for n in os.listdir(directory)}
    return {n: (s.st_ino, s.st_mtime_ns) for n, s in stats.items()}


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_demo_models_load_warm_and_validate(tmp_path: Path) -> None:
    made = make_demo_models(str(tmp_path / "demo"))
    assert made == [
        ("1", str(tmp_path / "demo" / "demo-v1.pt")),
        ("2", str(tmp_path / "demo" / "demo-v2.pt")),
    ]
    assert sorted(os.listdir(tmp_path / "demo")) == [
        "demo-v1.golden.npz",
        "demo-v1.pt",
        "demo-v1.toml",
        "demo-v2.golden.npz",
        "demo-v2.pt",
        "demo-v2.toml",
    ]
    answers = []
    for _, path in made:
        manifest = load_manifest(path)
        assert manifest is not None and manifest.path == os.path.splitext(path)[0] + ".toml"
        assert manifest.inputs == (InputSpec("float32", (1, 16)),)
        assert manifest.warmup_batch_sizes == (1, 8)
        model = load_model(path, CPU)
        assert (model.format, model.num_inputs) == ("torchscript", 1)
        assert warm_up(model, example_inputs(manifest, None, CPU)) >= 0.0
        assert validate(model, manifest) == 2
        (out,) = model.forward([torch.from_numpy(demo_input(3))])
        assert out.dtype == torch.float32 and out.shape == (3, 4)
        answers.append(out.numpy())
    # the versions are told apart by their answers
    assert np.abs(answers[0] - answers[1]).min() > 1e-3


def test_demo_is_idempotent(tmp_path: Path) -> None:
    make_demo_models(str(tmp_path))
    before = _stats(tmp_path)
    make_demo_models(str(tmp_path))
    assert _stats(tmp_path) == before


def test_demo_repairs_an_invalid_manifest_only_where_needed(tmp_path: Path) -> None:
    make_demo_models(str(tmp_path))
    (tmp_path / "demo-v1.toml").write_text("warmup_batch_sizes = [0]\n")
    v2_before = {n: s for n, s in _stats(tmp_path).items() if n.startswith("demo-v2")}
    make_demo_models(str(tmp_path))
    manifest = load_manifest(str(tmp_path / "demo-v1.pt"))
    assert manifest is not None and len(manifest.golden) == 2
    assert {n: s for n, s in _stats(tmp_path).items() if n.startswith("demo-v2")} == v2_before


@pytest.mark.parametrize("missing", ["demo-v2.pt", "demo-v2.golden.npz", "demo-v2.toml"])
def test_demo_rewrites_a_version_with_a_missing_file(tmp_path: Path, missing: str) -> None:
    make_demo_models(str(tmp_path))
    os.remove(tmp_path / missing)
    (_, _), (_, path) = make_demo_models(str(tmp_path))
    manifest = load_manifest(path)
    assert manifest is not None
    assert validate(load_model(path, CPU), manifest) == 2


def test_demo_files_are_deterministic(tmp_path: Path) -> None:
    first = make_demo_models(str(tmp_path / "a"))
    second = make_demo_models(str(tmp_path / "b"))
    for (_, p), (_, q) in zip(first, second, strict=True):
        assert _digest(p) == _digest(q)
    assert _digest(first[0][1]) != _digest(first[1][1])


def test_demo_leaves_no_temporary_files(tmp_path: Path) -> None:
    make_demo_models(str(tmp_path))
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_demo_input() -> None:
    x = demo_input()
    assert x.shape == (1, 16) and x.dtype == np.float32
    eight = demo_input(8)
    assert eight.shape == (8, 16)
    assert np.array_equal(eight[:1], x) and np.array_equal(demo_input(8), eight)
    assert len(np.unique(eight.round(4), axis=0)) == 8  # rows differ
    assert demo_input(0).shape == (0, 16)
    with pytest.raises(ValueError, match="n must be >= 0"):
        demo_input(-1)
