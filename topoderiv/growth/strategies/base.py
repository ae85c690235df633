"""What a growth strategy is: ``propose(grower) -> Proposal | None``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from torch import Tensor, nn

__all__ = ["Proposal", "InsertionStrategy"]


@dataclass
class Proposal:
    """What to insert.

    Attributes:
        point: candidate point (``model.blocks`` index of the new block).
        weight: ``[n, d_in]`` for ``model.new_block(point).linear.weight`` (None = zeros).
        bias: ``[n]`` (None = zeros). The inserted parameters are ``eps * weight``, ``eps * bias``.
        eps: scale (the block is the identity at ``eps = 0``).
        info: JSON-able extras recorded in the history (``"mu"``: ``{point: mu}`` is drawn).
        block: a ready module to insert instead of the site's new block (weight/bias/eps ignored).
        phi: a direction for the site's new block (any site kind: a ``[n, m]`` tensor or a dict
            of parameters, as :func:`topoderiv.insert` takes); overrides weight/bias.
    """

    point: int
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 1.0
    info: Dict[str, Any] = field(default_factory=dict)
    block: Optional[nn.Module] = None
    phi: Any = None


class InsertionStrategy:
    """Base class: ``propose(grower) -> Proposal | None`` (None stops the growth)."""

    name: str = "strategy"
    last_info: Dict[str, Any]

    def __init__(self) -> None:
        self.last_info = {}

    def propose(self, grower: "Grower") -> Optional[Proposal]:  # pragma: no cover - interface
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """JSON-able description recorded in the history."""
        return {"name": self.name}
