"""Wire codec: round trips for every message type and typed errors for every kind of bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import proto.messages  # noqa: F401  (registers messages)
from proto import codec
from proto.codec import Len, MaxItems, MaxLen, Range, decode, decode_as, encode, message
from proto.errors import DecodeError
from proto.messages import ErrorCode, ErrorReply, Hello, HelloAck
from tests.strategies import any_message, for_struct


def _all_messages() -> list[type[Any]]:
    # Import every module that registers messages so the registry is complete.
    import proto.paxos  # noqa: F401

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
