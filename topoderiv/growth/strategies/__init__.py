"""Insertion strategies, by name: a registry instead of names hard-coded in resume.

``STRATEGIES[name]`` is the class; ``strategy.config()`` is ``{"name": ..., **constructor
arguments}``, so :func:`strategy_from_config` rebuilds a saved strategy. Register your own with
:func:`register_strategy` (a class decorator; the class's ``name`` is the key).
"""
from __future__ import annotations

from typing import Any, Dict, Type, Union

from .base import InsertionStrategy, Proposal

__all__ = ["STRATEGIES", "register_strategy", "make_strategy", "strategy_from_config", "InsertionStrategy", "Proposal",
           "TopologicalStrategy", "TopologicalAllRows", "RandomInsertion", "IdentityInsertion", "ForwardThinking",
           "StackingInsertion", "ZeroBlockInsertion"]

STRATEGIES: Dict[str, Type[InsertionStrategy]] = {}


def register_strategy(cls: Type[InsertionStrategy]) -> Type[InsertionStrategy]:
    """Class decorator: ``STRATEGIES[cls.name] = cls``."""
    if not (isinstance(cls, type) and issubclass(cls, InsertionStrategy)):
        raise TypeError(f"register_strategy: cls must be an InsertionStrategy subclass, got {cls!r}")
    STRATEGIES[cls.name] = cls
    return cls


def make_strategy(strategy: Union[str, InsertionStrategy], fn: str = "Grower") -> InsertionStrategy:
    """A strategy object, or a registered name built with default arguments."""
    if isinstance(strategy, InsertionStrategy):
        return strategy
    if isinstance(strategy, str) and strategy in STRATEGIES:
        return STRATEGIES[strategy]()
    raise ValueError(f"{fn}: strategy must be an InsertionStrategy or one of {sorted(STRATEGIES)}, got {strategy!r}")


def strategy_from_config(config: Dict[str, Any], fn: str = "strategy_from_config") -> InsertionStrategy:
    """Rebuilds a strategy from its ``config()`` (the name must be registered)."""
    if not isinstance(config, dict) or not isinstance(config.get("name"), str):
        raise ValueError(f"{fn}: a strategy config must be a dict with a 'name', got {config!r}")
    cls = STRATEGIES.get(config["name"])
    if cls is None:
        raise ValueError(f"{fn}: strategy {config['name']!r} is not registered (known: {sorted(STRATEGIES)}); pass "
                         "strategy=... or register it with topoderiv.growth.strategies.register_strategy")
    try:
        return cls(**{k: v for k, v in config.items() if k != "name"})
    except TypeError as err:
        raise ValueError(f"{fn}: the saved config of strategy {config['name']!r} does not fit its class: {err}") from None


from .topological import TopologicalStrategy  # noqa: E402
from .baselines import ForwardThinking, IdentityInsertion, RandomInsertion, TopologicalAllRows  # noqa: E402
from .growers import StackingInsertion, ZeroBlockInsertion  # noqa: E402

for _cls in (TopologicalStrategy, TopologicalAllRows, RandomInsertion, IdentityInsertion, ForwardThinking,
             StackingInsertion, ZeroBlockInsertion):
    register_strategy(_cls)
