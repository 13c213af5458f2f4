"""Tar archives, read and written by the builder itself.

Strategy
--------
Layer tars come from strangers, so the reader is our own instead of
``tarfile``: ``tarfile`` reads PAX and GNU long-name payloads of whatever size
the header claims into memory, and its errors do not name the entry.  Here:

* :class:`TarHeader` is the sans-IO 512-byte header: ``from_bytes`` (checksum,
  numeric fields in octal or GNU base-256) and ``to_bytes`` (ustar, used by
  ``unpack``).  :func:`parse_pax` / :func:`pax_record` handle PAX payloads.
* :class:`TarReader` walks a byte stream once, front to back (it may be a FIFO
  or a gzip stream), folding GNU ``L``/``K`` and PAX ``x``/``g`` headers into
  the next :class:`TarMember`.  Metadata payloads are capped
  (``max_meta_size``), data is only ever read in caller-sized pieces, and a
  stream that ends early is reported with the entry it ended in.
* :class:`GzipStream` inflates (possibly multi-member) gzip with a bounded
  output per call, so a gzip bomb costs time, not memory.
"""

from __future__ import annotations

import base64
import urllib.parse
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ..errors import BuildError
from ..format.blob import parse_tar_number

__all__ = [
    "BLOCK",
    "TarHeader",
    "TarMember",
    "TarReader",
    "GzipStream",
    "parse_pax",
    "pax_record",
    "open_tar_stream",
    "REGTYPE",
    "LNKTYPE",
    "SYMTYPE",
    "CHRTYPE",
    "BLKTYPE",
    "DIRTYPE",
    "FIFOTYPE",
]

BLOCK = 512

REGTYPE = b"0"
AREGTYPE = b"\0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
GNU_LONGNAME = b"L"
GNU_LONGLINK = b"K"
GNU_SPARSE = b"S"
GNU_VOLHDR = b"V"
GNU_DUMPDIR = b"D"
PAX_LOCAL = b"x"
PAX_GLOBAL = b"g"

_MEMBER_TYPES = {REGTYPE, AREGTYPE, CONTTYPE, LNKTYPE, SYMTYPE, CHRTYPE, BLKTYPE, DIRTYPE, FIFOTYPE,
                 GNU_DUMPDIR}

_USTAR_MAGIC = b"ustar\x0000"
_GNU_MAGIC = b"ustar  \0"


def _field_str(raw: bytes) -> bytes:
    return raw.split(b"\0", 1)[0]


def _parse_number(raw: bytes, name: str, where: str) -> int:
    try:
        return parse_tar_number(raw)
    except ValueError as exc:
        raise BuildError(f"{where}: field {name}: {exc}") from None


def _octal(value: int, width: int) -> bytes:
    """``width``-byte field: zero-padded octal and a NUL, base-256 when too big."""
    digits = width - 1
    if 0 <= value < 8 ** digits:
        return b"%0*o\0" % (digits, value)
    if value < 0 or value >= 1 << (8 * (width - 1)):
        raise ValueError(f"value {value} does not fit a {width}-byte tar field")
    return b"\x80" + value.to_bytes(width - 1, "big")


