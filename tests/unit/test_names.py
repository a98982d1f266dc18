"""Adapter names, tunnel types, the identity alias and the driver version encoding (pure, no kernel)."""

import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wiretun.errors import InvalidData, InvalidParameter
from wiretun.linux.names import (
    ALIAS_MARKER,
    decode_alias,
    derived_kernel_name,
    encode_alias,
    is_derived_kernel_name,
    is_kernel_name,
    parse_driver_version,
    validate_name,
    validate_tunnel_type,
)


@pytest.mark.parametrize(
    "name",
    ["Demo", "wg0", "x" * 15, "x" * 16, "x" * 127, "Office.Net-1_2", "日本語", "é" * 63, "a:b", ".", "..", "ü",
     "Data Center", " lead and trail ", "a" * 63 + " " + "é" * 31],
)
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "must not be empty"),
        ("a/b", "contains '/'"),
        ("tab\there", "whitespace (U+0009)"),
        ("line\nbreak", "whitespace (U+000A)"),
        ("nb\u00a0sp", "whitespace (U+00A0)"),
        ("nul\0", "NUL"),
        ("bell\x07", "non-printable character (U+0007)"),
        ("x" * 128, "128 characters long; the limit is 127"),
        ("é" * 64, "128 bytes in UTF-8; the limit is 127 bytes"),
        ("Data Center " + "é" * 58, "128 bytes in UTF-8; the limit is 127 bytes"),
    ],
)
def test_invalid_names_say_why(name, fragment):
    with pytest.raises(InvalidParameter, match=re.escape(fragment)):
        validate_name(name)


def test_invalid_name_types():
    with pytest.raises(InvalidParameter, match="must be a str, not bytes"):
        validate_name(b"Demo")
    with pytest.raises(InvalidParameter, match="not NoneType"):
        validate_name(None)


def test_invalid_name_is_also_value_error():
    with pytest.raises(ValueError):
        validate_name("")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Demo", True),
        ("x" * 15, True),
        ("x" * 16, False),  # too long for IFNAMSIZ
        ("é", False),  # non-ASCII: kernels treat some UTF-8 bytes (0xA0) as whitespace
        ("a:b", False),  # ':' is reserved by the kernel
        ("wt%d", False),  # the kernel would expand %d into a number
        (".", False),
        ("..", False),
        ("...", True),
        ("Data Center", False),  # a space: never a kernel name (an altname)
    ],
)
def test_is_kernel_name(name, expected):
    assert is_kernel_name(name) is expected


def test_derived_kernel_name_shape_and_determinism():
    long = "An-adapter-name-of-sixty-characters-" + "x" * 24
    assert len(long) == 60
    k = derived_kernel_name(long)
    assert re.fullmatch(r"wt[0-9a-f]{13}", k)
    assert len(k.encode()) == 15
    assert derived_kernel_name(long) == k
    assert derived_kernel_name(long + "y") != k
    alternatives = {derived_kernel_name(long, i) for i in range(16)}
    assert len(alternatives) == 16
    assert all(is_derived_kernel_name(a, long) for a in alternatives)
    assert not is_derived_kernel_name(k, long + "y")
    assert not is_derived_kernel_name("Demo", "Demo")


def test_alias_round_trip_keeps_spaces_in_tunnel_type():
    guid = uuid.UUID("deadbabe-cafe-beef-0123-456789abcdef")
    alias = encode_alias(guid, "My Tunnel  Type ")
    assert alias == f"{ALIAS_MARKER} deadbabe-cafe-beef-0123-456789abcdef My Tunnel  Type "
    assert decode_alias(alias) == (guid, "My Tunnel  Type ")


def test_alias_fits_kernel_limit_for_longest_tunnel_type():
    alias = encode_alias(uuid.uuid4(), "t" * 127)
    assert len(alias.encode()) <= 255  # IFALIASZ - 1


@pytest.mark.parametrize(
    "alias",
    [
        None,
        "",
        "some admin note",
        "wiretun/1",
        "wiretun/1 deadbabe-cafe-beef-0123-456789abcdef",  # no tunnel type
        "wiretun/2 deadbabe-cafe-beef-0123-456789abcdef Example",  # a future format
        "wiretun/1 not-a-guid Example",
        "wiretun/1 DEADBABE-CAFE-BEEF-0123-456789ABCDEF Example",  # not canonical
        "wiretun/1 deadbabe-cafe-beef-0123-456789abcdef tab\ttype",
        "wiretun/1 deadbabe-cafe-beef-0123-456789abcdef " + "t" * 128,
    ],
)
def test_foreign_aliases_are_not_ours(alias):
    assert decode_alias(alias) is None


@pytest.mark.parametrize(
    ("tunnel_type", "fragment"),
    [
        ("", "must not be empty"),
        ("t" * 128, "128 characters long; the limit is 127"),
        ("日" * 43, "129 bytes in UTF-8; the limit is 127 bytes"),
        ("tab\t", "whitespace (U+0009)"),
        ("nul\0", "NUL"),
    ],
)
def test_invalid_tunnel_types(tunnel_type, fragment):
    with pytest.raises(InvalidParameter, match=re.escape(fragment)):
        validate_tunnel_type(tunnel_type)
    with pytest.raises(InvalidParameter):
        encode_alias(uuid.uuid4(), tunnel_type)


def test_tunnel_type_may_hold_spaces_and_slashes():
    assert validate_tunnel_type("Wintun / Example type") == "Wintun / Example type"


@given(
    st.uuids(),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Co", "Cn", "Cf")),
        min_size=1,
        max_size=40,
    ).filter(lambda s: all(c == " " or not c.isspace() for c in s) and s.isprintable()),
)
def test_alias_round_trip_property(guid, tunnel_type):
    assert decode_alias(encode_alias(guid, tunnel_type)) == (guid, tunnel_type)


@pytest.mark.parametrize(
    ("text", "version"),
    [("1.6", 0x10006), ("0.0", 0), ("1.6.2", 0x10006), ("2.15-rc1", 0x2000F), ("65535.65535", 0xFFFFFFFF),
     (" 1.6\n", 0x10006)],
)
def test_parse_driver_version(text, version):
    assert parse_driver_version(text) == version


@pytest.mark.parametrize("text", ["", "1", "v1.6", "1.x", "65536.0", "1.65536", "one.six"])
def test_parse_driver_version_rejects(text):
    with pytest.raises(InvalidData, match="driver version"):
        parse_driver_version(text)
