"""Both codecs: round trips of every supported type, zero copy, and every refusal."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import remote_exec
import remote_exec.registry as registry_module
from remote_exec.codecs import (
    DEFAULT_MAX_DEPTH,
    Codec,
    JsonCodec,
    MsgpackCodec,
    codec_for,
    codec_named,
)
from remote_exec.exceptions import CodecError, RegistryError, UnknownInstanceError
from remote_exec.framing import CODEC_JSON, CODEC_MSGPACK, decode_frame, encode_frame
from remote_exec.registry import InstanceRegistry

from .helpers import assert_same, join

CODECS = ["msgpack", "json"]
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- values that travel --------------------------------------------------------


class Device:
    """An instance held by the registry: it travels as a reference."""

    def __init__(self, name: str) -> None:
        self.name = name


@dataclass(frozen=True)
class Point:
    """A custom type with a coder (compared by value)."""

    x: int
    y: float


class Point3(Point):
    """A subclass: it travels with its base's coder and arrives as a Point."""


def _point_encode(p: Point) -> list[Any]:
    return [p.x, p.y]


def _point_decode(v: list[Any]) -> Point:
    return Point(*v)


DEVICES = [Device("a"), Device("b"), Device("c")]


def make_registry() -> InstanceRegistry:
    registry = InstanceRegistry()
    for device in DEVICES:
        registry.add_instance(device, device.name)
    registry.register_coder("tests.core.point", Point, _point_encode, _point_decode)
    return registry


REGISTRY = make_registry()

INT_EDGES = [-(2**63), -(2**63) + 1, -(2**31), -1, 0, 1, 2**31 - 1, 2**32, 2**53 + 1]
INT_EDGES += [2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]
int64s = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(INT_EDGES)
FLOAT_EDGES = [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1.7976931348623157e308]
any_floats = st.floats() | st.sampled_from(FLOAT_EDGES)
keys = st.one_of(st.text(max_size=6), int64s, any_floats, st.booleans(), st.none())
binaries = st.binary(max_size=40)
buffers = st.one_of(binaries, binaries.map(bytearray), binaries.map(lambda b: memoryview(b)))

SCALAR_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.timedelta64_dtypes(),
    hnp.byte_string_dtypes(max_len=5),
    hnp.unicode_string_dtypes(max_len=3),
)
DTYPES = SCALAR_DTYPES | hnp.array_dtypes(SCALAR_DTYPES, max_size=3, allow_subarrays=True)
small_arrays = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))

leaves = st.one_of(
    st.none(),
    st.booleans(),
    int64s,
    any_floats,
    st.text(max_size=12),
    buffers,
    st.sampled_from(DEVICES),
    st.builds(Point, st.integers(-5, 5), st.floats(allow_nan=False)),
)
values = st.recursive(
    leaves | small_arrays,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        # a user dict that looks like a JSON tag must stay a dict
        st.dictionaries(st.sampled_from(["$rx", "v"]), children, min_size=1),
    ),
    max_leaves=20,
)


def roundtrip(
    codec: Codec, value: Any, registry: InstanceRegistry | None = None, *, mutable: bool = False
) -> tuple[Any, bytes | bytearray]:
    """Encode ``value`` into a frame, decode it back; returns the value and the frame."""
    body, bufs = codec.dumps(value, registry)
    frame: bytes | bytearray = join(encode_frame(codec.codec_id, body, bufs))
    if mutable:
        frame = bytearray(frame)
    decoded = decode_frame(frame)
    assert decoded.codec_id == codec.codec_id
    return codec.loads(decoded.body, decoded.buffers, registry), frame


def loads(
    codec: Codec, body: bytes, bufs: Sequence[bytes] = (), registry: InstanceRegistry | None = None
) -> Any:
    return codec.loads(memoryview(body), [memoryview(b) for b in bufs], registry)


def frame_array(frame: bytes | bytearray) -> np.ndarray:
    return np.frombuffer(frame, np.uint8)


# -- round trips ----------------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
@PROPERTY
@given(value=values)
def test_nested_values_roundtrip(name: str, value: Any) -> None:
    result, _ = roundtrip(codec_named(name), value, REGISTRY)
    assert_same(value, result)


