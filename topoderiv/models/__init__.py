"""Models that grow: our MLP (and, with their sites, CNN and ViT), and what they are built from.

A model is growable when it declares sites (:mod:`topoderiv.sites`): a ``site_specs()`` method,
:func:`topoderiv.sites.declare` on an instance, or the legacy protocol (a ``blocks`` container
and ``new_block(point)``). To be saved and rebuilt it also has ``config()``: JSON-able
constructor arguments reproducing the current architecture (with the current depth). Optional:
``forward_from(point, h)`` runs everything after site ``point`` on the stream tensor ``h``; the
eps search then re-evaluates only that suffix.
"""
from ..sites import candidate_points, check_growable  # noqa: F401
from ..sites.linear import ResidualBlock  # noqa: F401
from .mlp import ResidualMLP  # noqa: F401
from .vit import ViT  # noqa: F401
from .cnn import ResidualCNN  # noqa: F401
from .timm import TimmModel, from_timm, timm_model  # noqa: F401  (timm itself is imported only when used)

__all__ = ["ResidualMLP", "ResidualCNN", "ResidualBlock", "candidate_points", "check_growable", "from_timm",
           "timm_model", "TimmModel"]
