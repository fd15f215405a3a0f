"""The C core's header check accepts exactly the requests the Python checks accept.

router/fastlane.c serves a request only when its own msgpack walk says the header is
routable; everything else goes to Python, which answers with the exact error. The
property that keeps answers right is "C routable => Python routable, same model and
timeout"; the converse keeps every ordinary request on the C path. Both hold: the limits
come from one place (router/protocol.py, through the generated header), names and ids
are counted in UTF-8 bytes on both sides, and nesting is cut where msgpack-python's
stack ends.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import fastlane
from router import protocol as p

pytestmark = pytest.mark.skipif(not fastlane.available(), reason="router/_fastlane not built")


def python_route(header: bytes) -> tuple[str, int] | None:
    try:
        model, timeout, _ = p.route_fields(p.unpack_map(header))
    except p.ProtocolError:
        return None
    return model, timeout or 0


def agree(header: bytes) -> tuple[str, int] | None:
    c = fastlane.check_header(header)
    assert python_route(header) == c, header
    return c


TENSOR = {"dtype": "float32", "shape": [1, 4]}


def test_an_ordinary_header_takes_the_c_path() -> None:
    header = msgpack.packb({"model": "m", "inputs": [TENSOR], "timeout_ms": 250, "id": 7})
    assert agree(header) == ("m", 250)
    inline = {"dtype": "uint8", "shape": [3], "data": b"abc"}
    assert agree(msgpack.packb({"model": "resnet", "inputs": [inline], "id": "r-1"})) == (
        "resnet",
        0,
    )


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},  # no model
        {"model": "", "inputs": []},
        {"model": 3, "inputs": []},
        {"model": "m"},  # no inputs
        {"model": "m", "inputs": {}},
        {"model": "m", "inputs": [], "timeout_ms": 0},
        {"model": "m", "inputs": [], "timeout_ms": -5},
        {"model": "m", "inputs": [], "timeout_ms": True},
        {"model": "m", "inputs": [], "timeout_ms": 1.5},
        {"model": "m", "inputs": [], "id": True},
        {"model": "m", "inputs": [], "id": 1.5},
        {"model": "m", "inputs": [], "id": "x" * 300},
        {"model": "m", "inputs": [], "id": [1]},
        {"model": "m", "inputs": [0] * 5000},  # longer than max_array_len
        {"model": "m", "inputs": [], "x": {str(i): i for i in range(300)}},  # > max_map_len
    ],
)
def test_headers_python_rejects_are_punted(body: dict[str, Any]) -> None:
    header = msgpack.packb(body)
    assert python_route(header) is None
    assert fastlane.check_header(header) is None


def test_byte_level_oddities_are_punted() -> None:
    good = msgpack.packb({"model": "m", "inputs": []})
    cases = [
        good + b"\x00",  # trailing bytes
        good[:-1],  # truncated
        b"",
        b"\xc1",  # never-used type byte
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({"model": "m", "inputs": [], "e": msgpack.ExtType(1, b"x")}),
        # a string that is not UTF-8, nested inside an input
        b"\x82\xa5model\xa1m\xa6inputs\x91\x81\xa1k\xa2\xff\xfe",
        # a map key that is an int (strict_map_key)
        b"\x82\xa5model\xa1m\xa6inputs\x91\x81\x01\x02",
        # a UTF-8-encoded surrogate, which Python's codec refuses
        b"\x83\xa5model\xa1m\xa6inputs\x90\xa1s\xa3\xed\xa0\x80",
    ]
    for header in cases:
        assert python_route(header) is None, header
        assert fastlane.check_header(header) is None, header


def test_duplicate_keys_resolve_like_python() -> None:
    header = b"\x83\xa5model\xa1a\xa6inputs\x90\xa5model\xa1b"
    assert agree(header) == ("b", 0)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
field_values = st.one_of(values, st.sampled_from(["m", "model-b", ""]), st.integers(-3, 10**6))


@settings(max_examples=400, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["model", "inputs", "timeout_ms", "id", "other", "outputs"]),
        field_values,
        max_size=6,
    )
)
@pytest.mark.slow
def test_c_accepts_only_what_python_accepts(body: dict[str, Any]) -> None:
    agree(msgpack.packb(body))


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_fool_the_c_check(raw: bytes) -> None:
    agree(raw)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 40))
def test_corrupted_real_headers_never_fool_the_c_check(noise: bytes, at: int) -> None:
    header = bytearray(msgpack.packb({"model": "m", "inputs": [TENSOR], "id": "abc"}))
    at = min(at, len(header))
    header[at : at + len(noise)] = noise
    agree(bytes(header))


def nested(depth: int, leaf: bytes = b"\x01") -> bytes:
    """A header whose "x" value nests arrays so that ``depth`` containers are open at the
    leaf, the top map included."""
    return b"\x83\xa5model\xa1m\xa6inputs\x90\xa1x" + b"\x91" * (depth - 1) + leaf


def test_nesting_is_cut_where_msgpack_python_cuts_it() -> None:
    deepest = p.MAX_NESTING
    assert agree(nested(deepest)) == ("m", 0)
    assert agree(nested(deepest + 1)) is None
    assert agree(nested(deepest - 1, b"\x90")) == ("m", 0)  # an empty array counts too
    assert agree(nested(deepest, b"\x90")) is None


def test_names_and_ids_are_limited_in_bytes_on_both_sides() -> None:
    limit, two_byte = p.MAX_MODEL_NAME_BYTES, "\u00e9"  # 2 bytes in UTF-8
    for name, ok in [
        ("a" * limit, True),
        ("a" * (limit + 1), False),
        (two_byte * (limit // 2), True),
        (two_byte * (limit // 2) + "a", False),  # 129 bytes, 65 characters
        ("a" * 512, False),  # what C used to accept
    ]:
        header = msgpack.packb({"model": name, "inputs": []})
        assert agree(header) == ((name, 0) if ok else None), (len(name), ok)
    for rid, ok in [
        ("i" * p.MAX_ID_BYTES, True),
        ("\u20ac" * (p.MAX_ID_BYTES // 3 + 1), False),  # 258 bytes in 86 characters
        (b"\x00" * p.MAX_ID_BYTES, True),
        (b"\x00" * (p.MAX_ID_BYTES + 1), False),
    ]:
        header = msgpack.packb({"model": "m", "inputs": [], "id": rid})
        assert agree(header) == (("m", 0) if ok else None)


def test_a_timeout_in_a_signed_encoding_is_routed() -> None:
    # 0xd0 0x05: int8 5, which msgpack-python decodes as 5, like any other encoder's 5
    header = b"\x83\xa5model\xa1m\xa6inputs\x90\xaatimeout_ms\xd0\x05"
    assert agree(header) == ("m", 5)
    assert agree(header[:-1] + b"\xfb") is None  # -5
    for big in (2**63, 2**64 - 1):  # past int64: C keeps it unsigned, as Python does
        assert agree(msgpack.packb({"model": "m", "inputs": [], "timeout_ms": big})) == ("m", big)


def near(limit: int) -> st.SearchStrategy[int]:
    return st.integers(max(1, limit - 3), limit + 3)


# Names and ids right around the real limits, in 1- to 4-byte characters.
wide_chars = st.sampled_from(["a", "-", "\u00e9", "\u20ac", "\U0001f600"])
names = st.builds(
    lambda chars, n: "".join(chars) * n, st.lists(wide_chars, min_size=1, max_size=4), near(40)
).map(lambda s: s[: p.MAX_MODEL_NAME_BYTES + 4])
edge_names = st.one_of(
    names,
    near(p.MAX_MODEL_NAME_BYTES).map(lambda n: "m" * n),
    near(p.MAX_MODEL_NAME_BYTES // 2).map(lambda n: "\u00e9" * n),
    near(p.MAX_MODEL_NAME_BYTES // 4).map(lambda n: "\U0001f600" * n),
)
edge_ids = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    near(p.MAX_ID_BYTES).map(lambda n: "i" * n),
    near(p.MAX_ID_BYTES // 3).map(lambda n: "\u20ac" * n),
    near(p.MAX_ID_BYTES).map(lambda n: b"\x07" * n),
    st.none(),
    st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(
    edge_names,
    st.one_of(st.none(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(), st.booleans()),
    edge_ids,
    st.dictionaries(st.text(max_size=6), values, max_size=3),
)
@pytest.mark.slow
def test_c_and_python_accept_exactly_the_same_requests(
    model: str, timeout: Any, rid: Any, extra: dict[str, Any]
) -> None:
    body = {**extra, "model": model, "inputs": [TENSOR], "timeout_ms": timeout, "id": rid}
    agree(msgpack.packb(body))
