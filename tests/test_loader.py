"""workers.loader and workers.warmup: every format, output normalisation, every error
path, warm-up and golden validation."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import struct
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from modelkit import (
    make_big_mlp,
    make_corrupt,
    make_factory_model,
    make_golden_mismatch,
    make_mlp,
    make_raising_forward,
    make_two_input,
    mlp_input,
    mlp_reference,
)

from pool.contract import ContractError, InputSignature
from workers import weights
from workers.loader import (
    LoadedModel,
    ModelLoadError,
    ModelOutputError,
    describe_error,
    load_model,
)
from workers.manifest import GoldenCase, InputSpec, Manifest, load_manifest, write_manifest
from workers.warmup import (
    ValidationError,
    WarmupError,
    example_inputs,
    validate,
    warm_up,
)

CPU = torch.device("cpu")
TOL = {"rtol": 1e-5, "atol": 1e-6}


class _Marker:
    """Unpickling this creates a file: proof, when the file is absent, that no pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[pathlib.Path]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _answer(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    (out,) = model.forward([torch.from_numpy(x)])
    return out.numpy()


# ---------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("ext", [".pt", ".pth", ".ts", ".torchscript"])
def test_torchscript_every_extension(tmp_path: Path, ext: str) -> None:
    path = str(tmp_path / f"m{ext}")
    make_mlp(path, seed=5, manifest=False)
    model = load_model(path, CPU)
    assert (model.format, model.num_inputs, model.device, model.path) == (
        "torchscript",
        1,
        CPU,
        path,
    )
    assert isinstance(model.module, torch.jit.ScriptModule)
    assert not model.module.training
    x = mlp_input(3)
    np.testing.assert_allclose(_answer(model, x), mlp_reference(5, x), **TOL)


def test_device_may_be_a_string(tmp_path: Path) -> None:
    model = load_model(make_mlp(str(tmp_path / "m.pt"), 1, manifest=False), "cpu")
    assert model.device == CPU


def test_tuple_output_becomes_list(tmp_path: Path) -> None:
    model = load_model(make_two_input(str(tmp_path / "two.pt")), CPU)
    assert model.num_inputs == 2
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 5.0]])
    out = model.forward([a, b])
    assert isinstance(out, list) and len(out) == 2
    assert torch.equal(out[0], a + b) and torch.equal(out[1], a * b)


class _Optional(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x if y is None else x + y


def test_torchscript_optional_argument_makes_count_unknown(tmp_path: Path) -> None:
    path = str(tmp_path / "opt.pt")
    torch.jit.script(_Optional()).save(path)
    model = load_model(path, CPU)
    assert model.num_inputs is None
    assert torch.equal(model.forward([torch.ones(1)])[0], torch.ones(1))


def test_corrupt_torchscript(tmp_path: Path) -> None:
    path = make_corrupt(str(tmp_path / "bad.pt"))
    with pytest.raises(ModelLoadError, match=f"^{path}: cannot load as TorchScript: "):
        load_model(path, CPU)


def test_pickled_checkpoint_named_pt_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = str(tmp_path / "unpickled")
    path = str(tmp_path / "ckpt.pt")
    torch.save({"w": torch.ones(2), "evil": _Marker(marker)}, path)
    with pytest.raises(ModelLoadError, match="cannot load as TorchScript"):
        load_model(path, CPU)
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- torch.export


class _Exportable(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.linear = torch.nn.Linear(6, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(2, 6, generator=gen))
            self.linear.bias.copy_(torch.randn(2, generator=gen))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.linear(x)), x.sum(1) * y


def _save_export(path: str) -> _Exportable:
    module = _Exportable().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        module,
        (torch.randn(2, 6), torch.randn(2)),
        dynamic_shapes=({0: batch}, {0: batch}),
    )
    torch.export.save(program, path)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> str:
    # Exporting is slow (seconds, the first time); tests share one archive and copy it.
    path = str(tmp_path_factory.mktemp("export") / "m.pt2")
    _save_export(path)
    return path


@pytest.mark.slow
def test_export_format(exported: str) -> None:
    path = exported
    reference = _Exportable().eval()
    model = load_model(path, CPU)
    assert (model.format, model.num_inputs) == ("export", 2)
    x, y = torch.randn(5, 6), torch.randn(5)
    out = model.forward([x, y])
    with torch.no_grad():
        expected = reference(x, y)
    assert len(out) == 2
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, **TOL)


