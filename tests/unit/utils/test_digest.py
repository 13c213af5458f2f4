"""Known answers for the digests and CRC-32C RAFS uses (rafs-format.md §0.2, §0.4)."""

from __future__ import annotations

import hashlib
import importlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.format.types import Digester

# The package attribute ``utils.digest`` is the function; fetch the module itself.
d = importlib.import_module("nydus_vfs.utils.digest")

SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
BLAKE3_EMPTY = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
BLAKE3_ABC = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"


@pytest.mark.parametrize(
    ("algo", "data", "expected"),
    [
        (Digester.SHA256, b"", SHA256_EMPTY),
        (Digester.SHA256, b"abc", SHA256_ABC),
        (Digester.BLAKE3, b"", BLAKE3_EMPTY),
        (Digester.BLAKE3, b"abc", BLAKE3_ABC),
    ],
)
def test_digest_known_answers(algo, data, expected):
    assert d.digest_bytes(algo, data).hex() == expected
    hasher = d.new_hasher(algo)
    hasher.update(data[:1])
    hasher.update(memoryview(data)[1:])
    assert hasher.hexdigest() == expected
    assert len(d.digest_bytes(algo, data)) == d.DIGEST_SIZE


def test_digest_accepts_raw_enum_values_and_rejects_unknown():
    assert d.digest_bytes(0, b"abc").hex() == BLAKE3_ABC
    assert d.digest_bytes(1, b"abc").hex() == SHA256_ABC
    with pytest.raises(ValueError, match="unknown digester"):
        d.digest_bytes(7, b"abc")
    with pytest.raises(ValueError, match="unknown digester"):
        d.new_hasher(2)


def test_sha256_helpers():
    assert d.sha256_hex(b"abc") == SHA256_ABC
    assert d.sha256(b"abc") == bytes.fromhex(SHA256_ABC)
    assert d.to_hex(b"\x00\xff") == "00ff"


def test_from_hex_round_trip_and_errors():
    raw = bytes(range(32))
    assert d.from_hex(raw.hex()) == raw
    assert d.from_hex("sha256:" + raw.hex()) == raw
    assert d.from_hex("abcd", size=None) == b"\xab\xcd"
    with pytest.raises(ValueError, match="not a hex digest"):
        d.from_hex("zz" * 32)
    with pytest.raises(ValueError, match="has 2 bytes, expected 32"):
        d.from_hex("abcd")


def test_crc32c_check_value():
    # The CRC catalogue "check" value of CRC-32/ISCSI.
    assert d.crc32c(b"123456789") == 0xE3069283
    assert d._crc32c_python(b"123456789") == 0xE3069283
    assert d.crc32c(b"") == 0


def test_crc32c_accepts_every_buffer_type():
    for buf in (bytearray(b"123456789"), memoryview(b"123456789")):
        assert d.crc32c(buf) == 0xE3069283


def test_crc32c_is_not_plain_crc32():
    import zlib

    assert d.crc32c(b"abc") != zlib.crc32(b"abc")


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_continuation_and_fallback_agree(a, b):
    whole = d.crc32c(a + b)
    assert d.crc32c(b, d.crc32c(a)) == whole
    assert d._crc32c_python(a + b) == whole
    assert d._crc32c_python(b, d._crc32c_python(a)) == whole


def test_sha256_matches_hashlib():
    data = bytes(range(256)) * 3
    assert d.digest_bytes(Digester.SHA256, data) == hashlib.sha256(data).digest()


def test_package_reexports():
    import nydus_vfs.utils as utils

    # The package exposes the functions (the builder calls utils.digest(algo, data)).
    assert utils.digest is d.digest_bytes
    assert utils.digest(Digester.SHA256, b"abc").hex() == SHA256_ABC
    assert utils.compress(b"", 3) == (b"", False)
