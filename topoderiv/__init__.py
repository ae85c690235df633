"""topoderiv: topological-derivative depth growth for neural networks.

Layers, bottom to top: the torch-free C++/CUDA core (``topoderiv._C``), drop-in custom ops
(:mod:`topoderiv.ops`) with plain-PyTorch twins (:mod:`topoderiv.reference`), then the method
(capture of states and costates, scoring, insertion, growth loop), models, tasks and the CLI.
"""
import torch  # noqa: F401  (loads torch's OpenMP runtime before the extension)

from . import ops, reference  # noqa: F401
from ._lib import build_info  # noqa: F401
from .ops import lanczos_topk, sensitivity_blocks, sensitivity_matvec, sensitivity_topk  # noqa: F401

__version__ = "0.1.0"



# --- growth API (sites, models, scoring, insertion, growth loop): exported below ------------
from . import data, growth, method, models, sites  # noqa: E402,F401
from .growth import (  # noqa: E402,F401
    GrowthHistory,
    Grower,
    InsertionStrategy,
    PointScore,
    Proposal,
    RoundRecord,
    ScoreReport,
    TopologicalStrategy,
    evaluate,
    fit,
    grow,
    insert,
    insert_block,
    load,
    load_checkpoint,
    remove_block,
    save,
    score,
    search_eps,
)
from .method.activations import TDActivation, check_admissible  # noqa: E402,F401
from .models import ResidualBlock, ResidualMLP  # noqa: E402,F401
from .sites import SiteSpec, candidate_points, declare, site_at, sites as list_sites  # noqa: E402,F401
from .sites.capture import capture_all, state_at  # noqa: E402,F401