def _rewrite_zip(src: str, dst: str, edit: dict[str, bytes | None]) -> None:
    """Copy a zip, replacing (or, for None, dropping) members whose name ends with a key."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, replacement in edit.items():
                if info.filename.endswith(suffix):
                    data = replacement  # type: ignore[assignment]
            if data is not None:
                zout.writestr(info, data)


def test_export_with_pickled_weights_is_refused(tmp_path: Path, exported: str) -> None:
    src = exported
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(z.read(name))
    for meta in config["config"].values():
        meta["use_pickle"] = True
    path = str(tmp_path / "pickled.pt2")
    _rewrite_zip(src, path, {"model_weights_config.json": json.dumps(config).encode()})
    with pytest.raises(ModelLoadError, match=r"linear\.\w+ in data/weights/.* pickle; refused"):
        load_model(path, CPU)


def test_export_with_unsafe_embedded_pt_is_refused_without_unpickling(
    tmp_path: Path, exported: str
) -> None:
    # torch.export.load retries a failed weights_only load with full pickle; the loader
    # must refuse before that can happen.
    src = exported
    marker = str(tmp_path / "unpickled")
    evil = str(tmp_path / "evil.pt")
    torch.save((_Marker(marker),), evil)
    with open(evil, "rb") as f:
        payload = f.read()
    path = str(tmp_path / "evil.pt2")
    _rewrite_zip(src, path, {"data/sample_inputs/model.pt": payload})
    with pytest.raises(ModelLoadError, match="sample_inputs/model.pt needs unrestricted pickle"):
        load_model(path, CPU)
    assert not os.path.exists(marker)


def test_export_old_layout_is_refused(tmp_path: Path, exported: str) -> None:
    src = exported
    path = str(tmp_path / "old.pt2")
    _rewrite_zip(src, path, {"archive_format": None})
    with pytest.raises(ModelLoadError, match="not a PT2 archive .* refused"):
        load_model(path, CPU)


def test_corrupt_export(tmp_path: Path) -> None:
    path = make_corrupt(str(tmp_path / "bad.pt2"))
    with pytest.raises(ModelLoadError, match=f"^{path}: not a readable .pt2"):
        load_model(path, CPU)


# ---------------------------------------------------------------- factory + safetensors


def test_factory_format(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=9)
    model = load_model(path, CPU)
    assert (model.format, model.num_inputs) == ("safetensors", 1)
    assert not model.module.training
    tensors = list(model.module.parameters()) + list(model.module.buffers())
    assert tensors and all(t.device == CPU and not t.is_meta for t in tensors)
    x = mlp_input(4)
    np.testing.assert_allclose(_answer(model, x), mlp_reference(9, x), **TOL)


def test_factory_uses_given_manifest_over_disk(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=9)
    os.rename(tmp_path / "f" / "net.py", tmp_path / "f" / "other.py")
    with pytest.raises(ModelLoadError, match="net.py does not exist"):
        load_model(path, CPU)
    model = load_model(path, CPU, Manifest(path="x", factory="other.py:build"))
    x = mlp_input(2)
    np.testing.assert_allclose(_answer(model, x), mlp_reference(9, x), **TOL)


def test_two_factories_in_one_process_stay_apart(tmp_path: Path) -> None:
    plain = load_model(make_factory_model(str(tmp_path / "a"), 1), CPU)
    picky = load_model(make_factory_model(str(tmp_path / "b"), 2, forward="raise_if_negative"), CPU)
    negative = -np.ones((1, 16), np.float32)
    np.testing.assert_allclose(_answer(plain, negative), mlp_reference(1, negative), **TOL)
    with pytest.raises(ValueError, match="negative input"):
        _answer(picky, negative)
    assert type(plain.module).__module__ != type(picky.module).__module__


def _factory_dir(tmp_path: Path, net_source: str, factory: str = "net.py:build") -> str:
    """A factory model dir with modelkit's weights and a custom net.py."""
    path = make_factory_model(str(tmp_path / "f"), seed=1)
    (tmp_path / "f" / "net.py").write_text(net_source)
    write_manifest(str(tmp_path / "f" / "model.toml"), factory=factory)
    return path


NET_OK = """
import torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    def forward(self, x):
        return self.body(x)
def build():
    return Net()
"""


@pytest.mark.parametrize(
    ("net_source", "factory", "message"),
    [
        (NET_OK, "missing.py:build", r"factory file .*missing.py does not exist"),
        (NET_OK, "../net.py:build", "factory file '../net.py' is outside the model directory"),
        (NET_OK, "net.py:make", "has no callable 'make'"),
        (NET_OK + "make = 3\n", "net.py:make", "has no callable 'make'"),
        ("def build(:\n", "net.py:build", r"failed to import: SyntaxError"),
        ("import no_such_module_xyz\n", "net.py:build", "failed to import: ModuleNotFoundError"),
        (
            "def build():\n    raise RuntimeError('no GPU here')\n",
            "net.py:build",
            r"factory net.py:build raised: RuntimeError: no GPU here",
        ),
        ("def build():\n    return 42\n", "net.py:build", "returned int, not a torch.nn.Module"),
        (
            NET_OK.replace("Linear(32, 4)", "Linear(32, 5)"),
            "net.py:build",
            r"weights do not fit .*size mismatch for body.2.weight",
        ),
        (
            NET_OK.replace("torch.nn.ReLU(), torch.nn.Linear(32, 4)", "torch.nn.ReLU()"),
            "net.py:build",
            r"weights do not fit .*Unexpected key\(s\) in state_dict: .*body.2.weight",
        ),
        (
            NET_OK.replace(
                "super().__init__()",
                "super().__init__()\n        self.extra = torch.nn.Linear(2, 2)",
            ),
            "net.py:build",
            r"weights do not fit .*Missing key\(s\) in state_dict: .*extra.weight",
        ),
        (
            NET_OK.replace(
                "super().__init__()",
                "super().__init__()\n"
                "        self.register_buffer('scale', torch.ones(4), persistent=False)",
            ),
            "net.py:build",
            "scale not set by the weights file .*non-persistent buffers",
        ),
    ],
)
def test_factory_errors(tmp_path: Path, net_source: str, factory: str, message: str) -> None:
    path = _factory_dir(tmp_path, net_source, factory)
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(path, CPU)
    assert str(info.value).startswith(f"{path}: ")


