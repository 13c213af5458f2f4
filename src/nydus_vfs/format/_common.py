"""Plumbing shared by every on-disk structure of the format layer.

* :class:`OnDisk` turns a declarative little-endian layout into a slotted class
  with ``from_bytes`` / ``to_bytes`` / ``__eq__`` / ``__repr__``.  Every field,
  reserved ones included, is kept, so ``to_bytes(from_bytes(x)) == x`` holds for
  any input of the right length (ToC entries carry garbage in their reserved
  tail, for instance, and must survive a round trip).
* ``from_bytes`` only checks that enough bytes are there and decodes; it never
  judges values.  ``validate(...)`` applies the loader's rules.  Keeping the two
  apart lets a builder decode, patch and re-encode a structure that a loader
  would refuse, and lets tests build deliberately bad structures.
* :class:`EntryList` and :class:`XattrPairs` are the shared bodies of the
  variable-size structures (tables of entries, xattr blocks): construction,
  value equality and ``repr``; each subclass still decodes, validates and
  encodes its own on-disk form.
* Every error is :class:`~nydus_vfs.errors.FormatError` naming the structure,
  the field and the bad value.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar, Iterable

from ..errors import FormatError
from .types import Compressor, Digester, SuperFlags

__all__ = [
    "OnDisk",
    "layout_slots",
    "EntryList",
    "XattrPairs",
    "NoSuchInodeError",
    "U8",
    "U16",
    "U32",
    "U64",
    "align",
    "align8",
    "align4k",
    "need",
    "decode_blob_id",
    "encode_blob_id",
    "check_super_flags",
    "algorithms_from_flags",
    "flags_from_algorithms",
    "KNOWN_SUPER_FLAGS",
    "MAX_CHUNK_SIZE",
    "MAX_NAME_LEN",
    "MAX_XATTR_VALUE",
    "XATTR_PREFIXES",
    "check_xattr_name",
]

U8 = struct.Struct("<B")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

#: Largest chunk size any loader accepts (16 MiB).
MAX_CHUNK_SIZE = 0x100_0000
#: Longest file name (bytes) RAFS and EROFS store.
MAX_NAME_LEN = 255
#: Largest xattr value the builder stores.
MAX_XATTR_VALUE = 64 * 1024
#: xattr name prefixes the builder accepts (v5 and v6 alike).
XATTR_PREFIXES = (b"user.", b"security.", b"trusted.", b"system.posix_acl_access", b"system.posix_acl_default")

KNOWN_SUPER_FLAGS = 0
for _flag in SuperFlags:
    KNOWN_SUPER_FLAGS |= int(_flag)


class NoSuchInodeError(FormatError, LookupError):
    """The inode number does not name an inode of this bootstrap.

    Raised by :class:`~nydus_vfs.format.reader.Bootstrap` for numbers out of
    range or not in use (a v5 table slot that is a secondary hardlink name, a
    nid past the end of the metadata).  The filesystem layer maps it to
    ``ENOENT``; any other :class:`FormatError` means the image is corrupt (``EIO``).
    """


def align(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (a power of two)."""
    return (value + alignment - 1) & ~(alignment - 1)


def align8(value: int) -> int:
    return (value + 7) & ~7


def align4k(value: int) -> int:
    return (value + 4095) & ~4095


def need(buf: Any, offset: int, size: int, structure: str, field: str = "offset") -> None:
    """Raise unless ``buf[offset:offset+size]`` lies entirely inside ``buf``."""
    if offset < 0 or size < 0 or offset + size > len(buf):
        raise FormatError(
            structure, field, offset,
            f"needs {size} bytes at offset {offset:#x} but the buffer holds {len(buf)}",
        )


def decode_blob_id(raw: bytes, structure: str, field: str = "blob_id") -> str:
    """Decode a NUL-padded ASCII blob id; refuse empty ids and non-printable bytes."""
    text = bytes(raw).rstrip(b"\0")
    if not text:
        raise FormatError(structure, field, bytes(raw), "blob id is empty")
    if any(c < 0x21 or c > 0x7E for c in text):
        raise FormatError(structure, field, bytes(raw), "blob id is not printable ASCII")
    return text.decode("ascii")


def encode_blob_id(blob_id: str, width: int, structure: str, field: str = "blob_id") -> bytes:
    """Encode ``blob_id`` into a NUL-padded field of ``width`` bytes."""
    raw = blob_id.encode("ascii", "strict") if isinstance(blob_id, str) else bytes(blob_id)
    if not raw or len(raw) > width:
        raise FormatError(structure, field, raw, f"blob id must be 1..{width} bytes")
    return raw.ljust(width, b"\0")


