"""The standard types both codecs carry (tags 10-21): round trips, refusals,
enum classes the receiver may use, and the examples of docs/wire-format.md."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import pathlib
import re
import sys
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from remote_exec.codecs import Codec, JsonCodec, MsgpackCodec, codec_named
from remote_exec.exceptions import CodecError, RegistryError, UnknownInstanceError
from remote_exec.registry import MAIN_MODULE_PREFIX, InstanceRegistry, register_coder

from .helpers import join

CODECS = ["msgpack", "json"]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DOCS = Path(__file__).resolve().parents[2] / "docs" / "wire-format.md"


class Holder:
    """Held by the registries below: Enum classes of this module may be decoded."""

    class Inner(enum.Enum):
        A = "a"


class Shade(enum.Enum):
    LIGHT = 1
    DARK = 2


class Access(enum.Flag):
    READ = 1
    WRITE = 2
    EXECUTE = 4


class Level(enum.IntEnum):
    HIGH = 3


class Name(str, enum.Enum):  # noqa: UP042 - not a StrEnum: its str() is not its value
    ALICE = "alice"


def held_registry() -> InstanceRegistry:
    registry = InstanceRegistry()
    registry.add_instance(Holder(), "holder")
    return registry


REGISTRY = held_registry()


def roundtrip(name: str, value: Any, registry: InstanceRegistry | None = REGISTRY) -> Any:
    """Encode ``value`` into a frame as a sender does, decode it as a receiver does."""
    from remote_exec.framing import decode_frame, encode_frame

    codec = codec_named(name)
    body, buffers = codec.dumps(value, registry)
    frame = decode_frame(join(encode_frame(codec.codec_id, body, buffers)))
    return codec.loads(frame.body, frame.buffers, registry)


def loads(codec: Codec, tree: Any, registry: InstanceRegistry | None = REGISTRY) -> Any:
    """Decode a hand-made tree (what another client could send)."""
    if isinstance(codec, MsgpackCodec):
        body = msgpack.packb(tree, use_bin_type=True)
    else:
        body = json.dumps(tree).encode()
    return codec.loads(memoryview(body), [], registry)


def msgpack_tag(code: int, *fields: Any) -> list[Any]:
    return [msgpack.ExtType(code, b""), *fields]


def assert_same(sent: Any, got: Any) -> None:
    """Equal (NaN equal to NaN) and of exactly the same type, recursively for sets."""
    assert type(got) is type(sent), (sent, got)
    if isinstance(sent, np.generic):
        assert got.dtype == sent.dtype
        if np.isnan(sent).any() if sent.dtype.kind in "fcmM" else False:
            assert np.isnan(got)
        elif sent.dtype.kind == "c":
            assert (got.real, got.imag) == (sent.real, sent.imag)
            assert (
                np.signbit([got.real, got.imag]).tolist()
                == np.signbit([sent.real, sent.imag]).tolist()
            )
        else:
            assert got == sent
            assert got.tobytes() == sent.tobytes()  # -0.0 stays -0.0
    elif isinstance(sent, decimal.Decimal):
        assert str(got) == str(sent)  # NaN, sNaN, -0 and trailing zeros kept
    elif isinstance(sent, complex):
        assert repr(got) == repr(sent)
    elif isinstance(sent, set | frozenset):
        assert got == sent
        # hash-equal items (1, 1.0, True) collapse: each must keep its own type
        assert {x: type(x) for x in got} == {x: type(x) for x in sent}
    else:
        assert got == sent
    if isinstance(sent, dt.datetime | dt.time):
        assert got.utcoffset() == sent.utcoffset()  # naive stays naive, offset kept


# -- round trips ------------------------------------------------------------------

offsets = st.integers(-(24 * 3600 - 1), 24 * 3600 - 1).map(
    lambda s: dt.timezone(dt.timedelta(seconds=s))
)
zones = st.none() | st.just(dt.UTC) | offsets
datetimes = st.datetimes(timezones=zones)
times = st.times(timezones=zones)
decimals = st.decimals(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [decimal.Decimal(t) for t in ["-0", "1.10", "1E+3", "sNaN", "-NaN", "NaN123", "-Infinity"]]
)
complexes = st.complex_numbers(allow_nan=True, allow_infinity=True)
SCALAR_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.unsigned_integer_dtypes(endianness="="),
    hnp.floating_dtypes(endianness="=", sizes=(16, 32, 64)),
    hnp.complex_number_dtypes(endianness="="),
    hnp.datetime64_dtypes(endianness="="),
    hnp.timedelta64_dtypes(endianness="="),
)
np_scalars = SCALAR_DTYPES.flatmap(lambda d: hnp.arrays(d, ())).map(lambda a: a[()])
path_text = st.text(alphabet="ab./\\: C", max_size=12)
paths = st.one_of(
    path_text.map(pathlib.PurePosixPath),
    # pathlib itself cannot read back the text of a malformed UNC path ("//a/")
    path_text.map(pathlib.PureWindowsPath).filter(lambda p: pathlib.PureWindowsPath(str(p)) == p),
    path_text.map(Path),
)
hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    datetimes,
    st.dates(),
    st.timedeltas(),
    st.uuids(),
    paths,
    st.sampled_from([*Shade, *Access, Holder.Inner.A]),
    st.decimals(allow_nan=False),
    st.complex_numbers(allow_nan=False),
)
hashables = st.recursive(
    hashable_leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(tuple),
        st.frozensets(children, max_size=3),
    ),
    max_leaves=8,
)
standard_values = st.one_of(
    datetimes,
    st.dates(),
    times,
    st.timedeltas(),
    st.sets(hashables, max_size=5),
    st.frozensets(hashables, max_size=5),
    decimals,
    paths,
    complexes,
    st.uuids(),
    st.sampled_from([*Shade, *Access, Access.READ | Access.WRITE, Access(0), Holder.Inner.A]),
    np_scalars,
)


@pytest.mark.parametrize("name", CODECS)
@PROPERTY
@given(value=standard_values)
def test_standard_values_roundtrip(name: str, value: Any) -> None:
    assert_same(value, roundtrip(name, value))


@pytest.mark.parametrize("name", CODECS)
@PROPERTY
@given(value=st.lists(standard_values, max_size=4).map(tuple))
def test_standard_values_roundtrip_inside_containers(name: str, value: Any) -> None:
    got = roundtrip(name, {"values": value, "nested": [value]})
    for sent, arrived in zip(value, got["values"], strict=True):
        assert_same(sent, arrived)
    for sent, arrived in zip(value, got["nested"][0], strict=True):
        assert_same(sent, arrived)


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize(
    "dtype",
    [
        *["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"],
        *["M8[ns]", "M8[D]", "m8[us]", "M8", "m8"],
    ],
)
def test_numpy_scalars_keep_their_dtype(name: str, dtype: str) -> None:
    scalars = np.zeros(3, dtype=dtype)
    if dtype[0] in "Mm":
        scalars = np.array([0, 1, np.iinfo(np.int64).min], dtype="i8").view(dtype)
    elif dtype != "?":
        info = np.iinfo(dtype) if dtype[0] in "iu" else np.finfo(dtype)
        scalars = np.array([info.min, info.max, 1], dtype=dtype)
    if len(dtype) == 2 and dtype[0] in "Mm":  # generic unit: only NaT exists
        scalars = scalars[2:]
    for scalar in scalars:
        assert_same(scalar, roundtrip(name, scalar))


def test_a_float64_is_no_longer_a_plain_float() -> None:
    got = roundtrip("msgpack", [np.float64(2.5), np.int32(7), np.bool_(False)])
    assert [type(x) for x in got] == [np.float64, np.int32, np.bool_]


@pytest.mark.parametrize("name", CODECS)
def test_naive_stays_naive_and_aware_keeps_its_offset(name: str) -> None:
    naive = dt.datetime(2024, 5, 1, 12, 30)
    aware = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=-3)))
    got_naive, got_aware = roundtrip(name, [naive, aware])
    assert got_naive.tzinfo is None
    assert got_aware.utcoffset() == dt.timedelta(hours=-3)
    assert got_aware == aware


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 1, 1, tzinfo=dt.timezone(dt.timedelta(microseconds=1))),
        dt.time(tzinfo=dt.timezone(dt.timedelta(seconds=-30, microseconds=1))),
    ],
)
def test_an_offset_with_a_fraction_of_a_second_is_refused(value: Any) -> None:
    # Python 3.11 would read "+00:00:00.000001" back as UTC: refused, not lost
    with pytest.raises(CodecError, match="fraction of a second"):
        codec_named("msgpack").dumps(value, None)


@pytest.mark.parametrize("name", CODECS)
def test_a_zoneinfo_datetime_arrives_with_its_fixed_offset(name: str) -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        paris = zoneinfo.ZoneInfo("Europe/Paris")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    sent = dt.datetime(2024, 7, 1, 9, 0, tzinfo=paris)
    got = roundtrip(name, sent)
    assert got == sent
    assert got.tzinfo == dt.timezone(dt.timedelta(hours=2))  # the zone's rules stay behind


@pytest.mark.parametrize("name", CODECS)
def test_paths_keep_their_flavour(name: str) -> None:
    native = Path("data") / "run1.csv"
    sent = [native, pathlib.PurePosixPath("/a/b"), pathlib.PureWindowsPath(r"C:\x\y.txt")]
    got = roundtrip(name, sent)
    assert [type(p) for p in got] == [type(p) for p in sent]
    assert got == sent


@pytest.mark.parametrize("name", CODECS)
def test_a_concrete_path_of_another_os_arrives_pure(name: str) -> None:
    other = "WindowsPath" if sys.platform != "win32" else "PosixPath"
    pure = pathlib.PureWindowsPath if sys.platform != "win32" else pathlib.PurePosixPath
    codec = codec_named(name)
    tree: Any
    if name == "msgpack":
        tree = msgpack_tag(17, other, "C:\\x")
    else:
        tree = {"$rx": "path", "v": [other, "C:\\x"]}
    got = loads(codec, tree)
    assert type(got) is pure
    assert got == pure("C:\\x")


@pytest.mark.parametrize("name", CODECS)
def test_sets_arrive_as_sets_with_their_items_decoded(name: str) -> None:
    sent = {(1, 2), frozenset({b"x"}), np.int16(3), Shade.DARK, "s"}
    got = roundtrip(name, sent)
    assert_same(sent, got)
    assert type(got) is set


@pytest.mark.parametrize("name", CODECS)
def test_int_and_str_enums_travel_as_plain_values(name: str) -> None:
    got = roundtrip(name, [Level.HIGH, Name.ALICE], InstanceRegistry())
    assert got == [3, "alice"]
    assert [type(x) for x in got] == [int, str]


@pytest.mark.parametrize("name", CODECS)
def test_subclasses_of_standard_types_travel_as_their_base(name: str) -> None:
    class Stamp(dt.datetime):
        def isoformat(self, *args: Any, **kwargs: Any) -> str:
            return "not what travels"

    class Tags(set[Any]):
        pass

    got = roundtrip(name, [Stamp(2024, 1, 2, 3, 4, 5), Tags({1})])
    assert got == [dt.datetime(2024, 1, 2, 3, 4, 5), {1}]
    assert [type(x) for x in got] == [dt.datetime, set]


@pytest.mark.parametrize("name", CODECS)
def test_a_coder_for_a_subclass_wins_over_its_base(name: str) -> None:
    class Stamp(dt.datetime):
        pass

    registry = held_registry()
    registry.register_coder(
        "tests.stamp",
        Stamp,
        lambda s: s.isoformat(),
        lambda v: Stamp.fromisoformat(v),
    )
    got = roundtrip(name, Stamp(2024, 1, 2), registry)
    assert type(got) is Stamp


@pytest.mark.parametrize("cls", [dt.datetime, set, decimal.Decimal, Path, np.float64, int, bytes])
def test_a_coder_for_a_type_carried_natively_is_refused(cls: type) -> None:
    with pytest.raises(RegistryError, match="natively"):
        InstanceRegistry().register_coder("tests.native", cls, str, str)
    with pytest.raises(RegistryError, match="natively"):
        register_coder("tests.native", cls, str, str)


def test_longdouble_is_refused_with_a_way_out() -> None:
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("longdouble is a double here")
    with pytest.raises(CodecError, match="asarray"):
        codec_named("msgpack").dumps(np.longdouble(1), None)


# -- enums: only classes the receiver may use ------------------------------------------


@pytest.mark.parametrize("name", CODECS)
def test_an_enum_of_a_module_this_side_uses_arrives(name: str) -> None:
    sent = [Shade.DARK, Holder.Inner.A, Access.READ | Access.EXECUTE, Access(0)]
    got = roundtrip(name, sent)
    assert got == sent
    assert [type(x) for x in got] == [Shade, Holder.Inner, Access, Access]
    assert got[0] is Shade.DARK


@pytest.mark.parametrize("name", CODECS)
def test_an_enum_of_a_module_this_side_does_not_use_is_refused(name: str) -> None:
    with pytest.raises(CodecError, match=r"register_remote_class\(Shade\)"):
        roundtrip(name, Shade.DARK, InstanceRegistry())


@pytest.mark.parametrize("name", CODECS)
def test_enum_decoding_follows_the_held_instances(name: str) -> None:
    registry = InstanceRegistry()
    holder = Holder()
    registry.add_instance(holder, "h")
    assert roundtrip(name, Shade.LIGHT, registry) is Shade.LIGHT
    registry.remove_instance(holder)  # the last instance of this module goes
    with pytest.raises(CodecError):
        roundtrip(name, Shade.LIGHT, registry)


@pytest.mark.parametrize("name", CODECS)
def test_a_registered_enum_class_arrives(name: str) -> None:
    registry = InstanceRegistry()
    registry.register_class(Shade)
    assert roundtrip(name, Shade.LIGHT, registry) is Shade.LIGHT


@pytest.mark.parametrize("name", CODECS)
def test_an_enum_without_a_registry_is_refused(name: str) -> None:
    with pytest.raises(CodecError, match="registry"):
        roundtrip(name, Shade.LIGHT, None)


def test_an_enum_defined_in_a_function_cannot_be_sent() -> None:
    class Local(enum.Enum):
        X = 1

    with pytest.raises(CodecError, match="inside a function"):
        codec_named("msgpack").dumps(Local.X, REGISTRY)


@pytest.fixture
def enum_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable module (not imported) that records being imported or probed."""
    name = f"rx_enum_target_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "import enum\n"
        "PROBED = []\n"
        "class Color(enum.Enum):\n"
        "    RED = 1\n"
        "class NotAnEnum:\n"
        "    RED = 1\n"
        "def __getattr__(name):\n"
        "    PROBED.append(name)\n"
        "    raise AttributeError(name)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def enum_tag(name: str, module: str, qualname: str, member: Any) -> Any:
    if name == "msgpack":
        return msgpack_tag(20, module, qualname, member)
    return {"$rx": "enum", "v": [module, qualname, member]}