@pytest.mark.parametrize("name", CODECS)
@PROPERTY
@given(head=st.tuples(st.integers(0, 2**63 - 1), st.text(max_size=6)), rest=st.lists(values))
def test_an_envelope_head_encodes_as_if_walked(
    name: str, head: tuple[int, str], rest: list[Any]
) -> None:
    """Skipping the walk for a message's leading ints and names changes no byte."""
    codec = codec_named(name)
    message = [*head, *rest]
    body, bufs = codec.dumps(message, REGISTRY, head=len(head))
    assert (body, [bytes(b) for b in bufs]) == (
        (walked := codec.dumps(message, REGISTRY))[0],
        [bytes(b) for b in walked[1]],
    )
    assert_same(message, codec.loads(memoryview(body), bufs, REGISTRY))


@pytest.mark.parametrize("name", CODECS)
@PROPERTY
@given(array=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_arrays_roundtrip(name: str, array: np.ndarray) -> None:
    result, frame = roundtrip(codec_named(name), array)
    assert_same(array, result)
    if result.nbytes:
        assert np.shares_memory(result, frame_array(frame)), "array was copied"


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "transpose": lambda a: a.T,
    "step": lambda a: a[::2],
    "reverse": lambda a: a[::-1],
    "fortran": np.asfortranarray,
    "column": lambda a: a[..., 1:] if a.ndim else a,
}


@pytest.mark.parametrize("name", CODECS)
@PROPERTY
@given(
    array=hnp.arrays(
        SCALAR_DTYPES, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5)
    ),
    transform=st.sampled_from(sorted(TRANSFORMS)),
)
def test_non_contiguous_arrays_roundtrip(name: str, array: np.ndarray, transform: str) -> None:
    view = TRANSFORMS[transform](array)
    result, _ = roundtrip(codec_named(name), view)
    assert_same(view, result)
    assert result.flags.c_contiguous


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(
    "array",
    [
        np.array(1.5),
        np.array(np.datetime64("2020-01-02T03:04:05")),
        np.array(b"abc", dtype="S5"),
        np.array("xy", dtype="U3"),
        np.array((1, 2.5), dtype=[("a", "<i2"), ("b", ">f8")]),
        np.zeros((0,), dtype="f8"),
        np.zeros((3, 0, 2), dtype="<c16"),
        np.zeros((0, 3), dtype="M8[s]"),
        np.arange(12, dtype=">u8").reshape(3, 4),
        np.array([True, False]),
        np.arange(6, dtype=np.float16),
        np.arange(6, dtype=np.longdouble),
        np.zeros(2, dtype=[("a", "<i4", (2, 3)), ("b", [("x", "u1"), ("y", "<f4")])]),
        np.zeros(2, dtype=[(("Title", "a"), "<i4"), ("b", "V3")]),
        np.zeros(3, dtype=[]),
    ],
    ids=lambda a: f"{a.dtype}-{a.shape}",
)
def test_array_examples(name: str, array: np.ndarray) -> None:
    result, _ = roundtrip(codec_named(name), array)
    assert_same(array, result)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -(2**63),
        2**64 - 1,
        math.nan,
        math.inf,
        -math.inf,
        -0.0,
        "",
        "ünïcødé \x00 \U0001f600",
        [],
        {},
        (),
        (1,),
        ((),),
        ([], (None,)),
        {"$rx": "bytes", "v": 0},
        {"$rx": 1},
        {1: "a", "1": "b", 1.5: "c", None: "d", False: "e"},
        {math.nan: 1, math.inf: 2, -math.inf: 3},
        b"",
        bytearray(b"xyz"),
        memoryview(b""),
        [b"a", bytearray(b"b"), memoryview(b"c"), b"a"],
    ],
    ids=lambda v: repr(v) if "memory at" not in repr(v) else f"{type(v).__name__}-with-memoryview",
)
def test_scalar_and_container_examples(name: str, value: Any) -> None:
    result, _ = roundtrip(codec_named(name), value)
    assert_same(value, result)


@pytest.mark.parametrize("name", CODECS)
def test_lone_surrogates(name: str) -> None:
    # JSON escapes them; msgpack strings must be UTF-8: a CodecError, nothing else.
    codec = codec_named(name)
    if name == "json":
        result, _ = roundtrip(codec, "\ud800")
        assert result == "\ud800"
    else:
        with pytest.raises(CodecError):
            codec.dumps("\ud800", None)
        # the packer is left usable
        assert roundtrip(codec, "ok")[0] == "ok"


class Color(enum.IntEnum):
    RED = 3


class Mode(enum.StrEnum):
    FAST = "fast"


