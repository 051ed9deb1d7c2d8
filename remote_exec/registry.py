"""The instance registry: named instances, registered classes and coders.

Every executor (and every server) owns one ``InstanceRegistry``; there is no
module-global state except the *default* coder table that new registries copy
when they are made (filled by the module-level ``register_coder``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .exceptions import CodecError, DuplicateInstanceError, RegistryError, UnknownInstanceError

__all__ = ["InstanceRegistry", "register_coder"]


@dataclass(frozen=True, slots=True)
class Coder:
    """How a custom type travels: ``encode(obj)`` gives an encodable value that
    ``decode(value)`` turns back into an object."""

    name: str
    cls: type
    encode: Callable[[Any], Any]
    decode: Callable[[Any], Any]


_default_coders: dict[str, Coder] = {}


def _check_coder(name: str, cls: type, coders: dict[str, Coder]) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError("a coder needs a non-empty string name")
    if not isinstance(cls, type):
        raise TypeError(f"register_coder needs a class, got {cls!r}")
    existing = coders.get(name)
    if existing is not None and existing.cls is not cls:
        raise RegistryError(f"coder name {name!r} is already used for {existing.cls.__qualname__}")


def register_coder(
    name: str, cls: type, encode: Callable[[Any], Any], decode: Callable[[Any], Any]
) -> None:
    """Teach every registry made from now on to carry ``cls`` under ``name``.

    Call it at import time of the module that defines ``cls``: a daemon that
    imports that module then knows the type too.
    """
    _check_coder(name, cls, _default_coders)
    _default_coders[name] = Coder(name, cls, encode, decode)


def qualified_name(cls: type) -> tuple[str, str]:
    """The (module, qualname) pair a class is known by on both sides."""
    return cls.__module__, cls.__qualname__


class InstanceRegistry:
    """Named instances both ways, registered classes, and the coders."""

    def __init__(self) -> None:
        self._instances: dict[str, Any] = {}
        self._names: dict[int, str] = {}  # id(obj) -> name; _instances keeps obj alive
        self._classes: dict[tuple[str, str], type] = {}
        self._coders: dict[str, Coder] = dict(_default_coders)
        self._coders_by_type: dict[type, Coder] = {c.cls: c for c in self._coders.values()}

    # -- instances -------------------------------------------------------------
    def add_instance(self, obj: Any, name: str) -> None:
        """Hold ``obj`` under ``name``.

        Raises:
            DuplicateInstanceError: the name, or the object, is already held.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("an instance name must be a non-empty string")
        if name in self._instances:
            raise DuplicateInstanceError(f"an instance named {name!r} already exists")
        if id(obj) in self._names:
            raise DuplicateInstanceError(
                f"{_describe(obj)} is already held as {self._names[id(obj)]!r}"
            )
        self._instances[name] = obj
        self._names[id(obj)] = name

    def remove_instance(self, obj_or_name: Any) -> Any:
        """Stop holding an instance (given by object or name); returns it."""
        name = obj_or_name if isinstance(obj_or_name, str) else self.require_name(obj_or_name)
        obj = self.get_instance(name)
        del self._instances[name]
        del self._names[id(obj)]
        return obj

    def get_instance(self, name: str) -> Any:
        """The instance held under ``name``.

        Raises:
            UnknownInstanceError: nothing is held under that name.
        """
        try:
            return self._instances[name]
        except (KeyError, TypeError):
            raise UnknownInstanceError(f"no instance named {name!r} is held") from None

    def name_of(self, obj: Any) -> str | None:
        """The name ``obj`` is held under, or None."""
        name = self._names.get(id(obj))
        if name is not None and self._instances.get(name) is obj:
            return name
        return None

    def require_name(self, obj: Any) -> str:
        """The name ``obj`` is held under; a helpful error if it is not held."""
        name = self.name_of(obj)
        if name is None:
            raise UnknownInstanceError(
                f"{_describe(obj)} is not held by this executor: register it first with "
                "`async with executor.remote_instance(obj, 'name', *args):` or "
                "`await executor.ensure_remote_instance(obj, 'name', *args)`"
            )
        return name

    def instance_names(self) -> list[str]:
        return list(self._instances)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(list(self._instances.items()))

    def __len__(self) -> int:
        return len(self._instances)

    # -- classes ---------------------------------------------------------------
    def register_class(self, cls: type) -> None:
        """Remember ``cls`` by (module, qualname); registering it twice is fine."""
        key = qualified_name(cls)
        known = self._classes.get(key)
        if known is not None and known is not cls:
            raise RegistryError(f"another class is already registered as {key[0]}.{key[1]}")
        self._classes[key] = cls

    def get_class(self, module: str, qualname: str) -> type | None:
        return self._classes.get((module, qualname))

    # -- coders ----------------------------------------------------------------
    def register_coder(
        self, name: str, cls: type, encode: Callable[[Any], Any], decode: Callable[[Any], Any]
    ) -> None:
        """Teach this registry alone to carry ``cls`` under ``name``."""
        _check_coder(name, cls, self._coders)
        coder = Coder(name, cls, encode, decode)
        self._coders[name] = coder
        self._coders_by_type[cls] = coder

    def learn_default_coders(self) -> None:
        """Add the module-level coders registered since this registry was made
        (a module imported later may register its coders at import)."""
        for name, coder in list(_default_coders.items()):
            if name not in self._coders:
                self.register_coder(name, coder.cls, coder.encode, coder.decode)

    def coder_for_type(self, cls: type) -> Coder | None:
        """The coder for ``cls`` (exact type first, then the nearest base)."""
        coder = self._coders_by_type.get(cls)
        if coder is None and self._coders:
            for base in cls.__mro__[1:]:
                coder = self._coders_by_type.get(base)
                if coder is not None:
                    break
        return coder

    def coder_named(self, name: str) -> Coder:
        try:
            return self._coders[name]
        except KeyError:
            raise CodecError(f"no coder named {name!r} is registered on this side") from None


def _describe(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__} object at {id(obj):#x}"
