"""Growth: scoring, insertion, the eps search, the growth loop, strategies, history, checkpoints."""
from .checkpoint import load, load_checkpoint, save  # noqa: F401
from .grower import Grower, adopt_parameters, grow  # noqa: F401
from .history import GrowthHistory, RoundRecord, count_parameters, jsonable  # noqa: F401
from .insertion import DEFAULT_EPS_GRID, insert, insert_block, prepare_block, remove_block, search_eps  # noqa: F401
from .scoring import PointScore, ScoreReport, score  # noqa: F401
from .strategies import (  # noqa: F401
    STRATEGIES,
    ForwardThinking,
    IdentityInsertion,
    InsertionStrategy,
    Proposal,
    RandomInsertion,
    StackingInsertion,
    TopologicalAllRows,
    TopologicalStrategy,
    ZeroBlockInsertion,
    register_strategy,
)
from .training import evaluate, fit  # noqa: F401