@pytest.mark.parametrize("name", CODECS)
def test_scalar_subclasses_arrive_as_their_base(name: str) -> None:
    # numpy scalars keep their dtype instead: tests/core/test_coders.py
    result, _ = roundtrip(codec_named(name), [Color.RED, Mode.FAST])
    assert result == [3, "fast"]
    assert [type(x) for x in result] == [int, str]


@pytest.mark.parametrize("name", CODECS)
def test_memoryviews_arrive_flat(name: str) -> None:
    ints = np.arange(6, dtype="<i4").reshape(2, 3)
    cases = [
        ints.data,  # 2-d, format "i"
        memoryview(b"abcdef")[::2],  # not contiguous: sent as its bytes
        ints.data.cast("B").cast("d"),  # format "d"
    ]
    for view in cases:
        result, frame = roundtrip(codec_named(name), view)
        assert_same(view, result)
        assert result.obj is frame, "the memoryview is not a view of the received frame"


# -- zero copy and out of band -----------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_large_buffers_go_out_of_band(name: str, kind: Any) -> None:
    payload = kind(bytes(range(256)) * 4096)  # 1 MiB
    codec = codec_named(name)
    body, bufs = codec.dumps(payload, None)
    assert len(body) < 32
    assert len(bufs) == 1
    assert bufs[0].nbytes == 1 << 20
    owner = payload.obj if isinstance(payload, memoryview) else payload
    assert bufs[0].obj is owner, "the buffer was copied while encoding"
    pieces = encode_frame(codec.codec_id, body, bufs)
    assert len(pieces) == 2
    assert pieces[1] is bufs[0], "the frame copied the buffer"
    assert len(pieces[0]) < 64
    result, _ = roundtrip(codec, payload)
    assert type(result) is kind
    assert bytes(result) == bytes(payload)


@pytest.mark.parametrize("name", CODECS)
def test_arrays_are_zero_copy_views_of_the_frame(name: str) -> None:
    array = np.arange(1000, dtype="<f8").reshape(10, 100)
    result, frame = roundtrip(codec_named(name), {"a": array})
    assert np.shares_memory(result["a"], frame_array(frame))
    assert not result["a"].flags.writeable  # the frame (bytes) is immutable

    result, frame = roundtrip(codec_named(name), array, mutable=True)
    assert isinstance(frame, bytearray)
    assert result.flags.writeable
    frame[-8:] = np.float64(-1.0).tobytes()  # the last element, written in the frame
    assert result[-1, -1] == -1.0


@pytest.mark.parametrize("name", CODECS)
def test_bytes_and_bytearray_are_copies(name: str) -> None:
    (data, array), frame = roundtrip(codec_named(name), (b"abc", bytearray(b"def")), mutable=True)
    assert isinstance(frame, bytearray)
    frame[:] = bytes(len(frame))
    assert (data, array) == (b"abc", bytearray(b"def"))


@pytest.mark.parametrize("name", CODECS)
def test_buffer_indexes_follow_the_walk(name: str) -> None:
    codec = codec_named(name)
    _, bufs = codec.dumps(
        [b"0", (bytearray(b"1"), {"k": memoryview(b"2")}), np.array([3], dtype=np.uint8)], None
    )
    assert [bytes(b) for b in bufs] == [b"0", b"1", b"2", b"\x03"]


# -- instances and custom types ------------------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_instance_references_arrive_as_the_same_object(name: str) -> None:
    a, b, _ = DEVICES
    value = [a, (b, {"x": a}), {1: b}]
    result, _ = roundtrip(codec_named(name), value, REGISTRY)
    assert result[0] is a
    assert result[1][0] is b
    assert result[1][1]["x"] is a
    assert result[2][1] is b


@pytest.mark.parametrize("name", CODECS)
def test_instance_reference_travels_by_name(name: str) -> None:
    # The sender's object arrives as the receiver's object of the same name.
    codec = codec_named(name)
    here, there = Device("here"), Device("there")
    sender, receiver = InstanceRegistry(), InstanceRegistry()
    sender.add_instance(here, "dev")
    receiver.add_instance(there, "dev")
    body, bufs = codec.dumps([here], sender)
    assert codec.loads(memoryview(body), bufs, receiver)[0] is there
    with pytest.raises(UnknownInstanceError, match="dev"):
        codec.loads(memoryview(body), bufs, InstanceRegistry())
    with pytest.raises(CodecError):
        codec.loads(memoryview(body), bufs, None)


