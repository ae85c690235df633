"""Loads the compiled extension on first use, with an error that says how to build it."""
from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def lib() -> ModuleType:
    """Returns ``topoderiv._C``; raises ImportError with build instructions if it is missing."""
    try:
        from . import _C
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ImportError(
            "topoderiv: the compiled extension topoderiv._C is missing or broken "
            f"({err}). Build it with `pip install .` from the source tree "
            "(`pip install --no-build-isolation --no-deps .` offline), and run tests with the "
            "`pytest` console script so the installed package is imported."
        ) from err
    return _C
