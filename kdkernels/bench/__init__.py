"""Microbenchmarks: cases and providers defined once, used by `kdkernels bench` and bench/.

Every figure is measured side by side in one run: the median time of forward+backward (or
forward only) per provider, the providers of a case timed in turns, the time to stream the
minimal bytes at the copy bandwidth measured in the same run, and optionally each provider's
peak memory in a fresh process.

    cases.py    the cases (shape, dtype, teachers, divergence), the grids and the providers
    measure.py  timing, the streaming floor, peak memory, `run`
    report.py   table, CSV, figure
"""

from .cases import GRIDS, Case, providers, reference_loss
from .measure import Row, run
from .report import format_table, plot, write_csv

__all__ = [
    "GRIDS",
    "Case",
    "Row",
    "format_table",
    "plot",
    "providers",
    "reference_loss",
    "run",
    "write_csv",
]
