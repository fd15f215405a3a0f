"""workers.manifest: lookup, parsing, every error path, and the writer round trip."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from workers.manifest import (
    GoldenCase,
    InputSpec,
    Manifest,
    ManifestError,
    find_manifest,
    load_manifest,
    parse_manifest,
    write_golden,
    write_manifest,
)


def _write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------- lookup


def test_find_manifest_prefers_stem_toml_over_model_toml(tmp_path: Path) -> None:
    model = os.path.join(tmp_path, "resnet.pt")
    _write(os.path.join(tmp_path, "model.toml"), "rtol = 0.5\n")
    assert find_manifest(model) == os.path.join(tmp_path, "model.toml")
    _write(os.path.join(tmp_path, "resnet.toml"), "rtol = 0.25\n")
    assert find_manifest(model) == os.path.join(tmp_path, "resnet.toml")
    manifest = load_manifest(model)
    assert manifest is not None and manifest.rtol == 0.25


def test_no_manifest_is_none(tmp_path: Path) -> None:
    model = os.path.join(tmp_path, "m.pt")
    assert find_manifest(model) is None
    assert load_manifest(model) is None


def test_manifest_of_another_model_is_not_used(tmp_path: Path) -> None:
    _write(os.path.join(tmp_path, "other.toml"), "rtol = 0.5\n")
    assert find_manifest(os.path.join(tmp_path, "m.pt")) is None


def test_empty_manifest_gives_defaults(tmp_path: Path) -> None:
    path = _write(os.path.join(tmp_path, "m.toml"), "")
    assert load_manifest(os.path.join(tmp_path, "m.pt")) == Manifest(path=path)
    m = Manifest(path=path)
    assert (m.inputs, m.warmup_batch_sizes, m.golden) == ((), (1,), ())
    assert (m.rtol, m.atol, m.factory, m.max_batch, m.max_delay_ms) == (
        1e-4,
        1e-5,
        None,
        None,
        None,
    )


# ---------------------------------------------------------------- parsing


def test_full_manifest_is_parsed(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.savez(os.path.join(tmp_path, "golden.npz"), case0_in0=a, case0_in1=a * 2, case0_out0=a + 1)
    path = _write(
        os.path.join(tmp_path, "model.toml"),
        """\
        factory = "net.py:build"
        rtol = 1e-3
        atol = 0
        warmup_batch_sizes = [1, 8]

        [batching]
        max_batch = 32
        max_delay_ms = 2

        [[inputs]]
        dtype = "float32"
        shape = [1, 3]

        [[inputs]]
        dtype = "int64"
        shape = []

        [golden]
        file = "golden.npz"
        """,
    )
    m = parse_manifest(path)
    assert m.path == path
    assert m.factory == "net.py:build"
    assert (m.rtol, m.atol) == (1e-3, 0.0)
    assert m.warmup_batch_sizes == (1, 8)
    assert (m.max_batch, m.max_delay_ms) == (32, 2.0)
    assert m.inputs == (InputSpec("float32", (1, 3)), InputSpec("int64", ()))
    assert len(m.golden) == 1
    case = m.golden[0]
    assert [x.tolist() for x in case.inputs] == [a.tolist(), (a * 2).tolist()]
    assert [x.tolist() for x in case.outputs] == [(a + 1).tolist()]


def test_golden_cases_are_ordered_numerically(tmp_path: Path) -> None:
    # case10 sorts before case2 as a string; the cases must come back in numeric order
    cases = [
        GoldenCase([np.full((1, 2), i, np.float32)], [np.full((1,), -i, np.int64)])
        for i in range(12)
    ]
    write_manifest(os.path.join(tmp_path, "m.toml"), golden=cases)
    m = load_manifest(os.path.join(tmp_path, "m.pt"))
    assert m is not None
    assert [int(c.inputs[0][0, 0]) for c in m.golden] == list(range(12))
    assert [int(c.outputs[0][0]) for c in m.golden] == [-i for i in range(12)]


def test_writer_round_trip(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)
    cases = [GoldenCase([x, x.astype(np.int32)], [x * 3, x.sum(1)])]
    path = os.path.join(tmp_path, "net.toml")
    write_manifest(
        path,
        inputs=[InputSpec("float16", (1, 4)), ("int32", [1, 4])],
        warmup_batch_sizes=[1, 2, 16],
        golden=cases,
        rtol=0.01,
        atol=0.002,
        factory="net.py:make",
        max_batch=8,
        max_delay_ms=1.5,
    )
    m = load_manifest(os.path.join(tmp_path, "net.safetensors"))
    assert m is not None
    assert m.inputs == (InputSpec("float16", (1, 4)), InputSpec("int32", (1, 4)))
    assert m.warmup_batch_sizes == (1, 2, 16)
    assert (m.rtol, m.atol, m.factory, m.max_batch, m.max_delay_ms) == (
        0.01,
        0.002,
        "net.py:make",
        8,
        1.5,
    )
    # the default golden file name, relative to the manifest
    assert os.path.isfile(os.path.join(tmp_path, "net.golden.npz"))
    (got,) = m.golden
    for a, b in zip(got.inputs + got.outputs, cases[0].inputs + cases[0].outputs, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    # written atomically: nothing but the two files is left behind
    assert sorted(os.listdir(tmp_path)) == ["net.golden.npz", "net.toml"]


def test_writer_escapes_strings(tmp_path: Path) -> None:
    golden_name = 'odd "name" \\ here.npz'
    write_golden(os.path.join(tmp_path, golden_name), [GoldenCase([np.ones(1)], [np.ones(1)])])
    write_manifest(os.path.join(tmp_path, "m.toml"), golden_file=golden_name)
    m = load_manifest(os.path.join(tmp_path, "m.pt"))
    assert m is not None and len(m.golden) == 1


def test_writer_with_golden_file_only_refers_to_it(tmp_path: Path) -> None:
    write_manifest(os.path.join(tmp_path, "m.toml"), golden_file="later.npz")
    assert not os.path.exists(os.path.join(tmp_path, "later.npz"))
    with pytest.raises(ManifestError, match="golden.file: .*later.npz: no such file"):
        load_manifest(os.path.join(tmp_path, "m.pt"))


# ---------------------------------------------------------------- errors

BAD_MANIFESTS = [
    ("rtol = ", "not valid TOML"),
    ("warmup_batch_size = [1]", "warmup_batch_size: unknown key"),
    ("[batching]\nmax_batches = 3", "batching.max_batches: unknown key"),
    ("batching = 3", "batching: must be a table"),
    ("[golden]\npath = 'g.npz'", "golden.path: unknown key"),
    ("golden = 'g.npz'", "golden: must be a table"),
    ("rtol = 'big'", "rtol: must be a number"),
    ("rtol = true", "rtol: must be a number"),
    ("atol = -1.0", "atol: must be a finite number >= 0"),
    ("atol = inf", "atol: must be a finite number >= 0"),
    ("warmup_batch_sizes = []", "warmup_batch_sizes: must be a non-empty list"),
    ("warmup_batch_sizes = 4", "warmup_batch_sizes: must be a non-empty list"),
    ("warmup_batch_sizes = [1, 0]", r"warmup_batch_sizes\[1\]: must be an integer >= 1"),
    ("warmup_batch_sizes = [1.5]", r"warmup_batch_sizes\[0\]: must be an integer >= 1"),
    ("factory = 3", "factory: must be a string"),
    ("factory = 'net.py'", "factory: must look like 'file.py:callable'"),
    ("factory = 'net.py:1build'", "factory: must look like"),
    ("factory = ':build'", "factory: must look like"),
    ("[batching]\nmax_batch = 0", "batching.max_batch: must be an integer >= 1"),
    ("[batching]\nmax_batch = true", "batching.max_batch: must be an integer >= 1"),
    ("[batching]\nmax_delay_ms = -2", "batching.max_delay_ms: must be a finite number >= 0"),
    ("inputs = 3", "inputs: must be an array of tables"),
    ("inputs = [3]", r"inputs\[0\]: must be a table"),
    (
        "[[inputs]]\ndtype='float32'\nshape=[1]\n[[inputs]]\ndtype='float8'\nshape=[1]",
        r"inputs\[1\].dtype: unknown dtype 'float8'",
    ),
    ("[[inputs]]\nshape=[1]", r"inputs\[0\].dtype: unknown dtype None"),
    ("[[inputs]]\ndtype='int64'\nshape=[1, 0]", r"inputs\[0\].shape: must be a list of integers"),
    ("[[inputs]]\ndtype='int64'\nshape='1,2'", r"inputs\[0\].shape: must be a list of integers"),
    ("[[inputs]]\ndtype='int64'", r"inputs\[0\].shape: must be a list of integers"),
    ("[[inputs]]\ndtype='int64'\nshape=[1]\nlayout='x'", r"inputs\[0\].layout: unknown key"),
    ("[[inputs]]\ndtype='int64'\nshape=[1]\nname='a b'", r"inputs\[0\].name: must match"),
    ("[[outputs]]\nname=3", r"outputs\[0\].name: must match"),
    ("[golden]\nfile = 3", "golden.file: must be a file name"),
]


@pytest.mark.parametrize(("text", "message"), BAD_MANIFESTS)
def test_bad_manifest_names_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(os.path.join(tmp_path, "model.toml"), text + "\n")
    with pytest.raises(ManifestError, match=message) as info:
        load_manifest(os.path.join(tmp_path, "model.pt"))
    assert str(info.value).startswith(path + ": ")


def _golden_manifest(tmp_path: Path) -> str:
    _write(os.path.join(tmp_path, "model.toml"), "[golden]\nfile = 'g.npz'\n")
    return os.path.join(tmp_path, "g.npz")


def test_golden_file_missing(tmp_path: Path) -> None:
    _golden_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"golden.file: .*g.npz: no such file"):
        load_manifest(os.path.join(tmp_path, "model.pt"))


def test_golden_file_not_npz(tmp_path: Path) -> None:
    with open(_golden_manifest(tmp_path), "wb") as f:
        f.write(b"PK\x03\x04 not really a zip")
    with pytest.raises(ManifestError, match=r"golden.file: .*cannot read .npz"):
        load_manifest(os.path.join(tmp_path, "model.pt"))


class _Boom:
    """Unpickling this would create a file: proof that no pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_golden_object_arrays_are_refused_without_unpickling(
    tmp_path: Path,
) -> None:
    marker = os.path.join(tmp_path, "unpickled")
    arr = np.empty(1, dtype=object)
    arr[0] = _Boom(marker)
    np.savez(_golden_manifest(tmp_path), case0_in0=arr, case0_out0=np.ones(1))
    with pytest.raises(ManifestError, match=r"golden.file: .*cannot read .npz"):
        load_manifest(os.path.join(tmp_path, "model.pt"))
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({}, "holds no golden cases"),
        ({"case0_in0": 1, "case0_out0": 1, "weights": 1}, "unexpected array 'weights'"),
        ({"case0_in0": 1, "case0_out0": 1, "case0_in0x": 1}, "unexpected array 'case0_in0x'"),
        ({"case0_in0": 1, "case0_out0": 1, "case2_in0": 1, "case2_out0": 1}, "case1 is missing"),
        ({"case0_in0": 1}, "case0 has no output arrays"),
        ({"case0_out0": 1}, "case0 has no input arrays"),
        ({"case0_in1": 1, "case0_out0": 1}, "case0_in0 is missing"),
        ({"case0_in0": 1, "case0_out0": 1, "case0_out2": 1}, "case0_out1 is missing"),
    ],
)
def test_bad_golden_layout(tmp_path: Path, arrays: dict[str, int], message: str) -> None:
    np.savez(_golden_manifest(tmp_path), **{k: np.full(2, v) for k, v in arrays.items()})
    with pytest.raises(ManifestError, match=f"golden.file: .*g.npz: {message}"):
        load_manifest(os.path.join(tmp_path, "model.pt"))