@pytest.mark.parametrize("name", CODECS)
def test_registry_coder(name: str) -> None:
    codec = codec_named(name)
    value = {"p": Point(1, 2.5), "q": [Point3(3, -1.0)], "t": (Point(0, math.nan),)}
    result, _ = roundtrip(codec, value, REGISTRY)
    assert result["p"] == Point(1, 2.5)
    assert type(result["q"][0]) is Point  # the base's coder, so a Point arrives
    assert result["q"][0] == Point(3, -1.0)
    assert math.isnan(result["t"][0].y)

    # the other side does not know the coder name
    body, bufs = codec.dumps(Point(1, 2.0), REGISTRY)
    with pytest.raises(CodecError, match=r"tests\.core\.point"):
        codec.loads(memoryview(body), bufs, InstanceRegistry())


@pytest.mark.parametrize("name", CODECS)
def test_coder_value_is_encoded_recursively(name: str) -> None:
    registry = InstanceRegistry()
    registry.register_coder(
        "tests.core.box", Device, lambda d: {"n": d.name, "raw": d.name.encode()}, lambda v: v
    )
    result, _ = roundtrip(codec_named(name), Device("x"), registry)
    assert result == {"n": "x", "raw": b"x"}


@pytest.mark.parametrize("name", CODECS)
def test_failing_decoder_is_a_codec_error(name: str) -> None:
    def decode(value: Any) -> Any:
        raise RuntimeError("boom")

    registry = InstanceRegistry()
    registry.register_coder("tests.core.bad", Device, lambda d: d.name, decode)
    codec = codec_named(name)
    body, bufs = codec.dumps(Device("x"), registry)
    with pytest.raises(CodecError, match="boom"):
        codec.loads(memoryview(body), bufs, registry)


def test_coder_name_clash() -> None:
    registry = InstanceRegistry()
    registry.register_coder("tests.core.clash", Point, _point_encode, _point_decode)
    registry.register_coder("tests.core.clash", Point, _point_encode, _point_decode)  # same: fine
    with pytest.raises(RegistryError, match=r"tests\.core\.clash"):
        registry.register_coder("tests.core.clash", Device, str, Device)
    with pytest.raises(ValueError, match="name"):
        registry.register_coder("", Point, _point_encode, _point_decode)
    with pytest.raises(TypeError):
        registry.register_coder("tests.core.x", Point(1, 2), _point_encode, _point_decode)  # type: ignore[arg-type]


class Celsius:
    def __init__(self, degrees: float) -> None:
        self.degrees = degrees


def test_module_level_register_coder(monkeypatch: pytest.MonkeyPatch) -> None:
    # Work on a copy of the default table; monkeypatch puts the original back.
    original = registry_module._default_coders
    monkeypatch.setattr(registry_module, "_default_coders", dict(original))
    name = "tests.core.test_codecs.Celsius"
    before = InstanceRegistry()
    remote_exec.register_coder(name, Celsius, lambda c: c.degrees, Celsius)
    after = InstanceRegistry()
    for codec_name in CODECS:
        codec = codec_named(codec_name)
        result, _ = roundtrip(codec, [Celsius(21.5)], after)
        assert type(result[0]) is Celsius
        assert result[0].degrees == 21.5
        with pytest.raises(CodecError, match="register_coder"):
            codec.dumps(Celsius(1.0), before)  # made before: it does not know the type
    monkeypatch.undo()
    assert name not in registry_module._default_coders
    assert InstanceRegistry().coder_for_type(Celsius) is None


# -- refusals --------------------------------------------------------------------------


class Unregistered:
    pass


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(
    "value",
    [
        object(),
        Unregistered(),
        msgpack.ExtType(1, b""),  # user data can never forge a tag
        [Device("unheld")],
        {(1, 2): "tuple key"},
        {b"k": "bytes key"},
        np.array([1, "a"], dtype=object),
        np.zeros(2, dtype=[("a", "O"), ("b", "<i4")]),
        2**64,
        -(2**63) - 1,
        [2**100],
        {2**64: "big key"},
    ],
    ids=lambda v: type(v).__name__,
)
def test_unsupported_values(name: str, value: Any) -> None:
    with pytest.raises(CodecError):
        codec_named(name).dumps(value, REGISTRY)


