"""Digests and checksums used by RAFS (reference/rafs-format.md §0.2, §0.4).

* Chunk digests (``block_id``) are blake3 or sha256 over the *uncompressed*
  chunk bytes, 32 raw bytes either way, chosen by :class:`~nydus_vfs.format.types.Digester`.
* Blob ids, ToC digests and bootstrap names are always sha256, lowercase hex.
* Chunks built since 2025 also carry CRC-32C (Castagnoli); when present nydusd
  validates with it *instead of* the digest because it is much cheaper.

CRC-32C comes from ``google-crc32c`` (hardware accelerated where the CPU has
SSE4.2/ARMv8 CRC); a table-driven pure Python fallback keeps the package usable
without it, at roughly 10 MB/s, which is acceptable for tests but not for
serving images.

Layering: ``utils`` sits below ``format``, so algorithms are taken as the enum
*values* of ``format.types.Digester`` (an ``IntEnum``, so its members work as
is): 0 = blake3, 1 = sha256.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import blake3 as _blake3

__all__ = [
    "DIGEST_SIZE",
    "Hasher",
    "new_hasher",
    "digest_bytes",
    "sha256",
    "sha256_hex",
    "to_hex",
    "from_hex",
    "crc32c",
    "CRC32C_IMPLEMENTATION",
]

#: Every RAFS digest is 32 raw bytes.
DIGEST_SIZE = 32

# ``format.types.Digester`` values (rafs-format.md §0.1: blake3 is 0).
_BLAKE3 = 0
_SHA256 = 1


class Hasher(Protocol):
    """The streaming interface shared by ``hashlib.sha256()`` and ``blake3.blake3()``."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


def new_hasher(algo: int) -> Hasher:
    """A fresh streaming hasher for the ``Digester`` value ``algo`` (data arriving in pieces)."""
    if algo == _BLAKE3:
        return _blake3.blake3()
    if algo == _SHA256:
        return hashlib.sha256()
    raise ValueError(f"unknown digester {algo!r}")


def digest_bytes(algo: int, data: bytes | bytearray | memoryview) -> bytes:
    """The 32-byte digest of ``data`` under the ``Digester`` value ``algo``."""
    if algo == _BLAKE3:
        return _blake3.blake3(data).digest()
    if algo == _SHA256:
        return hashlib.sha256(data).digest()
    raise ValueError(f"unknown digester {algo!r}")


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex sha256: the form of blob ids and OCI digests (without ``sha256:``)."""
    return hashlib.sha256(data).hexdigest()


def to_hex(raw: bytes | bytearray | memoryview) -> str:
    return bytes(raw).hex()


def from_hex(text: str, *, size: int | None = DIGEST_SIZE) -> bytes:
    """Parse hex ``text`` (an optional ``sha256:`` prefix is dropped).

    Raises ``ValueError`` naming the text when it is not hex or, unless
    ``size`` is None, does not decode to exactly ``size`` bytes.
    """
    body = text[7:] if text.startswith("sha256:") else text
    try:
        raw = bytes.fromhex(body)
    except ValueError:
        raise ValueError(f"not a hex digest: {text!r}") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"hex digest {text!r} has {len(raw)} bytes, expected {size}")
    return raw


# -- CRC-32C -------------------------------------------------------------------

_CRC32C_POLY_REFLECTED = 0x82F63B78


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE = _make_table()


def _crc32c_python(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    # Standard reflected CRC with init/xorout 0xFFFFFFFF; ``value`` is a previous
    # *final* CRC, so undo its final xor to continue the computation.
    crc = value ^ 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:
    import google_crc32c as _gcrc
except ImportError:  # pragma: no cover - exercised only where the wheel is missing
    _gcrc = None

if _gcrc is not None:
    CRC32C_IMPLEMENTATION: str = f"google-crc32c ({_gcrc.implementation})"

    def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
        """CRC-32C (Castagnoli, iSCSI) of ``data``; pass a previous result as ``value`` to continue."""
        # The C binding accepts only read-only buffers (bytes), not bytearray/memoryview.
        raw = data if type(data) is bytes else bytes(data)
        return _gcrc.extend(value, raw) if value else _gcrc.value(raw)

else:  # pragma: no cover
    CRC32C_IMPLEMENTATION = "pure python"
    crc32c = _crc32c_python