@dataclass
class TarHeader:
    """One 512-byte ustar/GNU header (fields as named in POSIX ``tar.h``)."""

    name: bytes = b""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    typeflag: bytes = REGTYPE
    linkname: bytes = b""
    magic: bytes = _USTAR_MAGIC
    uname: bytes = b""
    gname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    prefix: bytes = b""

    @classmethod
    def from_bytes(cls, block: bytes | memoryview, offset: int = 0) -> "TarHeader | None":
        """Decode a header block; ``None`` for an all-zero (end-of-archive) block.

        ``offset`` is only used to say where a bad header is.
        """
        block = bytes(block)
        where = f"tar header at offset {offset}"
        if len(block) != BLOCK:
            raise BuildError(f"{where}: truncated ({len(block)} of 512 bytes)")
        if block.count(0) == BLOCK:
            return None
        try:
            stored = _parse_number(block[148:156], "chksum", where)
        except BuildError:
            raise BuildError(f"{where}: the checksum field is not a number; not a tar stream or corrupt") from None
        unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
        signed = unsigned - sum(2 * b for b in block[:148] + block[156:] if b >= 0x80)
        if stored not in (unsigned, signed):
            raise BuildError(f"{where}: checksum mismatch (stored {stored:o}, computed {unsigned:o}); "
                             "not a tar stream or corrupt")
        magic = block[257:265]
        prefix = b""
        if magic == _USTAR_MAGIC or magic[:6] == b"ustar\0":
            prefix = _field_str(block[345:500])
        hdr = cls(
            name=_field_str(block[0:100]),
            mode=_parse_number(block[100:108], "mode", where),
            uid=_parse_number(block[108:116], "uid", where),
            gid=_parse_number(block[116:124], "gid", where),
            size=_parse_number(block[124:136], "size", where),
            mtime=_parse_number(block[136:148], "mtime", where),
            typeflag=block[156:157],
            linkname=_field_str(block[157:257]),
            magic=magic,
            uname=_field_str(block[265:297]),
            gname=_field_str(block[297:329]),
            devmajor=_parse_number(block[329:337], "devmajor", where),
            devminor=_parse_number(block[337:345], "devminor", where),
            prefix=prefix,
        )
        hdr.validate(where)
        return hdr

    def validate(self, where: str = "tar header") -> None:
        """Reject values no tar member may carry."""
        if self.size < 0:
            raise BuildError(f"{where}: negative size {self.size}")
        if self.uid < 0 or self.gid < 0:
            raise BuildError(f"{where}: negative uid/gid {self.uid}/{self.gid}")

    @property
    def path(self) -> bytes:
        return self.prefix + b"/" + self.name if self.prefix else self.name

    def to_bytes(self) -> bytes:
        """Encode as one 512-byte header with a valid checksum.

        ``name`` and ``linkname`` must fit their 100-byte fields (callers put
        longer ones in a PAX record first); ``prefix`` is written only for
        ustar magic.
        """
        if len(self.name) > 100 or len(self.linkname) > 100 or len(self.prefix) > 155:
            raise ValueError("tar name/linkname too long for a plain header; use a PAX record")
        buf = bytearray(BLOCK)
        buf[0:len(self.name)] = self.name
        buf[100:108] = _octal(self.mode, 8)
        buf[108:116] = _octal(self.uid, 8)
        buf[116:124] = _octal(self.gid, 8)
        buf[124:136] = _octal(self.size, 12)
        buf[136:148] = _octal(self.mtime, 12)
        buf[148:156] = b" " * 8
        buf[156:157] = self.typeflag
        buf[157:157 + len(self.linkname)] = self.linkname
        buf[257:265] = self.magic
        buf[265:265 + len(self.uname[:32])] = self.uname[:32]
        buf[297:297 + len(self.gname[:32])] = self.gname[:32]
        buf[329:337] = _octal(self.devmajor, 8)
        buf[337:345] = _octal(self.devminor, 8)
        if self.magic == _USTAR_MAGIC and self.prefix:
            buf[345:345 + len(self.prefix)] = self.prefix
        buf[148:156] = b"%06o\0 " % sum(buf)
        return bytes(buf)