@pytest.mark.parametrize("name", CODECS)
def test_unregistered_class_message_says_how_to_fix(name: str) -> None:
    with pytest.raises(CodecError) as info:
        codec_named(name).dumps({"x": Unregistered()}, InstanceRegistry())
    message = str(info.value)
    assert "Unregistered" in message
    assert "register_coder" in message
    assert "remote instance" in message


def nested(depth: int) -> Any:
    value: Any = None
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("name", CODECS)
def test_depth_cap(name: str) -> None:
    codec = codec_named(name)
    result, _ = roundtrip(codec, nested(DEFAULT_MAX_DEPTH))
    assert result == nested(DEFAULT_MAX_DEPTH)
    with pytest.raises(CodecError, match="deeper"):
        codec.dumps(nested(DEFAULT_MAX_DEPTH + 1), None)
    # a peer that does not check: the receiver refuses
    deep = nested(DEFAULT_MAX_DEPTH + 1)
    body = msgpack.packb(deep) if name == "msgpack" else json.dumps(deep).encode()
    with pytest.raises(CodecError, match="deeper"):
        loads(codec, body)
    # tuples, dicts and tags count as levels too
    small = codec_for(codec.codec_id, max_depth=3)
    assert loads(small, small.dumps([[()]], None)[0]) == [[()]]
    too_deep: Any
    for too_deep in ([[[()]]], [[{"a": []}]], [(b"",)] * 2, [[np.zeros(1)]]):
        with pytest.raises(CodecError):
            small.dumps([too_deep], None)


@pytest.mark.parametrize("name", CODECS)
def test_hostile_nesting_is_refused(name: str) -> None:
    codec = codec_named(name)
    if name == "json":
        body = b"[" * 100_000 + b"]" * 100_000
    else:
        body = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(CodecError):
        loads(codec, body)


def deep_descr(depth: int) -> Any:
    """A structured dtype description nested ``depth`` levels deep."""
    descr: Any = "<f8"
    for _ in range(depth):
        descr = [["a", descr]]
    return descr


def test_structured_dtypes_nest_up_to_32_levels() -> None:
    body = msgpack.packb([msgpack.ExtType(4, b""), 0, deep_descr(32), [0]])
    assert loads(MsgpackCodec(), body, [b""]).shape == (0,)


def msgpack_tag(code: int, *fields: Any) -> list[Any]:
    return [msgpack.ExtType(code, b""), *fields]


def json_tag(name: str, v: Any) -> dict[str, Any]:
    return {"$rx": name, "v": v}


BAD_MSGPACK: list[tuple[str, Any, list[bytes]]] = [
    ("unknown tag", msgpack_tag(99, 1), []),
    ("json-only dict tag", msgpack_tag(8, [[1, 2]]), []),
    ("json-only float tag", msgpack_tag(9, "nan"), []),
    ("stray ext", [1, msgpack.ExtType(1, b"")], []),
    ("unknown coder", msgpack_tag(7, "no.such.coder", 1), []),
    ("coder name not str", msgpack_tag(7, 5, 1), []),
    ("buffer index out of range", msgpack_tag(1, 1), [b"x"]),
    ("negative buffer index", msgpack_tag(2, -1), [b"x"]),
    ("bool buffer index", msgpack_tag(3, True), [b"x"]),
    ("no buffers", msgpack_tag(1, 0), []),
    ("bytes tag without index", msgpack_tag(1), [b"x"]),
    ("bytes tag with two fields", msgpack_tag(1, 0, 0), [b"x"]),
    ("ref without registry name", msgpack_tag(6, 5), []),
    ("array size mismatch", msgpack_tag(4, 0, "<f8", [2]), [b"\x00" * 8]),
    ("array negative shape", msgpack_tag(4, 0, "<f8", [-1]), [b""]),
    ("array bad shape type", msgpack_tag(4, 0, "<f8", "x"), [b""]),
    ("array object dtype", msgpack_tag(4, 0, "|O", [1]), [b"\x00" * 8]),
    ("array object field", msgpack_tag(4, 0, [["a", "|O"]], [1]), [b"\x00" * 8]),
    ("array bad dtype", msgpack_tag(4, 0, "not a dtype", [1]), [b"\x00" * 8]),
    ("array huge dtype", msgpack_tag(4, 0, "|V99999999999999999", [0]), [b""]),
    ("array huge shape", msgpack_tag(4, 0, "<f8", [2**62, 2**62, 0]), [b""]),
    ("array too many dims", msgpack_tag(4, 0, "<f8", [1] * 100), [b"\x00" * 8]),
    ("array deep descr", msgpack_tag(4, 0, deep_descr(400), [0]), [b""]),
    ("array descr 33 deep", msgpack_tag(4, 0, deep_descr(33), [0]), [b""]),
    ("bin in body", [b"raw"], []),
    ("ext with data", msgpack_tag(5, 1.0, msgpack.ExtType(1, b"x")), []),
]


