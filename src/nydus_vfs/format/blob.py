"""Data-blob side structures (reference/rafs-format.md §3, §4.1), sans-IO.

* :class:`BlobCompressionContextHeader` – the 4 KiB "ci header" after the ci array.
* :class:`BlobChunkInfoV1` (16 bytes) / :class:`BlobChunkInfoV2` (24 bytes) – ci
  entries, with the asymmetric bit packing of trap 4.
* :class:`ZranContext` / :class:`BatchContext` – the 40-byte contexts after the ci entries.
* :class:`TocEntry` (128 bytes) – the ``rafs.blob.toc`` entries.
* :class:`TarHeader` – the 512-byte GNU header placed *after* each section.
* :class:`BlobTail` – walks a blob's tail (ToC first, else the reversed tar
  headers) to find sections such as ``image.boot`` and ``blob.meta``, and
  extracts them (decompressed, digest-checked).

Strategy of the tail walk: read the last 512 bytes.  If they are the header
of ``rafs.blob.toc`` the ToC names every section with its offset, compression
and sha256, so nothing else is read.  Otherwise walk the headers backwards:
data of a section is ``[cur - size, cur)`` and the previous header sits just
before it.  The walk stops at the first block that is not a valid header, at
offset 0, or after :data:`MAX_TAIL_SECTIONS` steps, so a hostile blob cannot make
it loop or read outside the blob.  No I/O is done here: the caller passes a
``read_at(offset, size) -> bytes`` callable (or any buffer).
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Callable, Union

from ..errors import FormatError
from ._common import EntryList, OnDisk, layout_slots
from .types import BlobFeatures, BlobInfo, ChunkFlags, ChunkInfo, Compressor

__all__ = [
    "parse_tar_number",
    "BLOB_CCT_MAGIC",
    "BLOB_CCT_HEADER_SIZE",
    "TOC_FLAG_NONE",
    "TOC_FLAG_ZSTD",
    "TOC_FLAG_LZ4",
    "MAX_TAIL_SECTIONS",
    "BlobCompressionContextHeader",
    "BlobChunkInfoV1",
    "BlobChunkInfoV2",
    "ZranContext",
    "BatchContext",
    "decode_ci_entries",
    "split_blob_meta_file",
    "TocEntry",
    "TocEntryList",
    "TarHeader",
    "BlobSection",
    "BlobTail",
    "ReadAt",
]

BLOB_CCT_MAGIC = 0xB10BB10B
BLOB_CCT_HEADER_SIZE = 4096
_CHUNK_SIZE_MASK = 0xFF_FFFF
_MAX_CHUNK = 0x100_0000
_FEATURE_INCOMPAT_UNKNOWN = 0x0000_F000

TOC_FLAG_NONE = 0x1
TOC_FLAG_ZSTD = 0x2
TOC_FLAG_LZ4 = 0x4
_TOC_COMPRESSION_MASK = 0xF
_TOC_NAME = "rafs.blob.toc"
_TOC_MAX_SIZE = 1 << 20
#: The tail walk gives up after this many sections (Nydus writes at most six).
MAX_TAIL_SECTIONS = 32
#: Default cap for an extracted (decompressed) section.
_DEFAULT_MAX_EXTRACT = 1 << 31
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

ReadAt = Callable[[int, int], bytes]


def _check_features(features: int, structure: str, field: str) -> None:
    if features & _FEATURE_INCOMPAT_UNKNOWN or features & BlobFeatures.V5_NO_EXT_BLOB_TABLE:
        raise FormatError(structure, field, features, "unknown incompatible or internal-only blob feature bits")


class BlobCompressionContextHeader(OnDisk):
    """The 4096-byte ci header that follows the (compressed) ci array (rafs-format.md §3.3)."""

    _LAYOUT = (
        ("s_magic", "I"),
        ("s_features", "I"),
        ("s_ci_compressor", "I"),
        ("s_ci_entries", "I"),
        ("s_ci_offset", "Q"),
        ("s_ci_compressed_size", "Q"),
        ("s_ci_uncompressed_size", "Q"),
        ("s_ci_zran_offset", "Q"),
        ("s_ci_zran_size", "Q"),
        ("s_ci_zran_count", "I"),
        ("s_reserved", "4032s"),
        ("s_magic2", "I"),
    )
    __slots__ = layout_slots(_LAYOUT)
    _INIT = {"s_magic": BLOB_CCT_MAGIC, "s_magic2": BLOB_CCT_MAGIC}

    @property
    def is_v2(self) -> bool:
        return bool(self.s_features & BlobFeatures.CHUNK_INFO_V2)

    def validate(self, blob: BlobInfo | None = None) -> None:
        """Magics, features, enums; with ``blob`` also the field-by-field match the loader does."""
        n = self.NAME
        if self.s_magic != BLOB_CCT_MAGIC:
            raise FormatError(n, "s_magic", self.s_magic, f"expected {BLOB_CCT_MAGIC:#x}")
        if self.s_magic2 != BLOB_CCT_MAGIC:
            raise FormatError(n, "s_magic2", self.s_magic2, f"expected {BLOB_CCT_MAGIC:#x}")
        _check_features(self.s_features, n, "s_features")
        if self.s_ci_compressor not in Compressor._value2member_map_:
            raise FormatError(n, "s_ci_compressor", self.s_ci_compressor, "unknown compressor value")
        if self.s_ci_compressed_size > self.s_ci_uncompressed_size and self.s_ci_compressor == 0:
            raise FormatError(n, "s_ci_compressed_size", self.s_ci_compressed_size,
                              "uncompressed ci area with different sizes")
        entry = 24 if self.is_v2 else 16
        if self.s_ci_entries * entry > self.s_ci_uncompressed_size:
            raise FormatError(n, "s_ci_entries", self.s_ci_entries,
                              f"{self.s_ci_entries} entries do not fit in {self.s_ci_uncompressed_size} bytes")
        if blob is None:
            return
        for field, mine, theirs in (
            ("s_ci_entries", self.s_ci_entries, blob.chunk_count),
            ("s_ci_compressor", self.s_ci_compressor, int(blob.ci_compressor)),
            ("s_ci_offset", self.s_ci_offset, blob.ci_offset),
            ("s_ci_compressed_size", self.s_ci_compressed_size, blob.ci_compressed_size),
            ("s_ci_uncompressed_size", self.s_ci_uncompressed_size, blob.ci_uncompressed_size),
        ):
            if mine != theirs:
                raise FormatError(n, field, mine, f"blob table entry {blob.index} says {theirs:#x}")


class _CiEntry(OnDisk):
    __slots__ = ()

    compressed_offset: int
    compressed_size: int
    uncompressed_offset: int
    uncompressed_size: int

    #: The entry's flags as :class:`~nydus_vfs.format.types.ChunkFlags` bits (a property in subclasses).
    flags: int

    @property
    def crc32(self) -> int:
        """CRC-32C of the uncompressed chunk, 0 when the entry has none (always for v1)."""
        return 0

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & ChunkFlags.COMPRESSED)

    def to_chunk_info(self, blob_index: int, index: int, digest: bytes = b"", file_offset: int = 0) -> ChunkInfo:
        """A storage descriptor for chunk ``index`` of blob ``blob_index``."""
        return ChunkInfo(digest=digest, blob_index=blob_index, index=index, flags=self.flags,
                         compressed_offset=self.compressed_offset, compressed_size=self.compressed_size,
                         uncompressed_offset=self.uncompressed_offset, uncompressed_size=self.uncompressed_size,
                         file_offset=file_offset, crc32=self.crc32)


class BlobChunkInfoV1(_CiEntry):
    """ci v1 entry (16 bytes): both sizes stored minus 1, split 20+4 bits; no flags.

    ``uncomp_info``: bits 8..11 usize-1 bits 20..23, bits 12..43 the 4 KiB-aligned
    uncompressed offset, bits 44..63 usize-1 bits 0..19.  ``comp_info``: bits
    0..39 compressed offset, bits 40..43 csize-1 bits 20..23, bits 44..63 csize-1
    bits 0..19.  "Compressed" means ``csize != usize``.
    """

    _LAYOUT = (("uncomp_info", "Q"), ("comp_info", "Q"))
    __slots__ = layout_slots(_LAYOUT)

    @classmethod
    def new(cls, compressed_offset: int, compressed_size: int,
            uncompressed_offset: int, uncompressed_size: int) -> "BlobChunkInfoV1":
        n = cls.NAME
        if not 0 < compressed_size <= _MAX_CHUNK:
            raise FormatError(n, "compressed_size", compressed_size, "must be 1..16 MiB")
        if not 0 < uncompressed_size <= _MAX_CHUNK:
            raise FormatError(n, "uncompressed_size", uncompressed_size, "must be 1..16 MiB")
        if compressed_offset >> 40:
            raise FormatError(n, "compressed_offset", compressed_offset, "must fit in 40 bits")
        if uncompressed_offset & ~0xFFF_FFFF_F000:
            raise FormatError(n, "uncompressed_offset", uncompressed_offset, "must be 4 KiB aligned and < 2^44")
        cs, us = compressed_size - 1, uncompressed_size - 1
        comp = compressed_offset | ((cs & 0xF0_0000) << 20) | ((cs & 0x0F_FFFF) << 44)
        uncomp = uncompressed_offset | ((us & 0xF0_0000) >> 12) | ((us & 0x0F_FFFF) << 44)
        return cls(uncomp_info=uncomp, comp_info=comp)

    @property
    def compressed_offset(self) -> int:
        return self.comp_info & 0xFF_FFFF_FFFF

    @property
    def compressed_size(self) -> int:
        return ((self.comp_info >> 44) | ((self.comp_info & 0xF00_0000_0000) >> 20)) + 1

    @property
    def uncompressed_offset(self) -> int:
        return self.uncomp_info & 0xFFF_FFFF_F000

    @property
    def uncompressed_size(self) -> int:
        return ((self.uncomp_info >> 44) | ((self.uncomp_info & 0xF00) << 12)) + 1

    @property
    def flags(self) -> int:
        return int(ChunkFlags.COMPRESSED) if self.compressed_size != self.uncompressed_size else 0

    def validate(self) -> None:
        if self.uncomp_info & 0xFF:
            raise FormatError(self.NAME, "uncomp_info", self.uncomp_info, "reserved bits 0..7 are not zero")


class BlobChunkInfoV2(_CiEntry):
    """ci v2 entry (24 bytes): usize stored minus 1, csize as-is, offset in 4 KiB pages.

    ``uncomp_info``: bits 0..31 uncompressed offset >> 12, bits 32..55 usize-1,
    bits 56..63 flags (0x01 COMPRESSED, 0x02 ZRAN, 0x04 BATCH, 0x08 ENCRYPTED,
    0x10 HAS_CRC32).  ``comp_info``: bits 0..39 compressed offset, bits 40..63
    csize.  ``data``: zran/batch ``index << 32 | offset``, else the CRC32.
    """

    _LAYOUT = (("uncomp_info", "Q"), ("comp_info", "Q"), ("data", "Q"))
    __slots__ = layout_slots(_LAYOUT)

    FLAG_COMPRESSED = 0x01
    FLAG_ZRAN = 0x02
    FLAG_BATCH = 0x04
    FLAG_ENCRYPTED = 0x08
    FLAG_HAS_CRC32 = 0x10
    _FLAG_VALID = 0x1F

    @classmethod
    def new(cls, compressed_offset: int, compressed_size: int, uncompressed_offset: int,
            uncompressed_size: int, ci_flags: int = 0, data: int = 0) -> "BlobChunkInfoV2":
        """``ci_flags`` are the v2 on-disk flag bits (``FLAG_*``), not ChunkFlags."""
        n = cls.NAME
        if not 0 <= compressed_size <= _CHUNK_SIZE_MASK:
            raise FormatError(n, "compressed_size", compressed_size, "must fit in 24 bits")
        if not 0 < uncompressed_size <= _MAX_CHUNK:
            raise FormatError(n, "uncompressed_size", uncompressed_size, "must be 1..16 MiB")
        if compressed_offset >> 40:
            raise FormatError(n, "compressed_offset", compressed_offset, "must fit in 40 bits")
        if uncompressed_offset & 0xFFF or uncompressed_offset >> 44:
            raise FormatError(n, "uncompressed_offset", uncompressed_offset, "must be 4 KiB aligned and < 2^44")
        if ci_flags & ~cls._FLAG_VALID:
            raise FormatError(n, "flags", ci_flags, "unknown ci v2 flag bits")
        uncomp = (uncompressed_offset >> 12) | ((uncompressed_size - 1) << 32) | (ci_flags << 56)
        return cls(uncomp_info=uncomp, comp_info=compressed_offset | (compressed_size << 40), data=data)

    @property
    def ci_flags(self) -> int:
        """The raw v2 flag byte."""
        return self.uncomp_info >> 56

    @property
    def flags(self) -> int:
        f = self.ci_flags
        out = 0
        if f & self.FLAG_COMPRESSED:
            out |= ChunkFlags.COMPRESSED
        if f & self.FLAG_ENCRYPTED:
            out |= ChunkFlags.ENCRYPTED
        if f & self.FLAG_BATCH:
            out |= ChunkFlags.BATCH
        if f & self.FLAG_HAS_CRC32:
            out |= ChunkFlags.HAS_CRC32
        return int(out)

    @property
    def compressed_offset(self) -> int:
        return self.comp_info & 0xFF_FFFF_FFFF

    @property
    def compressed_size(self) -> int:
        return (self.comp_info >> 40) & _CHUNK_SIZE_MASK

    @property
    def uncompressed_offset(self) -> int:
        return (self.uncomp_info & 0xFFFF_FFFF) << 12

    @property
    def uncompressed_size(self) -> int:
        return ((self.uncomp_info >> 32) & _CHUNK_SIZE_MASK) + 1

    @property
    def is_zran(self) -> bool:
        return bool(self.ci_flags & self.FLAG_ZRAN)

    @property
    def is_batch(self) -> bool:
        return bool(self.ci_flags & self.FLAG_BATCH)

    @property
    def crc32(self) -> int:
        return self.data & 0xFFFF_FFFF if self.ci_flags & self.FLAG_HAS_CRC32 else 0

    @property
    def context_index(self) -> int:
        """ZRAN / batch context index (``data >> 32``)."""
        return self.data >> 32

    @property
    def context_offset(self) -> int:
        """Offset of the chunk in the context's output (``data & 0xffffffff``)."""
        return self.data & 0xFFFF_FFFF

    def validate(self, separate: bool = False) -> None:
        """Loader rules; ``separate`` relaxes ``csize != 0`` for SEPARATE (ref/zran) blobs."""
        n = self.NAME
        f = self.ci_flags
        if f & ~self._FLAG_VALID:
            raise FormatError(n, "uncomp_info", self.uncomp_info, f"unknown flag bits {f:#x}")
        if not separate and not f & self.FLAG_BATCH and self.compressed_size == 0:
            raise FormatError(n, "comp_info", self.comp_info, "compressed size is 0")
        if not f & (self.FLAG_COMPRESSED | self.FLAG_ENCRYPTED) and not f & self.FLAG_BATCH \
                and not separate and self.compressed_size != self.uncompressed_size:
            raise FormatError(n, "comp_info", self.comp_info, "plain chunk with different sizes")
        if f & self.FLAG_HAS_CRC32 and self.crc32 == 0:
            raise FormatError(n, "data", self.data, "HAS_CRC32 set but the CRC is 0")