def test_factory_outside_via_symlink_is_refused(tmp_path: Path) -> None:
    path = _factory_dir(tmp_path, NET_OK)
    (tmp_path / "outside.py").write_text(NET_OK)
    os.remove(tmp_path / "f" / "net.py")
    os.symlink(tmp_path / "outside.py", tmp_path / "f" / "net.py")
    with pytest.raises(ModelLoadError, match="outside the model directory"):
        load_model(path, CPU)


def test_factory_import_failure_leaves_no_module_behind(tmp_path: Path) -> None:
    import sys

    before = set(sys.modules)
    path = _factory_dir(tmp_path, "raise ImportError('nope')\n")
    with pytest.raises(ModelLoadError, match="failed to import: ImportError: nope"):
        load_model(path, CPU)
    assert {m for m in set(sys.modules) - before if m.startswith("_gpu_pool_factory")} == set()


def test_safetensors_without_manifest(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=1)
    os.remove(tmp_path / "f" / "model.toml")
    with pytest.raises(ModelLoadError, match="needs a manifest with factory"):
        load_model(path, CPU)


def test_safetensors_manifest_without_factory(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=1)
    write_manifest(str(tmp_path / "f" / "model.toml"), rtol=0.1)
    with pytest.raises(ModelLoadError, match="needs a manifest with factory"):
        load_model(path, CPU)


def test_safetensors_bad_manifest(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=1)
    (tmp_path / "f" / "model.toml").write_text("factory = 'net.py'\n")
    with pytest.raises(ModelLoadError, match=r"bad manifest: .*model.toml: factory: must look"):
        load_model(path, CPU)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=1)
    make_corrupt(path)
    with pytest.raises(ModelLoadError, match=f"^{path}: cannot read safetensors weights"):
        load_model(path, CPU)


def test_missing_key_in_weights(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=1)
    state = safetensors.torch.load_file(path)
    del state["body.2.bias"]
    safetensors.torch.save_file(state, path)
    with pytest.raises(ModelLoadError, match=r"Missing key\(s\) in state_dict: \"body.2.bias\""):
        load_model(path, CPU)


def test_variadic_forward_count_is_unknown(tmp_path: Path) -> None:
    source = NET_OK.replace("def forward(self, x):", "def forward(self, *xs):").replace(
        "self.body(x)", "self.body(xs[0])"
    )
    model = load_model(_factory_dir(tmp_path, source), CPU)
    assert model.num_inputs is None
    assert model.forward([torch.zeros(1, 16)])[0].shape == (1, 4)


@pytest.mark.parametrize(
    ("signature", "expected"),
    [("x, y", 2), ("x, y=None", None), ("x, *, scale", None), ("x, *, scale=1.0", 1)],
)
def test_signature_counts(tmp_path: Path, signature: str, expected: int | None) -> None:
    source = NET_OK.replace("def forward(self, x):", f"def forward(self, {signature}):")
    assert load_model(_factory_dir(tmp_path, source), CPU).num_inputs == expected


# ---------------------------------------------------------------- safetensors reader

ST_NAME = {dtype: name for name, dtype in weights.DTYPES.items()}
# Stored in this order, one after the other: odd byte counts put most tensors at offsets
# that are not a multiple of their element size.
ODD_TENSORS: list[tuple[str, torch.dtype, tuple[int, ...]]] = [
    ("u8", torch.uint8, (3,)),
    ("f32", torch.float32, (5, 7)),
    ("flag", torch.bool, (7,)),
    ("f64_scalar", torch.float64, ()),
    ("i16", torch.int16, (3, 3)),
    ("bf16", torch.bfloat16, (11,)),
    ("i8", torch.int8, (1,)),
    ("f16", torch.float16, (2, 3, 5)),
    ("c64", torch.complex64, (3,)),
    ("empty", torch.float32, (0, 4)),
    ("i64", torch.int64, (5,)),
    ("u16", torch.uint16, (9,)),
    ("u32", torch.uint32, (3,)),
    ("u64", torch.uint64, (2,)),
    ("e4m3", torch.float8_e4m3fn, (13,)),
    ("e5m2", torch.float8_e5m2, (4,)),
    ("e4m3fnuz", torch.float8_e4m3fnuz, (3,)),
    ("e5m2fnuz", torch.float8_e5m2fnuz, (3,)),
    ("e8m0", torch.float8_e8m0fnu, (6,)),
    ("i32", torch.int32, (1,)),
    ("big", torch.float32, (301,)),  # spans many chunks when they are small
    ("f32_tail", torch.float32, (2, 1)),
]