@pytest.mark.parametrize(("case", "tree", "bufs"), BAD_MSGPACK, ids=[c[0] for c in BAD_MSGPACK])
def test_msgpack_refusals(case: str, tree: Any, bufs: list[bytes]) -> None:
    body = msgpack.packb(tree, use_bin_type=True)
    with pytest.raises(CodecError):
        loads(MsgpackCodec(), body, bufs, REGISTRY)


BAD_JSON: list[tuple[str, Any, list[bytes]]] = [
    ("unknown tag", json_tag("nope", 1), []),
    ("tag name not str", json_tag([], 1), []),  # type: ignore[arg-type]
    ("tag without v", {"$rx": "bytes"}, [b"x"]),
    ("tag with extra key", {"$rx": "bytes", "v": 0, "w": 1}, [b"x"]),
    ("unknown coder", json_tag("custom", ["no.such.coder", 1]), []),
    ("custom not a list", json_tag("custom", "tests.core.point"), []),
    ("buffer index out of range", json_tag("bytes", 1), [b"x"]),
    ("buffer index float", json_tag("bytes", 0.0), [b"x"]),
    ("ref to a number", json_tag("ref", 1), []),
    ("tuple not a list", json_tag("tuple", 1), []),
    ("dict pair not a pair", json_tag("dict", [[1, 2, 3]]), []),
    ("dict pair a string", json_tag("dict", ["ab"]), []),
    ("dict key a list", json_tag("dict", [[[1], 2]]), []),
    ("dict key a tuple tag", json_tag("dict", [[json_tag("tuple", []), 2]]), []),
    ("float tag bad text", json_tag("float", "1.5"), []),
    ("array size mismatch", json_tag("ndarray", [0, "<f8", [3]]), [b"\x00" * 8]),
    ("array object dtype", json_tag("ndarray", [0, "|O", [1]]), [b"\x00" * 8]),
    ("array huge shape", json_tag("ndarray", [0, "<f8", [10**30, 0]]), [b""]),
    ("array deep descr", json_tag("ndarray", [0, deep_descr(400), [0]]), [b""]),
    ("array descr field shape", json_tag("ndarray", [0, [["a", "<i4", 2]], [0]]), [b""]),
    ("int over 64 bits", 2**64, []),
    ("int under 64 bits", -(2**63) - 1, []),
    ("nested int over 64 bits", {"a": [2**70]}, []),
]


@pytest.mark.parametrize(("case", "tree", "bufs"), BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_json_refusals(case: str, tree: Any, bufs: list[bytes]) -> None:
    body = json.dumps(tree).encode()
    with pytest.raises(CodecError):
        loads(JsonCodec(), body, bufs, REGISTRY)


@pytest.mark.parametrize(
    "body", [b"NaN", b"[Infinity]", b"{", b"", b"\xff\xfe", b"[1] [2]", b"1" * 5000]
)
def test_invalid_json_bodies(body: bytes) -> None:
    with pytest.raises(CodecError):
        loads(JsonCodec(), body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never used
        b"\x92\x01",  # truncated
        b"\x01\x02",  # trailing data
        b"\xd6\xff\x00\x00\x00\x00",  # a timestamp extension
        b"\x92\xc7\x00\xfb\x01",  # [ExtType(-5), 1]: a negative tag code
        b"\x92\xc7\x00\xff\x01",  # [ExtType(-1), 1]: an empty timestamp
    ],
)
def test_invalid_msgpack_bodies(body: bytes) -> None:
    with pytest.raises(CodecError):
        loads(MsgpackCodec(), body)


def test_codec_lookup() -> None:
    assert codec_named("msgpack").codec_id == CODEC_MSGPACK
    assert codec_named("json").codec_id == CODEC_JSON
    assert isinstance(codec_for(CODEC_JSON), JsonCodec)
    with pytest.raises(ValueError, match="pickle"):
        codec_named("pickle")
    with pytest.raises(CodecError):
        codec_for(3)