class ZranContext(OnDisk):
    """A gzip random-access context (40 bytes, rafs-format.md §3.5)."""

    _LAYOUT = (
        ("in_offset", "Q"),
        ("out_offset", "Q"),
        ("dict_offset", "Q"),
        ("in_len", "I"),
        ("out_len", "I"),
        ("dict_size", "I"),
        ("ctx_byte", "B"),
        ("ctx_bits", "B"),
        ("reserved", "H"),
    )
    __slots__ = layout_slots(_LAYOUT)

    def validate(self) -> None:
        if self.out_len > _MAX_CHUNK * 2:
            raise FormatError(self.NAME, "out_len", self.out_len, "context output larger than 32 MiB")
        if self.dict_size not in (0, 32768):
            raise FormatError(self.NAME, "dict_size", self.dict_size, "must be 0 or 32768")
        if self.ctx_bits > 7:
            raise FormatError(self.NAME, "ctx_bits", self.ctx_bits, "must be 0..7")


class BatchContext(OnDisk):
    """A batch context (40 bytes, rafs-format.md §3.4): sizes of one compressed batch."""

    _LAYOUT = (("compressed_size", "I"), ("uncompressed_batch_size", "I"), ("reserved", "32s"))
    __slots__ = layout_slots(_LAYOUT)