@pytest.mark.parametrize("name", CODECS)
def test_decoding_an_enum_never_imports(name: str, enum_module: str) -> None:
    registry = InstanceRegistry()
    registry.module_allowed = lambda module: True  # even a server that allows everything
    with pytest.raises(CodecError, match="may not be decoded"):
        loads(codec_named(name), enum_tag(name, enum_module, "Color", "RED"), registry)
    assert enum_module not in sys.modules


@pytest.mark.parametrize("name", CODECS)
def test_an_allowed_module_already_imported_is_used(name: str, enum_module: str) -> None:
    module = __import__(enum_module)
    registry = InstanceRegistry()
    registry.module_allowed = lambda m: m == enum_module
    got = loads(codec_named(name), enum_tag(name, enum_module, "Color", "RED"), registry)
    assert got is module.Color.RED
    with pytest.raises(CodecError):  # a registry that does not allow it
        loads(codec_named(name), enum_tag(name, enum_module, "Color", "RED"), InstanceRegistry())


@pytest.mark.parametrize(
    ("qualname", "member"),
    [
        ("Missing", "RED"),  # a module __getattr__ is never asked
        ("NotAnEnum", "RED"),
        ("Color", "BLUE"),
        ("Color", 1),  # an int only names a Flag combination
        ("Color.RED", "RED"),
        ("enum.Enum", "RED"),  # not defined there: imported
        ("__class__", "RED"),
        ("", "RED"),
        ("Color", None),
    ],
)
@pytest.mark.parametrize("name", CODECS)
def test_enum_refusals(name: str, enum_module: str, qualname: str, member: Any) -> None:
    module = __import__(enum_module)
    registry = InstanceRegistry()
    registry.module_allowed = lambda m: m == enum_module
    with pytest.raises(CodecError):
        loads(codec_named(name), enum_tag(name, enum_module, qualname, member), registry)
    assert module.PROBED == []


