"""`python -m kdkernels.bench PROVIDER CASE_JSON`: one provider's peak memory on one case, in
a fresh process (measure.peak_memory_mb runs it)."""

import sys

from .measure import child_peak_memory

child_peak_memory(sys.argv[1], sys.argv[2])