def decode_ci_entries(buf: Any, count: int, v2: bool, offset: int = 0) -> list[Union[BlobChunkInfoV1, BlobChunkInfoV2]]:
    """Decode ``count`` ci entries of the uncompressed ci area at ``offset``."""
    cls = BlobChunkInfoV2 if v2 else BlobChunkInfoV1
    return cls.array_from_bytes(buf, offset, count, "ci array", "count")


def split_blob_meta_file(buf: Any) -> tuple[BlobCompressionContextHeader, memoryview]:
    """Split a ``<blob_id>.blob.meta`` file (rafs-format.md §3.9) into its header and ci area.

    The header is the last 4096 bytes; the ci area is the first
    ``s_ci_uncompressed_size`` bytes, which must end before the header.
    """
    n = "blob.meta file"
    if len(buf) < BLOB_CCT_HEADER_SIZE or len(buf) % 4096:
        raise FormatError(n, "length", len(buf), "must be a non-zero multiple of 4096")
    header = BlobCompressionContextHeader.from_bytes(buf, len(buf) - BLOB_CCT_HEADER_SIZE)
    header.validate()
    size = header.s_ci_uncompressed_size
    if size > len(buf) - BLOB_CCT_HEADER_SIZE:
        raise FormatError(n, "s_ci_uncompressed_size", size, "ci area overlaps the header")
    return header, memoryview(buf)[:size]


