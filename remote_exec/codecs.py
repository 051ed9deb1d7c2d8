"""Codecs: turn values into a body plus out-of-band buffers, and back.

Both codecs carry exactly the same values:

- JSON scalars (``None``, ``bool``, 64-bit ``int``, ``float`` including NaN and
  infinities, ``str``), ``list`` and ``dict`` (keys: ``str``, ``int``, ``float``,
  ``bool`` or ``None``);
- ``tuple`` (arrives as a tuple);
- ``bytes``, ``bytearray``, ``memoryview`` and numpy arrays, always as
  out-of-band buffers of the frame. ``bytes``/``bytearray`` arrive as their own
  type (one copy); a ``memoryview`` arrives as a flat byte ``memoryview`` of the
  received frame and a numpy array as an array over it (no copy; read-only when
  the transport's buffer is immutable);
- the standard types every program passes around, each as its own tag so that
  it arrives as the same type: ``datetime``/``date``/``time``/``timedelta``,
  ``set``/``frozenset``, ``Decimal``, pathlib paths, ``complex``, ``UUID``,
  members of ``Enum`` classes the receiver may use (``registry.enum_class``),
  and numpy bool, integer, float, complex, datetime64 and timedelta64 scalars
  (which keep their dtype);
- references to instances held by the registry (they arrive as the holder's
  own object of that name);
- any type given a coder with ``register_coder``.

Values are first *lowered* to a tree of plain values plus tags, by one walk
shared by both codecs, then the codec serialises the tree. A tag is

- msgpack: an array whose first element is the extension ``ExtType(code, b"")``
  followed by the tag's fields (user data can never produce an ``ExtType``);
- JSON: an object ``{"$rx": name, "v": value}`` (a user dict with a ``"$rx"``
  key, or with non-string keys, is itself sent as the ``"dict"`` tag).

=========  ====  ====================================  =================================
tag        code  fields (msgpack) / ``v`` (JSON)        value
=========  ====  ====================================  =================================
bytes      1     buffer index                          ``bytes``
bytearray  2     buffer index                          ``bytearray``
memview    3     buffer index                          ``memoryview`` (format ``B``)
ndarray    4     buffer index, dtype descr, shape      ``numpy.ndarray``
tuple      5     item, item, ...                       ``tuple``
ref        6     instance name                         the held instance
custom     7     coder name, encoded value             whatever the coder decodes
dict       8     [key, value] pairs (JSON only)        ``dict``
float      9     "nan", "inf" or "-inf" (JSON only)    ``float``
datetime   10    ISO 8601 text                         ``datetime.datetime``
date       11    ISO 8601 text                         ``datetime.date``
time       12    ISO 8601 text                         ``datetime.time``
timedelta  13    days, seconds, microseconds           ``datetime.timedelta``
set        14    item, item, ...                       ``set``
frozenset  15    item, item, ...                       ``frozenset``
decimal    16    text (``str(d)``)                     ``decimal.Decimal``
path       17    flavour, text                         a ``pathlib`` path
complex    18    real, imag                            ``complex``
uuid       19    canonical text                        ``uuid.UUID``
enum       20    module, qualname, member              an ``Enum`` member
npscalar   21    dtype descr, value                    a numpy scalar
=========  ====  ====================================  =================================

In JSON the tag fields are the array ``v`` (a single field is not wrapped).
docs/wire-format.md spells each one out. Decoding never calls anything but
the registry's own coders and the constructors of the types above, and never
imports: unknown tags, unknown coder names, enum classes the registry does not
allow and nesting deeper than ``max_depth`` raise ``CodecError``. Nothing is
ever unpickled.

A body holds at most ``max_elements`` values, counted on the wire: every item
of an array and every entry of a map (key and value together), nested ones
too (a tag's fields are its array's items, or its object's entries). A value
takes at least one byte of body, so only a body longer than the cap is
counted (``count_elements``), before the parser builds anything (it would
turn one byte into a 72-byte empty list): a receiver refuses a body over the
cap with ``CodecError``, and a sender refuses to encode one (``FrameError``,
like a message over the size cap: the caller gets it, nothing is sent).
"""

from __future__ import annotations

import datetime as _dt
import decimal
import json
import math
import os
import pathlib
import re
import uuid
from collections.abc import Callable
from enum import Enum, Flag
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .exceptions import CodecError, FrameError, RemoteExecError
from .framing import (
    CODEC_JSON,
    CODEC_MSGPACK,
    DEFAULT_MAX_BUFFERS,
    DEFAULT_MAX_FRAME_SIZE,
    encode_frame,
)
from .registry import wire_module

if TYPE_CHECKING:
    from .registry import InstanceRegistry

try:  # numpy is optional
    import numpy as _np
    from numpy.lib.format import (
        descr_to_dtype as _descr_to_dtype,
        dtype_to_descr as _dtype_to_descr,
    )
except ImportError:  # pragma: no cover - exercised only without numpy
    _np = None  # type: ignore[assignment]

__all__ = ["Codec", "CodecCheck", "JsonCodec", "MsgpackCodec", "codec_for", "codec_named"]

DEFAULT_MAX_DEPTH = 64
DEFAULT_MAX_ELEMENTS = 1_000_000

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