# -- exact encodings (the examples of docs/wire-format.md) ----------------------------------


def test_msgpack_tag_encoding() -> None:
    body, bufs = MsgpackCodec().dumps([b"hi", (1, 2)], None)
    # [ [ExtType(1), 0], [ExtType(5), 1, 2] ]; an empty ext is "c7 00 <code>"
    assert body.hex(" ") == "92 92 c7 00 01 00 93 c7 00 05 01 02"
    assert [bytes(b) for b in bufs] == [b"hi"]


def test_json_tag_encoding() -> None:
    value = [b"hi", (1, 2), {1: math.nan}, math.inf, {"$rx": 0}]
    body, bufs = JsonCodec().dumps(value, None)
    assert json.loads(body) == [
        {"$rx": "bytes", "v": 0},
        {"$rx": "tuple", "v": [1, 2]},
        {"$rx": "dict", "v": [[1, {"$rx": "float", "v": "nan"}]]},
        {"$rx": "float", "v": "inf"},
        {"$rx": "dict", "v": [["$rx", 0]]},
    ]
    assert [bytes(b) for b in bufs] == [b"hi"]


def test_array_tag_encoding() -> None:
    array = np.arange(6, dtype="<i2").reshape(2, 3)
    body, bufs = JsonCodec().dumps(array, None)
    assert json.loads(body) == {"$rx": "ndarray", "v": [0, "<i2", [2, 3]]}
    assert bytes(bufs[0]) == array.tobytes()
    structured = np.zeros(1, dtype=[("a", "<i4", (2,)), ("b", "|S3")])
    body, _ = JsonCodec().dumps(structured, None)
    assert json.loads(body) == {"$rx": "ndarray", "v": [0, [["a", "<i4", [2]], ["b", "|S3"]], [1]]}
    body, _ = MsgpackCodec().dumps(np.array(1.0), None)
    assert msgpack.unpackb(body) == [msgpack.ExtType(4, b""), 0, "<f8", []]


def test_ref_and_custom_encoding() -> None:
    body, _ = JsonCodec().dumps([DEVICES[0], Point(1, 2.0)], REGISTRY)
    assert json.loads(body) == [
        {"$rx": "ref", "v": "a"},
        {"$rx": "custom", "v": ["tests.core.point", [1, 2.0]]},
    ]
    body, _ = MsgpackCodec().dumps([DEVICES[0], Point(1, 2.0)], REGISTRY)
    assert msgpack.unpackb(body) == [
        [msgpack.ExtType(6, b""), "a"],
        [msgpack.ExtType(7, b""), "tests.core.point", [1, 2.0]],
    ]


# -- hostile input: bodies and trees ----------------------------------------------------


HOSTILE_BUFFERS = [b"\x00" * 16, b"", b"abc"]


def _check_hostile(codec: Codec, body: bytes) -> None:
    try:
        loads(codec, body, HOSTILE_BUFFERS, REGISTRY)
    except (CodecError, UnknownInstanceError):
        pass


@pytest.mark.parametrize("name", CODECS)
@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=64))
def test_any_body_decodes_or_raises_codec_error(name: str, body: bytes) -> None:
    _check_hostile(codec_named(name), body)


DESCRS = ["<f8", "|b1", "<i4", "|O", "|V0", "|S3", "<U2", "<M8[s]", "zz", "", "V3"]
raw_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=4),
    st.sampled_from(["a", "b", "tests.core.point", "nan", "inf", *DESCRS]),
    st.integers(-1, 4),
)


def msgpack_trees() -> st.SearchStrategy[Any]:
    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        tags = st.builds(
            lambda code, fields: [msgpack.ExtType(code, b""), *fields],
            st.integers(0, 11),
            st.lists(children, max_size=4),
        )
        return st.one_of(
            tags, st.lists(children, max_size=4), st.dictionaries(raw_leaves, children, max_size=3)
        )

    return st.recursive(raw_leaves, extend, max_leaves=15)


def json_trees() -> st.SearchStrategy[Any]:
    names = st.sampled_from(["bytes", "bytearray", "memview", "ndarray", "tuple", "ref"])
    names |= st.sampled_from(["custom", "dict", "float", "nope"])

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        tags = st.builds(lambda name, v: {"$rx": name, "v": v}, names, children)
        return st.one_of(
            tags,
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=3), children, max_size=3),
        )

    leaves = raw_leaves | st.integers(-(2**80), 2**80)
    return st.recursive(leaves, extend, max_leaves=15)


