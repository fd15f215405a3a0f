"""Tiny real models for tests, written into a test's tmp directory.

Every builder returns the path of the model file it wrote. Weights come from explicit
seeded generators, so a model and ``mlp_reference`` agree without sharing any state.
Manifests (warm-up inputs, golden cases) are written beside the models unless a builder
is told not to; golden inputs are non-negative so the "raise_if_negative" and
``only_if_negative`` models pass validation and warm-up.
"""

from __future__ import annotations

import os

import numpy as np
import safetensors.torch
import torch

from workers.manifest import GoldenCase, InputSpec, write_manifest

HIDDEN = 32


class _TwoInput(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, a * b


class _Pair(torch.nn.Module):
    """forward(x1, x2) -> (y1, y2): the shape of the model gpu-pool was born for."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.rand(3, 1, 1, generator=gen), requires_grad=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x1 * self.w + x2, x1 - x2 * self.w


def pair_reference(seed: int, x1: np.ndarray, x2: np.ndarray) -> list[np.ndarray]:
    """What ``make_pair(path, seed)`` answers."""
    with torch.inference_mode():
        out = _Pair(seed)(torch.as_tensor(x1), torch.as_tensor(x2))
    return [o.numpy() for o in out]


def make_pair(path: str, seed: int, *, manifest: bool = False, examples: bool = False) -> str:
    """TorchScript ``forward(x1, x2) -> (y1, y2)`` on float32 ``[N, 3, 16, 16]`` inputs,
    without a manifest unless asked (as a new user would bring it). ``examples``: the
    module carries ``example_inputs`` (two float32 ``[1, 3, 16, 16]``, see workers.schema)."""
    module = _Pair(seed)
    if examples:
        gen = torch.Generator().manual_seed(seed)
        module.example_inputs = tuple(torch.rand(1, 3, 16, 16, generator=gen) for _ in range(2))
    _save_script(module, path)
    if manifest:
        write_manifest(
            _manifest_path(path),
            inputs=[InputSpec("float32", (1, 3, 16, 16)), InputSpec("float32", (1, 3, 16, 16))],
        )
    return path


class _Embedding(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(10, 4, generator=gen), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.table)


def make_embedding(path: str, seed: int, *, manifest: bool = True) -> str:
    """TorchScript embedding: int64 ids ``[N, 5]`` (values 0..9) -> float32 ``[N, 5, 4]``."""
    _save_script(_Embedding(seed), path)
    if manifest:
        write_manifest(_manifest_path(path), inputs=[InputSpec("int64", (1, 5), name="ids")])
    return path


class _OneRow(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0, keepdim=True)[:, :4]


def make_one_row(path: str) -> str:
    """TorchScript that answers one row ``[1, 4]`` whatever the batch (no manifest)."""
    return _save_script(_OneRow(), path)


class _RaisingAny(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= 0:
            raise RuntimeError("modelkit: this model fails on every call")
        return x


def make_raising_bare(path: str) -> str:
    """TorchScript whose forward always raises, without a manifest."""
    return _save_script(_RaisingAny(), path)


class _Raising(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() >= 0:  # always true; TorchScript needs a reachable return below
            raise RuntimeError("modelkit: this model fails on every call")
        return x


def _mlp_state(seed: int, in_features: int, out_features: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "0.weight": (HIDDEN, in_features),
        "0.bias": (HIDDEN,),
        "2.weight": (out_features, HIDDEN),
        "2.bias": (out_features,),
    }
    state = {}
    for name, shape in shapes.items():
        scale = shape[1] ** -0.5 if len(shape) == 2 else 0.1
        state[name] = (torch.randn(shape, generator=gen) * scale).contiguous()
    return state


def _mlp(seed: int, in_features: int, out_features: int) -> torch.nn.Sequential:
    net = torch.nn.Sequential(
        torch.nn.Linear(in_features, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, out_features),
    )
    net.load_state_dict(_mlp_state(seed, in_features, out_features))
    return net.eval()


def mlp_reference(
    seed: int, x: np.ndarray, in_features: int = 16, out_features: int = 4
) -> np.ndarray:
    """What ``make_mlp(path, seed, ...)`` and ``make_factory_model(..., seed)`` answer."""
    with torch.inference_mode():
        out = _mlp(seed, in_features, out_features)(torch.as_tensor(np.asarray(x)))
    return out.numpy()


def mlp_answer_problem(seeds: dict[str, int], x: np.ndarray, r: object) -> str | None:
    """What is wrong with reply ``r`` to ``x`` from a pool serving ``make_mlp`` versions
    (``seeds``: version label -> seed), or None when it is the answer of its version."""
    version = getattr(r, "version", "")
    if version not in seeds:
        return f"unexpected version {version!r}"
    want = mlp_reference(seeds[version], x)
    if not np.allclose(r.outputs[0], want, rtol=1e-5, atol=1e-6):  # type: ignore[attr-defined]
        return f"answer does not match version {version}"
    return None


def mlp_input(n: int, in_features: int = 16, seed: int = 0) -> np.ndarray:
    """A deterministic non-negative float32 ``[n, in_features]`` input."""
    return np.random.default_rng(seed).random((n, in_features), dtype=np.float32)


def _save_script(module: torch.nn.Module, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.jit.script(module).save(path)
    return path


def _manifest_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + ".toml"


def _golden_cases(seed: int, in_features: int, out_features: int) -> list[GoldenCase]:
    cases = []
    for n in (1, 3):
        x = mlp_input(n, in_features, seed=100 + n)
        cases.append(GoldenCase([x], [mlp_reference(seed, x, in_features, out_features)]))
    return cases


def make_mlp(
    path: str,
    seed: int,
    in_features: int = 16,
    out_features: int = 4,
    *,
    manifest: bool = True,
    golden: bool = True,
    warmup_batch_sizes: tuple[int, ...] = (1, 4),
) -> str:
    """TorchScript Linear(in, 32) -> ReLU -> Linear(32, out); with a manifest (warm-up
    inputs and, with ``golden``, two golden cases) unless ``manifest=False``."""
    _save_script(_mlp(seed, in_features, out_features), path)
    if manifest:
        write_manifest(
            _manifest_path(path),
            inputs=[InputSpec("float32", (1, in_features))],
            warmup_batch_sizes=warmup_batch_sizes,
            golden=_golden_cases(seed, in_features, out_features) if golden else None,
        )
    return path


def make_two_input(path: str, *, manifest: bool = True) -> str:
    """TorchScript ``forward(a, b) -> (a + b, a * b)`` on float32 ``[N, 4]`` inputs."""
    _save_script(_TwoInput(), path)
    if manifest:
        write_manifest(
            _manifest_path(path),
            inputs=[InputSpec("float32", (1, 4)), InputSpec("float32", (1, 4))],
        )
    return path


def make_raising_forward(path: str) -> str:
    """TorchScript whose forward raises on every call; its manifest has warm-up inputs, so
    warm-up fails."""
    _save_script(_Raising(), path)
    write_manifest(_manifest_path(path), inputs=[InputSpec("float32", (1, 16))])
    return path


_NET_TEMPLATE = '''\
"""Written by tests/modelkit.py: an MLP built by a factory, for the safetensors format."""
import os
import time

import torch

LOAD_SLEEP_S = {load_sleep_s!r}
MODE = {mode!r}
ONLY_IF_NEGATIVE = {only_if_negative!r}
BUSY_S = {busy_s!r}


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear({in_features}, {hidden}),
            torch.nn.ReLU(),
            torch.nn.Linear({hidden}, {out_features}),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        negative = bool((x < 0).any())
        if MODE == "raise_if_negative" and negative:
            raise ValueError("modelkit: negative input")
        if MODE == "busy" and (negative or not ONLY_IF_NEGATIVE):
            # A slow but live forward: the CPU computes for BUSY_S seconds.
            end = time.monotonic() + BUSY_S
            while time.monotonic() < end:
                x = x * 1.0
        if MODE in ("hang", "exit") and (negative or not ONLY_IF_NEGATIVE):
            if MODE == "exit":
                os._exit(13)
            while True:
                time.sleep(0.05)
        return self.body(x)


def build() -> Net:
    if LOAD_SLEEP_S:
        time.sleep(LOAD_SLEEP_S)
    return Net()
'''

FACTORY_MODES = ("mlp", "hang", "exit", "raise_if_negative", "busy")


def make_factory_model(
    dirpath: str,
    seed: int,
    *,
    load_sleep_s: float = 0.0,
    forward: str = "mlp",
    only_if_negative: bool = False,
    in_features: int = 16,
    out_features: int = 4,
    golden: bool = True,
    busy_s: float = 0.0,
) -> str:
    """``net.py`` + ``model.safetensors`` + ``model.toml`` (factory format) in ``dirpath``.

    ``forward``: "mlp" (answers like ``mlp_reference``), "hang" (forward never returns),
    "exit" (forward calls ``os._exit(13)``), "raise_if_negative" (ValueError when the
    input has a negative value). With ``only_if_negative``, "hang" and "exit" also fire
    only on negative input, so the model warms up, validates and serves first. "busy"
    (with ``only_if_negative``: on negative input) computes on the CPU for ``busy_s``
    seconds before it answers like "mlp".
    """
    if forward not in FACTORY_MODES:
        raise ValueError(f"forward must be one of {FACTORY_MODES}, got {forward!r}")
    os.makedirs(dirpath, exist_ok=True)
    source = _NET_TEMPLATE.format(
        load_sleep_s=float(load_sleep_s),
        busy_s=float(busy_s),
        mode=forward,
        only_if_negative=only_if_negative,
        in_features=in_features,
        out_features=out_features,
        hidden=HIDDEN,
    )
    with open(os.path.join(dirpath, "net.py"), "w", encoding="utf-8") as f:
        f.write(source)
    state = {f"body.{k}": v for k, v in _mlp_state(seed, in_features, out_features).items()}
    path = os.path.join(dirpath, "model.safetensors")
    safetensors.torch.save_file(state, path)
    write_manifest(
        os.path.join(dirpath, "model.toml"),
        factory="net.py:build",
        inputs=[InputSpec("float32", (1, in_features))],
        warmup_batch_sizes=(1, 4),
        golden=_golden_cases(seed, in_features, out_features) if golden else None,
    )
    return path


def make_golden_mismatch(path: str, seed: int) -> str:
    """An MLP whose manifest's golden outputs are off by 1.0: validation must fail."""
    make_mlp(path, seed, golden=False)
    cases = [GoldenCase(c.inputs, [o + 1.0 for o in c.outputs]) for c in _golden_cases(seed, 16, 4)]
    write_manifest(
        _manifest_path(path),
        inputs=[InputSpec("float32", (1, 16))],
        warmup_batch_sizes=(1, 4),
        golden=cases,
    )
    return path


def make_corrupt(path: str) -> str:
    """Bytes that no loader accepts, under whatever extension ``path`` has."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"this is not a model\n" + bytes(range(256)) * 4)
    return path


def make_big_mlp(path: str, hidden: int, layers: int, seed: int) -> str:
    """TorchScript of ``layers`` x (Linear(hidden, hidden) + ReLU), float32 ``[N, hidden]``
    in and out: ``layers * hidden**2 * 4`` bytes of weights (1 GiB at 4096 x 16). The
    manifest has warm-up inputs only (no golden cases: they would cost a CPU forward)."""
    gen = torch.Generator().manual_seed(seed)
    blocks: list[torch.nn.Module] = []
    with torch.no_grad():
        for _ in range(layers):
            # Allocated on meta first so the default init does not run over 1 GiB.
            with torch.device("meta"):
                linear = torch.nn.Linear(hidden, hidden)
            linear = linear.to_empty(device="cpu")
            linear.weight.normal_(0.0, hidden**-0.5, generator=gen)
            linear.bias.zero_()
            blocks += [linear, torch.nn.ReLU()]
    _save_script(torch.nn.Sequential(*blocks).eval(), path)
    write_manifest(_manifest_path(path), inputs=[InputSpec("float32", (1, hidden))])
    return path


_BIG_NET = """import torch


def build() -> torch.nn.Sequential:
    blocks = []
    for _ in range({layers}):
        blocks += [torch.nn.Linear({hidden}, {hidden}), torch.nn.ReLU()]
    return torch.nn.Sequential(*blocks)
"""


def make_big_factory(dirpath: str, hidden: int, layers: int, seed: int) -> str:
    """The factory format (``net.py`` + ``model.safetensors`` + ``model.toml``) of the
    same network as ``make_big_mlp``: ``layers * hidden**2 * 4`` bytes of weights."""
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "net.py"), "w", encoding="utf-8") as f:
        f.write(_BIG_NET.format(hidden=hidden, layers=layers))
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        w = torch.empty(hidden, hidden)
        w.normal_(0.0, hidden**-0.5, generator=gen)
        state[f"{2 * i}.weight"], state[f"{2 * i}.bias"] = w, torch.zeros(hidden)
    path = os.path.join(dirpath, "model.safetensors")
    safetensors.torch.save_file(state, path)
    write_manifest(
        os.path.join(dirpath, "model.toml"),
        factory="net.py:build",
        inputs=[InputSpec("float32", (1, hidden))],
    )
    return path
