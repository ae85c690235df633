"""Loads the compiled extension on first use, with an error that says how to build it."""
from __future__ import annotations

import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
from types import ModuleType
from typing import Optional


def _installed_extension() -> Optional[ModuleType]:
    """The installed distribution's ``topoderiv._C`` when this package is an uncompiled source tree.

    ``python -m topoderiv`` or ``python -m pytest`` run from a checkout import the source package
    (the working directory comes first on ``sys.path``); after ``pip install .`` its compiled
    extension lives in site-packages, and loading it from there makes both work.
    """
    try:
        files = importlib.metadata.distribution("topoderiv").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    for f in files:
        if f.parts[:1] == ("topoderiv",) and f.name.startswith("_C.") and f.name.endswith(suffixes):
            spec = importlib.util.spec_from_file_location("topoderiv._C", str(f.locate()))
            if spec is None or spec.loader is None:
                return None
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            sys.modules["topoderiv._C"] = mod
            return mod
    return None


@functools.lru_cache(maxsize=None)
def lib() -> ModuleType:
    """Returns ``topoderiv._C``; raises ImportError with build instructions if it is missing."""
    try:
        from . import _C
        return _C
    except ImportError as err:  # pragma: no cover - depends on the installation
        mod = _installed_extension()
        if mod is not None:
            return mod
        raise ImportError(
            "topoderiv: the compiled extension topoderiv._C is missing or broken "
            f"({err}). Build it with `pip install .` from the source tree "
            "(`pip install --no-build-isolation --no-deps .` offline)."
        ) from err


def build_info() -> dict:
    """What was built: CUDA kernels yes/no, architectures, runtime version, visible GPUs, torch."""
    import torch

    info = dict(lib().build_info())
    info["torch"] = torch.__version__
    info["torch_cuda_available"] = torch.cuda.is_available()
    info["torch_threads"] = torch.get_num_threads()
    return info
