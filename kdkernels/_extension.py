"""The compiled extension kdkernels._C, imported once, with the reason when it is missing."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def load_extension() -> tuple[ModuleType | None, str]:
    """(kdkernels._C, "") or (None, why it could not be imported)."""
    try:
        from . import _C
    except ImportError as exc:  # a source checkout that was never built, or a broken wheel
        return None, f"the compiled extension kdkernels._C is missing ({exc}); install the wheel"
    return _C, ""