class TocEntry(OnDisk):
    """One ``rafs.blob.toc`` entry (128 bytes, rafs-format.md §3.7).

    Bytes 124..127 (end of ``reserved2``) may hold garbage from older builders;
    they are kept for a byte-exact round trip and otherwise ignored.
    """

    _LAYOUT = (
        ("flags", "I"),
        ("reserved1", "I"),
        ("name", "16s"),
        ("uncompressed_digest", "32s"),
        ("compressed_offset", "Q"),
        ("compressed_size", "Q"),
        ("uncompressed_size", "Q"),
        ("reserved2", "48s"),
    )
    __slots__ = layout_slots(_LAYOUT)

    @property
    def entry_name(self) -> str:
        """The name up to the first NUL (``blob.meta.header`` fills all 16 bytes)."""
        raw = self.name.split(b"\0", 1)[0]
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise FormatError(self.NAME, "name", self.name, "name is not ASCII") from None

    @property
    def compression(self) -> int:
        return self.flags & _TOC_COMPRESSION_MASK

    def validate(self) -> None:
        n = self.NAME
        if not self.entry_name:
            raise FormatError(n, "name", self.name, "empty section name")
        if self.compression not in (TOC_FLAG_NONE, TOC_FLAG_ZSTD, TOC_FLAG_LZ4):
            raise FormatError(n, "flags", self.flags, f"unknown compression of section {self.entry_name!r}")