T_BYTES, T_BYTEARRAY, T_MEMVIEW, T_NDARRAY, T_TUPLE, T_REF, T_CUSTOM, T_DICT, T_FLOAT = range(1, 10)
T_DATETIME, T_DATE, T_TIME, T_TIMEDELTA, T_SET, T_FROZENSET = range(10, 16)
T_DECIMAL, T_PATH, T_COMPLEX, T_UUID, T_ENUM, T_NPSCALAR = range(16, 22)
_TAG_NAMES = {
    T_BYTES: "bytes",
    T_BYTEARRAY: "bytearray",
    T_MEMVIEW: "memview",
    T_NDARRAY: "ndarray",
    T_TUPLE: "tuple",
    T_REF: "ref",
    T_CUSTOM: "custom",
    T_DICT: "dict",
    T_FLOAT: "float",
    T_DATETIME: "datetime",
    T_DATE: "date",
    T_TIME: "time",
    T_TIMEDELTA: "timedelta",
    T_SET: "set",
    T_FROZENSET: "frozenset",
    T_DECIMAL: "decimal",
    T_PATH: "path",
    T_COMPLEX: "complex",
    T_UUID: "uuid",
    T_ENUM: "enum",
    T_NPSCALAR: "npscalar",
}
_TAG_CODES = {name: code for code, name in _TAG_NAMES.items()}
_SCALARS = (str, int, float, bool, type(None))
_KEY_TYPES = (str, int, float, bool, type(None))


class Codec(Protocol):
    """Serialises a lowered tree to a body and back; chosen by id in the frame."""

    codec_id: int
    name: str

    def dumps(
        self, value: Any, registry: InstanceRegistry | None, *, head: int = 0
    ) -> tuple[bytes, list[memoryview]]:
        """Encode ``value``; returns the body and the out-of-band buffers.

        ``head``: ``value`` is a list whose first ``head`` items are plain
        strings and ints already fit for the wire (a message's envelope); they
        skip the lowering walk.
        """
        ...

    def parse(self, body: memoryview) -> Any:
        """Decode a body into its lowered tree (tags not yet resolved).

        Raises:
            CodecError: the body is invalid, or holds more than ``max_elements`` values.
        """
        ...

    def count_elements(self, body: bytes | memoryview, limit: int) -> int:
        """The values ``body`` holds (array items and map entries, nested ones
        too), or, once there are more than ``limit``, some number above it."""
        ...

    def build(self, tree: Any, registry: InstanceRegistry | None, buffers: list[memoryview]) -> Any:
        """Resolve the tags of a parsed tree (buffers, tuples, refs, custom types)."""
        ...

    def loads(
        self, body: memoryview, buffers: list[memoryview], registry: InstanceRegistry | None
    ) -> Any:
        """Decode a body with its buffers back into values."""
        ...


