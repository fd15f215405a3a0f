"""The leak detector: hundreds of hot updates under load, and proof that nothing leaks.

    python scripts/stress.py --cycles 20 --clients 4 --device cpu --out /tmp/stress
    python scripts/stress.py --cycles 200 --clients 16 --device cuda:0 --model-size 1gib \\
        --strategy surge --out docs/stress/surge
    python scripts/stress.py --mode in-process --device cuda:0 --model-size 1gib --out ...
    python scripts/stress.py --compare docs/stress/surge docs/stress/in-process --out docs/stress

Each cycle moves the model to the other of two versions (every K-th cycle by a rollback)
while client threads send requests without pause, then samples the device, the server
process and its children. Writes samples.csv, summary.json and stress.png to --out and
exits 0 (pass) or 1 (fail). docs/STRESS.md explains every column and every verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stress_report import compare, print_verdict, progress_line, summarize  # noqa: E402
from stress_run_inprocess import run_inprocess  # noqa: E402
from stress_run_pool import run_pool  # noqa: E402
from stress_verdict import check, judge  # noqa: E402
from stresskit import Sample, plot_run, write_csv  # noqa: E402  (puts the root on sys.path)

from pool.ctl.client import Unreachable  # noqa: E402
from pool.gpu import device_index  # noqa: E402

__all__ = ["judge", "main", "parse_args"]  # judge: tests/test_stress.py


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="stress.py", description=__doc__.split("\n\n")[0],
        epilog="See docs/STRESS.md.")
    ap.add_argument("--mode", choices=("pool", "in-process"), default="pool")
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--strategy", choices=("surge", "drain-first", "auto"), default="auto")
    ap.add_argument("--rollback-every", type=int, default=0, metavar="K",
                    help="every K-th cycle is a rollback instead of an upgrade (0: never)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda:N (default cpu)")
    ap.add_argument("--standby", action="store_true",
                    help="run poold with a hot standby (standby = true; default: false) and "
                         "check that every update starts in it")
    ap.add_argument("--model-size", choices=("small", "1gib"), default="small")
    ap.add_argument("--models-dir", help="where the two model versions are written (and "
                    "reused by later runs); default: a temporary directory")
    ap.add_argument("--out", default="stress-out", help="directory for the outputs")
    ap.add_argument("--rss-slope-max", type=float, default=256 * 1024,
                    metavar="BYTES_PER_CYCLE")
    ap.add_argument("--dwell", type=float, default=0.0, metavar="S",
                    help="seconds of plain serving after each cycle (default 0: back to back)")
    ap.add_argument("--update-timeout", type=float, default=120.0, metavar="S")
    ap.add_argument("--request-timeout", type=float, default=60.0, metavar="S")
    ap.add_argument("--json", action="store_true",
                    help="print summary.json on stdout (progress lines go to stderr)")
    ap.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                    help="draw two runs' memory on one chart (--out/compare.png)")
    at = ap.add_argument_group("attach to a running poold (instead of starting one)")
    at.add_argument("--control", metavar="ENDPOINT")
    at.add_argument("--frontend", metavar="ENDPOINT")
    at.add_argument("--model", metavar="NAME")
    at.add_argument("--paths", nargs=2, metavar=("A", "B"))
    at.add_argument("--input-shape", metavar="N,D,...",
                    help="float32 input shape when the model has no manifest")
    args = ap.parse_args(argv)
    if args.control and not (args.frontend and args.model and args.paths):
        ap.error("--control needs --frontend, --model and --paths A B")
    if args.control and args.mode == "in-process":
        ap.error("--mode in-process starts its own server; it cannot attach")
    if args.cycles < 1 or args.clients < 1 or args.rollback_every < 0:
        ap.error("--cycles and --clients must be >= 1, --rollback-every >= 0")
    if args.device != "cpu" and device_index(args.device) is None:
        ap.error(f"--device must be cpu or cuda:N, got {args.device!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, args.out)
    log = sys.stderr if args.json else sys.stdout
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu-pool-stress-")

    def emit(s: Sample) -> None:
        print(progress_line(s, args.cycles), file=log, flush=True)

    def interrupted(signum: int, frame: object) -> None:
        # A SIGTERM (e.g. from `timeout`) ends the run like Ctrl-C does: the cycle loop
        # stops, its poold is shut down, and what was sampled so far is written.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    t0 = time.monotonic()
    try:
        runner = run_pool if args.mode == "pool" else run_inprocess
        samples, errors, lat, extra = runner(args, work, emit)
    except (RuntimeError, Unreachable, subprocess.CalledProcessError) as exc:
        print(f"stress: could not start: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    checks = judge(samples, gpu=True, rss_slope_max=args.rss_slope_max,
                   cycles=args.cycles) + extra
    if args.standby and args.mode == "pool" and args.control is None:
        cold = [s.cycle for s in samples if "standby" in s.error]
        checks.append(check("started in the standby", not cold, len(cold), 0,
                             f"{len(samples) - len(cold)} of {len(samples)} updates"
                             + (f"; not in cycles {cold[:10]}" if cold else "")))
    summary = summarize(args, samples, checks, errors, lat, time.monotonic() - t0)
    write_csv(os.path.join(args.out, "samples.csv"), samples)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    title = (f"{summary['mode']} ({summary['strategy']}), {args.model_size} model on "
             f"{args.device}, {args.clients} clients: {summary['verdict'].upper()}")
    plot_run(samples, os.path.join(args.out, "stress.png"), title,
             "poold" if args.mode == "pool" else "server")
    if errors:
        print("first failures:\n  " + "\n  ".join(errors[:5]), file=log)
    print_verdict(summary, log)
    if args.json:
        json.dump(summary, sys.stdout, indent=1)
        print()
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