@settings(max_examples=300, deadline=None)
@given(tree=msgpack_trees())
def test_hostile_msgpack_trees(tree: Any) -> None:
    _check_hostile(MsgpackCodec(), msgpack.packb(tree, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(tree=json_trees())
def test_hostile_json_trees(tree: Any) -> None:
    _check_hostile(JsonCodec(), json.dumps(tree).encode())


class Fraction:
    def __init__(self, numerator: int, denominator: int) -> None:
        self.numerator, self.denominator = numerator, denominator


DOC_TAGS: list[tuple[Any, str, str]] = [
    ((1, 2), "93 c7 00 05 01 02", '{"$rx":"tuple","v":[1,2]}'),
    ((), "91 c7 00 05", '{"$rx":"tuple","v":[]}'),
    (bytearray(b"ab"), "92 c7 00 02 00", '{"$rx":"bytearray","v":0}'),
    (memoryview(b"cd"), "92 c7 00 03 00", '{"$rx":"memview","v":0}'),
    (
        {1: "a", None: 2, 1.5: 3},
        "83 01 a1 61 c0 02 cb 3f f8 00 00 00 00 00 00 03",
        '{"$rx":"dict","v":[[1,"a"],[null,2],[1.5,3]]}',
    ),
    (
        [math.nan, -math.inf, 0.5],
        "93 cb 7f f8 00 00 00 00 00 00 cb ff f0 00 00 00 00 00 00 cb 3f e0 00 00 00 00 00 00",
        '[{"$rx":"float","v":"nan"},{"$rx":"float","v":"-inf"},0.5]',
    ),
    (np.arange(6, dtype="<i2").reshape(2, 3), "94 c7 00 04 00 a3 3c 69 32 92 02 03", ""),
    (np.array(1.0), "94 c7 00 04 00 a3 3c 66 38 90", '{"$rx":"ndarray","v":[0,"<f8",[]]}'),
]


@pytest.mark.parametrize(
    ("value", "packed", "text"), DOC_TAGS, ids=[t[2] or t[1] for t in DOC_TAGS]
)
def test_tag_table_of_the_docs(value: Any, packed: str, text: str) -> None:
    # the "Tags" table of docs/wire-format.md
    assert MsgpackCodec().dumps(value, None)[0].hex(" ") == packed
    if text:
        assert JsonCodec().dumps(value, None)[0].decode() == text


def test_ref_and_custom_rows_of_the_docs() -> None:
    registry = InstanceRegistry()
    registry.add_instance(Device("cam"), "cam")
    registry.register_coder(
        "fraction", Fraction, lambda f: [f.numerator, f.denominator], lambda v: Fraction(*v)
    )
    cam = registry.get_instance("cam")
    assert MsgpackCodec().dumps(cam, registry)[0].hex(" ") == "92 c7 00 06 a3 63 61 6d"
    assert JsonCodec().dumps(cam, registry)[0] == b'{"$rx":"ref","v":"cam"}'
    packed = MsgpackCodec().dumps(Fraction(1, 3), registry)[0].hex(" ")
    assert packed == "93 c7 00 07 a8 66 72 61 63 74 69 6f 6e 92 01 03"
    text = JsonCodec().dumps(Fraction(1, 3), registry)[0]
    assert text == b'{"$rx":"custom","v":["fraction",[1,3]]}'


@pytest.mark.parametrize("codec", [MsgpackCodec(), JsonCodec()], ids=["msgpack", "json"])
def test_decoding_leaves_no_reference_cycle_holding_the_frame(codec: Any) -> None:
    """The received frame is freed as soon as its values are, not at the next GC."""
    import gc
    import weakref

    class Frame(bytearray):  # a subclass, so that it can be weakly referenced
        pass

    body, buffers = codec.dumps([(1, [b"payload"]), {"k": bytearray(b"x")}], None)
    frame = Frame(bytes(body) + b"".join(bytes(b) for b in buffers))
    probe = weakref.ref(frame)
    view = memoryview(frame)
    received = [view[len(body) :][: len(b"payload")], view[len(body) + len(b"payload") :]]
    gc.disable()
    try:
        value = codec.loads(view[: len(body)], received, None)
        assert value == [(1, [b"payload"]), {"k": bytearray(b"x")}]
        del value, received, view, frame
        assert probe() is None
    finally:
        gc.enable()
