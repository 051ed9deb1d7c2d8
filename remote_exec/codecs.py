"""Codecs: turn values into a body plus out-of-band buffers, and back.

Both codecs carry exactly the same values:

- JSON scalars (``None``, ``bool``, 64-bit ``int``, ``float`` including NaN and
  infinities, ``str``), ``list`` and ``dict`` (keys: ``str``, ``int``, ``float``,
  ``bool`` or ``None``);
- ``tuple`` (arrives as a tuple); numpy bool, integer and float scalars
  (arrive as Python ``bool``, ``int`` and ``float``);
- ``bytes``, ``bytearray``, ``memoryview`` and numpy arrays, always as
  out-of-band buffers of the frame. ``bytes``/``bytearray`` arrive as their own
  type (one copy); a ``memoryview`` arrives as a flat byte ``memoryview`` of the
  received frame and a numpy array as an array over it (no copy; read-only when
  the transport's buffer is immutable);
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
=========  ====  ====================================  =================================

In JSON the tag fields are the array ``v`` (a single field is not wrapped).
Decoding never calls anything but the registry's own coders: unknown tags,
unknown coder names and nesting deeper than ``max_depth`` raise ``CodecError``.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .exceptions import CodecError, RemoteExecError
from .framing import CODEC_JSON, CODEC_MSGPACK

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

__all__ = ["Codec", "JsonCodec", "MsgpackCodec", "codec_for", "codec_named"]

DEFAULT_MAX_DEPTH = 64

INT_MIN = -(2**63)
INT_MAX = 2**64 - 1

T_BYTES, T_BYTEARRAY, T_MEMVIEW, T_NDARRAY, T_TUPLE, T_REF, T_CUSTOM, T_DICT, T_FLOAT = range(1, 10)
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
        """Decode a body into its lowered tree (tags not yet resolved)."""
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

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self.max_depth = max_depth

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
            if _np is not None and isinstance(obj, _np.ndarray):
                return self._lower_array(obj, buffers)
            if _np is not None and isinstance(obj, _np.bool_ | _np.integer | _np.floating):
                return lower(obj.item(), depth)  # numpy scalars travel as Python numbers
            if registry is not None:
                name = registry.name_of(obj)
                if name is not None:
                    return self.tag(T_REF, [name])
                coder = registry.coder_for_type(kind)
                if coder is not None:
                    return self.tag(T_CUSTOM, [coder.name, lower(coder.encode(obj), depth)])
            for base in (bool, int, float, str):  # subclasses such as IntEnum or StrEnum
                if isinstance(obj, base):
                    return lower(base(obj), depth)
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


class MsgpackCodec(_Walker):
    """The default codec: msgpack body, tags as ``[ExtType(code), *fields]``."""

    codec_id = CODEC_MSGPACK
    name = "msgpack"

    _EXT = {code: msgpack.ExtType(code, b"") for code in _TAG_NAMES}

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        super().__init__(max_depth)
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
            return self._packer.pack(tree), buffers
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. lone surrogates in a str
            raise CodecError(f"cannot encode with msgpack: {exc}") from exc

    def parse(self, body: memoryview) -> Any:
        try:
            return msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=False,
                max_bin_len=0,  # binaries only travel out of band
                max_ext_len=0,
            )
        except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
            raise CodecError(f"invalid msgpack body: {exc}") from exc


class JsonCodec(_Walker):
    """Buffer-aware JSON: readable, browser-friendly; tags as ``{"$rx": name, "v": ...}``."""

    codec_id = CODEC_JSON
    name = "json"
    uses_plain_dicts = False

    _VARIADIC = frozenset({T_NDARRAY, T_CUSTOM, T_TUPLE, T_DICT})

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
        return json.dumps(tree, separators=(",", ":"), allow_nan=False).encode(), buffers

    def parse(self, body: memoryview) -> Any:
        try:
            return json.loads(bytes(body), parse_constant=_refuse_constant)
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise CodecError(f"invalid JSON body: {exc}") from exc


def _refuse_constant(name: str) -> float:
    raise ValueError(f"bare {name} is not JSON; non-finite floats travel as tags")


_CODECS: dict[int, type[_Walker]] = {CODEC_MSGPACK: MsgpackCodec, CODEC_JSON: JsonCodec}
_NAMES = {"msgpack": CODEC_MSGPACK, "json": CODEC_JSON}


def codec_for(codec_id: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Codec:
    """A codec instance for the id found in a frame header."""
    try:
        return _CODECS[codec_id](max_depth)  # type: ignore[return-value]
    except KeyError:
        raise CodecError(f"unknown codec id {codec_id}") from None


def codec_named(name: str, max_depth: int = DEFAULT_MAX_DEPTH) -> Codec:
    """A codec instance by name: ``"msgpack"`` or ``"json"``."""
    try:
        return codec_for(_NAMES[name], max_depth)
    except KeyError:
        raise ValueError(f"unknown codec {name!r}: use 'msgpack' or 'json'") from None