def _random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bytes (NaNs and all) reinterpreted as ``dtype``; bools stay 0 or 1."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 2 if dtype == torch.bool else 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _st_bytes(tensors: list[tuple[str, torch.Tensor]]) -> tuple[dict[str, Any], bytes]:
    """Header entries and data region for ``tensors`` stored in the given order, unpadded
    (safetensors.torch.save_file would sort them by alignment)."""
    entries: dict[str, Any] = {}
    data = bytearray()
    for name, t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        entries[name] = {
            "dtype": ST_NAME[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return entries, bytes(data)


def _write_st(path: Path, header: object, data: bytes) -> str:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


def _odd_file(path: Path) -> str:
    tensors = [(n, _random_tensor(d, s, i)) for i, (n, d, s) in enumerate(ODD_TENSORS)]
    entries, data = _st_bytes(tensors)
    return _write_st(path, {"__metadata__": {"format": "pt"}, **entries}, data)


def _assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name].cpu()
        assert (g.dtype, g.shape, g.is_contiguous()) == (w.dtype, w.shape, True), name
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), name


def test_read_header_of_a_safetensors_file(tmp_path: Path) -> None:
    path = str(tmp_path / "w.safetensors")
    safetensors.torch.save_file(
        {"b": torch.zeros(2, 3), "a": torch.ones(4, dtype=torch.int8)}, path, {"k": "v"}
    )
    header = weights.read_header(path)
    (n,) = struct.unpack("<Q", Path(path).read_bytes()[:8])
    assert (header.data_start, header.data_size) == (8 + n, 24 + 4)
    assert header.metadata == {"k": "v"}
    assert [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors] == [
        ("b", torch.float32, (2, 3), 24),
        ("a", torch.int8, (4,), 4),
    ]


def test_reader_is_bit_identical_to_safetensors_with_misaligned_offsets(tmp_path: Path) -> None:
    path = _odd_file(tmp_path / "odd.safetensors")
    header = weights.read_header(path)
    assert any(t.begin % t.dtype.itemsize for t in header.tensors)  # really misaligned
    want = safetensors.torch.load_file(path)
    got = weights.load_file(path, CPU)
    _assert_bit_identical(got, want)
    ptrs = [t.untyped_storage().data_ptr() for t in got.values() if t.numel()]
    assert len(set(ptrs)) == len(ptrs)  # each tensor owns its storage, as with safetensors


@pytest.mark.parametrize(
    ("chunk_bytes", "threads", "ring_slots"),
    [(1, 1, 1), (3, 2, 2), (7, 3, 4), (64, 4, 6), (100, 8, 2), (1 << 20, 4, 6)],
)
def test_chunked_reads_are_bit_identical(
    tmp_path: Path, chunk_bytes: int, threads: int, ring_slots: int
) -> None:
    path = _odd_file(tmp_path / "odd.safetensors")
    got = weights.load_file(
        path, "cpu", chunk_bytes=chunk_bytes, threads=threads, ring_slots=ring_slots
    )
    _assert_bit_identical(got, safetensors.torch.load_file(path))
    assert not [t for t in threading.enumerate() if t.name.startswith("weights")]


def test_a_file_saved_by_safetensors_is_read_the_same(tmp_path: Path) -> None:
    path = str(tmp_path / "saved.safetensors")
    tensors = {n: _random_tensor(d, s, i) for i, (n, d, s) in enumerate(ODD_TENSORS)}
    safetensors.torch.save_file(tensors, path)
    for chunk in (5, 1 << 20):
        _assert_bit_identical(weights.load_file(path, CPU, chunk_bytes=chunk), tensors)


def test_files_without_data(tmp_path: Path) -> None:
    path = _write_st(tmp_path / "none.safetensors", {}, b"")
    assert weights.load_file(path, CPU) == {}
    entries, data = _st_bytes(
        [("e", torch.zeros(0, 2)), ("s", torch.zeros(3, 0, dtype=torch.int8))]
    )
    got = weights.load_file(_write_st(tmp_path / "empty.safetensors", entries, data), CPU)
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {
        "e": ((0, 2), torch.float32),
        "s": ((3, 0), torch.int8),
    }


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    specs=hst.lists(
        hst.tuples(
            hst.sampled_from(sorted(weights.DTYPES, key=str)),
            hst.lists(hst.integers(0, 9), max_size=3),
        ),
        max_size=12,
    ),
    chunk_bytes=hst.integers(1, 200),
    threads=hst.integers(1, 4),
    ring_slots=hst.integers(1, 5),
)
def test_any_layout_and_chunking_is_bit_identical(
    tmp_path_factory: pytest.TempPathFactory,
    specs: list[tuple[str, list[int]]],
    chunk_bytes: int,
    threads: int,
    ring_slots: int,
) -> None:
    tensors = [
        (f"t{i}", _random_tensor(weights.DTYPES[name], tuple(shape), i))
        for i, (name, shape) in enumerate(specs)
    ]
    entries, data = _st_bytes(tensors)
    path = _write_st(tmp_path_factory.mktemp("st") / "h.safetensors", entries, data)
    got = weights.load_file(
        path, CPU, chunk_bytes=chunk_bytes, threads=threads, ring_slots=ring_slots
    )
    _assert_bit_identical(got, safetensors.torch.load_file(path))


