"""What ``scripts/stress.py`` stands on, gathered in one import: model files
(``stress_models``), a private poold (``stress_poold``), process probes
(``stress_probes``), the in-process runner (``stress_inproc``), the samples and their
CSV (``stress_samples``) and the charts (``stress_charts``).

The stress driver itself never imports torch: models are written by a child process
(``python stresskit.py make-models DIR SIZE``) and the classic in-process swap runs in a
child too (``python stresskit.py inproc ...``), so the driver's own process never holds a
CUDA context or any ``/dev/nvidia*`` descriptor beyond NVML's. This file is those
children's entry point.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as a plain script from anywhere: find pool/, router/, workers/
    sys.path.insert(0, ROOT)

from stress_charts import plot_compare, plot_run  # noqa: E402
from stress_inproc import InProcess, inproc_server  # noqa: E402
from stress_models import (  # noqa: E402
    SIZES,
    VERSIONS,
    ModelSet,
    make_models,
    model_set,
    output_problem,
)
from stress_poold import PoolProcess  # noqa: E402
from stress_probes import Leftovers, child_stats, nvidia_holders, proc_stats  # noqa: E402
from stress_samples import (  # noqa: E402
    COLUMNS,
    MiB,
    Sample,
    percentile,
    read_csv,
    slope,
    write_csv,
)

_make_models = make_models  # the name tests/test_stress.py calls
_inproc_server = inproc_server

__all__ = [
    "COLUMNS", "SIZES", "VERSIONS", "InProcess", "Leftovers", "MiB", "ModelSet", "PoolProcess",
    "Sample", "child_stats", "make_models", "model_set", "nvidia_holders", "output_problem",
    "percentile", "plot_compare", "plot_run", "proc_stats", "read_csv", "slope", "write_csv",
]  # fmt: skip


def main(argv: list[str]) -> int:
    if argv[:1] == ["make-models"] and len(argv) == 3:
        make_models(argv[1], argv[2])
        return 0
    if argv[:1] == ["inproc"] and len(argv) == 4:
        inproc_server(argv[1], int(argv[2]), argv[3])
        return 0
    print("usage: stresskit.py make-models DIR small|1gib | inproc DEVICE CLIENTS DIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
