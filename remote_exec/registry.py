"""The instance registry: named instances, registered classes and coders.

Every executor (and every server) owns one ``InstanceRegistry``; there is no
module-global state except the *default* coder table that new registries copy
when they are made (filled by the module-level ``register_coder``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from types import ModuleType
from typing import Any

from .exceptions import CodecError, DuplicateInstanceError, RegistryError, UnknownInstanceError

__all__ = ["InstanceRegistry", "register_coder"]

# A server imports a client's main script under a private name of this prefix
# (server/dispatch.py); its classes are ``__main__`` classes to the client.
MAIN_MODULE_PREFIX = "__remote_exec_main_"


def wire_module(module: str) -> str:
    """The module name a class of ``module`` is known by on the wire."""
    return "__main__" if module.startswith(MAIN_MODULE_PREFIX) else module


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
    from .codecs import carried_natively  # codecs imports this module

    if not isinstance(name, str) or not name:
        raise ValueError("a coder needs a non-empty string name")
    if not isinstance(cls, type):
        raise TypeError(f"register_coder needs a class, got {cls!r}")
    if carried_natively(cls):
        raise RegistryError(
            f"{cls.__module__}.{cls.__qualname__} travels natively (docs/wire-format.md): "
            "a coder for it would never be used"
        )
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
    """Named instances both ways, registered classes, and the coders.

    Attributes:
        module_allowed: on a server, its allow-list (``module -> bool``): Enum
            classes of an allowed module already imported may be decoded too.
    """

    def __init__(self) -> None:
        self._instances: dict[str, Any] = {}
        self._names: dict[int, str] = {}  # id(obj) -> name; _instances keeps obj alive
        self._classes: dict[tuple[str, str], type] = {}
        self._coders: dict[str, Coder] = dict(_default_coders)
        self._coders_by_type: dict[type, Coder] = {c.cls: c for c in self._coders.values()}
        # The modules this side uses: of held instances' classes (counted) and of
        # registered classes. Enum classes defined there may be decoded.
        self._held_modules: dict[str, int] = {}
        self._class_modules: set[str] = set()
        self._enums: dict[tuple[str, str], type[Enum]] = {}  # resolved, until an instance goes
        self.module_allowed: Callable[[str], bool] | None = None

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
        module = type(obj).__module__
        self._held_modules[module] = self._held_modules.get(module, 0) + 1

    def remove_instance(self, obj_or_name: Any) -> Any:
        """Stop holding an instance (given by object or name); returns it."""
        name = obj_or_name if isinstance(obj_or_name, str) else self.require_name(obj_or_name)
        obj = self.get_instance(name)
        del self._instances[name]
        del self._names[id(obj)]
        module = type(obj).__module__
        left = self._held_modules.get(module, 1) - 1
        if left > 0:
            self._held_modules[module] = left
        else:
            self._held_modules.pop(module, None)
            self._enums.clear()  # its module may no longer be one this side uses
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
        self._class_modules.add(cls.__module__)

    def get_class(self, module: str, qualname: str) -> type | None:
        return self._classes.get((module, qualname))

    def enum_class(self, module: str, qualname: str) -> type[Enum]:
        """The Enum class an enum member on the wire names; never imports anything.

        Found if it is a registered class, or defined (at module level or in a
        class) in an already imported module this side uses: one of a held
        instance's class, of a registered class, or one ``module_allowed``
        accepts. ``"__main__"`` also means a client's main script a server
        loaded (``MAIN_MODULE_PREFIX``).

        Raises:
            CodecError: no such Enum class may be used here.
        """
        key = (module, qualname)
        cls = self._enums.get(key)
        if cls is not None:
            return cls
        found: Any = self._classes.get(key)
        if found is None:
            candidates = [module] if self._uses_module(module) else []
            if module == "__main__":
                candidates += sorted(
                    m for m in list(sys.modules) if m.startswith(MAIN_MODULE_PREFIX)
                )
            hits = {c for m in candidates if (c := _defined_class(sys.modules.get(m), qualname))}
            if len(hits) > 1:
                raise CodecError(f"enum class __main__.{qualname} is ambiguous on this side")
            found = hits.pop() if hits else None
        if not (isinstance(found, type) and issubclass(found, Enum)):
            raise CodecError(
                f"enum class {module}.{qualname} may not be decoded here: it is neither "
                "registered nor defined in an imported module this side holds instances of "
                f"(or allows); register it with `await executor.register_remote_class({qualname})`"
            )
        self._enums[key] = found
        return found

    def _uses_module(self, module: str) -> bool:
        if module in self._held_modules or module in self._class_modules:
            return True
        allowed = self.module_allowed
        return allowed is not None and allowed(module)

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


def _defined_class(module: ModuleType | None, qualname: str) -> type | None:
    """The class ``qualname`` defined in ``module``, looked up in namespaces only
    (no ``getattr``: a module's ``__getattr__`` could import or run code)."""
    if module is None:
        return None
    obj: Any = module
    for part in qualname.split("."):
        if not part.isidentifier() or part.startswith("__"):
            return None
        obj = vars(obj).get(part)
        if not isinstance(obj, type):
            return None
    if not isinstance(obj, type) or (obj.__module__, obj.__qualname__) != (
        module.__name__,
        qualname,
    ):
        return None  # imported from elsewhere, not defined here
    return obj


def _describe(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__} object at {id(obj):#x}"