def test_unreadable_manifest(tmp_path: Path) -> None:
    os.mkdir(os.path.join(tmp_path, "model.toml.d"))
    with pytest.raises(ManifestError, match="cannot read"):
        parse_manifest(os.path.join(tmp_path, "model.toml.d"))


def test_golden_file_that_is_a_single_npy_array(tmp_path: Path) -> None:
    with open(_golden_manifest(tmp_path), "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ManifestError, match=r"cannot read .npz: an .npy array, not an .npz"):
        load_manifest(os.path.join(tmp_path, "model.pt"))


# ------------------------------------------------ the golden file stays inside the roots
def _golden_elsewhere(tmp_path: Path, file: str) -> str:
    case = GoldenCase([np.zeros((1, 2), np.float32)], [np.zeros((1, 2), np.float32)])
    target = os.path.normpath(os.path.join(tmp_path, "root", "m", file))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    write_golden(target, [case])
    os.makedirs(os.path.join(tmp_path, "root", "m"), exist_ok=True)
    _write(os.path.join(tmp_path, "root", "m", "model.toml"), f"[golden]\nfile = {file!r}\n")
    return os.path.join(tmp_path, "root", "m", "model.pt")


@pytest.mark.parametrize("file", ["../../outside/g.npz", "/etc/passwd"])
def test_golden_file_outside_the_roots_is_refused_before_it_is_read(
    tmp_path: Path, file: str
) -> None:
    if file.startswith("/"):
        os.makedirs(os.path.join(tmp_path, "root", "m"))
        _write(os.path.join(tmp_path, "root", "m", "model.toml"), f"[golden]\nfile = {file!r}\n")
        model = os.path.join(tmp_path, "root", "m", "model.pt")
        shown = file
    else:
        model = _golden_elsewhere(tmp_path, file)
        shown = os.path.join(tmp_path, "outside", "g.npz")
    root = os.path.join(tmp_path, "root")
    with pytest.raises(ManifestError, match="golden.file: ") as e:
        load_manifest(model, [root])
    assert f"{shown} is outside the model roots: {root}" in str(e.value)
    with pytest.raises(ManifestError, match="outside the model roots"):
        load_manifest(model)  # no roots given: the manifest's own directory


def test_golden_file_elsewhere_inside_the_roots_is_read(tmp_path: Path) -> None:
    model = _golden_elsewhere(tmp_path, "../shared/g.npz")
    manifest = load_manifest(model, [os.path.join(tmp_path, "root")])
    assert manifest is not None and len(manifest.golden) == 1


def test_golden_file_through_a_symlink_out_of_the_roots_is_refused(tmp_path: Path) -> None:
    model = _golden_elsewhere(tmp_path, "../../outside/g.npz")
    os.symlink(os.path.join(tmp_path, "outside", "g.npz"), os.path.join(tmp_path, "root", "l.npz"))
    _write(os.path.join(tmp_path, "root", "m", "model.toml"), "[golden]\nfile = '../l.npz'\n")
    with pytest.raises(ManifestError, match=r"l.npz \(resolves to .*outside/g.npz\) is outside"):
        load_manifest(model, [os.path.join(tmp_path, "root")])
