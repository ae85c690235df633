"""The registry of classes a checkpoint may name: a file never names code to run.

A checkpoint stores architectures as registered NAMES plus JSON configs; loading looks the name
up here and never imports a module or resolves an attribute path from the file. What is
registered: topoderiv's own models, blocks, activations and feature maps (at import), the
classes of supported libraries (timm, when its support is imported), and whatever the user
registers explicitly in code:

    from topoderiv.registry import register

    @register                      # under its class name (or register(name="my.Block"))
    class MyBlock(nn.Module): ...

Names are unique: registering a different class under a taken name raises.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Type, TypeVar, Union, overload

__all__ = ["register", "lookup", "name_of", "registered"]

T = TypeVar("T", bound=type)

_BY_NAME: Dict[str, type] = {}
_NAME_OF: Dict[type, str] = {}


@overload
def register(cls: T, *, name: Optional[str] = None) -> T: ...


@overload
def register(cls: None = None, *, name: Optional[str] = None) -> Callable[[T], T]: ...


def register(cls: Optional[T] = None, *, name: Optional[str] = None) -> Union[T, Callable[[T], T]]:
    """Registers a class (decorator, with or without ``name=``); returns the class.

    Raises:
        TypeError: ``cls`` is not a class. ValueError: the name is taken by another class.
    """

    def deco(c: T) -> T:
        if not isinstance(c, type):
            raise TypeError(f"register: expected a class, got {type(c).__name__}")
        key = name if name is not None else c.__qualname__
        if not isinstance(key, str) or not key:
            raise ValueError(f"register: name must be a non-empty str, got {key!r}")
        old = _BY_NAME.get(key)
        if old is not None and old is not c:
            raise ValueError(f"register: the name {key!r} is already registered for {old.__module__}."
                             f"{old.__qualname__}; pass register(name=...) with another name")
        _BY_NAME[key] = c
        _NAME_OF.setdefault(c, key)
        return c

    return deco(cls) if cls is not None else deco


def lookup(name: object, what: str = "class", where: str = "checkpoint") -> type:
    """The class registered under ``name``; ValueError naming it and how to register it otherwise."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(
            f"{where}: {what} {name!r} is not a registered class: loading never imports code named by a file. "
            f"If you trust it, register the class in your code before loading: "
            f"`from topoderiv.registry import register; register(MyClass, name={name!r})`"
        )
    return _BY_NAME[name]


def name_of(cls_or_obj: object) -> Optional[str]:
    """The registered name of a class (or of an instance's class), or None."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return _NAME_OF.get(cls)


def registered() -> Dict[str, type]:
    """A copy of the registry: ``{name: class}``."""
    return dict(_BY_NAME)