class TocEntryList(EntryList):
    """The ToC: consecutive :class:`TocEntry` records."""

    __slots__ = ()
    NAME = "TocEntryList"
    entries: list[TocEntry]

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0, size: int | None = None) -> "TocEntryList":
        if size is None:
            size = len(buf) - offset
        if size % TocEntry.SIZE:
            raise FormatError(cls.NAME, "size", size, "must be a multiple of 128")
        return cls(TocEntry.array_from_bytes(buf, offset, size // TocEntry.SIZE, cls.NAME))

    def to_bytes(self) -> bytes:
        return b"".join(e.to_bytes() for e in self.entries)

    def get(self, name: str) -> TocEntry | None:
        for e in self.entries:
            if e.entry_name == name:
                return e
        return None


def parse_tar_number(raw: bytes) -> int:
    """A numeric tar header field: NUL/space-terminated octal, or GNU base-256.

    Raises ValueError (with the reason) for anything else; callers turn it into
    their own layer's error naming the field.
    """
    if raw and raw[0] & 0x80:
        # GNU base-256: 0x80 marks a positive and 0xff a negative big-endian value.
        if raw[0] == 0x80:
            return int.from_bytes(raw[1:], "big")
        if raw[0] == 0xFF:
            return int.from_bytes(raw, "big", signed=True)
        raise ValueError(f"invalid base-256 marker 0x{raw[0]:02x}")
    text = raw.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError(f"not an octal number: {text[:24]!r}") from None


def _octal(raw: bytes, structure: str, field: str) -> int:
    try:
        return parse_tar_number(raw)
    except ValueError as exc:
        raise FormatError(structure, field, raw, str(exc)) from None


class TarHeader(OnDisk):
    """A 512-byte GNU tar header as Nydus writes it *after* each section (rafs-format.md §4.1)."""

    _LAYOUT = (
        ("name", "100s"),
        ("mode", "8s"),
        ("uid", "8s"),
        ("gid", "8s"),
        ("size", "12s"),
        ("mtime", "12s"),
        ("chksum", "8s"),
        ("typeflag", "1s"),
        ("linkname", "100s"),
        ("magic", "8s"),
        ("uname", "32s"),
        ("gname", "32s"),
        ("devmajor", "8s"),
        ("devminor", "8s"),
        ("rest", "167s"),
    )
    __slots__ = layout_slots(_LAYOUT)
    GNU_MAGIC = b"ustar  \0"

    @classmethod
    def new(cls, name: str, size: int) -> "TarHeader":
        """The header ``tar::Header::new_gnu()`` + name/size/mtime 0/regular gives (checksum set)."""
        raw = name.encode("ascii")
        if not raw or len(raw) > 100:
            raise FormatError(cls.NAME, "name", raw, "must be 1..100 bytes")
        if not 0 <= size < 8 ** 11:
            raise FormatError(cls.NAME, "size", size, "must fit in 11 octal digits")
        hdr = cls(name=raw, size=b"%011o\0" % size, mtime=b"%011o\0" % 0, typeflag=b"0",
                  magic=cls.GNU_MAGIC)
        hdr.chksum = b"%07o\0" % hdr.compute_checksum()
        return hdr

    def compute_checksum(self) -> int:
        """Unsigned byte sum with the checksum field taken as eight spaces."""
        raw = bytearray(self.to_bytes())
        raw[148:156] = b" " * 8
        return sum(raw)

    @property
    def entry_name(self) -> str:
        raw = self.name.split(b"\0", 1)[0]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(self.NAME, "name", self.name, "name is not UTF-8") from None

    @property
    def entry_size(self) -> int:
        return _octal(self.size, self.NAME, "size")

    def validate(self) -> None:
        """Checksum, name and size must be sane (the magic is not required)."""
        n = self.NAME
        stored = _octal(self.chksum, n, "chksum")
        if stored != self.compute_checksum():
            raw = bytearray(self.to_bytes())
            raw[148:156] = b" " * 8
            signed = sum(b - 256 if b > 127 else b for b in raw)
            if stored != signed:
                raise FormatError(n, "chksum", self.chksum, f"checksum mismatch (computed {self.compute_checksum():o})")
        if not self.entry_name:
            raise FormatError(n, "name", self.name, "empty entry name")
        _ = self.entry_size  # parsing is the check


class BlobSection:
    """Where one named section of a blob is and how to decode it.

    ``compression`` is a ToC flag value (``TOC_FLAG_*``) or ``None`` when the
    section was found through tar headers only (then ``image.boot`` may be zstd;
    :meth:`BlobTail.extract` sniffs the zstd magic).  ``digest`` is the ToC's
    sha256 of the uncompressed data, or ``None``.
    """

    __slots__ = ("name", "offset", "size", "uncompressed_size", "compression", "digest")

    def __init__(self, name: str, offset: int, size: int, uncompressed_size: int | None = None,
                 compression: int | None = None, digest: bytes | None = None) -> None:
        self.name = name
        self.offset = offset
        self.size = size
        self.uncompressed_size = size if uncompressed_size is None else uncompressed_size
        self.compression = compression
        self.digest = digest

    def __repr__(self) -> str:
        return (f"BlobSection({self.name!r}, offset={self.offset}, size={self.size}, "
                f"uncompressed_size={self.uncompressed_size}, compression={self.compression})")


def _as_read_at(source: Any) -> ReadAt:
    if callable(source):
        return source
    view = memoryview(source)

    def read_at(offset: int, size: int) -> bytes:
        return bytes(view[offset:offset + size])

    return read_at


class BlobTail:
    """The sections found at the tail of a blob (see the module docstring).

    ``sections`` maps section names to :class:`BlobSection`; ``toc`` is the
    decoded :class:`TocEntryList` when the blob has one (else ``None``) and
    ``toc_digest`` its sha256 over ToC entries plus ToC header (the value the
    bootstrap stores as ``blob_toc_digest``).
    """

    __slots__ = ("blob_size", "sections", "toc", "toc_digest", "toc_size")
    NAME = "BlobTail"

    def __init__(self, blob_size: int, sections: dict[str, BlobSection], toc: TocEntryList | None = None,
                 toc_digest: bytes | None = None, toc_size: int = 0) -> None:
        self.blob_size = blob_size
        self.sections = sections
        self.toc = toc
        self.toc_digest = toc_digest
        self.toc_size = toc_size

    @classmethod
    def parse(cls, source: Any, blob_size: int | None = None) -> "BlobTail":
        """Walk the tail of a blob of ``blob_size`` bytes.

        ``source`` is ``read_at(offset, size) -> bytes`` or a buffer (then
        ``blob_size`` defaults to its length).  Raises FormatError when the last
        512 bytes are not a valid section header.
        """
        if blob_size is None:
            if callable(source):
                raise FormatError(cls.NAME, "blob_size", None, "blob size is required with a read_at callable")
            blob_size = len(source)
        read_at = _as_read_at(source)
        n = cls.NAME
        if blob_size < TarHeader.SIZE:
            raise FormatError(n, "blob_size", blob_size, "too small to end with a 512-byte section header")
        cur = blob_size - TarHeader.SIZE
        raw = read_at(cur, TarHeader.SIZE)
        if len(raw) != TarHeader.SIZE:
            raise FormatError(n, "read_at", len(raw), f"short read of the last header at {cur:#x}")
        header = TarHeader.from_bytes(raw)
        header.validate()
        if header.entry_name == _TOC_NAME:
            return cls._from_toc(read_at, blob_size, cur, header, raw)
        sections: dict[str, BlobSection] = {}
        for _ in range(MAX_TAIL_SECTIONS):
            size = header.entry_size
            if size > cur:
                raise FormatError(n, "size", size,
                                  f"section {header.entry_name!r} of {size} bytes starts before the blob")
            start = cur - size
            sections.setdefault(header.entry_name, BlobSection(header.entry_name, start, size))
            cur = start - TarHeader.SIZE
            if cur < 0:
                break
            raw = read_at(cur, TarHeader.SIZE)
            if len(raw) != TarHeader.SIZE:
                break
            header = TarHeader.from_bytes(raw)
            try:
                header.validate()
            except FormatError:
                # Chunk data before the first header is not a header: the walk ends.
                break
        return cls(blob_size, sections)

    @classmethod
    def _from_toc(cls, read_at: ReadAt, blob_size: int, cur: int, header: TarHeader, raw_header: bytes) -> "BlobTail":
        n = cls.NAME
        size = header.entry_size
        if size == 0 or size % TocEntry.SIZE or size > _TOC_MAX_SIZE or size > cur:
            raise FormatError(n, "toc size", size, "ToC must be 128..1 MiB bytes, a multiple of 128, inside the blob")
        data = read_at(cur - size, size)
        if len(data) != size:
            raise FormatError(n, "read_at", len(data), f"short read of the ToC at {cur - size:#x}")
        toc = TocEntryList.from_bytes(data)
        sections = {}
        for entry in toc.entries:
            entry.validate()
            name = entry.entry_name
            off, csize = entry.compressed_offset, entry.compressed_size
            if name == "image.blob" and off + csize > blob_size and off >= csize:
                # 2.2-era builders stored the *end* of the chunk data as its offset.
                off -= csize
            if off + csize > blob_size:
                raise FormatError("TocEntry", "compressed_offset", off,
                                  f"section {name!r} of {csize} bytes runs past the blob end {blob_size:#x}")
            sections.setdefault(name, BlobSection(name, off, csize, entry.uncompressed_size,
                                                  entry.compression, entry.uncompressed_digest))
        sections[_TOC_NAME] = BlobSection(_TOC_NAME, cur - size, size, size, TOC_FLAG_NONE)
        digest = hashlib.sha256(bytes(data) + bytes(raw_header)).digest()
        return cls(blob_size, sections, toc, digest, size + TarHeader.SIZE)

    def __contains__(self, name: str) -> bool:
        return name in self.sections

    def extract(self, name: str, source: Any, *, max_size: int = _DEFAULT_MAX_EXTRACT) -> bytes:
        """Read, decompress and (when the ToC gives a digest) verify section ``name``.

        ``image.blob``'s ToC digest also covers its tar header, so it is not
        verified here.  Output never exceeds ``max_size`` bytes.
        """
        n = self.NAME
        sec = self.sections.get(name)
        if sec is None:
            raise FormatError(n, "name", name, f"blob has no section {name!r} (has {sorted(self.sections)})")
        read_at = _as_read_at(source)
        data = read_at(sec.offset, sec.size)
        if len(data) != sec.size:
            raise FormatError(n, "read_at", len(data), f"short read of section {name!r} ({sec.size} bytes)")
        compression = sec.compression
        if compression is None:
            compression = TOC_FLAG_ZSTD if bytes(data[:4]) == _ZSTD_MAGIC else TOC_FLAG_NONE
            limit = max_size
        else:
            limit = sec.uncompressed_size
            if limit > max_size:
                raise FormatError(n, "uncompressed_size", limit, f"section {name!r} exceeds the {max_size}-byte cap")
        out = _decompress(bytes(data), compression, limit, name, exact=sec.compression is not None)
        if sec.digest is not None and name != "image.blob" and any(sec.digest):
            if hashlib.sha256(out).digest() != sec.digest:
                raise FormatError("TocEntry", "uncompressed_digest", sec.digest,
                                  f"sha256 of section {name!r} does not match the ToC")
        return out


def _decompress(data: bytes, compression: int, limit: int, name: str, *, exact: bool) -> bytes:
    n = "BlobSection"
    if compression == TOC_FLAG_NONE:
        out = data
    elif compression == TOC_FLAG_ZSTD:
        import zstandard

        chunks = []
        total = 0
        try:
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
                while total <= limit:
                    piece = reader.read(min(1 << 20, limit + 1 - total))
                    if not piece:
                        break
                    chunks.append(piece)
                    total += len(piece)
        except zstandard.ZstdError as exc:
            raise FormatError(n, name, None, f"zstd data is corrupt: {exc}") from None
        if total > limit:
            raise FormatError(n, name, total, f"decompresses to more than {limit} bytes")
        out = b"".join(chunks)
    elif compression == TOC_FLAG_LZ4:
        import lz4.block

        # An LZ4 block cannot expand more than ~255x; refuse sizes that would
        # only serve to make us allocate.
        if limit > 255 * len(data) + 16:
            raise FormatError(n, name, limit, f"impossible lz4 expansion of {len(data)} bytes")
        try:
            out = lz4.block.decompress(data, uncompressed_size=limit)
        except Exception as exc:  # lz4 raises LZ4BlockError, a plain Exception subclass
            raise FormatError(n, name, None, f"lz4 data is corrupt: {exc}") from None
    else:
        raise FormatError(n, name, compression, "unknown section compression")
    if exact and len(out) != limit:
        raise FormatError(n, name, len(out), f"section decodes to {len(out)} bytes, the ToC says {limit}")
    return out
