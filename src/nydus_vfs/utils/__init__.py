"""Leaf utilities with no knowledge of images or I/O policy.

* owns: digests and CRC-32C (``digest.py``), chunk (de)compression with the
  nydus fallback rule (``compress.py``), and I/O value types shared across
  layers (``io.FileSegment``, ``io.WritePayload``).
* does not own: which algorithm an image uses (``format``), when to validate
  (``storage``).

Note: the re-exported *functions* ``compress`` and ``digest`` shadow the
submodules of the same name as package attributes; to reach anything else in
those modules use ``from nydus_vfs.utils.digest import ...`` (which goes through
``sys.modules``), not ``import nydus_vfs.utils.digest as m``.
"""

from .compress import MAX_DECOMPRESSED_SIZE as MAX_DECOMPRESSED_SIZE
from .compress import compress as compress
from .compress import compress_raw as compress_raw
from .compress import decompress as decompress
from .digest import CRC32C_IMPLEMENTATION as CRC32C_IMPLEMENTATION
from .digest import DIGEST_SIZE as DIGEST_SIZE
from .digest import Hasher as Hasher
from .digest import crc32c as crc32c
from .digest import digest_bytes as digest
from .digest import digest_bytes as digest_bytes
from .digest import from_hex as from_hex
from .digest import new_hasher as new_hasher
from .digest import sha256 as sha256
from .digest import sha256_hex as sha256_hex
from .digest import to_hex as to_hex
from .io import FileSegment as FileSegment
from .io import WritePayload as WritePayload

__all__ = [
    "MAX_DECOMPRESSED_SIZE",
    "compress",
    "compress_raw",
    "decompress",
    "CRC32C_IMPLEMENTATION",
    "DIGEST_SIZE",
    "Hasher",
    "crc32c",
    "digest",
    "digest_bytes",
    "from_hex",
    "new_hasher",
    "sha256",
    "sha256_hex",
    "to_hex",
    "FileSegment",
    "WritePayload",
]