def main_copy(monkeypatch: pytest.MonkeyPatch, digest: str) -> types.ModuleType:
    """A client's main script as a server loads it (under a private name)."""
    module = types.ModuleType(f"{MAIN_MODULE_PREFIX}{digest}__")
    module.__dict__["Mode"] = enum.Enum(
        "Mode", [("FAST", "fast")], module=module.__name__, qualname="Mode"
    )
    module.__dict__["Cam"] = type("Cam", (), {"__module__": module.__name__})
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


@pytest.fixture
def served_main(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    return main_copy(monkeypatch, "feedbeef")


@pytest.mark.parametrize("name", CODECS)
def test_a_servers_copy_of_the_clients_main_travels_as_main(
    name: str, served_main: types.ModuleType
) -> None:
    registry = InstanceRegistry()
    registry.add_instance(served_main.Cam(), "cam")
    codec = codec_named(name)
    body, _ = codec.dumps(served_main.Mode.FAST, registry)
    assert b"__main__" in body
    assert served_main.__name__.encode() not in body
    assert loads(codec, enum_tag(name, "__main__", "Mode", "FAST"), registry) is (
        served_main.Mode.FAST
    )


@pytest.mark.parametrize("name", CODECS)
def test_two_main_scripts_defining_the_same_enum_are_ambiguous(
    name: str, served_main: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    main_copy(monkeypatch, "0ddba11")
    with pytest.raises(CodecError, match="ambiguous"):
        loads(codec_named(name), enum_tag(name, "__main__", "Mode", "FAST"), InstanceRegistry())


# -- refusals: what another client could send ------------------------------------------

BAD_FIELDS: list[tuple[str, str, list[Any]]] = [
    ("datetime not text", "datetime", [5]),
    ("datetime bad text", "datetime", ["2024-13-01T00:00:00"]),
    ("datetime too long", "datetime", ["2024-01-01" + " " * 100]),
    ("datetime two fields", "datetime", ["2024-01-01", "x"]),
    ("date bad text", "date", ["01/02/2024"]),
    ("time bad text", "time", ["25:00"]),
    ("timedelta float", "timedelta", [1.5, 0, 0]),
    ("timedelta bool", "timedelta", [True, 0, 0]),
    ("timedelta two fields", "timedelta", [1, 0]),
    ("timedelta overflow", "timedelta", [10**10, 0, 0]),
    ("set of lists", "set", [[1], [2]]),
    ("frozenset with a dict", "frozenset", [{"a": 1}]),
    ("decimal not text", "decimal", [1.5]),
    ("decimal bad text", "decimal", ["1.2.3"]),
    ("path unknown flavour", "path", ["MacPath", "a"]),
    ("path not text", "path", ["PurePosixPath", 1]),
    ("path one field", "path", ["PurePosixPath"]),
    ("complex text", "complex", ["1", "2"]),
    ("complex bool", "complex", [True, 0.0]),
    ("complex three fields", "complex", [1.0, 2.0, 3.0]),
    ("uuid bad text", "uuid", ["not-a-uuid"]),
    ("uuid not text", "uuid", [12]),
    ("enum not text", "enum", [1, "Shade", "DARK"]),
    ("enum two fields", "enum", [__name__, "Shade"]),
    ("npscalar object dtype", "npscalar", ["|O", 1]),
    ("npscalar structured dtype", "npscalar", ["i4,f8", 1]),
    ("npscalar string dtype", "npscalar", ["<U3", "abc"]),
    ("npscalar bad dtype", "npscalar", ["zz", 1]),
    ("npscalar int out of range", "npscalar", ["|i1", 300]),
    ("npscalar uint negative", "npscalar", ["<u4", -1]),
    ("npscalar bool as int", "npscalar", ["|b1", 1]),
    ("npscalar int as bool", "npscalar", ["<i4", True]),
    ("npscalar float as text", "npscalar", ["<f8", "1.5"]),
    ("npscalar complex scalar", "npscalar", ["<c16", 1.5]),
    ("npscalar longdouble", "npscalar", ["<f16", 1.5]),
    ("npscalar datetime float", "npscalar", ["<M8[s]", 1.5]),
    ("npscalar datetime over 64 bits", "npscalar", ["<M8[s]", 2**63]),
    ("npscalar generic datetime", "npscalar", ["<M8", 5]),
]


@pytest.mark.parametrize(("case", "tag", "fields"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
@pytest.mark.parametrize("name", CODECS)
def test_malformed_standard_tags_are_codec_errors(
    name: str, case: str, tag: str, fields: list[Any]
) -> None:
    from remote_exec.codecs import _TAG_CODES

    codec = codec_named(name)
    if name == "msgpack":
        tree: Any = msgpack_tag(_TAG_CODES[tag], *fields)
    elif tag in ("datetime", "date", "time", "decimal", "uuid") and len(fields) == 1:
        tree = {"$rx": tag, "v": fields[0]}  # a single field is not wrapped in JSON
    else:
        tree = {"$rx": tag, "v": fields}
    with pytest.raises(CodecError):
        loads(codec, tree)


def standard_trees() -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=6),
        st.sampled_from(["<f8", "|b1", "<M8[s]", "|O", "Shade", "DARK", __name__, "PosixPath"]),
        st.sampled_from(["2024-01-01", "12:00", "1.5", "NaN", "__main__", "Flag"]),
    )

    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        tags = st.builds(
            lambda code, fields: [msgpack.ExtType(code, b""), *fields],
            st.integers(10, 21),
            st.lists(children, max_size=4),
        )
        return tags | st.lists(children, max_size=3)

    return st.recursive(leaves, extend, max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(tree=standard_trees())
def test_hostile_standard_tags_decode_or_raise_codec_error(tree: Any) -> None:
    body = msgpack.packb(tree, use_bin_type=True)
    try:
        MsgpackCodec().loads(memoryview(body), [], REGISTRY)
    except (CodecError, UnknownInstanceError):
        pass


# -- the examples of docs/wire-format.md -------------------------------------------------

DocMode = enum.Enum("DocMode", [("FAST", 1)], module="lab", qualname="Mode")
DocPerm = enum.Flag("DocPerm", [("R", 4), ("W", 2)], module="lab", qualname="Perm")
DOC_VALUES: dict[str, Any] = {
    "datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))": dt.datetime(
        2024, 5, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))
    ),
    "datetime(2024, 5, 1, 12, 30, 0, 250000)": dt.datetime(2024, 5, 1, 12, 30, 0, 250000),
    "date(2024, 5, 1)": dt.date(2024, 5, 1),
    "time(12, 30, 0, 500000)": dt.time(12, 30, 0, 500000),
    "timedelta(seconds=-1)": dt.timedelta(seconds=-1),
    "{7}": {7},
    "frozenset()": frozenset(),
    'Decimal("1.10")': decimal.Decimal("1.10"),
    'PurePosixPath("/data/x.csv")': pathlib.PurePosixPath("/data/x.csv"),
    'PureWindowsPath("C:/data/x.csv")': pathlib.PureWindowsPath("C:/data/x.csv"),
    "complex(1, -2)": complex(1, -2),
    'UUID("12345678-1234-5678-1234-567812345678")': uuid.UUID(
        "12345678-1234-5678-1234-567812345678"
    ),
    "Mode.FAST": DocMode.FAST,
    "Perm.R | Perm.W": DocPerm.R | DocPerm.W,
    "np.float64(1.5)": np.float64(1.5),
    "np.int32(-3)": np.int32(-3),
    "np.bool_(True)": np.bool_(True),
    'np.datetime64("2024-05-01")': np.datetime64("2024-05-01"),
}


def doc_rows() -> list[tuple[str, str, str]]:
    """The rows of the standard types' example table: (value, msgpack hex, JSON)."""
    text = DOCS.read_text()
    table = text.split("The standard types (no buffers):", 1)[1].split("\n\n", 2)[1]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        label = re.match(r"`([^`]*)`", cells[0])
        assert label is not None, line
        rows.append((label.group(1).replace("\\|", "|"), cells[1].strip("`"), cells[2].strip("`")))
    return [(v, h, j.replace("\\|", "|")) for v, h, j in rows]


def test_every_standard_tag_has_a_docs_example() -> None:
    assert sorted(v for v, _, _ in doc_rows()) == sorted(DOC_VALUES)
    tags = {json.loads(j)["$rx"] for _, _, j in doc_rows()}
    assert tags == {
        "datetime", "date", "time", "timedelta", "set", "frozenset", "decimal",
        "path", "complex", "uuid", "enum", "npscalar",
    }  # fmt: skip


@pytest.mark.parametrize(("label", "packed", "text"), doc_rows(), ids=[r[0] for r in doc_rows()])
def test_the_docs_examples_are_what_is_sent(label: str, packed: str, text: str) -> None:
    value = DOC_VALUES[label]
    assert MsgpackCodec().dumps(value, None)[0].hex(" ") == packed
    assert JsonCodec().dumps(value, None)[0].decode() == text


@pytest.mark.parametrize(("label", "packed", "text"), doc_rows(), ids=[r[0] for r in doc_rows()])
def test_the_docs_examples_decode_to_their_value(label: str, packed: str, text: str) -> None:
    value = DOC_VALUES[label]
    registry = InstanceRegistry()
    if isinstance(value, enum.Enum):
        registry.register_class(type(value))
    got = MsgpackCodec().loads(memoryview(bytes.fromhex(packed)), [], registry)
    assert_same(value, got)
    got = JsonCodec().loads(memoryview(text.encode()), [], registry)
    assert_same(value, got)


def test_the_docs_spell_out_every_standard_tag_code() -> None:
    from remote_exec.codecs import _TAG_NAMES

    text = DOCS.read_text()
    for code in range(10, 22):
        assert re.search(rf"^\| {_TAG_NAMES[code]} +\| {code} +\|", text, re.MULTILINE), code
        assert re.search(rf"\*\*{_TAG_NAMES[code]}\*\* \({code}\)", text), code


def test_nan_and_infinite_parts_are_float_tags_in_json() -> None:
    body = JsonCodec().dumps([complex(math.inf, math.nan), np.float32(-math.inf)], None)[0]
    assert json.loads(body) == [
        {"$rx": "complex", "v": [{"$rx": "float", "v": "inf"}, {"$rx": "float", "v": "nan"}]},
        {"$rx": "npscalar", "v": ["<f4", {"$rx": "float", "v": "-inf"}]},
    ]


@pytest.mark.parametrize("name", CODECS)
def test_a_float_too_large_for_its_dtype_arrives_infinite_without_a_warning(name: str) -> None:
    # warnings are errors in this suite: a hostile value must not raise one either
    codec = codec_named(name)
    tree = (
        msgpack_tag(21, "<f2", 1e300)
        if name == "msgpack"
        else {"$rx": "npscalar", "v": ["<f2", 1e300]}
    )
    got = loads(codec, tree)
    assert type(got) is np.float16
    assert np.isinf(got)
