"""FUSE wire structs as objects, plus the packing helpers the server's hot path uses.

Two audiences, two speeds:

* **Objects** (``InHeader``, ``EntryOut``, ``Dirent``, ...): one frozen class per
  ``struct fuse_*`` with ``from_bytes`` / ``validate`` / ``to_bytes``.  They are
  what tests, the request factory and debugging tools use, and what
  :func:`decode_request` returns.  ``from_bytes`` checks the length first and
  raises :class:`~nydus_vfs.errors.RemoteProtocolError` naming the struct;
  ``validate`` checks field values and names the field and value;
  ``to_bytes`` raises :class:`~nydus_vfs.errors.LocalProtocolError` when a
  field does not fit its C type (our bug, not the peer's).
* **Helpers** (:func:`pack_attr`, :func:`split_timeout`, :func:`pack_statfs`,
  the ``*_out_size`` functions): what :mod:`.server` calls per request.  They
  create no wire objects; ``pack_attr`` caches the 88 packed bytes on the
  :class:`~nydus_vfs.fuse.ops.Attr` so a warm GETATTR is one concatenation.

Nothing here does I/O or knows about sessions; bytes in, objects or bytes out.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Iterator, NamedTuple

from ..errors import LocalProtocolError, RemoteProtocolError
from . import abi
from .ops import Attr, StatFs

__all__ = [
    "InHeader",
    "OutHeader",
    "FuseAttr",
    "EntryOut",
    "AttrOut",
    "Kstatfs",
    "ForgetIn",
    "ForgetOne",
    "BatchForgetIn",
    "GetattrIn",
    "OpenIn",
    "OpenOut",
    "ReleaseIn",
    "FlushIn",
    "ReadIn",
    "FsyncIn",
    "GetxattrIn",
    "GetxattrOut",
    "AccessIn",
    "InitIn",
    "InitOut",
    "InterruptIn",
    "LseekIn",
    "LseekOut",
    "SyncfsIn",
    "SetattrIn",
    "MknodIn",
    "MkdirIn",
    "RenameIn",
    "Rename2In",
    "LinkIn",
    "WriteIn",
    "WriteOut",
    "CreateIn",
    "SetxattrIn",
    "FallocateIn",
    "CopyFileRangeIn",
    "LkIn",
    "LkOut",
    "Dirent",
    "DirentPlus",
    "Request",
    "decode_request",
    "iter_dirents",
    "iter_direntplus",
    "pack_attr",
    "pack_statfs",
    "split_timeout",
    "error_reply",
    "init_out_size",
    "entry_out_size",
    "attr_out_size",
    "statfs_out_size",
]

_U64 = 0xFFFF_FFFF_FFFF_FFFF


def _bad(struct_name: str, field: str, value: object, reason: str) -> RemoteProtocolError:
    shown = hex(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
    return RemoteProtocolError(f"{struct_name}.{field} = {shown}: {reason}")


def _need(struct_name: str, need: int, buf, offset: int) -> int:
    """Bytes present from ``offset``; RemoteProtocolError unless at least ``need``."""
    have = len(buf) - offset
    if offset < 0 or have < need:
        raise RemoteProtocolError(
            f"{struct_name}: needs {need} bytes at offset {offset}, only {max(have, 0)} present")
    return have


def _encode(struct_name: str, obj: object, pack, *values) -> bytes:
    """``pack(*values)``; a value that does not fit its C type is our bug (LocalProtocolError)."""
    try:
        return pack(*values)
    except struct.error as exc:
        raise LocalProtocolError(f"{struct_name}: cannot encode {obj!r}: {exc}") from None


class _Wire:
    """Shared ``from_bytes``/``to_bytes`` for structs that are one flat ``struct.Struct``.

    Subclasses are slotted frozen dataclasses whose fields are the C fields in
    declaration order; ``_S`` is the matching :mod:`.abi` struct and ``C_NAME``
    the C struct name used in error messages.
    """

    __slots__ = ()
    _S: ClassVar[struct.Struct]
    C_NAME: ClassVar[str]

    @classmethod
    def wire_size(cls) -> int:
        return cls._S.size

    @classmethod
    def from_bytes(cls, buf, offset: int = 0):
        """Decode one struct at ``offset``; RemoteProtocolError if the buffer is too short."""
        _need(cls.C_NAME, cls._S.size, buf, offset)
        return cls(*cls._S.unpack_from(buf, offset))

    def astuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def to_bytes(self) -> bytes:
        return _encode(self.C_NAME, self, self._S.pack, *self.astuple())

    def validate(self) -> None:
        """Check field values beyond what the C types enforce.  Default: nothing to check."""


_frozen = dataclass(frozen=True, slots=True)


@_frozen
class InHeader(_Wire):
    """``struct fuse_in_header`` (40 bytes), the start of every request."""

    C_NAME: ClassVar[str] = "fuse_in_header"
    _S: ClassVar[struct.Struct] = abi.fuse_in_header
    len: int = 0
    opcode: int = 0
    unique: int = 0
    nodeid: int = 0
    uid: int = 0
    gid: int = 0
    pid: int = 0
    total_extlen: int = 0
    padding: int = 0

    def validate(self, buf_len: int | None = None, *, security_ctx: bool = False) -> None:
        """``len`` must cover the header and equal the buffer length; no extensions
        unless SECURITY_CTX was negotiated."""
        if self.len < self._S.size:
            raise _bad(self.C_NAME, "len", self.len, "shorter than the header itself")
        if buf_len is not None and self.len != buf_len:
            raise _bad(self.C_NAME, "len", self.len, f"does not match the {buf_len} bytes received")
        if self.total_extlen and not security_ctx:
            raise _bad(self.C_NAME, "total_extlen", self.total_extlen,
                       "extensions sent but SECURITY_CTX was not negotiated")


@_frozen
class OutHeader(_Wire):
    """``struct fuse_out_header`` (16 bytes), the start of every reply."""

    C_NAME: ClassVar[str] = "fuse_out_header"
    _S: ClassVar[struct.Struct] = abi.fuse_out_header
    len: int = 0
    error: int = 0
    unique: int = 0

    def validate(self, buf_len: int | None = None) -> None:
        if self.len < self._S.size:
            raise _bad(self.C_NAME, "len", self.len, "shorter than the header itself")
        if buf_len is not None and self.len != buf_len:
            raise _bad(self.C_NAME, "len", self.len, f"does not match the {buf_len} bytes present")
        if not -512 < self.error <= 0:
            raise _bad(self.C_NAME, "error", self.error, "must be 0 or a negative errno above -512")
        if self.error and self.len != self._S.size:
            raise _bad(self.C_NAME, "len", self.len, "an error reply carries no payload")


@_frozen
class FuseAttr(_Wire):
    """``struct fuse_attr`` (88 bytes)."""

    C_NAME: ClassVar[str] = "fuse_attr"
    _S: ClassVar[struct.Struct] = abi.fuse_attr
    ino: int = 0
    size: int = 0
    blocks: int = 0
    atime: int = 0
    mtime: int = 0
    ctime: int = 0
    atimensec: int = 0
    mtimensec: int = 0
    ctimensec: int = 0
    mode: int = 0
    nlink: int = 0
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    blksize: int = 0
    flags: int = 0

    @classmethod
    def from_attr(cls, attr: Attr) -> "FuseAttr":
        return cls(attr.ino, attr.size, attr.blocks, attr.atime, attr.mtime, attr.ctime,
                   attr.atimensec, attr.mtimensec, attr.ctimensec, attr.mode, attr.nlink,
                   attr.uid, attr.gid, attr.rdev, attr.blksize, 0)

    def validate(self) -> None:
        # The kernel refuses (EIO) sizes above LLONG_MAX and nanoseconds >= 1e9.
        if self.size > 0x7FFF_FFFF_FFFF_FFFF:
            raise _bad(self.C_NAME, "size", self.size, "above LLONG_MAX")
        for name in ("atimensec", "mtimensec", "ctimensec"):
            value = getattr(self, name)
            if value >= 1_000_000_000:
                raise _bad(self.C_NAME, name, value, "nanoseconds must be below 10**9")


class _WithAttr(_Wire):
    """A flat head followed by an embedded ``fuse_attr`` (entry_out, attr_out)."""

    __slots__ = ()

    @classmethod
    def wire_size(cls) -> int:
        return cls._S.size + abi.fuse_attr.size

    @classmethod
    def from_bytes(cls, buf, offset: int = 0):
        _need(cls.C_NAME, cls.wire_size(), buf, offset)
        head = cls._S.unpack_from(buf, offset)
        return cls(*head, FuseAttr.from_bytes(buf, offset + cls._S.size))

    def to_bytes(self) -> bytes:
        values = self.astuple()
        return _encode(self.C_NAME, self, self._S.pack, *values[:-1]) + values[-1].to_bytes()

    def validate(self) -> None:
        self.attr.validate()  # type: ignore[attr-defined]


@_frozen
class EntryOut(_WithAttr):
    """``struct fuse_entry_out`` (128 bytes)."""

    C_NAME: ClassVar[str] = "fuse_entry_out"
    _S: ClassVar[struct.Struct] = abi.fuse_entry_out
    nodeid: int = 0
    generation: int = 0
    entry_valid: int = 0
    attr_valid: int = 0
    entry_valid_nsec: int = 0
    attr_valid_nsec: int = 0
    attr: FuseAttr = FuseAttr()

    def validate(self) -> None:
        for name in ("entry_valid_nsec", "attr_valid_nsec"):
            value = getattr(self, name)
            if value >= 1_000_000_000:
                raise _bad(self.C_NAME, name, value, "nanoseconds must be below 10**9")
        self.attr.validate()


@_frozen
class AttrOut(_WithAttr):
    """``struct fuse_attr_out`` (104 bytes)."""

    C_NAME: ClassVar[str] = "fuse_attr_out"
    _S: ClassVar[struct.Struct] = abi.fuse_attr_out
    attr_valid: int = 0
    attr_valid_nsec: int = 0
    dummy: int = 0
    attr: FuseAttr = FuseAttr()


@_frozen
class Kstatfs(_Wire):
    """``struct fuse_kstatfs`` (80 bytes; ``spare[6]`` is always zero)."""

    C_NAME: ClassVar[str] = "fuse_kstatfs"
    _S: ClassVar[struct.Struct] = abi.fuse_kstatfs
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 0
    namelen: int = 0
    frsize: int = 0
    padding: int = 0


def _flat(c_name: str, names: str, doc: str):
    """Build a flat wire class over the :mod:`.abi` struct ``c_name`` from its field names (all default 0)."""
    ns: dict = {
        "__doc__": doc,
        "__annotations__": {n: "int" for n in names.split()},
        "C_NAME": c_name,
        "_S": getattr(abi, c_name),
    }
    for n in names.split():
        ns[n] = 0
    cls = type(_camel(c_name), (_Wire,), ns)
    cls.__module__ = __name__
    return _frozen(cls)


def _camel(c_name: str) -> str:
    return "".join(part.capitalize() for part in c_name.removeprefix("fuse_").split("_"))


ForgetIn = _flat("fuse_forget_in", "nlookup", "``struct fuse_forget_in`` (8 bytes).")
ForgetOne = _flat("fuse_forget_one", "nodeid nlookup",
                  "``struct fuse_forget_one`` (16 bytes), repeated after BatchForgetIn.")
BatchForgetIn = _flat("fuse_batch_forget_in", "count dummy",
                      "``struct fuse_batch_forget_in`` (8 bytes).")
GetattrIn = _flat("fuse_getattr_in", "getattr_flags dummy fh",
                  "``struct fuse_getattr_in`` (16 bytes); ``fh`` is valid with FUSE_GETATTR_FH.")
OpenIn = _flat("fuse_open_in", "flags open_flags", "``struct fuse_open_in`` (8 bytes).")
OpenOut = _flat("fuse_open_out", "fh open_flags padding",
                "``struct fuse_open_out`` (16 bytes).")
ReleaseIn = _flat("fuse_release_in", "fh flags release_flags lock_owner",
                  "``struct fuse_release_in`` (24 bytes).")
FlushIn = _flat("fuse_flush_in", "fh unused padding lock_owner",
                "``struct fuse_flush_in`` (24 bytes).")
ReadIn = _flat("fuse_read_in", "fh offset size read_flags lock_owner flags padding",
               "``struct fuse_read_in`` (40 bytes); also the argument of READDIR/READDIRPLUS.")
FsyncIn = _flat("fuse_fsync_in", "fh fsync_flags padding",
                "``struct fuse_fsync_in`` (16 bytes).")
GetxattrIn = _flat("fuse_getxattr_in", "size padding",
                   "``struct fuse_getxattr_in`` (8 bytes); the name follows for GETXATTR.")
GetxattrOut = _flat("fuse_getxattr_out", "size padding",
                    "``struct fuse_getxattr_out`` (8 bytes): the size-probe answer.")
AccessIn = _flat("fuse_access_in", "mask padding", "``struct fuse_access_in`` (8 bytes).")
InterruptIn = _flat("fuse_interrupt_in", "unique",
                    "``struct fuse_interrupt_in`` (8 bytes).")
LseekIn = _flat("fuse_lseek_in", "fh offset whence padding",
                "``struct fuse_lseek_in`` (24 bytes).")
LseekOut = _flat("fuse_lseek_out", "offset", "``struct fuse_lseek_out`` (8 bytes).")
SyncfsIn = _flat("fuse_syncfs_in", "padding", "``struct fuse_syncfs_in`` (8 bytes).")
SetattrIn = _flat("fuse_setattr_in",
                  "valid padding fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec "
                  "mode unused4 uid gid unused5",
                  "``struct fuse_setattr_in`` (88 bytes); ``valid`` holds FATTR_* bits.")
MknodIn = _flat("fuse_mknod_in", "mode rdev umask padding",
                "``struct fuse_mknod_in`` (16 bytes); the name follows.")
MkdirIn = _flat("fuse_mkdir_in", "mode umask", "``struct fuse_mkdir_in`` (8 bytes); the name follows.")
RenameIn = _flat("fuse_rename_in", "newdir",
                 "``struct fuse_rename_in`` (8 bytes); old and new name follow.")
Rename2In = _flat("fuse_rename2_in", "newdir flags padding",
                  "``struct fuse_rename2_in`` (16 bytes); old and new name follow.")
LinkIn = _flat("fuse_link_in", "oldnodeid", "``struct fuse_link_in`` (8 bytes); the new name follows.")
WriteIn = _flat("fuse_write_in", "fh offset size write_flags lock_owner flags padding",
                "``struct fuse_write_in`` (40 bytes); ``size`` bytes of data follow.")
WriteOut = _flat("fuse_write_out", "size padding",
                 "``struct fuse_write_out`` (8 bytes); also the COPY_FILE_RANGE reply.")
CreateIn = _flat("fuse_create_in", "flags mode umask open_flags",
                 "``struct fuse_create_in`` (16 bytes); the name follows.")
SetxattrIn = _flat("fuse_setxattr_in_compat", "size flags",
                   "``struct fuse_setxattr_in`` as sent without SETXATTR_EXT (8 bytes); "
                   "the name and ``size`` value bytes follow.")
FallocateIn = _flat("fuse_fallocate_in", "fh offset length mode padding",
                    "``struct fuse_fallocate_in`` (32 bytes).")
CopyFileRangeIn = _flat("fuse_copy_file_range_in", "fh_in off_in nodeid_out fh_out off_out len flags",
                        "``struct fuse_copy_file_range_in`` (56 bytes).")
LkIn = _flat("fuse_lk_in", "fh owner start end type pid lk_flags padding",
             "``struct fuse_lk_in`` (48 bytes) with its ``fuse_file_lock`` flattened in.")
LkOut = _flat("fuse_lk_out", "start end type pid", "``struct fuse_lk_out`` (24 bytes): the conflicting lock.")


@_frozen
class InitIn(_Wire):
    """``struct fuse_init_in``: 64 bytes from 7.36 on, 16 bytes before.

    ``flags2`` is only meaningful when ``flags`` has INIT_EXT; :attr:`all_flags`
    folds it in as bits 32..63.  ``to_bytes`` gives the 64-byte layout (its
    first 16 bytes are what an older kernel sends).
    """

    C_NAME: ClassVar[str] = "fuse_init_in"
    _S: ClassVar[struct.Struct] = abi.fuse_init_in
    major: int = 0
    minor: int = 0
    max_readahead: int = 0
    flags: int = 0
    flags2: int = 0

    @classmethod
    def from_bytes(cls, buf, offset: int = 0) -> "InitIn":
        have = len(buf) - offset
        if have >= cls._S.size:
            return cls(*cls._S.unpack_from(buf, offset))
        if offset >= 0 and have >= abi.fuse_init_in_compat.size:
            return cls(*abi.fuse_init_in_compat.unpack_from(buf, offset))
        raise RemoteProtocolError(
            f"{cls.C_NAME}: needs {abi.fuse_init_in_compat.size} (before 7.36) or {cls._S.size} bytes "
            f"at offset {offset}, only {max(have, 0)} present")

    @property
    def all_flags(self) -> int:
        if self.flags & abi.InitFlags.INIT_EXT:
            return self.flags | (self.flags2 << 32)
        return self.flags


@_frozen
class InitOut(_Wire):
    """``struct fuse_init_out`` (64 bytes; shorter for old minors, see :func:`init_out_size`).

    ``from_bytes`` accepts a short reply and reads missing tail fields as zero,
    as the kernel does.
    """

    C_NAME: ClassVar[str] = "fuse_init_out"
    _S: ClassVar[struct.Struct] = abi.fuse_init_out
    major: int = 0
    minor: int = 0
    max_readahead: int = 0
    flags: int = 0
    max_background: int = 0
    congestion_threshold: int = 0
    max_write: int = 0
    time_gran: int = 0
    max_pages: int = 0
    map_alignment: int = 0
    flags2: int = 0

    @classmethod
    def from_bytes(cls, buf, offset: int = 0) -> "InitOut":
        have = len(buf) - offset
        if offset < 0 or have < abi.FUSE_COMPAT_INIT_OUT_SIZE:
            raise RemoteProtocolError(
                f"{cls.C_NAME}: needs at least {abi.FUSE_COMPAT_INIT_OUT_SIZE} bytes at offset {offset}, "
                f"only {max(have, 0)} present")
        raw = bytes(buf[offset:offset + cls._S.size]).ljust(cls._S.size, b"\0")
        return cls(*cls._S.unpack(raw))

    def validate(self) -> None:
        if self.major != abi.FUSE_KERNEL_VERSION:
            raise _bad(self.C_NAME, "major", self.major, "the kernel only accepts major 7")
        if not 1 <= self.time_gran <= 1_000_000_000 and self.minor >= 23:
            raise _bad(self.C_NAME, "time_gran", self.time_gran, "must be 1..10**9 ns")

    def to_bytes_for(self, minor: int) -> bytes:
        """Encoded and cut to the size a peer of protocol ``7.minor`` expects."""
        return self.to_bytes()[:init_out_size(minor)]


@_frozen
class Dirent(_Wire):
    """``struct fuse_dirent`` plus its name; ``to_bytes`` pads to 8 bytes."""

    C_NAME: ClassVar[str] = "fuse_dirent"
    _S: ClassVar[struct.Struct] = abi.fuse_dirent
    ino: int = 0
    off: int = 0
    namelen: int = 0
    type: int = 0
    name: bytes = b""

    @classmethod
    def from_bytes(cls, buf, offset: int = 0) -> "Dirent":
        head = cls._S.size
        have = _need(cls.C_NAME, head, buf, offset)
        ino, off, namelen, typ = cls._S.unpack_from(buf, offset)
        if namelen > have - head:
            raise _bad(cls.C_NAME, "namelen", namelen, f"runs past the {have - head} bytes that follow")
        name = bytes(buf[offset + head:offset + head + namelen])
        return cls(ino, off, namelen, typ, name)

    def record_size(self) -> int:
        return abi.fuse_dirent_align(self._S.size + self.namelen)

    def validate(self) -> None:
        if self.namelen != len(self.name):
            raise _bad(self.C_NAME, "namelen", self.namelen, f"name has {len(self.name)} bytes")
        if not 0 < self.namelen <= abi.NAME_MAX:
            raise _bad(self.C_NAME, "namelen", self.namelen, "must be 1..255")
        if b"/" in self.name or b"\0" in self.name:
            raise _bad(self.C_NAME, "name", self.name, "contains '/' or NUL")

    def to_bytes(self) -> bytes:
        raw = _encode(self.C_NAME, self, self._S.pack, self.ino, self.off, self.namelen, self.type) + self.name
        return raw + b"\0" * (abi.fuse_dirent_align(len(raw)) - len(raw))


@_frozen
class DirentPlus:
    """``struct fuse_direntplus``: an entry_out followed by a dirent."""

    C_NAME: ClassVar[str] = "fuse_direntplus"
    entry_out: EntryOut
    dirent: Dirent

    @classmethod
    def from_bytes(cls, buf, offset: int = 0) -> "DirentPlus":
        entry = EntryOut.from_bytes(buf, offset)
        return cls(entry, Dirent.from_bytes(buf, offset + EntryOut.wire_size()))

    @property
    def namelen(self) -> int:
        return self.dirent.namelen

    def record_size(self) -> int:
        return abi.fuse_dirent_align(abi.FUSE_NAME_OFFSET_DIRENTPLUS + self.dirent.namelen)

    def validate(self) -> None:
        self.entry_out.validate()
        self.dirent.validate()

    def to_bytes(self) -> bytes:
        return self.entry_out.to_bytes() + self.dirent.to_bytes()


def _iter_records(payload, record):
    pos = 0
    end = len(payload)
    while pos < end:
        d = record.from_bytes(payload, pos)
        pos += d.record_size()
        if pos > end:
            raise _bad(record.C_NAME, "namelen", d.namelen, "record padding runs past the payload")
        yield d


def iter_dirents(payload) -> Iterator[Dirent]:
    """Walk a READDIR reply payload record by record."""
    return _iter_records(payload, Dirent)


def iter_direntplus(payload) -> Iterator[DirentPlus]:
    """Walk a READDIRPLUS reply payload record by record."""
    return _iter_records(payload, DirentPlus)


# -- request decoding (tests, tools; the server parses inline for speed) --------------

class Request(NamedTuple):
    """A decoded request: header, fixed argument struct (or None), NUL-terminated
    name(s) without the NUL (LOOKUP, GETXATTR, SYMLINK's name and target,
    RENAME's two names, ...), and whatever bytes follow (WRITE's data,
    SETXATTR's value)."""

    header: InHeader
    arg: object
    names: tuple[bytes, ...]
    payload: bytes

    @property
    def opcode(self) -> int:
        return self.header.opcode


# opcode -> (argument struct or None, number of NUL-terminated names after it)
_REQUEST_LAYOUT: dict[int, tuple[type | None, int]] = {
    abi.Opcode.LOOKUP: (None, 1),
    abi.Opcode.FORGET: (ForgetIn, 0),
    abi.Opcode.BATCH_FORGET: (BatchForgetIn, 0),
    abi.Opcode.GETATTR: (GetattrIn, 0),
    abi.Opcode.READLINK: (None, 0),
    abi.Opcode.OPEN: (OpenIn, 0),
    abi.Opcode.OPENDIR: (OpenIn, 0),
    abi.Opcode.READ: (ReadIn, 0),
    abi.Opcode.READDIR: (ReadIn, 0),
    abi.Opcode.READDIRPLUS: (ReadIn, 0),
    abi.Opcode.RELEASE: (ReleaseIn, 0),
    abi.Opcode.RELEASEDIR: (ReleaseIn, 0),
    abi.Opcode.STATFS: (None, 0),
    abi.Opcode.GETXATTR: (GetxattrIn, 1),
    abi.Opcode.LISTXATTR: (GetxattrIn, 0),
    abi.Opcode.FLUSH: (FlushIn, 0),
    abi.Opcode.FSYNC: (FsyncIn, 0),
    abi.Opcode.FSYNCDIR: (FsyncIn, 0),
    abi.Opcode.INIT: (InitIn, 0),
    abi.Opcode.DESTROY: (None, 0),
    abi.Opcode.ACCESS: (AccessIn, 0),
    abi.Opcode.INTERRUPT: (InterruptIn, 0),
    abi.Opcode.LSEEK: (LseekIn, 0),
    abi.Opcode.SYNCFS: (SyncfsIn, 0),
    abi.Opcode.UNLINK: (None, 1),
    abi.Opcode.RMDIR: (None, 1),
    abi.Opcode.REMOVEXATTR: (None, 1),
    abi.Opcode.SETATTR: (SetattrIn, 0),
    abi.Opcode.MKNOD: (MknodIn, 1),
    abi.Opcode.MKDIR: (MkdirIn, 1),
    abi.Opcode.SYMLINK: (None, 2),
    abi.Opcode.RENAME: (RenameIn, 2),
    abi.Opcode.RENAME2: (Rename2In, 2),
    abi.Opcode.LINK: (LinkIn, 1),
    abi.Opcode.WRITE: (WriteIn, 0),
    abi.Opcode.CREATE: (CreateIn, 1),
    abi.Opcode.SETXATTR: (SetxattrIn, 1),
    abi.Opcode.FALLOCATE: (FallocateIn, 0),
    abi.Opcode.COPY_FILE_RANGE: (CopyFileRangeIn, 0),
    abi.Opcode.GETLK: (LkIn, 0),
    abi.Opcode.SETLK: (LkIn, 0),
    abi.Opcode.SETLKW: (LkIn, 0),
}


def decode_request(buf) -> Request:
    """Decode a whole request, checking the header against ``len(buf)``.

    Raises :class:`RemoteProtocolError` naming what is wrong.  Opcodes without a
    known layout keep all their argument bytes in ``payload``.
    """
    header = InHeader.from_bytes(buf)
    header.validate(len(buf))
    pos = InHeader.wire_size()
    arg_cls, n_names = _REQUEST_LAYOUT.get(header.opcode, (None, 0))
    arg = None
    if arg_cls is not None:
        arg = arg_cls.from_bytes(buf, pos)
        if arg_cls is InitIn and len(buf) - pos < InitIn.wire_size():
            pos += abi.fuse_init_in_compat.size
        else:
            pos += arg_cls.wire_size()
    names = []
    for _ in range(n_names):
        end = bytes(buf[pos:]).find(b"\0")
        if end < 0:
            raise RemoteProtocolError(f"opcode {header.opcode}: name at offset {pos} is not NUL-terminated")
        names.append(bytes(buf[pos:pos + end]))
        pos += end + 1
    return Request(header, arg, tuple(names), bytes(buf[pos:]))


# -- hot-path helpers ------------------------------------------------------------------

_pack_attr = abi.fuse_attr.pack


def pack_attr(attr: Attr) -> bytes:
    """The 88-byte ``fuse_attr`` of ``attr``, cached in ``attr._packed``.

    Attr objects are immutable once handed over (ops.py), so the cache never
    goes stale.  Raises LocalProtocolError if a field does not fit its C type.
    """
    packed = attr._packed
    if packed is None:
        packed = _encode("fuse_attr", attr, _pack_attr, attr.ino, attr.size, attr.blocks, attr.atime,
                         attr.mtime, attr.ctime, attr.atimensec, attr.mtimensec, attr.ctimensec, attr.mode,
                         attr.nlink, attr.uid, attr.gid, attr.rdev, attr.blksize, 0)
        attr._packed = packed
    return packed


def pack_statfs(st: StatFs, minor: int = abi.FUSE_KERNEL_MINOR_VERSION) -> bytes:
    """``fuse_statfs_out`` for a peer of protocol ``7.minor``."""
    raw = _encode("fuse_kstatfs", st, abi.fuse_kstatfs.pack, st.blocks, st.bfree, st.bavail, st.files,
                  st.ffree, st.bsize, st.namelen, st.frsize, 0)
    return raw[:statfs_out_size(minor)]


#: Timeouts beyond this are clamped: the kernel converts to jiffies anyway and
#: a century is "forever" for a cache.
_MAX_TIMEOUT_S = 100 * 365 * 86400


def split_timeout(seconds: float) -> tuple[int, int]:
    """A cache timeout in seconds as ``(sec, nsec)``; negative or NaN -> 0, huge -> clamped."""
    if not seconds > 0:  # also catches NaN
        return (0, 0)
    if seconds >= _MAX_TIMEOUT_S or math.isinf(seconds):
        return (_MAX_TIMEOUT_S, 0)
    sec = int(seconds)
    nsec = int(round((seconds - sec) * 1e9))
    if nsec >= 1_000_000_000:
        sec, nsec = sec + 1, 0
    return (sec, nsec)


_pack_out = abi.fuse_out_header.pack


def error_reply(unique: int, err: int) -> bytes:
    """A header-only reply carrying ``-err``; ``err`` outside 1..511 becomes EIO."""
    if not 0 < err < 512:
        err = 5  # EIO: the kernel would misread anything outside (-512, 0)
    return _pack_out(16, -err, unique & _U64)


def init_out_size(minor: int) -> int:
    """Bytes of ``fuse_init_out`` a peer of protocol ``7.minor`` reads."""
    if minor < 5:
        return abi.FUSE_COMPAT_INIT_OUT_SIZE
    if minor < 23:
        return abi.FUSE_COMPAT_22_INIT_OUT_SIZE
    return abi.fuse_init_out.size


def entry_out_size(minor: int) -> int:
    """Bytes of ``fuse_entry_out`` for protocol ``7.minor``."""
    return abi.FUSE_COMPAT_ENTRY_OUT_SIZE if minor < 9 else abi.FUSE_ENTRY_OUT_SIZE


def attr_out_size(minor: int) -> int:
    """Bytes of ``fuse_attr_out`` for protocol ``7.minor``."""
    return abi.FUSE_COMPAT_ATTR_OUT_SIZE if minor < 9 else abi.FUSE_ATTR_OUT_SIZE


def statfs_out_size(minor: int) -> int:
    """Bytes of ``fuse_statfs_out`` for protocol ``7.minor``."""
    return abi.FUSE_COMPAT_STATFS_SIZE if minor < 4 else abi.fuse_kstatfs.size