def _u8(begin: int, end: int, shape: list[Any] | None = None) -> dict[str, Any]:
    return {
        "dtype": "U8",
        "shape": [end - begin] if shape is None else shape,
        "data_offsets": [begin, end],
    }


BAD_HEADERS: list[tuple[str, object, bytes, str]] = [
    ("not an object", [1, 2], b"", "header is not a JSON object"),
    ("entry not an object", {"a": 3}, b"", "tensor 'a': entry is not a JSON object"),
    ("missing key", {"a": {"dtype": "U8", "shape": [1]}}, b"x", "missing data_offsets"),
    ("extra key", {"a": {**_u8(0, 1), "x": 1}}, b"x", "unknown x"),
    (
        "unknown dtype",
        {"a": {**_u8(0, 1), "dtype": "F6_E2M3"}},
        b"x",
        "unsupported dtype 'F6_E2M3'",
    ),
    ("dtype not a string", {"a": {**_u8(0, 1), "dtype": 4}}, b"x", "unsupported dtype 4"),
    ("negative dim", {"a": _u8(0, 1, [-1])}, b"x", r"shape must be .* got \[-1\]"),
    ("float dim", {"a": _u8(0, 1, [1.0])}, b"x", r"shape must be .* got \[1.0\]"),
    ("bool dim", {"a": _u8(0, 1, [True])}, b"x", r"shape must be .* got \[True\]"),
    (
        "huge dim",
        {"a": _u8(0, 0, [0, 2**63])},
        b"",
        r"shape must be .* got \[0, 9223372036854775808\]",
    ),
    ("shape not a list", {"a": {**_u8(0, 1), "shape": 1}}, b"x", "shape must be"),
    ("one offset", {"a": {**_u8(0, 1), "data_offsets": [1]}}, b"x", "two non-negative integers"),
    ("string offset", {"a": {**_u8(0, 1), "data_offsets": [0, "1"]}}, b"x", "two non-negative"),
    ("negative offset", {"a": {**_u8(0, 1), "data_offsets": [-1, 0]}}, b"x", "two non-negative"),
    ("reversed offsets", {"a": {**_u8(0, 1), "data_offsets": [1, 0]}}, b"x", "end before they"),
    (
        "dtype x shape mismatch",
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
        b"abcd",
        r"F32 x \[2\] is 8 bytes but data_offsets \[0, 4\] hold 4",
    ),
    ("offsets out of range", {"a": _u8(0, 8)}, b"abcd", r"\[0, 8\] run past the end of the data"),
    ("far out of range", {"a": _u8(2**62, 2**62 + 1)}, b"", "run past the end of the data"),
    ("overlap", {"a": _u8(0, 4), "b": _u8(2, 6)}, b"abcdef", r"'b'.* overlap tensor 'a' \[0, 4\]"),
    ("duplicate range", {"a": _u8(0, 2), "b": _u8(0, 2)}, b"ab", "overlap tensor"),
    ("gap", {"a": _u8(0, 2), "b": _u8(3, 5)}, b"abcde", "leave a gap of 1 bytes"),
    ("gap at the start", {"a": _u8(1, 2)}, b"ab", "leave a gap of 1 bytes"),
    ("trailing bytes", {"a": _u8(0, 2)}, b"abc", "1 bytes after the last tensor"),
    ("untensored data", {}, b"abc", "3 bytes after the last tensor"),
    ("metadata not strings", {"__metadata__": {"k": 1}}, b"", "__metadata__"),
    ("metadata not a map", {"__metadata__": ["k"]}, b"", "__metadata__"),
]


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [pytest.param(h, d, m, id=i) for i, h, d, m in BAD_HEADERS],
)
def test_bad_headers_are_refused(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    path = _write_st(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(weights.SafetensorsError, match=message):
        weights.read_header(path)
    with pytest.raises(weights.SafetensorsError, match=message):
        weights.load_file(path, CPU)


def _framed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "file is 0 bytes, too short for the 8-byte header length"),
        (b"\x01\x00\x00", "file is 3 bytes, too short"),
        (struct.pack("<Q", 200_000_000) + b"{}", "header length 200000000 is over the "),
        (struct.pack("<Q", 2**64 - 1), "is over the 100000000-byte limit"),
        (struct.pack("<Q", 10) + b"{}", r"header length 10 runs past the end of the file \(10 "),
        (_framed(b"\xff\xfe"), "header is not UTF-8"),
        (_framed(b'{"a"'), "header is not valid JSON"),
        (_framed(b" {} "), "header is not a JSON object"),
        (_framed(b"[[[]]]"), "header is not a JSON object"),
        (_framed(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "not valid JSON"),
        (_framed(b'{"a":' + b"[" * 9_996), "header is not valid JSON"),
        (_framed(b'{"a": 1, "a": 2}'), "header has the key 'a' twice"),
    ],
)
def test_bad_framing_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(weights.SafetensorsError, match=message):
        weights.read_header(str(path))


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = _odd_file(tmp_path / "odd.safetensors")
    os.truncate(path, os.path.getsize(path) - 1)
    with pytest.raises(weights.SafetensorsError, match="'f32_tail'.* run past the end .*truncated"):
        weights.load_file(path, CPU)


