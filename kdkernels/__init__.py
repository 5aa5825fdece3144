"""kdkernels: the fused knowledge-distillation loss of Hinton et al. (2015) for PyTorch."""

from importlib.metadata import PackageNotFoundError, version

from ._autograd import allow_repeated_backward
from ._gradient_buffers import empty_cache
from ._validate import TEMPERATURE_RANGE
from .linear import LinearDistillationLoss, linear_distillation_loss
from .loss import DistillationLoss, backends, distillation_loss
from .reference import kd_loss_reference

try:
    __version__ = version("kdkernels")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "TEMPERATURE_RANGE",
    "DistillationLoss",
    "LinearDistillationLoss",
    "__version__",
    "allow_repeated_backward",
    "backends",
    "distillation_loss",
    "empty_cache",
    "kd_loss_reference",
    "linear_distillation_loss",
]
