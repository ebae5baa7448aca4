"""Wire codec: round trips for every message type and typed errors for every kind of bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proto.messages  # noqa: F401  (registers messages)
from proto import codec
from proto.address import AddressRecord
from proto.codec import (
    U8,
    U16,
    Len,
    MaxItems,
    MaxLen,
    Range,
    decode,
    decode_as,
    decode_struct,
    encode,
    encode_struct,
    message,
)
from proto.envelope import Envelope, EnvelopeBody
from proto.errors import DecodeError
from proto.handoff import HandoffPart, JoinRefusal
from proto.invite import InviteTicket, JoinRequest
from proto.manifest import Manifest
from proto.messages import ErrorCode, ErrorReply, Hello, HelloAck
from proto.paxos.messages import AcceptorSignature, Ballot, Certificate
from proto.service import BackfillPage, Subscribe
from proto.ticket import NodeTicket
from tests.strategies import (
    any_message,
    for_struct,
    hostile_frame,
    mutated_message,
    object_bomb,
    type_confusion,
)


def _all_messages() -> list[type[Any]]:
    # Import every module that registers messages so the registry is complete.
    import proto.paxos
    import proto.resets  # noqa: F401

    return list(codec.registered_messages().values())


@given(any_message())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_round_trip_every_message(msg: Any) -> None:
    data = encode(msg)
    assert decode(data) == msg
    assert encode(decode(data)) == data  # canonical: one encoding per value


@pytest.mark.parametrize("cls", _all_messages(), ids=lambda c: c.__name__)
def test_each_type_round_trips(cls: type[Any]) -> None:
    @given(for_struct(cls))
    @settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
    def check(msg: Any) -> None:
        assert decode(encode(msg)) == msg

    check()


@given(any_message(), st.data())
@settings(max_examples=300)
def test_truncated_input_is_a_decode_error(msg: Any, data: st.DataObject) -> None:
    raw = encode(msg)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DecodeError):
        decode(raw[:cut])


@given(any_message(), st.binary(min_size=1, max_size=8))
def test_trailing_bytes_rejected(msg: Any, extra: bytes) -> None:
    with pytest.raises(DecodeError, match="trailing"):
        decode(encode(msg) + extra)


@given(st.binary(max_size=512))
@settings(max_examples=2000)
def test_random_bytes_never_raise_anything_but_decode_error(raw: bytes) -> None:
    try:
        decode(raw)
    except DecodeError:
        pass


@given(any_message(), st.data())
@settings(max_examples=1000)
def test_bit_flips_give_decode_error_or_a_valid_message(msg: Any, data: st.DataObject) -> None:
    raw = bytearray(encode(msg))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= 1 << data.draw(st.integers(0, 7))
    try:
        out = decode(bytes(raw))
    except DecodeError:
        return
    assert encode(out) == bytes(raw)  # anything accepted is canonical and well-typed


def test_unknown_tag() -> None:
    with pytest.raises(DecodeError) as exc:
        decode(msgpack.packb([0x7FFF, 1, 2]))
    assert exc.value.field == "<tag>"


def test_wrong_field_type_names_the_field() -> None:
    raw = msgpack.packb([codec.tag_of(Hello), [1, "two"], "agent"])
    with pytest.raises(DecodeError) as exc:
        decode(raw)
    assert exc.value.field == "Hello.versions[1]"
    assert "expected int" in exc.value.reason


def test_bool_is_not_an_int() -> None:
    with pytest.raises(DecodeError, match="expected int"):
        decode(msgpack.packb([codec.tag_of(HelloAck), True, "x"]))


def test_out_of_range_int() -> None:
    with pytest.raises(DecodeError, match="out of range") as exc:
        decode(msgpack.packb([codec.tag_of(HelloAck), 70000, "x"]))
    assert exc.value.field == "HelloAck.version"


def test_unknown_enum_value() -> None:
    with pytest.raises(DecodeError, match="unknown ErrorCode"):
        decode(msgpack.packb([codec.tag_of(ErrorReply), 999, "x"]))


def test_oversized_string_and_list() -> None:
    with pytest.raises(DecodeError, match="length <= 128"):
        decode(msgpack.packb([codec.tag_of(Hello), [1], "a" * 129]))
    with pytest.raises(DecodeError, match="length <= 16") as exc:
        decode(msgpack.packb([codec.tag_of(Hello), list(range(17)), "a"]))
    assert exc.value.field == "Hello.versions"
    # a str bound counts characters, not UTF-8 bytes
    assert decode(msgpack.packb([codec.tag_of(Hello), [1], "é" * 128])).agent == "é" * 128


def test_wrong_arity() -> None:
    with pytest.raises(DecodeError, match="has 2 fields"):
        decode(msgpack.packb([codec.tag_of(Hello), [1]]))


def test_cross_field_validation_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="at least one version"):
        decode(msgpack.packb([codec.tag_of(Hello), [], "agent"]))


def test_message_size_limit() -> None:
    raw = encode(ErrorReply(ErrorCode.INTERNAL, "x" * 1000))
    with pytest.raises(DecodeError, match="exceed the maximum"):
        decode(raw, max_bytes=100)


def test_nesting_bomb_rejected() -> None:
    bomb = b"\x91" * 200_000 + b"\x00"
    with pytest.raises(DecodeError):
        decode(bomb)
    deep_but_parsable = msgpack.packb([codec.tag_of(Hello), [[[[1]]]], "a"])
    with pytest.raises(DecodeError, match="expected int"):
        decode(deep_but_parsable)


def test_huge_declared_lengths_do_not_allocate() -> None:
    # array32 / bin32 headers announcing 4 billion items with no payload behind them
    for raw in (b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"):
        with pytest.raises(DecodeError):
            decode(raw)


def test_non_canonical_encoding_rejected() -> None:
    # the int 1 written as a uint32 instead of a positive fixint
    tag = msgpack.packb(codec.tag_of(HelloAck))
    raw = b"\x93" + tag + b"\xce\x00\x00\x00\x01" + msgpack.packb("x")
    assert msgpack.unpackb(raw) == [codec.tag_of(HelloAck), 1, "x"]
    with pytest.raises(DecodeError, match="non-canonical"):
        decode(raw)


def test_ext_types_and_floats_rejected() -> None:
    with pytest.raises(DecodeError):
        decode(msgpack.packb([codec.tag_of(HelloAck), 1.0, "x"]))
    with pytest.raises(DecodeError):
        decode(msgpack.packb([codec.tag_of(HelloAck), msgpack.ExtType(1, b"x"), "x"]))


def test_decode_as_checks_type() -> None:
    raw = encode(HelloAck(1, "x"))
    assert decode_as(raw, HelloAck) == HelloAck(1, "x")
    with pytest.raises(DecodeError, match="expected Hello"):
        decode_as(raw, Hello)


@dataclass(frozen=True)
class _Inner:
    key: Annotated[bytes, Len(4)]
    n: Annotated[int, Range(-5, 5)]


@dataclass(frozen=True)
class _Outer:
    inner: _Inner
    table: Annotated[dict[str, _Inner], MaxItems(3)]
    maybe: Annotated[bytes, MaxLen(3)] | None


def test_nested_structs_maps_optionals() -> None:
    message(0x0FFE)(_Outer)
    value = _Outer(_Inner(b"abcd", -5), {"b": _Inner(b"1234", 5), "a": _Inner(b"zzzz", 0)}, None)
    raw = encode(value)
    assert decode(raw) == value
    # map keys are sorted on the wire regardless of insertion order
    again = _Outer(value.inner, dict(reversed(list(value.table.items()))), None)
    assert encode(again) == raw
    with pytest.raises(DecodeError, match=r"_Outer.table\[\.\.\.\].key"):
        decode(msgpack.packb([0x0FFE, [b"abcd", 0], {"a": [b"abc", 0]}, None]))
    with pytest.raises(DecodeError, match=r"_Outer\.maybe"):
        decode(msgpack.packb([0x0FFE, [b"abcd", 0], {}, b"four"]))


def test_schema_rules_enforced_at_registration() -> None:
    @dataclass
    class NotFrozen:
        x: int

    with pytest.raises(TypeError, match="frozen"):
        message(0x0FFD)(NotFrozen)

    @dataclass(frozen=True)
    class Floaty:
        x: float

    with pytest.raises(TypeError, match="unsupported"):
        message(0x0FFC)(Floaty)

    with pytest.raises(ValueError, match="already used"):
        message(codec.tag_of(Hello))(HelloAck)


# ---------------------------------------------------------------------------------------------
# Hostile input (issue 14, finding 2): the decoder reads against the schema, so every frame either
# decodes to a valid message or raises DecodeError, and it agrees with the plain reference decoder.
# ---------------------------------------------------------------------------------------------


def _outcome(fn: Any, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(raw)
    except DecodeError:
        return "refused", None


def _assert_valid_or_refused(raw: bytes) -> None:
    try:
        out = decode(raw)
    except DecodeError:
        return
    assert codec.registered_messages()[codec.tag_of(type(out))] is type(out)
    assert encode(out) == raw  # anything accepted is canonical and well-typed


@given(hostile_frame())
@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_hostile_frames_decode_or_raise_decode_error(raw: bytes) -> None:
    _assert_valid_or_refused(raw)


@given(object_bomb())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_object_bombs_are_refused(raw: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(raw)  # never an int where the tag must be
    # as the only field of every message type (small ones can be valid messages)
    for tag in codec.registered_messages():
        _assert_valid_or_refused(b"\x92" + msgpack.packb(tag) + raw)


@given(st.one_of(type_confusion(), mutated_message(), any_message().map(encode),
                 st.binary(max_size=64)))
@settings(max_examples=1500, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_decoder_agrees_with_the_reference(raw: bytes) -> None:
    """Same accept/reject decision and the same value as the plain unpack-then-validate decoder
    the schema was first written for (kept as the executable specification)."""
    assert _outcome(decode, raw) == _outcome(codec.reference_decode, raw)


_RECORDS = [Manifest, AddressRecord, EnvelopeBody, InviteTicket, JoinRequest, NodeTicket,
            HandoffPart, JoinRefusal]


@pytest.mark.parametrize("cls", _RECORDS, ids=lambda c: c.__name__)
def test_decode_struct_is_protected_and_agrees(cls: type[Any]) -> None:
    @given(for_struct(cls), st.data())
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    def check(value: Any, data: st.DataObject) -> None:
        raw = encode_struct(value)
        assert decode_struct(raw, cls) == value
        bad = bytearray(raw)
        i = data.draw(st.integers(0, len(bad) - 1))
        bad[i] = data.draw(st.integers(0, 255))
        got = _outcome(lambda r: decode_struct(r, cls), bytes(bad))
        assert got == _outcome(lambda r: codec.reference_decode_struct(r, cls), bytes(bad))
        with pytest.raises(DecodeError):
            decode_struct(data.draw(object_bomb()), cls)

    check()


def _smallest_wire(spec: codec.Spec) -> Any:
    """The wire form of the smallest value a spec takes (type-correct; cross-field checks may
    still refuse it, but they run after every field's type check)."""
    if isinstance(spec, codec.IntSpec):
        return max(spec.lo, min(spec.hi, 0))
    if isinstance(spec, codec.BoolSpec):
        return False
    if isinstance(spec, codec.EnumSpec):
        return int(next(iter(spec.enum_cls)))
    if isinstance(spec, codec.BytesSpec):
        return bytes(spec.min_len)
    if isinstance(spec, codec.StrSpec):
        return ""
    if isinstance(spec, codec.OptSpec):
        return None
    if isinstance(spec, codec.ListSpec):
        return []
    if isinstance(spec, codec.MapSpec):
        return {}
    assert isinstance(spec, codec.StructSpec)
    return [_smallest_wire(f.spec) for f in codec.schema_of(spec.cls)]


def test_every_message_field_refuses_every_other_type() -> None:
    """Type confusion, exhaustively: each top-level field of each message given a value of each
    msgpack type its spec does not take."""
    samples: dict[str, Any] = {
        "nil": None, "bool": True, "int": 7, "negative int": -7, "float": 1.5,
        "bytes": b"\x01\x02", "str": "ab", "array": [[], []], "map": {"k": 1},
        "ext": msgpack.ExtType(5, b"x"),
    }
    takes = {codec.IntSpec: {"int", "negative int"}, codec.EnumSpec: {"int", "negative int"},
             codec.BoolSpec: {"bool"}, codec.BytesSpec: {"bytes"}, codec.StrSpec: {"str"},
             codec.ListSpec: {"array"}, codec.StructSpec: {"array"}, codec.MapSpec: {"map"}}
    checked = 0
    for tag, cls in codec.registered_messages().items():
        for i, f in enumerate(codec.schema_of(cls)):
            spec, optional = f.spec, isinstance(f.spec, codec.OptSpec)
            if isinstance(spec, codec.OptSpec):
                spec = spec.inner
            for kind, value in samples.items():
                if kind in takes[type(spec)] or (optional and kind == "nil"):
                    continue
                wire = [tag, *_smallest_wire(codec.StructSpec(cls))]
                wire[i + 1] = value
                with pytest.raises(DecodeError) as exc:
                    decode(msgpack.packb(wire, use_bin_type=True))
                assert exc.value.field.startswith(f"{cls.__name__}.{f.name}"), (tag, kind)
                checked += 1
    assert checked > 500


def test_arrays_of_tiny_ints_where_bytes_are_expected() -> None:
    env = Envelope(b"g" * 32, b"s" * 32, 1, 1, b"c", b"x" * 64)
    wire = codec.to_wire(env)
    wire[5] = [1] * 100_000
    with pytest.raises(DecodeError, match="expected bytes, got array") as exc:
        decode(msgpack.packb(wire, use_bin_type=True))
    assert exc.value.field == "Envelope.ciphertext"


def test_extra_items_are_refused_without_reading_them() -> None:
    # [tag, group_id, <a million empty arrays the schema has no field for>]
    n = 1 << 20
    raw = (b"\xdd" + (n + 2).to_bytes(4, "big") + msgpack.packb(codec.tag_of(Subscribe))
           + msgpack.packb(b"g" * 32) + b"\x90" * n)
    with pytest.raises(DecodeError, match=f"Subscribe has 1 fields, got {n + 1}"):
        decode(raw)


def test_decode_as_refuses_another_type_from_its_tag() -> None:
    # the body is garbage: decode_as must not read it to find out it has the wrong type
    raw = b"\x93" + msgpack.packb(codec.tag_of(BackfillPage)) + b"\xdd\xff\xff\xff\xff"
    with pytest.raises(DecodeError, match="expected Hello, got BackfillPage"):
        decode_as(raw, Hello)


def test_decode_only_some_types_refuses_others_from_the_tag() -> None:
    raw = b"\x93" + msgpack.packb(codec.tag_of(BackfillPage)) + b"\xdd\xff\xff\xff\xff"
    with pytest.raises(DecodeError, match="BackfillPage is not expected here") as exc:
        decode(raw, only={Hello, HelloAck})
    assert exc.value.field == "<tag>"
    assert decode(encode(HelloAck(1, "x")), only={Hello, HelloAck}) == HelloAck(1, "x")


def test_error_paths_name_nested_fields() -> None:
    sig = AcceptorSignature(b"a" * 32, b"s" * 64)
    cert = Certificate(b"g", 1, Ballot(1, b"p" * 32), b"h" * 32, (sig, sig))
    wire = codec.to_wire(cert)
    wire[5][1][1] = b"short"
    with pytest.raises(DecodeError, match="length >= 64") as exc:
        decode(msgpack.packb(wire, use_bin_type=True))
    assert exc.value.field == "Certificate.signatures[1].signature"
    wire = codec.to_wire(cert)
    wire[3] = [1]
    with pytest.raises(DecodeError, match="Ballot has 2 fields, got 1") as exc:
        decode(msgpack.packb(wire, use_bin_type=True))
    assert exc.value.field == "Certificate.ballot"


@dataclass(frozen=True)
class _Checked:
    n: U16

    def __post_init__(self) -> None:
        if self.n == 13:
            raise ValueError("13 is not allowed")


@dataclass(frozen=True)
class _HasChecked:
    items: Annotated[tuple[_Checked, ...], MaxItems(4)]


def test_nested_cross_field_validation_names_the_item() -> None:
    message(0x0FFB)(_HasChecked)
    assert decode(encode(_HasChecked((_Checked(1), _Checked(2))))) == _HasChecked(
        (_Checked(1), _Checked(2)))
    with pytest.raises(DecodeError, match="13 is not allowed") as exc:
        decode(msgpack.packb([0x0FFB, [[1], [13]]]))
    assert exc.value.field == "_HasChecked.items[1]"


def test_msgpack_errors_are_decode_errors() -> None:
    tag = msgpack.packb(codec.tag_of(HelloAck))
    for raw, reason in [
        (b"", "empty"),
        (b"\x93" + tag + b"\x01\xa2\xff\xfe", "UTF-8"),  # invalid UTF-8
        (b"\x93" + tag + b"\x01\xa5ab", "truncated"),
        (b"\xc1", "non-empty array"),  # never-used byte
        (b"\x92\xc1\x01", "got invalid byte"),
    ]:
        with pytest.raises(DecodeError, match=reason):
            decode(raw)


def test_schemas_that_could_exceed_the_object_bound_are_refused() -> None:
    @dataclass(frozen=True)
    class Grid:
        rows: Annotated[tuple[Annotated[tuple[U8, ...], MaxItems(1024)], ...], MaxItems(1024)]

    with pytest.raises(TypeError, match="MAX_OBJECTS"):
        codec.schema_of(Grid)
    for cls in codec.registered_messages().values():
        assert codec.max_objects(cls) <= codec.MAX_OBJECTS
    assert codec.max_objects(Hello) == 1 + (1 + 16) + 1


def test_bounds_msgspec_cannot_express_are_refused_not_weakened() -> None:
    @dataclass(frozen=True)
    class Odd:
        x: Annotated[int, Range(0, 2**63)]

    with pytest.raises(TypeError, match="int64"):
        codec.schema_of(Odd)

    @dataclass(frozen=True)
    class IntKeys:
        m: Annotated[dict[int, int], MaxItems(2)]

    with pytest.raises(TypeError, match="map keys"):
        codec.schema_of(IntKeys)

    @dataclass(frozen=True)
    class Wide:  # the ends of the u64 and i64 ranges need no check: msgpack cannot go beyond
        a: Annotated[int, Range(-(2**63), 2**64 - 1)]
        b: Annotated[int, Range(-(2**63), 2**63 - 1)]

    wide = Wide(-(2**63), 2**63 - 1)
    assert codec.decode_struct(codec.encode_struct(wide), Wide) == wide
    assert codec.decode_struct(codec.encode_struct(Wide(2**64 - 1, 0)), Wide).a == 2**64 - 1
    with pytest.raises(DecodeError, match="out of range"):
        codec.decode_struct(msgpack.packb([0, 2**63]), Wide)


def test_msgspec_encoding_is_msgpacks_canonical_encoding() -> None:
    """The canonical-form check re-encodes with msgspec; it must write exactly the bytes our
    encoder (msgpack.packb) writes, or valid messages would be refused or non-canonical ones
    accepted. Checked at every size boundary of every type the schema uses."""
    enc = msgspec.msgpack.Encoder()
    ints = {0, 2**64 - 1, -(2**63)}
    for bits in (4, 5, 7, 8, 15, 16, 31, 32, 63):
        for d in (-1, 0, 1):
            ints |= {2**bits + d, -(2**bits) + d}
    values: list[Any] = [v for v in ints if -(2**63) <= v < 2**64]
    for n in (0, 1, 15, 16, 31, 32, 255, 256, 65535, 65536):
        values += ["a" * n, "é" * n, b"b" * n, [0] * n, tuple([None] * n)]
    values += [True, False, None, ErrorCode.INTERNAL]
    for v in values:
        assert enc.encode(v) == msgpack.packb(v, use_bin_type=True), v
