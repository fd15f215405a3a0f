"""The built-in demo model: two versions of a small deterministic MLP.

float32 ``[N, 16]`` -> float32 ``[N, 4]`` (Linear 16->32, ReLU, Linear 32->4). Version
"1" has weights from seed 1, version "2" from seed 2, so a client can tell from the
numbers alone which version answered. Each file ships a manifest with warm-up inputs and
two golden cases, so the demo exercises the whole load / warm / validate path.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
import torch

from workers.manifest import (
    GoldenCase,
    InputSpec,
    ManifestError,
    load_manifest,
    temp_path,
    write_manifest,
)

__all__ = ["IN_FEATURES", "OUT_FEATURES", "demo_input", "make_demo_models"]

log = logging.getLogger(__name__)

IN_FEATURES = 16
HIDDEN = 32
OUT_FEATURES = 4
VERSIONS: tuple[tuple[str, int], ...] = (("1", 1), ("2", 2))  # (version, seed)


def demo_input(n: int = 1) -> np.ndarray:
    """A deterministic float32 ``[n, 16]`` input; row i is the same for every n."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    flat = np.sin(0.37 * np.arange(n * IN_FEATURES, dtype=np.float64) + 0.1)
    return flat.reshape(n, IN_FEATURES).astype(np.float32)


def _build(seed: int) -> torch.nn.Sequential:
    # Weights come from an explicit generator: the global RNG is left alone and the
    # numbers do not depend on nn.Linear's init scheme.
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(IN_FEATURES, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, OUT_FEATURES),
    )
    with torch.no_grad():
        for p in net.parameters():
            scale = p.shape[1] ** -0.5 if p.dim() == 2 else 0.1  # weight: 1/sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return net.eval()


def _is_complete(model_path: str) -> bool:
    if not os.path.isfile(model_path):
        return False
    try:
        manifest = load_manifest(model_path)
    except ManifestError as e:
        log.warning("demo manifest for %s is invalid, rewriting: %s", model_path, e)
        return False
    return manifest is not None and len(manifest.golden) > 0


def make_demo_models(directory: str) -> list[tuple[str, str]]:
    """Write (once) ``demo-v1.pt`` and ``demo-v2.pt`` with their manifests into
    ``directory``; return ``[(version, path), ...]``."""
    os.makedirs(directory, exist_ok=True)
    made = []
    for version, seed in VERSIONS:
        path = os.path.join(directory, f"demo-v{version}.pt")
        if not _is_complete(path):
            _write_version(path, seed)
        made.append((version, path))
    return made


def _write_version(path: str, seed: int) -> None:
    net = _build(seed)
    directory = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    scripted = torch.jit.script(net)
    # Saved through a buffer: saving to a path embeds the (temporary) file name in the
    # archive, and the bytes should depend on the seed alone (versions may be digests).
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    cases = []
    for n in (1, 8):
        x = demo_input(n)
        with torch.inference_mode():
            y = scripted(torch.from_numpy(x)).numpy()
        cases.append(GoldenCase(inputs=[x], outputs=[y]))
    # The manifest goes last: its presence marks the version complete.
    write_manifest(
        os.path.join(directory, f"{stem}.toml"),
        inputs=[InputSpec("float32", (1, IN_FEATURES))],
        warmup_batch_sizes=[1, 8],
        golden=cases,
        golden_file=f"{stem}.golden.npz",
    )
    log.info("wrote demo model %s (seed %d)", path, seed)


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.demo DIR``: write the demo models (poold runs this in a child,
    since poold itself never imports torch)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m workers.demo DIR", file=sys.stderr)
        return 2
    for version, path in make_demo_models(args[0]):
        print(f"demo version {version}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