def check_super_flags(flags: int, structure: str, field: str = "s_flags") -> None:
    """Refuse ``RafsSuperFlags`` bits the loader does not know (``from_bits`` fails)."""
    unknown = flags & ~KNOWN_SUPER_FLAGS
    if unknown:
        raise FormatError(structure, field, flags, f"unknown RafsSuperFlags bits {unknown:#x}")


def algorithms_from_flags(flags: int) -> tuple[Compressor, Digester]:
    """Decode the compressor/digester bits with the loader's precedence.

    Compression: NONE > LZ4 > GZIP > ZSTD, else LZ4.  Hash: BLAKE3 > SHA256,
    else BLAKE3 (a v5 superblock with no hash bit means blake3).
    """
    if flags & SuperFlags.COMPRESSION_NONE:
        comp = Compressor.NONE
    elif flags & SuperFlags.COMPRESSION_LZ4:
        comp = Compressor.LZ4_BLOCK
    elif flags & SuperFlags.COMPRESSION_GZIP:
        comp = Compressor.GZIP
    elif flags & SuperFlags.COMPRESSION_ZSTD:
        comp = Compressor.ZSTD
    else:
        comp = Compressor.LZ4_BLOCK
    if flags & SuperFlags.HASH_BLAKE3:
        dig = Digester.BLAKE3
    elif flags & SuperFlags.HASH_SHA256:
        dig = Digester.SHA256
    else:
        dig = Digester.BLAKE3
    return comp, dig


_COMP_BITS = {
    Compressor.NONE: SuperFlags.COMPRESSION_NONE,
    Compressor.LZ4_BLOCK: SuperFlags.COMPRESSION_LZ4,
    Compressor.GZIP: SuperFlags.COMPRESSION_GZIP,
    Compressor.ZSTD: SuperFlags.COMPRESSION_ZSTD,
}


def flags_from_algorithms(compressor: Compressor, digester: Digester) -> SuperFlags:
    """The superblock flag bits for an (enum) compressor and digester (trap 3)."""
    hash_bit = SuperFlags.HASH_BLAKE3 if digester == Digester.BLAKE3 else SuperFlags.HASH_SHA256
    return _COMP_BITS[Compressor(compressor)] | hash_bit


def check_xattr_name(name: bytes, structure: str, field: str) -> None:
    """Refuse xattr names the builder would refuse (prefix, length, NUL)."""
    if not name.startswith(XATTR_PREFIXES):
        raise FormatError(structure, field, name, "xattr name has no supported prefix")
    if len(name) > 255 or b"\0" in name:
        raise FormatError(structure, field, name, "xattr name is longer than 255 bytes or contains NUL")


def _field_width(fmt: str) -> int:
    return struct.calcsize("<" + fmt)


