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

:func:`lookup` also accepts the ``"module:QualName"`` spelling that checkpoints written before the
registry used (``"topoderiv.models:ResidualMLP"``, ``"torch.optim.adam:Adam"``): it maps to the
REGISTERED class of that qualified name whose module is ``module`` or inside the package
``module`` (plus a few renamed spellings of topoderiv's own classes), and never imports anything.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, TypeVar, Union, overload

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


#: spellings of topoderiv's own classes in checkpoints written before the registry, whose module
#: has since moved out of the package it names -> registered name
_LEGACY: Dict[str, str] = {
    "topoderiv.models:ResidualBlock": "ResidualBlock",
    "topoderiv.activations:TDActivation": "td",
}


def _legacy_class(spelling: str, where: str) -> Optional[type]:
    """The registered class spelled ``"module:QualName"`` (see the module docstring), or None."""
    mod, sep, qual = spelling.partition(":")
    if not sep or not mod or not qual:
        return None
    renamed = _LEGACY.get(spelling)
    if renamed is not None and renamed in _BY_NAME:
        return _BY_NAME[renamed]
    matches = {c for c in _BY_NAME.values()
               if c.__qualname__ == qual and (c.__module__ == mod or c.__module__.startswith(mod + "."))}
    if len(matches) > 1:
        found = sorted(f"{c.__module__}.{c.__qualname__}" for c in matches)
        raise ValueError(f"{where}: {spelling!r} is ambiguous: it may name any of the registered classes {found}; "
                         f"name one by its registered name instead")
    return next(iter(matches)) if matches else None


def lookup(name: object, what: str = "class", where: str = "checkpoint", base: Optional[type] = None) -> type:
    """The class registered under ``name`` (or spelled ``"module:QualName"``, see the module docstring).

    Args:
        name: a registered name.
        what, where: for the error message (what is looked up, and the function/file/field).
        base: when given, the class must be a subclass of it.

    Raises:
        ValueError: ``name`` is not registered (the message names it and how to register it), or
            the class is not a subclass of ``base``. Nothing is ever imported.
    """
    cls = _BY_NAME.get(name) if isinstance(name, str) else None
    if cls is None and isinstance(name, str):
        cls = _legacy_class(name, where)
    if cls is None:
        raise ValueError(
            f"{where}: {what} {name!r} is not a registered class: loading never imports code named by a file. "
            f"If you trust it, register the class in your code before loading: "
            f"`from topoderiv.registry import register; register(MyClass, name={name!r})`"
        )
    if base is not None and not issubclass(cls, base):
        raise ValueError(f"{where}: {what} {name!r} is registered for {cls.__module__}.{cls.__qualname__}, which is "
                         f"not a {base.__module__}.{base.__qualname__} subclass")
    return cls


def name_of(cls_or_obj: object) -> Optional[str]:
    """The registered name of a class (or of an instance's class), or None.

    An instance built by a registered BUILDER (a registered class whose constructor returns an
    object of another class, e.g. ``"timm"``: :func:`topoderiv.models.from_timm`) names it in its
    attribute ``topoderiv_builder``; that registered name is returned for the instance.
    """
    if not isinstance(cls_or_obj, type):
        builder = getattr(cls_or_obj, "topoderiv_builder", None)
        if isinstance(builder, str) and builder in _BY_NAME:
            return builder
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return _NAME_OF.get(cls)


def registered() -> Dict[str, type]:
    """A copy of the registry: ``{name: class}``."""
    return dict(_BY_NAME)
