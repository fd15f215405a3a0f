"""The stress run's charts: one run's memory, failures and update times over cycles
(``plot_run``), and several runs' memory on one chart (``plot_compare``).
"""

from __future__ import annotations

from collections.abc import Sequence

from stress_samples import MiB, Sample


def _series(samples: Sequence[Sample], key: str,
            scale: float = 1.0) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for s in samples:
        v = getattr(s, key)
        if v is not None:
            xs.append(s.cycle)
            ys.append(v / scale)
    return xs, ys


def plot_run(samples: Sequence[Sample], path: str, title: str,
             server: str = "poold") -> None:
    """Memory per series over cycles; failures and upgrade times beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7),
                                      gridspec_kw={"height_ratios": [2, 1]})
    for key, label, style in (("device_used", "device used (NVML)", "-"),
                              ("workers_gpu_bytes", "worker GPU bytes", "-"),
                              ("residue", "residue at retire", "--"),
                              ("rss", f"{server} RSS", "-")):
        xs, ys = _series(samples, key, MiB)
        if xs:
            top.plot(xs, ys, style, label=label, marker="." if len(xs) < 60 else None)
    top.set_ylabel("MiB")
    top.set_title(title)
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    xs, ys = _series(samples, "failed_total")
    bottom.step(xs, ys, where="post", color="tab:red", label="failed requests (total)")
    bottom.set_ylabel("failed requests", color="tab:red")
    bottom.set_ylim(bottom=0, top=max([1.0, *ys]) * 1.1)
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set_xlabel("cycle")
    right = bottom.twinx()
    xs, ys = _series(samples, "elapsed_s")
    right.plot(xs, ys, ".", color="tab:blue", label="update time (s)")
    xs, ys = _series(samples, "call_s")
    if xs:
        right.plot(xs, ys, "x", color="tab:cyan", label="command time (s), digest included")
    right.set_ylabel("update time (s)", color="tab:blue")
    right.set_ylim(bottom=0)
    lines = bottom.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    bottom.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize="small")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_compare(runs: Sequence[tuple[str, Sequence[Sample]]], path: str) -> None:
    """Device memory (or server RSS on CPU) of several runs on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_device = any(s.device_used is not None for _, samples in runs for s in samples)
    key, what = ("device_used", "device used") if has_device else ("rss", "server RSS")
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7),
                                      gridspec_kw={"height_ratios": [2, 1]})
    for i, (label, samples) in enumerate(runs):
        color = f"C{i}"
        xs, ys = _series(samples, key, MiB)
        top.plot(xs, ys, "-", color=color, label=f"{label}: {what}")
        xs, ys = _series(samples, "residue", MiB)
        if xs:
            top.plot(xs, ys, "--", color=color, label=f"{label}: residue at retire")
        xs, ys = _series(samples, "elapsed_s")
        bottom.plot(xs, ys, ".", color=color, label=label)
    top.set_ylabel("MiB")
    top.set_title(f"{what} over update cycles")
    top.legend(loc="best", fontsize="small")
    top.grid(alpha=0.3)
    bottom.set_ylabel("update time (s)")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("cycle")
    bottom.xaxis.get_major_locator().set_params(integer=True)
    bottom.legend(loc="best", fontsize="small")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