def test_file_truncated_while_being_read(tmp_path: Path) -> None:
    path = _odd_file(tmp_path / "odd.safetensors")
    fd = os.open(path, os.O_RDONLY)
    try:
        header = weights._read_header(fd)
        os.truncate(path, header.data_start + 100)
        with pytest.raises(weights.SafetensorsError, match="truncated while being read"):
            weights._stream(fd, header, CPU, 16, 3, 4)
    finally:
        os.close(fd)
    assert not [t for t in threading.enumerate() if t.name.startswith("weights")]


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(weights.SafetensorsError, match="cannot open: No such file"):
        weights.load_file(str(tmp_path / "nope.safetensors"), CPU)
    with pytest.raises(ValueError, match="at least 1"):
        weights.load_file(str(tmp_path / "nope.safetensors"), CPU, chunk_bytes=0)


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"body.0.weight": _u8(0, 8)}, b"abcd", r"run past the end of the data \(4 bytes\)"),
        ({"a": _u8(0, 2), "b": _u8(1, 3)}, b"abc", "overlap tensor 'a'"),
    ],
)
def test_loader_names_the_header_problem(
    tmp_path: Path, header: object, data: bytes, message: str
) -> None:
    path = make_factory_model(str(tmp_path / "f"), seed=1)
    _write_st(Path(path), header, data)
    with pytest.raises(
        ModelLoadError, match=f"^{path}: cannot read safetensors weights: .*{message}"
    ):
        load_model(path, CPU)


def test_loader_reads_misaligned_weights(tmp_path: Path) -> None:
    """A persistent 3-byte buffer stored first puts every float after it off alignment."""
    source = NET_OK.replace(
        "super().__init__()",
        "super().__init__()\n"
        "        self.register_buffer('tag', torch.zeros(3, dtype=torch.uint8))",
    )
    path = _factory_dir(tmp_path, source)
    tag = torch.tensor([7, 8, 9], dtype=torch.uint8)
    entries, data = _st_bytes([("tag", tag), *safetensors.torch.load_file(path).items()])
    _write_st(Path(path), entries, data)
    model = load_model(path, CPU)
    assert torch.equal(model.module.get_buffer("tag"), tag)
    x = mlp_input(2)
    np.testing.assert_allclose(_answer(model, x), mlp_reference(1, x), **TOL)


# ---------------------------------------------------------------- generic errors


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match=f"^{path}: no such file$"):
        load_model(path, CPU)


@pytest.mark.parametrize("name", ["m.onnx", "model"])
def test_unknown_format(tmp_path: Path, name: str) -> None:
    path = make_corrupt(str(tmp_path / name))
    with pytest.raises(ModelLoadError, match=f"^{path}: unsupported model format"):
        load_model(path, CPU)


def test_describe_error_is_one_bounded_line() -> None:
    text = describe_error(RuntimeError("first\n\tsecond  line\n" + "x" * 1000), limit=80)
    assert "\n" not in text and len(text) == 80
    assert text.startswith("RuntimeError: first second line xxx") and text.endswith("...")
    assert describe_error(KeyError()) == "KeyError"


# ---------------------------------------------------------------- output normalisation


class _Returns(torch.nn.Module):
    def __init__(self, value: object) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> object:
        return self.value if self.value is not None else x * 2


def _eager(value: object) -> LoadedModel:
    return LoadedModel(module=_Returns(value), device=CPU, format="safetensors", num_inputs=1)


def test_single_tensor_output_becomes_list_and_runs_in_inference_mode() -> None:
    out = _eager(None).forward([torch.ones(2)])
    assert len(out) == 1 and torch.equal(out[0], torch.full((2,), 2.0))
    assert out[0].is_inference()


def test_list_output_stays_list() -> None:
    t = [torch.zeros(1), torch.ones(3)]
    assert _eager(t).forward([torch.ones(1)]) == t


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"y": torch.ones(1)}, "got dict"),
        (3.0, "got float"),
        ((torch.ones(1), 7), "element 1 of the tuple is int"),
        ([torch.ones(1), (torch.ones(1),)], "element 1 of the list is tuple"),
    ],
)
def test_bad_outputs_raise_type_error(value: object, message: str) -> None:
    with pytest.raises(ModelOutputError, match=message) as info:
        _eager(value).forward([torch.ones(1)])
    assert isinstance(info.value, TypeError)


@pytest.mark.slow
def test_forward_moves_inputs_to_the_model_device() -> None:
    model = LoadedModel(_Returns(None), torch.device("meta"), "safetensors", 1)
    (out,) = model.forward([torch.ones(2)])
    assert out.is_meta