def pax_record(key: bytes, value: bytes) -> bytes:
    """One ``"%d %s=%s\\n"`` PAX record; the length counts its own digits."""
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def parse_pax(data: bytes, where: str) -> dict[bytes, bytes]:
    """Decode PAX records into a dict (later records win, as POSIX says)."""
    out: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:
            break  # some writers pad the payload with NULs
        space = data.find(b" ", pos, pos + 24)
        if space < 0:
            raise BuildError(f"{where}: malformed PAX record at byte {pos} (no length)")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise BuildError(f"{where}: malformed PAX record length {data[pos:space][:24]!r}") from None
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise BuildError(f"{where}: malformed PAX record at byte {pos} (bad length {length})")
        record = data[space + 1:end - 1]
        eq = record.find(b"=")
        if eq <= 0:
            raise BuildError(f"{where}: malformed PAX record {record[:40]!r} (no key)")
        out[record[:eq]] = record[eq + 1:]
        pos = end
    return out


def _pax_time(value: bytes, where: str) -> tuple[int, int]:
    try:
        text = value.decode("ascii")
        neg = text.startswith("-")
        whole, _, frac = text.lstrip("-").partition(".")
        sec = int(whole or "0")
        nsec = int((frac + "000000000")[:9]) if frac else 0
    except (UnicodeDecodeError, ValueError):
        raise BuildError(f"{where}: PAX mtime {value[:40]!r} is not a number") from None
    if neg:
        sec, nsec = (-sec - 1, 1_000_000_000 - nsec) if nsec else (-sec, 0)
    return sec, nsec


@dataclass
class TarMember:
    """One archive entry after GNU long names and PAX records were applied."""

    path: bytes
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    mtime_nsec: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    offset: int = 0

    @property
    def shown(self) -> str:
        return self.path[:300].decode("utf-8", "backslashreplace")

    @property
    def is_file(self) -> bool:
        return self.typeflag in (REGTYPE, AREGTYPE, CONTTYPE)


class GzipStream:
    """Read-only file object inflating a gzip stream of one or more members.

    ``read(n)`` never returns more than ``n`` bytes and never inflates more
    than it returns, so memory stays bounded whatever the compression ratio.
    Corrupt or truncated input raises :class:`BuildError` with the compressed
    offset.  NUL padding after the last member is accepted (tape-style
    writers add it); any other trailing byte is an error.
    """

    def __init__(self, raw: BinaryIO, *, read_size: int = 1 << 18) -> None:
        self._raw = raw
        self._read_size = read_size
        self._d = zlib.decompressobj(31)
        self._buf = b""           # compressed bytes not yet consumed by zlib
        self._in_pos = 0          # compressed bytes read from raw so far
        self._eof = False

    def _fill(self) -> bool:
        chunk = self._raw.read(self._read_size)
        if not chunk:
            return False
        self._in_pos += len(chunk)
        self._buf += chunk
        return True

    def _next_member(self) -> None:
        while True:
            stripped = self._buf.lstrip(b"\0")
            if stripped:
                break
            self._buf = b""
            if not self._fill():
                self._eof = True
                return
        self._buf = stripped
        while len(self._buf) < 2 and self._fill():
            pass
        if self._buf[:2] != b"\x1f\x8b":
            raise BuildError(f"gzip stream: garbage after the end of a member near compressed offset "
                             f"{self._in_pos - len(self._buf)}")
        self._d = zlib.decompressobj(31)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        out = bytearray()
        while len(out) < n and not self._eof:
            if self._d.eof:
                self._next_member()
                continue
            if not self._buf and not self._fill():
                raise BuildError(f"gzip stream: truncated at compressed offset {self._in_pos} "
                                 "(a member has no end)")
            try:
                out += self._d.decompress(self._buf, n - len(out))
            except zlib.error as exc:
                raise BuildError(f"gzip stream: corrupt data near compressed offset "
                                 f"{self._in_pos - len(self._buf)}: {exc}") from None
            self._buf = self._d.unused_data if self._d.eof else self._d.unconsumed_tail
        return bytes(out)


