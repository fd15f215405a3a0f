"""The C core's header check never accepts what the Python checks reject.

router/fastlane.c serves a request only when its own msgpack walk says the header is
routable; everything else goes to Python, which answers with the exact error. So the one
property that matters is: C routable => Python routable, with the same model and timeout.
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
    if c is not None:
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