class OnDisk:
    """Base of the fixed-size little-endian structures.

    A subclass declares ``_LAYOUT`` (``(name, struct-format)`` pairs, in on-disk
    order) and ``__slots__ = layout_slots(_LAYOUT)``; it may set ``_INIT`` (a
    dict of non-zero defaults such as magics, used by the keyword constructor).
    ``NAME`` (the structure name in errors) defaults to the class name.
    """

    __slots__ = ()

    NAME: ClassVar[str]
    SIZE: ClassVar[int]
    _LAYOUT: ClassVar[tuple[tuple[str, str], ...]]
    _INIT: ClassVar[dict[str, Any]] = {}
    _STRUCT: ClassVar[struct.Struct]
    _FIELDS: ClassVar[tuple[str, ...]]
    _DEFAULTS: ClassVar[tuple[Any, ...]]
    _BYTES_FIELDS: ClassVar[tuple[tuple[str, int], ...]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        layout = cls.__dict__.get("_LAYOUT")
        if layout is None:
            return
        cls.NAME = cls.__dict__.get("NAME", cls.__name__)
        cls._STRUCT = struct.Struct("<" + "".join(fmt for _, fmt in layout))
        cls.SIZE = cls._STRUCT.size
        cls._FIELDS = tuple(name for name, _ in layout)
        defaults = []
        byte_fields = []
        for name, fmt in layout:
            if fmt.endswith("s"):
                width = _field_width(fmt)
                byte_fields.append((name, width))
                defaults.append(cls._INIT.get(name, b"\0" * width))
            else:
                defaults.append(cls._INIT.get(name, 0))
        cls._DEFAULTS = tuple(defaults)
        cls._BYTES_FIELDS = tuple(byte_fields)

    def __init__(self, **fields: Any) -> None:
        for name, default in zip(self._FIELDS, self._DEFAULTS):
            setattr(self, name, fields.pop(name, default))
        if fields:
            raise TypeError(f"{self.NAME} has no field(s) {', '.join(sorted(fields))}")

    @classmethod
    def from_bytes(cls, buf: Any, offset: int = 0) -> Any:
        """Decode ``SIZE`` bytes at ``offset``; only the length is checked."""
        need(buf, offset, cls.SIZE, cls.NAME)
        obj = cls.__new__(cls)
        for name, value in zip(cls._FIELDS, cls._STRUCT.unpack_from(buf, offset)):
            setattr(obj, name, value)
        return obj

    @classmethod
    def array_from_bytes(cls, buf: Any, offset: int, count: int, structure: str,
                         field: str = "offset") -> list[Any]:
        """Decode ``count`` consecutive structures at ``offset``.

        The whole span is checked first, so a hostile ``count`` fails (naming
        ``structure`` and ``field``) before anything is decoded.
        """
        size = cls.SIZE
        need(buf, offset, count * size, structure, field)
        return [cls.from_bytes(buf, offset + i * size) for i in range(count)]

    def to_bytes(self) -> bytes:
        """Encode exactly ``SIZE`` bytes; a value that does not fit names its field."""
        for name, width in self._BYTES_FIELDS:
            value = getattr(self, name)
            if len(value) > width:
                raise FormatError(self.NAME, name, value, f"longer than the {width}-byte field")
        values = [getattr(self, name) for name in self._FIELDS]
        try:
            return self._STRUCT.pack(*values)
        except struct.error:
            for (name, fmt), value in zip(self._LAYOUT, values):
                try:
                    struct.pack("<" + fmt, value)
                except struct.error:
                    raise FormatError(self.NAME, name, value, f"does not fit the on-disk field '{fmt}'") from None
            raise

    def fields(self) -> dict[str, Any]:
        """All fields by name, in on-disk order."""
        return {name: getattr(self, name) for name in self._FIELDS}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._FIELDS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = []
        for name in self._FIELDS:
            value = getattr(self, name)
            if "reserved" in name or name == "s_padding":
                if isinstance(value, bytes) and not any(value):
                    continue
                if value == 0:
                    continue
            if isinstance(value, bytes):
                value = value.rstrip(b"\0")
                more = "…" if len(value) > 40 else ""
                if all(0x20 <= c < 0x7F for c in value):
                    shown.append(f"{name}={value[:40]!r}{more}")
                else:
                    shown.append(f"{name}={value[:40].hex()}{more}")
            elif isinstance(value, int) and value > 9:
                shown.append(f"{name}={value:#x}")
            else:
                shown.append(f"{name}={value!r}")
        return f"{self.NAME}({', '.join(shown)})"


def layout_slots(layout: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """The ``__slots__`` of an :class:`OnDisk` subclass with this layout."""
    return tuple(name for name, _ in layout)


class _ListValued:
    """Value equality and ``repr`` over the one list attribute named by ``_ITEMS``.

    Instances are mutable, hence unhashable; equality needs the same type.
    """

    __slots__ = ()
    NAME: ClassVar[str]
    _ITEMS: ClassVar[str]

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return getattr(self, self._ITEMS) == getattr(other, self._ITEMS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{self.NAME}({getattr(self, self._ITEMS)!r})"


class EntryList(_ListValued):
    """Base of the variable-size structures that are a sequence of ``entries``.

    Gives the list-holding constructor, ``len()``, value equality and a
    ``repr`` naming the structure.  Subclasses set ``NAME`` and keep
    ``from_bytes`` / ``validate`` / ``to_bytes`` to themselves.
    """

    __slots__ = ("entries",)
    _ITEMS = "entries"

    def __init__(self, entries: Iterable[Any] = ()) -> None:
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)


class XattrPairs(_ListValued):
    """Base of the v5 and v6 xattr blocks: ``pairs`` of full names and values, in on-disk order.

    Both formats accept the same names and values, so :meth:`validate` (the
    builder's rules: supported prefix, value size, no duplicate name) lives
    here; the encodings differ and stay in the subclasses.
    """

    __slots__ = ("pairs",)
    _ITEMS = "pairs"

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.pairs = [(bytes(k), bytes(v)) for k, v in pairs]

    def validate(self) -> None:
        seen = set()
        for i, (k, v) in enumerate(self.pairs):
            check_xattr_name(k, self.NAME, f"pairs[{i}].name")
            if len(v) > MAX_XATTR_VALUE:
                raise FormatError(self.NAME, f"pairs[{i}].value", len(v), "xattr value is larger than 64 KiB")
            if k in seen:
                raise FormatError(self.NAME, f"pairs[{i}].name", k, "duplicate xattr name")
            seen.add(k)

    def as_dict(self) -> dict[bytes, bytes]:
        return dict(self.pairs)