def open_tar_stream(raw: BinaryIO) -> BinaryIO:
    """Wrap ``raw`` in a :class:`GzipStream` when it starts with the gzip magic.

    Works on pipes: the two sniffed bytes are handed back to the reader.
    """
    head = raw.read(2)

    class _Prepend:
        def __init__(self) -> None:
            self._head = head

        def read(self, n: int = -1) -> bytes:
            if self._head:
                if n is None or n < 0:
                    data, self._head = self._head + raw.read(), b""
                    return data
                data, self._head = self._head[:n], self._head[n:]
                if len(data) < n:
                    data += raw.read(n - len(data))
                return data
            return raw.read(n)

    stream = _Prepend()
    if head == b"\x1f\x8b":
        return GzipStream(stream)  # type: ignore[arg-type]
    return stream  # type: ignore[return-value]


class TarReader:
    """Iterate the members of a tar stream read strictly front to back.

    After each member is yielded the caller may :meth:`read` up to
    ``member.size`` bytes of its data; whatever it leaves is skipped before the
    next header.  The archive ends at a zero block or at a clean end of stream
    on a header boundary.
    """

    def __init__(self, stream: BinaryIO, *, max_meta_size: int = 4 << 20, max_entries: int = 1 << 24) -> None:
        self._s = stream
        self._pos = 0
        self._left = 0            # data bytes of the current member not read yet
        self._pad = 0             # padding after the current member's data
        self._member: TarMember | None = None
        self.max_meta_size = max_meta_size
        self.max_entries = max_entries

    def _read_exact(self, n: int, what: str) -> bytes:
        parts = []
        want = n
        while want:
            chunk = self._s.read(min(want, 1 << 20))
            if not chunk:
                raise BuildError(f"{what}: tar stream ends early (at byte {self._pos + n - want}, "
                                 f"{want} more bytes expected)")
            parts.append(chunk)
            want -= len(chunk)
        self._pos += n
        return b"".join(parts)

    def _skip(self, n: int, what: str) -> None:
        while n:
            step = min(n, 1 << 20)
            self._read_exact(step, what)
            n -= step

    def read(self, n: int) -> bytes:
        """Read up to ``n`` bytes of the current member's data (short only at its end)."""
        if self._member is None:
            raise BuildError("tar: no current member to read from")
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._read_exact(n, f"tar entry {self._member.shown!r}")
        self._left -= n
        return data

    def _meta_payload(self, hdr: TarHeader, kind: str, offset: int) -> bytes:
        if hdr.size > self.max_meta_size:
            raise BuildError(f"tar header at offset {offset}: {kind} payload of {hdr.size} bytes exceeds the "
                             f"{self.max_meta_size}-byte limit")
        data = self._read_exact(hdr.size, f"{kind} payload at offset {offset}")
        self._skip(-hdr.size % BLOCK, f"{kind} payload at offset {offset}")
        return data

    def __iter__(self) -> Iterator[TarMember]:
        global_pax: dict[bytes, bytes] = {}
        count = 0
        while True:
            if self._member is not None:
                self._skip(self._left + self._pad, f"tar entry {self._member.shown!r}")
                self._member = None
                self._left = self._pad = 0
            long_name: bytes | None = None
            long_link: bytes | None = None
            pax: dict[bytes, bytes] = {}
            while True:
                offset = self._pos
                block = self._s.read(BLOCK)
                while block and len(block) < BLOCK:
                    more = self._s.read(BLOCK - len(block))
                    if not more:
                        break
                    block += more
                if not block:
                    if long_name is not None or long_link is not None or pax:
                        raise BuildError(f"tar stream ends after an extended header at offset {offset}")
                    return
                self._pos += len(block)
                hdr = TarHeader.from_bytes(block, offset)
                if hdr is None:
                    if long_name is not None or long_link is not None or pax:
                        raise BuildError(f"tar header at offset {offset}: end of archive right after an "
                                         "extended header")
                    return
                t = hdr.typeflag
                if t == GNU_LONGNAME:
                    long_name = _field_str(self._meta_payload(hdr, "GNU long name", offset))
                elif t == GNU_LONGLINK:
                    long_link = _field_str(self._meta_payload(hdr, "GNU long link", offset))
                elif t == PAX_LOCAL:
                    pax.update(parse_pax(self._meta_payload(hdr, "PAX header", offset),
                                         f"PAX header at offset {offset}"))
                elif t == PAX_GLOBAL:
                    global_pax.update(parse_pax(self._meta_payload(hdr, "PAX global header", offset),
                                                f"PAX global header at offset {offset}"))
                elif t == GNU_VOLHDR:
                    self._skip(hdr.size + (-hdr.size % BLOCK), f"volume header at offset {offset}")
                else:
                    break
            count += 1
            if count > self.max_entries:
                raise BuildError(f"tar stream has more than {self.max_entries} entries (refusing a tar bomb)")
            member = self._member_from(hdr, offset, long_name, long_link, {**global_pax, **pax})
            self._member = member
            self._left = member.size
            self._pad = -member.size % BLOCK
            yield member

    def _member_from(self, hdr: TarHeader, offset: int, long_name: bytes | None, long_link: bytes | None,
                     pax: dict[bytes, bytes]) -> TarMember:
        path = long_name if long_name is not None else hdr.path
        linkname = long_link if long_link is not None else hdr.linkname
        size, uid, gid, mtime, nsec = hdr.size, hdr.uid, hdr.gid, hdr.mtime, 0
        shown = (pax.get(b"path") or path)[:300].decode("utf-8", "backslashreplace")
        where = f"tar entry {shown!r} (header at offset {offset})"
        if hdr.typeflag not in _MEMBER_TYPES:
            if hdr.typeflag == GNU_SPARSE:
                raise BuildError(f"{where}: GNU sparse entries are not supported")
            raise BuildError(f"{where}: unsupported tar entry type {hdr.typeflag!r}")
        xattrs: dict[bytes, bytes] = {}
        libarchive: dict[bytes, bytes] = {}
        for key, value in pax.items():
            try:
                if key == b"path":
                    path = value
                elif key == b"linkpath":
                    linkname = value
                elif key == b"size":
                    size = int(value)
                elif key == b"uid":
                    uid = int(value)
                elif key == b"gid":
                    gid = int(value)
                elif key == b"mtime":
                    mtime, nsec = _pax_time(value, where)
                elif key.startswith(b"SCHILY.xattr."):
                    xattrs[key[len(b"SCHILY.xattr."):]] = value
                elif key.startswith(b"LIBARCHIVE.xattr."):
                    name = urllib.parse.unquote_to_bytes(key[len(b"LIBARCHIVE.xattr."):])
                    libarchive[name] = base64.b64decode(value + b"=" * (-len(value) % 4))
                elif key.startswith(b"GNU.sparse."):
                    raise BuildError(f"{where}: GNU sparse entries (PAX {key.decode('ascii', 'replace')}) "
                                     "are not supported")
            except ValueError as exc:
                if isinstance(exc, BuildError):
                    raise
                raise BuildError(f"{where}: PAX record {key[:40]!r} has an invalid value {value[:40]!r}") from None
        for name, value in libarchive.items():
            xattrs.setdefault(name, value)
        if size < 0 or uid < 0 or gid < 0:
            raise BuildError(f"{where}: negative size/uid/gid in PAX records")
        # Only regular files (and GNU dump-dirs, which we skip) carry data
        # records, whatever the size field of other types says (POSIX: links,
        # directories and devices have no data logical records).
        data_size = size if hdr.typeflag in (REGTYPE, AREGTYPE, CONTTYPE, GNU_DUMPDIR) else 0
        return TarMember(path=path, typeflag=hdr.typeflag, mode=hdr.mode & 0o7777, uid=uid, gid=gid,
                         size=data_size, mtime=mtime, mtime_nsec=nsec, linkname=linkname,
                         devmajor=hdr.devmajor, devminor=hdr.devminor, xattrs=xattrs, offset=offset)
