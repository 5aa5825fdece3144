import os
import sys
from pathlib import Path

import torch

# Test helper modules beside the tests (kernel_args, triton_aot) import by name.
sys.path.insert(0, str(Path(__file__).parent))

# Without a GPU, the Triton backend runs on CPU tensors in Triton's interpreter. This must be
# set before kdkernels imports Triton (it does so lazily, at the first use of the backend).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