class _Walker:
    """The lowering and raising walks, shared by both codecs.

    Subclasses say how a tag looks in their serialisation (``tag`` and ``untag``).
    """

    codec_id: int
    name: str
    uses_plain_dicts = True

    def __init__(
        self, max_depth: int = DEFAULT_MAX_DEPTH, max_elements: int = DEFAULT_MAX_ELEMENTS
    ) -> None:
        self.max_depth = max_depth
        self.max_elements = max_elements

    # -- tags: overridden per codec --------------------------------------------
    def tag(self, code: int, fields: list[Any]) -> Any:
        raise NotImplementedError

    def untag(self, value: Any) -> tuple[int, list[Any]] | None:
        """If ``value`` is a tag, its code and fields; else None."""
        raise NotImplementedError

    def lower_float(self, value: float) -> Any:
        return value

    def lower_dict(
        self, value: dict[Any, Any], lower: Callable[[Any, int], Any], depth: int
    ) -> Any:
        out = {}
        for key, item in value.items():
            if type(key) not in _KEY_TYPES:
                raise CodecError(
                    f"dict keys must be str, int, float, bool or None, not {type(key).__name__}"
                )
            if type(key) is int and not INT_MIN <= key <= INT_MAX:
                raise CodecError(f"integer key {key} does not fit in 64 bits")
            out[key] = lower(item, depth)
        return out

    # -- the lowering walk -----------------------------------------------------
    def lower(
        self,
        value: Any,
        registry: InstanceRegistry | None,
        buffers: list[memoryview],
        head: int = 0,
    ) -> Any:
        max_depth = self.max_depth

        def lower(obj: Any, depth: int) -> Any:
            kind = type(obj)
            if kind is str or kind is bool or obj is None:
                return obj
            if kind is int:
                if not INT_MIN <= obj <= INT_MAX:
                    raise CodecError(f"integer {obj} does not fit in 64 bits")
                return obj
            if kind is float:
                return self.lower_float(obj)
            if depth >= max_depth:
                raise CodecError(f"value nested deeper than the cap of {max_depth}")
            depth += 1
            if kind is list:
                return [lower(item, depth) for item in obj]
            if kind is dict:
                return self.lower_dict(obj, lower, depth)
            if kind is tuple:
                return self.tag(T_TUPLE, [lower(item, depth) for item in obj])
            if kind is bytes or kind is bytearray or kind is memoryview:
                view = memoryview(obj)
                if not view.c_contiguous:
                    view = memoryview(view.tobytes())
                buffers.append(view.cast("B") if view.ndim != 1 or view.format != "B" else view)
                code = T_BYTES if kind is bytes else T_BYTEARRAY if kind is bytearray else T_MEMVIEW
                return self.tag(code, [len(buffers) - 1])
            native = _LOWERERS.get(kind)  # the standard types and numpy scalars
            if native is not None:
                return native(self, obj, lower, depth)
            if _np is not None and isinstance(obj, _np.ndarray):
                return self._lower_array(obj, buffers)
            if registry is not None:
                name = registry.name_of(obj)
                if name is not None:
                    return self.tag(T_REF, [name])
                coder = registry.coder_for_type(kind)
                if coder is not None:
                    return self.tag(T_CUSTOM, [coder.name, lower(coder.encode(obj), depth)])
            if isinstance(obj, Enum) and not isinstance(obj, _PLAIN_ENUM_MIXINS):
                return _lower_enum(self, obj)
            for base, plain in _PLAIN_BASES:  # subclasses such as IntEnum or StrEnum
                if isinstance(obj, base):
                    return lower(plain(obj), depth)  # the value, whatever __str__ says
            for base in kind.__mro__[1:]:  # subclasses of the standard types travel as them
                native = _LOWERERS.get(base)
                if native is not None:
                    return native(self, obj, lower, depth)
            raise CodecError(
                f"cannot encode a {kind.__module__}.{kind.__qualname__}: register it with "
                "register_coder(name, cls, encode, decode) or hold it as a remote instance"
            )

        try:
            if head:
                return value[:head] + [lower(item, 1) for item in value[head:]]
            return lower(value, 0)
        finally:
            # ``lower`` refers to itself: without this the cycle (and every
            # buffer it reaches) lives until the next garbage collection.
            lower = None  # type: ignore[assignment]

    def _lower_array(self, arr: Any, buffers: list[memoryview]) -> Any:
        if arr.dtype.hasobject:
            raise CodecError("numpy arrays of dtype object cannot be sent (that would need pickle)")
        contiguous = _np.ascontiguousarray(arr)
        try:
            view = contiguous.data.cast("B") if contiguous.size else memoryview(b"")
        except (TypeError, ValueError):  # dtypes the buffer protocol does not know
            view = (
                contiguous.view(_np.uint8).reshape(-1).data if contiguous.size else memoryview(b"")
            )
        buffers.append(view)
        descr = _dtype_to_descr(contiguous.dtype)
        # ``arr.shape``, not ``contiguous.shape``: ascontiguousarray turns 0-d into 1-d.
        return self.tag(T_NDARRAY, [len(buffers) - 1, _lower_descr(descr), list(arr.shape)])

    def loads(
        self, body: memoryview, buffers: list[memoryview], registry: InstanceRegistry | None
    ) -> Any:
        return self.build(self.parse(body), registry, buffers)

    def parse(self, body: memoryview) -> Any:
        raise NotImplementedError

    # -- the element cap ---------------------------------------------------------
    def count_elements(self, body: bytes | memoryview, limit: int) -> int:
        raise NotImplementedError

    def over_cap(self, body: bytes | memoryview) -> bool:
        """Whether ``body`` holds more values than the cap (only called for a
        body longer than the cap: a shorter one cannot)."""
        return self.count_elements(body, self.max_elements) > self.max_elements

    def _refuse_to_send(self) -> None:
        raise FrameError(
            f"the message holds more than {self.max_elements} values (array items and map "
            "entries), more than the element cap (Limits.max_elements); send large "
            "homogeneous data as bytes or a numpy array, or in several calls"
        )

    def _refuse_to_parse(self) -> None:
        raise CodecError(
            f"the message holds more than {self.max_elements} values, more than the "
            "element cap (Limits.max_elements; the daemon's --max-elements)"
        )

    # -- the raising walk ------------------------------------------------------
    def build(self, tree: Any, registry: InstanceRegistry | None, buffers: list[memoryview]) -> Any:
        max_depth = self.max_depth
        untag = self.untag

        def buffer(index: Any) -> memoryview:
            if type(index) is not int or not 0 <= index < len(buffers):
                raise CodecError(f"buffer index {index!r} out of range ({len(buffers)} buffers)")
            return buffers[index]

        def raise_(obj: Any, depth: int) -> Any:
            kind = type(obj)
            if kind is int:
                if not INT_MIN <= obj <= INT_MAX:
                    raise CodecError("integer does not fit in 64 bits")
                return obj
            if kind in _SCALARS:
                return obj
            if depth >= max_depth:
                raise CodecError(f"value nested deeper than the cap of {max_depth}")
            depth += 1
            tagged = untag(obj)
            if tagged is None:
                if kind is list:
                    return [raise_(item, depth) for item in obj]
                if kind is dict:
                    out = {}
                    for key, item in obj.items():
                        if type(key) not in _KEY_TYPES:
                            raise CodecError(f"invalid dict key type {type(key).__name__}")
                        out[key] = raise_(item, depth)
                    return out
                raise CodecError(f"unexpected {kind.__name__} in body")
            code, fields = tagged
            try:
                return self._raise_tag(code, fields, raise_, depth, buffer, registry)
            except RemoteExecError:
                raise
            except (
                TypeError,
                ValueError,
                IndexError,
                KeyError,
                AttributeError,
                OverflowError,
                RecursionError,
            ) as exc:
                raise CodecError(f"malformed {_TAG_NAMES.get(code, code)} tag: {exc}") from exc

        try:
            return raise_(tree, 0)
        finally:
            raise_ = None  # type: ignore[assignment]  # break the self-reference: buffers go now

    def _raise_tag(
        self,
        code: int,
        fields: list[Any],
        raise_: Callable[[Any, int], Any],
        depth: int,
        buffer: Callable[[Any], memoryview],
        registry: InstanceRegistry | None,
    ) -> Any:
        if code == T_TUPLE:
            return tuple(raise_(item, depth) for item in fields)
        if code == T_BYTES:
            (index,) = fields
            return bytes(buffer(index))
        if code == T_BYTEARRAY:
            (index,) = fields
            return bytearray(buffer(index))
        if code == T_MEMVIEW:
            (index,) = fields
            return buffer(index)
        if code == T_NDARRAY:
            index, descr, shape = fields
            return self._raise_array(buffer(index), descr, shape)
        if code == T_REF:
            (name,) = fields
            if type(name) is not str or registry is None:
                raise CodecError("malformed instance reference")
            return registry.get_instance(name)
        if code == T_CUSTOM:
            name, value = fields
            if type(name) is not str or registry is None:
                raise CodecError("malformed custom value")
            coder = registry.coder_named(name)
            decoded = raise_(value, depth)
            try:
                return coder.decode(decoded)
            except Exception as exc:  # the coder is user code fed with peer data
                raise CodecError(f"coder {name!r} could not decode its value: {exc!r}") from exc
        if code == T_DICT and not self.uses_plain_dicts:
            out = {}
            for pair in fields:
                if type(pair) is not list or len(pair) != 2:
                    raise CodecError("a dict tag holds [key, value] pairs")
                key, value = pair
                if type(key) is dict:  # a tagged key: a non-finite float
                    key = raise_(key, depth)
                if type(key) not in _KEY_TYPES:
                    raise CodecError(f"invalid dict key type {type(key).__name__}")
                out[key] = raise_(value, depth)
            return out
        if code == T_FLOAT and not self.uses_plain_dicts:
            (text,) = fields
            if text not in ("nan", "inf", "-inf"):
                raise CodecError(f"invalid float tag {text!r}")
            return float(text)
        native = _RAISERS.get(code)
        if native is not None:
            return native(fields, raise_, depth, registry)
        raise CodecError(f"unknown tag {code!r}")

    @staticmethod
    def _raise_array(view: memoryview, descr: Any, shape: Any) -> Any:
        if _np is None:
            raise CodecError("received a numpy array but numpy is not installed")
        if type(shape) is not list or not all(type(n) is int and n >= 0 for n in shape):
            raise CodecError("invalid array shape")
        dtype = _np.dtype(_descr_to_dtype(_raise_descr(descr)))
        if dtype.hasobject:
            raise CodecError("numpy arrays of dtype object are refused")
        count = math.prod(shape)
        if count * dtype.itemsize != view.nbytes:
            raise CodecError("array buffer size does not match its dtype and shape")
        if count == 0 or dtype.itemsize == 0:
            return _np.empty(shape, dtype)
        return _np.frombuffer(view, dtype).reshape(shape)