# ---------------------------------------------------------------- warm-up inputs


def test_example_inputs_from_manifest() -> None:
    manifest = Manifest(
        path="m.toml",
        inputs=(InputSpec("float16", (1, 3)), InputSpec("int64", (1, 2, 2)), InputSpec("bool", ())),
        warmup_batch_sizes=(1, 8),
    )
    sets = example_inputs(manifest, [InputSignature.of([("float32", (5, 5))])], CPU)
    assert [[(t.dtype, tuple(t.shape)) for t in s] for s in sets] == [
        [(torch.float16, (1, 3)), (torch.int64, (1, 2, 2)), (torch.bool, ())],
        [(torch.float16, (8, 3)), (torch.int64, (8, 2, 2)), (torch.bool, ())],
    ]
    floats = sets[1][0].float()
    assert bool(((floats >= 0) & (floats < 1)).all()) and float(floats.std()) > 0
    assert not bool(sets[1][1].any()) and not bool(sets[1][2].any())
    again = example_inputs(manifest, None, "cpu")
    assert all(
        torch.equal(a, b)
        for s, t in zip(sets, again, strict=True)
        for a, b in zip(s, t, strict=True)
    )


def test_example_inputs_from_observed() -> None:
    two = InputSignature.of([("float32", (2, 16)), ("int32", [2])])
    one = example_inputs(None, [two], CPU)
    assert [[(t.dtype, tuple(t.shape)) for t in s] for s in one] == [
        [(torch.float32, (2, 16)), (torch.int32, (2,))]
    ]
    many = example_inputs(
        Manifest(path="m.toml"),
        [InputSignature.of([("float32", (1, 16))]), InputSignature.of([("float32", (4, 16))])],
        CPU,
    )
    assert [tuple(s[0].shape) for s in many] == [(1, 16), (4, 16)]


def test_signature_wire_form_cannot_be_misread() -> None:
    """One signature of a two-input model and a list of two one-input signatures were
    once the same bytes; the typed wire form keeps them apart and refuses junk."""
    pair = InputSignature.of([("float32", (1, 3)), ("float32", (1, 3))])
    assert InputSignature.from_wire(pair.to_wire()) == pair
    assert len(InputSignature.from_wire(pair.to_wire()).inputs) == 2
    for junk in ([["float32", [1, 16]]], {"inputs": [{"dtype": "float8", "shape": [1]}]},
                 {"inputs": [{"dtype": "float32", "shape": [-1]}]}, "junk", None):
        with pytest.raises(ContractError):
            InputSignature.from_wire(junk)


def test_example_inputs_empty_without_sources() -> None:
    assert example_inputs(None, None, CPU) == []
    assert example_inputs(Manifest(path="m.toml"), [], CPU) == []


# ---------------------------------------------------------------- warm-up


class _Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.inner(x)


def test_warm_up_runs_every_set(tmp_path: Path) -> None:
    path = make_mlp(str(tmp_path / "m.pt"), 1)
    model = load_model(path, CPU)
    counting = _Counting(model.module)
    model.module = counting
    seconds = warm_up(model, example_inputs(load_manifest(path), None, CPU))
    assert counting.shapes == [(1, 16), (4, 16)]
    assert seconds >= 0.0
    assert warm_up(model, []) >= 0.0 and len(counting.shapes) == 2


def test_warm_up_failure_names_set_and_cause(tmp_path: Path) -> None:
    path = make_raising_forward(str(tmp_path / "r.pt"))
    model = load_model(path, CPU)
    with pytest.raises(WarmupError) as info:
        warm_up(model, example_inputs(load_manifest(path), None, CPU))
    message = str(info.value)
    assert message.startswith("warm-up input set 0 (float32[1, 16]) failed: ")
    assert message.endswith("RuntimeError: modelkit: this model fails on every call")


def test_warm_up_with_wrong_shape_fails(tmp_path: Path) -> None:
    model = load_model(make_mlp(str(tmp_path / "m.pt"), 1, manifest=False), CPU)
    good, bad = [torch.zeros(2, 16)], [torch.zeros(2, 8)]
    with pytest.raises(WarmupError, match=r"warm-up input set 1 \(float32\[2, 8\]\) failed"):
        warm_up(model, [good, bad])


# ---------------------------------------------------------------- validation


def test_validate_passes_and_counts(tmp_path: Path) -> None:
    path = make_mlp(str(tmp_path / "m.pt"), 4)
    model = load_model(path, CPU)
    assert validate(model, load_manifest(path)) == 2
    assert validate(model, None) == 0
    assert validate(model, Manifest(path="m.toml")) == 0


def test_validate_factory_model(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), 6, forward="raise_if_negative")
    assert validate(load_model(path, CPU), load_manifest(path)) == 2


def test_validate_mismatch(tmp_path: Path) -> None:
    path = make_golden_mismatch(str(tmp_path / "m.pt"), 2)
    with pytest.raises(ValidationError) as info:
        validate(load_model(path, CPU), load_manifest(path))
    message = str(info.value)
    assert message.startswith("golden case 0 output 0: 4 of 4 values differ")
    assert "max abs difference 1 " in message and "rtol=0.0001, atol=1e-05" in message


