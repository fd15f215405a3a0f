"""What poold publishes every second: the metrics snapshot of workers, queues, models,
devices and standbys (``pool.metrics.PoolSnapshot``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pool.metrics import PoolSnapshot, StandbySample, WorkerSample

if TYPE_CHECKING:
    from pool.daemon import Daemon


def device_samples(d: Daemon) -> dict[str, tuple[float | None, int, int]]:
    """NVML utilisation and memory of every GPU, for the per-device gauges."""
    out: dict[str, tuple[float | None, int, int]] = {}
    for idx in range(d.gpu.count()):
        mem = d.gpu.memory(idx)
        if mem is not None:
            out[f"cuda:{idx}"] = (d.gpu.utilization(idx), mem[0], mem[2])
    return out


def publish(d: Daemon) -> None:
    d.store.retry()  # a disk that was full or read-only may take the state now
    d.state_problem = d.store.problem()
    d.router.flush_stats()
    d.peer_stats = d.router.peer_stats()  # also forgets connections that left
    workers = []
    for rt in d.sup.models.values():
        for w in rt.workers:
            if w.alive and w.pid:
                workers.append(
                    WorkerSample(
                        model=w.model,
                        version=w.version,
                        generation=w.generation,
                        device=w.device,
                        state=w.state.value,
                        pid=w.pid,
                        gpu_bytes=w.gpu_bytes,
                        rss_bytes=w.rss,
                        inflight=w.slot_view.load,
                        served=w.slot_view.served,
                    )
                )
    d.metrics.publish(
        PoolSnapshot(
            workers=tuple(workers),
            queue_depth={rt.name: d.router.queue_len(rt.name) for rt in d.sup.models.values()},
            model_state={rt.name: rt.status() for rt in d.sup.models.values()},
            devices=device_samples(d),
            standbys=tuple(
                StandbySample(r.device, r.state.value, r.pid, r.gpu_bytes, r.preload_bytes)
                for r in d.sup.standbys.current.values()
                if r.alive and r.pid is not None
            ),
            standbys_taken=dict(d.sup.standbys.taken),
            standbys_died=dict(d.sup.standbys.died),
        )
    )