_MAX_DESCR_DEPTH = 32  # nested structured dtypes; deeper descrs are refused


def _lower_descr(descr: Any) -> Any:
    """numpy descr (str or list of ``(name, format[, shape])`` tuples) as plain lists.

    A field name may be a ``(title, name)`` pair, a format a nested descr, and a
    shape a tuple of ints: each becomes a list.
    """
    if isinstance(descr, str):
        return descr
    out = []
    for name, fmt, *shape in descr:
        field = [list(name) if isinstance(name, tuple) else name, _lower_descr(fmt)]
        if shape:
            field.append(list(shape[0]))
        out.append(field)
    return out


def _raise_descr(descr: Any, depth: int = 0) -> Any:
    """The inverse of ``_lower_descr``; numpy validates the result."""
    if isinstance(descr, str):
        return descr
    if not isinstance(descr, list):
        raise CodecError("invalid dtype description")
    if depth >= _MAX_DESCR_DEPTH:
        raise CodecError("dtype description nested too deeply")
    out: list[tuple[Any, ...]] = []
    for field in descr:
        if not isinstance(field, list) or not 2 <= len(field) <= 3:
            raise CodecError("invalid dtype field")
        name, sub, *shape = field
        if isinstance(name, list):  # (title, name)
            name = tuple(name)
        sub = _raise_descr(sub, depth + 1)
        if shape:
            if not isinstance(shape[0], list):
                raise CodecError("invalid dtype field shape")
            out.append((name, sub, tuple(shape[0])))
        else:
            out.append((name, sub))
    return out


# -- the standard types ----------------------------------------------------------
# A lowerer turns one value into its tag, a raiser turns a tag's fields back
# into the value. Exact types are found with one dict lookup in the walk, after
# the hot types (str, int, float, bool, None, list, dict, tuple, bytes) have
# returned; subclasses go through their MRO after the registry's coders.

_ISO_MAX = 64  # longer than any ISO 8601 text isoformat() writes
_PLAIN_ENUM_MIXINS = (int, float, str)  # IntEnum, StrEnum, IntFlag, ...: sent as plain values
_PLAIN_BASES: tuple[tuple[type, Callable[[Any], Any]], ...] = (
    (int, int.__int__),  # bool too
    (float, float.__float__),
    (str, str.__str__),
)
_NATIVE_PURE = "PureWindowsPath" if os.name == "nt" else "PurePosixPath"
_NATIVE_CONCRETE = "WindowsPath" if os.name == "nt" else "PosixPath"
_PATH_FLAVOURS: dict[type, str] = {
    pathlib.PurePosixPath: "PurePosixPath",
    pathlib.PureWindowsPath: "PureWindowsPath",
    pathlib.PosixPath: "PosixPath",
    pathlib.WindowsPath: "WindowsPath",
    pathlib.Path: _NATIVE_CONCRETE,  # a subclass of Path (Python 3.12+) of no flavour
    pathlib.PurePath: _NATIVE_PURE,
}

_Lower = Callable[[Any, int], Any]
_Lowerer = Callable[[_Walker, Any, _Lower, int], Any]
_Raiser = Callable[[list[Any], _Lower, int, "InstanceRegistry | None"], Any]