def _with_golden(model_path: str, cases: list[GoldenCase], **tolerance: float) -> Manifest:
    write_manifest(os.path.splitext(model_path)[0] + ".toml", golden=cases, **tolerance)
    manifest = load_manifest(model_path)
    assert manifest is not None
    return manifest


def test_validate_output_count_and_shape(tmp_path: Path) -> None:
    path = make_mlp(str(tmp_path / "m.pt"), 1, manifest=False)
    model = load_model(path, CPU)
    x = mlp_input(1)
    y = mlp_reference(1, x)
    two = _with_golden(path, [GoldenCase([x], [y]), GoldenCase([x], [y, y])])
    with pytest.raises(
        ValidationError, match="^golden case 1: model returned 1 output.s., golden has 2$"
    ):
        validate(model, two)
    wide = _with_golden(path, [GoldenCase([x], [np.zeros((1, 5), np.float32)])])
    with pytest.raises(
        ValidationError, match=r"golden case 0 output 0: shape \[1, 4\] != golden \[1, 5\]"
    ):
        validate(model, wide)


def test_validate_tolerance_is_applied(tmp_path: Path) -> None:
    path = make_mlp(str(tmp_path / "m.pt"), 1, manifest=False)
    model = load_model(path, CPU)
    x = mlp_input(2)
    near = [GoldenCase([x], [mlp_reference(1, x) + np.float32(5e-4)])]
    assert validate(model, _with_golden(path, near, rtol=0.0, atol=1e-3)) == 1
    with pytest.raises(ValidationError, match=r"8 of 8 values differ, max abs difference 0.0005"):
        validate(model, _with_golden(path, near, rtol=0.0, atol=1e-4))


def test_validate_forward_failure(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), 1, forward="raise_if_negative")
    model = load_model(path, CPU)
    x = -np.ones((1, 16), np.float32)
    manifest = Manifest(path="m", golden=(GoldenCase([x], [mlp_reference(1, x)]),))
    with pytest.raises(
        ValidationError, match="^golden case 0: forward failed: ValueError: modelkit: negative"
    ):
        validate(model, manifest)


def test_validate_nan_semantics(tmp_path: Path) -> None:
    model = _eager((torch.tensor([1.0, float("nan")]),))
    x = np.ones(1, np.float32)
    same = Manifest(path="m", golden=(GoldenCase([x], [np.array([1.0, np.nan])]),))
    assert validate(model, same) == 1
    differs = Manifest(path="m", golden=(GoldenCase([x], [np.array([1.0, 2.0])]),))
    with pytest.raises(ValidationError, match=r"1 of 2 values differ, max abs difference nan"):
        validate(model, differs)


def test_validate_tuple_outputs(tmp_path: Path) -> None:
    path = make_two_input(str(tmp_path / "two.pt"), manifest=False)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 0.5, np.float32)
    manifest = _with_golden(path, [GoldenCase([a, b], [a + b, a * b])])
    assert validate(load_model(path, CPU), manifest) == 1


# ---------------------------------------------------------------- modelkit itself


def test_big_mlp_builder(tmp_path: Path) -> None:
    path = make_big_mlp(str(tmp_path / "big.pt"), hidden=64, layers=3, seed=0)
    model = load_model(path, CPU)
    weights = [p for n, p in model.module.named_parameters() if n.endswith("weight")]
    assert [tuple(w.shape) for w in weights] == [(64, 64)] * 3
    manifest = load_manifest(path)
    assert manifest is not None and manifest.inputs == (InputSpec("float32", (1, 64)),)
    assert warm_up(model, example_inputs(manifest, None, CPU)) >= 0.0


def test_factory_model_copies_are_independent(tmp_path: Path) -> None:
    path = make_factory_model(str(tmp_path / "f"), 1)
    shutil.copytree(tmp_path / "f", tmp_path / "g")
    copy = load_model(str(tmp_path / "g" / "model.safetensors"), CPU)
    x = mlp_input(1)
    np.testing.assert_allclose(_answer(load_model(path, CPU), x), _answer(copy, x), **TOL)


# ---------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["torchscript", "safetensors", "export"])
def test_load_onto_cuda(tmp_path: Path, kind: str) -> None:
    device = torch.device("cuda", 0)
    if kind == "torchscript":
        path = make_mlp(str(tmp_path / "m.pt"), 3)
    elif kind == "safetensors":
        path = make_factory_model(str(tmp_path / "f"), 3)
    else:
        path = str(tmp_path / "m.pt2")
        _save_export(path)
    model = load_model(path, device)
    assert all(p.device == device for p in model.module.parameters())
    manifest = load_manifest(path)
    assert (
        warm_up(
            model,
            example_inputs(
                manifest, [InputSignature.of([("float32", (2, 6)), ("float32", (2,))])], device
            ),
        )
        > 0
    )
    if kind != "export":
        assert validate(model, manifest) == 2