def _text(value: Any, what: str, limit: int | None = None) -> str:
    if type(value) is not str:
        raise CodecError(f"a {what} tag holds text, not {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise CodecError(f"a {what} tag's text is longer than {limit} characters")
    return value


def _integer(value: Any, what: str) -> int:
    if type(value) is not int:
        raise CodecError(f"a {what} tag holds integers, not {type(value).__name__}")
    return value


def _number(value: Any, what: str) -> float:
    if type(value) is not float and type(value) is not int:
        raise CodecError(f"a {what} tag holds numbers, not {type(value).__name__}")
    return float(value)


def _check_offset(offset: _dt.timedelta | None) -> None:
    # A fraction of a second is not read back reliably (Python 3.11 reads
    # "+00:00:00.5" as UTC); no real time zone has one.
    if offset is not None and offset.microseconds:
        raise CodecError(f"a UTC offset of {offset} (a fraction of a second) cannot travel")


def _lower_datetime(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    # The base class's methods, so that a subclass (pandas' Timestamp) sends what it is.
    if obj.tzinfo is not None:
        _check_offset(_dt.datetime.utcoffset(obj))
    return w.tag(T_DATETIME, [_dt.datetime.isoformat(obj)])


def _lower_date(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    return w.tag(T_DATE, [_dt.date.isoformat(obj)])


def _lower_time(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    if obj.tzinfo is not None:
        _check_offset(_dt.time.utcoffset(obj))
    return w.tag(T_TIME, [_dt.time.isoformat(obj)])


def _lower_timedelta(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    return w.tag(T_TIMEDELTA, [obj.days, obj.seconds, obj.microseconds])


def _lower_set(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    return w.tag(T_SET, [lower(item, depth) for item in obj])


def _lower_frozenset(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    return w.tag(T_FROZENSET, [lower(item, depth) for item in obj])


def _lower_decimal(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    return w.tag(T_DECIMAL, [decimal.Decimal.__str__(obj)])  # exact: sign, digits, exponent


def _lower_path(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    flavour = next(_PATH_FLAVOURS[base] for base in type(obj).__mro__ if base in _PATH_FLAVOURS)
    return w.tag(T_PATH, [flavour, pathlib.PurePath.__str__(obj)])


def _lower_complex(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    return w.tag(T_COMPLEX, [w.lower_float(obj.real), w.lower_float(obj.imag)])


def _lower_uuid(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    return w.tag(T_UUID, [uuid.UUID.__str__(obj)])


def _lower_enum(w: _Walker, obj: Enum) -> Any:
    cls = type(obj)
    qualname = cls.__qualname__
    if "<locals>" in qualname:
        raise CodecError(
            f"enum class {cls.__module__}.{qualname} is defined inside a function: "
            "the receiving side cannot find it (define it at module level)"
        )
    member: str | int
    if obj._name_ is not None and cls.__members__.get(obj._name_) is obj:
        member = obj._name_
    elif isinstance(obj, Flag) and type(obj._value_) is int and INT_MIN <= obj._value_ <= INT_MAX:
        member = obj._value_  # a combination of flags has no member name
    else:
        raise CodecError(f"{obj!r} is not a named member of {qualname}")
    return w.tag(T_ENUM, [wire_module(cls.__module__), qualname, member])


def _lower_npscalar(w: _Walker, obj: Any, lower: _Lower, depth: int) -> Any:
    dtype = obj.dtype
    kind = dtype.kind
    value: Any
    if kind == "b":
        value = bool(obj)
    elif kind in "iu":
        value = int(obj)
    elif kind == "f" and dtype.itemsize <= 8:
        value = w.lower_float(float(obj))
    elif kind == "c" and dtype.itemsize <= 16:
        value = [w.lower_float(float(obj.real)), w.lower_float(float(obj.imag))]
    elif kind in "mM":
        value = int(obj.view(_np.int64))  # the count of the dtype's unit; NaT is -2**63
    else:
        raise CodecError(
            f"a numpy {dtype} scalar cannot travel as a scalar without losing precision: "
            "send numpy.asarray(value) instead"
        )
    return w.tag(T_NPSCALAR, [dtype.str, value])


def _raise_datetime(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    (text,) = fields
    return _dt.datetime.fromisoformat(_text(text, "datetime", _ISO_MAX))


def _raise_date(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    (text,) = fields
    return _dt.date.fromisoformat(_text(text, "date", _ISO_MAX))


def _raise_time(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    (text,) = fields
    return _dt.time.fromisoformat(_text(text, "time", _ISO_MAX))


def _raise_timedelta(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    days, seconds, microseconds = (_integer(field, "timedelta") for field in fields)
    return _dt.timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _raise_set(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    return {raise_(item, depth) for item in fields}  # an unhashable item is a TypeError


def _raise_frozenset(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    return frozenset(raise_(item, depth) for item in fields)


def _raise_decimal(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    (text,) = fields
    try:
        return decimal.Decimal(_text(text, "decimal"))
    except decimal.InvalidOperation:
        raise CodecError(f"invalid decimal text {text[:64]!r}") from None


def _raise_path(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    flavour, text = fields
    text = _text(text, "path")
    if flavour == "PurePosixPath":
        return pathlib.PurePosixPath(text)
    if flavour == "PureWindowsPath":
        return pathlib.PureWindowsPath(text)
    if flavour == "PosixPath":  # a concrete path of another OS arrives as a pure one
        return pathlib.Path(text) if os.name != "nt" else pathlib.PurePosixPath(text)
    if flavour == "WindowsPath":
        return pathlib.Path(text) if os.name == "nt" else pathlib.PureWindowsPath(text)
    raise CodecError(f"unknown path flavour {flavour!r}")


def _raise_complex(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    real, imag = (_number(raise_(field, depth), "complex") for field in fields)
    return complex(real, imag)


def _raise_uuid(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    (text,) = fields
    return uuid.UUID(_text(text, "uuid", _ISO_MAX))


def _raise_enum(
    fields: list[Any], raise_: _Lower, depth: int, registry: InstanceRegistry | None
) -> Any:
    module, qualname, member = fields
    module, qualname = _text(module, "enum"), _text(qualname, "enum")
    if registry is None:
        raise CodecError("an enum member needs a registry to find its class")
    cls = registry.enum_class(module, qualname)  # never imports; CodecError if not allowed
    if type(member) is str:
        found = cls.__members__.get(member)
        if found is None:
            raise CodecError(f"{module}.{qualname} has no member {member[:64]!r}")
        return found
    if type(member) is int and issubclass(cls, Flag):
        return cls(member)
    raise CodecError(f"an enum tag's member is a name (or an int for a Flag), not {member!r}")


_scalar_dtypes: dict[str, tuple[Any, int, int]] = {}  # descr -> dtype, integer bounds


def _scalar_dtype(descr: Any) -> tuple[Any, int, int]:
    """The dtype of a scalar's descr (cached: parsing one costs more than the rest)."""
    known = _scalar_dtypes.get(descr)
    if known is None:
        dtype = _np.dtype(_text(descr, "npscalar", _ISO_MAX))
        low, high = (0, 0)
        if dtype.kind in "iu":
            info = _np.iinfo(dtype)
            low, high = int(info.min), int(info.max)
        known = (dtype, low, high)
        if dtype.kind in "biufcmM" and len(_scalar_dtypes) < 256:  # bounded: peers choose them
            _scalar_dtypes[descr] = known
    return known


def _raise_npscalar(fields: list[Any], raise_: _Lower, depth: int, registry: Any) -> Any:
    if _np is None:
        raise CodecError("received a numpy scalar but numpy is not installed")
    descr, value = fields
    dtype, low, high = _scalar_dtype(descr)
    kind = dtype.kind
    value = raise_(value, depth)
    if kind == "b" and type(value) is bool:
        return _np.bool_(value)
    if kind in "iu" and type(value) is int:
        if not low <= value <= high:
            raise CodecError(f"{value} does not fit in a numpy {dtype}")
        return dtype.type(value)
    if kind == "f" and dtype.itemsize <= 8:
        number = _number(value, "npscalar")
        if dtype.itemsize == 8:
            return dtype.type(number)
        with _np.errstate(over="ignore"):  # a float64 too large for a float16: inf, no warning
            return dtype.type(number)
    if kind == "c" and dtype.itemsize <= 16 and type(value) is list and len(value) == 2:
        real, imag = (_number(part, "npscalar") for part in value)
        if dtype.itemsize == 16:
            return dtype.type(complex(real, imag))
        with _np.errstate(over="ignore"):
            return dtype.type(complex(real, imag))
    if kind in "mM" and type(value) is int:
        if kind == "M" and value != INT_MIN and _np.datetime_data(dtype)[0] == "generic":
            raise CodecError("a datetime64 of generic unit can only be NaT")
        return _np.array(value, dtype=_np.int64).view(dtype.newbyteorder("="))[()]
    raise CodecError(f"a numpy scalar tag of dtype {dtype} cannot hold {value!r}"[:200])


_LOWERERS: dict[type, _Lowerer] = {
    _dt.datetime: _lower_datetime,
    _dt.date: _lower_date,
    _dt.time: _lower_time,
    _dt.timedelta: _lower_timedelta,
    set: _lower_set,
    frozenset: _lower_frozenset,
    decimal.Decimal: _lower_decimal,
    complex: _lower_complex,
    uuid.UUID: _lower_uuid,
    **dict.fromkeys(_PATH_FLAVOURS, _lower_path),
}
if _np is not None:
    # every numpy scalar type of a number, a bool, a datetime64 or a timedelta64
    # (longdouble too, to refuse it clearly)
    for _code in "?bBhHiIlLqQefdgFDGmM":
        _LOWERERS[_np.dtype(_code).type] = _lower_npscalar

_RAISERS: dict[int, _Raiser] = {
    T_DATETIME: _raise_datetime,
    T_DATE: _raise_date,
    T_TIME: _raise_time,
    T_TIMEDELTA: _raise_timedelta,
    T_SET: _raise_set,
    T_FROZENSET: _raise_frozenset,
    T_DECIMAL: _raise_decimal,
    T_PATH: _raise_path,
    T_COMPLEX: _raise_complex,
    T_UUID: _raise_uuid,
    T_ENUM: _raise_enum,
    T_NPSCALAR: _raise_npscalar,
}

_HOT_TYPES = frozenset({str, int, float, bool, type(None), list, dict, tuple})
_HOT_TYPES |= {bytes, bytearray, memoryview}


def carried_natively(cls: type) -> bool:
    """Whether the codecs carry ``cls`` themselves (a coder for it would never be used)."""
    return cls in _HOT_TYPES or cls in _LOWERERS or (_np is not None and cls is _np.ndarray)


class MsgpackCodec(_Walker):
    """The default codec: msgpack body, tags as ``[ExtType(code), *fields]``."""

    codec_id = CODEC_MSGPACK
    name = "msgpack"

    _EXT = {code: msgpack.ExtType(code, b"") for code in _TAG_NAMES}

    def __init__(
        self, max_depth: int = DEFAULT_MAX_DEPTH, max_elements: int = DEFAULT_MAX_ELEMENTS
    ) -> None:
        super().__init__(max_depth, max_elements)
        self._packer = msgpack.Packer(use_bin_type=True, autoreset=True)

    def tag(self, code: int, fields: list[Any]) -> Any:
        return [self._EXT[code], *fields]

    def untag(self, value: Any) -> tuple[int, list[Any]] | None:
        if type(value) is list and value and type(value[0]) is msgpack.ExtType:
            return value[0].code, value[1:]
        if type(value) is msgpack.ExtType:
            raise CodecError("stray extension value in body")
        return None

    def dumps(
        self, value: Any, registry: InstanceRegistry | None, *, head: int = 0
    ) -> tuple[bytes, list[memoryview]]:
        buffers: list[memoryview] = []
        tree = self.lower(value, registry, buffers, head)
        try:
            body = self._packer.pack(tree)
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. lone surrogates in a str
            raise CodecError(f"cannot encode with msgpack: {exc}") from exc
        if len(body) > self.max_elements and self.over_cap(body):
            self._refuse_to_send()
        return body, buffers

    def parse(self, body: memoryview) -> Any:
        if len(body) > self.max_elements and self.over_cap(body):
            self._refuse_to_parse()
        try:
            return msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=False,
                max_bin_len=0,  # binaries only travel out of band
                max_ext_len=0,
                max_array_len=self.max_elements,
                max_map_len=self.max_elements,
            )
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
            raise CodecError(f"invalid msgpack body: {exc}") from exc

    def count_elements(self, body: bytes | memoryview, limit: int) -> int:
        return _count_msgpack(body, limit)


class JsonCodec(_Walker):
    """Buffer-aware JSON: readable, browser-friendly; tags as ``{"$rx": name, "v": ...}``."""

    codec_id = CODEC_JSON
    name = "json"
    uses_plain_dicts = False

    _VARIADIC = frozenset(
        {T_NDARRAY, T_CUSTOM, T_TUPLE, T_DICT, T_TIMEDELTA, T_SET, T_FROZENSET}
        | {T_PATH, T_COMPLEX, T_ENUM, T_NPSCALAR}
    )

    def tag(self, code: int, fields: list[Any]) -> Any:
        return {"$rx": _TAG_NAMES[code], "v": fields if code in self._VARIADIC else fields[0]}

    def untag(self, value: Any) -> tuple[int, list[Any]] | None:
        if type(value) is dict and "$rx" in value:
            if len(value) != 2 or "v" not in value:
                raise CodecError("malformed tag object")
            name = value["$rx"]
            code = _TAG_CODES.get(name) if type(name) is str else None
            if code is None:
                raise CodecError(f"unknown tag {value['$rx']!r}")
            fields = value["v"]
            if code in self._VARIADIC:
                if type(fields) is not list:
                    raise CodecError(f"malformed {value['$rx']} tag")
                return code, fields
            return code, [fields]
        return None

    def lower_float(self, value: float) -> Any:
        if math.isfinite(value):
            return value
        return self.tag(T_FLOAT, ["nan" if math.isnan(value) else "inf" if value > 0 else "-inf"])

    def lower_dict(
        self, value: dict[Any, Any], lower: Callable[[Any, int], Any], depth: int
    ) -> Any:
        if all(type(key) is str for key in value) and "$rx" not in value:
            return {key: lower(item, depth) for key, item in value.items()}
        pairs = []
        for key, item in value.items():
            if type(key) not in _KEY_TYPES:
                raise CodecError(
                    f"dict keys must be str, int, float, bool or None, not {type(key).__name__}"
                )
            pairs.append([lower(key, depth), lower(item, depth)])
        return self.tag(T_DICT, pairs)

    def dumps(
        self, value: Any, registry: InstanceRegistry | None, *, head: int = 0
    ) -> tuple[bytes, list[memoryview]]:
        buffers: list[memoryview] = []
        tree = self.lower(value, registry, buffers, head)
        body = json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()
        if len(body) > self.max_elements and self.over_cap(body):
            self._refuse_to_send()
        return body, buffers

    def parse(self, body: memoryview) -> Any:
        if len(body) > self.max_elements and self.over_cap(body):
            self._refuse_to_parse()
        try:
            return json.loads(bytes(body), parse_constant=_refuse_constant)
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise CodecError(f"invalid JSON body: {exc}") from exc

    def count_elements(self, body: bytes | memoryview, limit: int) -> int:
        return _count_json(bytes(body), limit)

    def over_cap(self, body: bytes | memoryview) -> bool:
        text = bytes(body)
        limit = self.max_elements
        # Every value after an array's or object's first is after a comma, and
        # strings rarely hold many commas or brackets: almost always enough.
        if text.count(b",") + text.count(b"[") + text.count(b"{") <= limit:
            return False
        return _count_json(text, limit) > limit


def _refuse_constant(name: str) -> float:
    raise ValueError(f"bare {name} is not JSON; non-finite floats travel as tags")


# -- counting values without building them ----------------------------------------
# The parsers turn each byte of a hostile body into tens of bytes of objects (an
# empty msgpack array is one byte, the list it becomes 72): counting first is
# what bounds them. Both counters stop as soon as the count passes the limit,
# and leave a malformed body to the parser to refuse.


def _msgpack_sizes() -> bytes:
    """The size of each msgpack value that has one, by its first byte (0: an
    array or map, or a str, bin or ext whose length follows)."""
    sizes = bytearray(256)
    for byte in (*range(0x80), *range(0xE0, 0x100), 0xC0, 0xC1, 0xC2, 0xC3):
        sizes[byte] = 1  # fixints, nil, (never used), false, true
    sizes[0x80] = sizes[0x90] = 1  # an empty map or array: nothing in it to count
    for byte in range(0xA0, 0xC0):
        sizes[byte] = 1 + (byte & 0x1F)  # fixstr
    fixed = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5}
    fixed |= {0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}  # numbers, fixext
    for byte, size in fixed.items():
        sizes[byte] = size
    return bytes(sizes)


_MSGPACK_SIZES = _msgpack_sizes()
# str, bin and ext: bytes of their length field, bytes between it and the data
_MSGPACK_LENGTHS = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1)}
_MSGPACK_LENGTHS |= {0xC9: (4, 1), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}


def _count_msgpack(body: bytes | memoryview, limit: int) -> int:
    """Array items plus map entries in a msgpack body, stepping over the values
    without building any (a few dozen nanoseconds each)."""
    sizes, lengths, from_bytes = _MSGPACK_SIZES, _MSGPACK_LENGTHS, int.from_bytes
    pos = count = 0
    todo = 1  # values still to step over
    try:
        while todo:
            todo -= 1
            byte = body[pos]
            size = sizes[byte]
            if size:
                pos += size
                continue
            if byte < 0xA0:  # fixmap, fixarray
                n = byte & 0x0F
                pos += 1
                todo += n if byte >= 0x90 else 2 * n
            elif byte >= 0xDC:  # array 16, array 32, map 16, map 32
                width = 2 if byte in (0xDC, 0xDE) else 4
                n = from_bytes(body[pos + 1 : pos + 1 + width], "big")
                pos += 1 + width
                todo += n if byte < 0xDE else 2 * n
            else:  # str, bin, ext: a length, then that many bytes
                width, gap = lengths[byte]
                pos += 1 + width + gap + from_bytes(body[pos + 1 : pos + 1 + width], "big")
                continue
            count += n
            if count > limit:
                break
    except IndexError:  # truncated: the parser says so
        pass
    return count


# A JSON string once its escapes are gone (every '"' left then delimits a string).
_JSON_STRING = re.compile(rb'"[^"]*"')
_JSON_SPACE = b" \t\n\r"
_JSON_CHUNK = 1 << 16  # bytes counted at a time: the GIL is free between chunks


def _count_json(text: bytes, limit: int) -> int:
    """Array items plus object entries in a JSON text: its commas and its
    non-empty arrays and objects, outside strings, counted in chunks (so that a
    thread counting a large body holds the GIL a few milliseconds at a time)."""
    if b"\\" in text:  # escaped backslashes, then escaped quotes: left to right, as JSON reads
        text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    count = 0
    last = b'"'  # the last byte seen outside strings ('"' stands for a string)
    inside = False  # the chunk starts inside a string
    for start in range(0, len(text), _JSON_CHUNK):
        piece = text[start : start + _JSON_CHUNK]
        if inside:
            close = piece.find(b'"')
            if close < 0:
                continue
            piece = piece[close + 1 :]
            inside = False
        if piece.count(b'"') % 2:  # a string goes on into the next chunk
            piece = piece[: piece.rfind(b'"')]
            inside = True
        bare = _JSON_STRING.sub(b'"', piece).translate(None, _JSON_SPACE)
        if inside:
            bare += b'"'
        if not bare:
            continue
        count += bare.count(b",") + bare.count(b"[") + bare.count(b"{")
        count -= bare.count(b"[]") + bare.count(b"{}")
        if last in b"[{" and bare[0] in b"]}":  # an empty one across the cut
            count -= 1
        last = bare[-1:]
        if count > limit:
            break
    return count


_CODECS: dict[int, type[_Walker]] = {CODEC_MSGPACK: MsgpackCodec, CODEC_JSON: JsonCodec}
_NAMES = {"msgpack": CODEC_MSGPACK, "json": CODEC_JSON}


def codec_for(
    codec_id: int, max_depth: int = DEFAULT_MAX_DEPTH, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Codec:
    """A codec instance for the id found in a frame header."""
    try:
        return _CODECS[codec_id](max_depth, max_elements)  # type: ignore[return-value]
    except KeyError:
        raise CodecError(f"unknown codec id {codec_id}") from None


def codec_named(
    name: str, max_depth: int = DEFAULT_MAX_DEPTH, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> Codec:
    """A codec instance by name: ``"msgpack"`` or ``"json"``."""
    try:
        return codec_for(_NAMES[name], max_depth, max_elements)
    except KeyError:
        raise ValueError(f"unknown codec {name!r}: use 'msgpack' or 'json'") from None


class CodecCheck:
    """Proves that values could travel to a remote executor, without sending them.

    ThreadExecutor(check_codec=True) runs every argument, result and stream
    item through this, so that code tested on threads passes on the process
    executor and the daemon too: each message is encoded as a remote
    executor's connection would (msgpack, the executor's registry, the default
    frame caps) and its payload decoded as the receiver would. What could not
    travel raises the ``CodecError`` (or ``FrameError``) the remote side
    would; the values themselves are never replaced by the decoded copies.
    """

    def __init__(
        self,
        registry: InstanceRegistry,
        *,
        max_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_buffers: int = DEFAULT_MAX_BUFFERS,
    ) -> None:
        self.registry = registry
        self.max_size = max_size
        self.max_buffers = max_buffers
        self._codec = MsgpackCodec()

    def call(self, args: list[Any], kwargs: dict[str, Any]) -> None:
        """The arguments of a call, as a Call message carries them."""
        self._travel([1, 1, "", "", args, kwargs, False, 0, {}], 4, 6)

    def result(self, value: Any) -> None:
        """A call's return value, as a Result message carries it."""
        self._travel([2, 1, value], 2, 3)

    def items(self, items: list[Any]) -> None:
        """Stream items, as StreamItems messages carry them (split when too large)."""
        try:
            self._travel([4, 1, items], 2, 3)
        except RemoteExecError:
            if len(items) < 2:
                raise
            for item in items:  # the server sends a batch over the cap in pieces
                self._travel([4, 1, [item]], 2, 3)

    def _travel(self, message: list[Any], start: int, stop: int) -> None:
        codec, registry = self._codec, self.registry
        body, buffers = codec.dumps(message, registry, head=2)
        encode_frame(
            codec.codec_id, body, buffers, max_size=self.max_size, max_buffers=self.max_buffers
        )
        tree = codec.parse(memoryview(body))
        for field in tree[start:stop]:  # each payload field, from depth 0 as a receiver does
            codec.build(field, registry, buffers)
