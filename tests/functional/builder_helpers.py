"""Helpers for the builder tests (``tests.functional.builder_helpers``).

* :func:`make_rich_tree` creates a directory holding every entry kind the
  builder must carry (sparse and duplicate files, hardlinks, devices, fifos,
  sockets, xattrs, odd names, owners, nanosecond mtimes).
* :func:`snapshot_dir` and :func:`snapshot_image` describe a host directory
  and a built image in the same comparable form.  The image side goes through
  the *format reader* (``nydus_vfs.format.reader.Bootstrap``) and decodes chunk
  data itself (``utils.decompress`` plus a digest check), independently of the
  builder's own ``BlobReader``.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import socket
import stat

from nydus_vfs.format.reader import Bootstrap
from nydus_vfs.utils import decompress, digest_bytes

IS_ROOT = os.geteuid() == 0
XATTR_PREFIXES = (b"user.", b"trusted.", b"security.")
LONG_NAME = "L" * 255


def _write(path: pathlib.Path, data: bytes) -> None:
    path.write_bytes(data)


def make_rich_tree(root: pathlib.Path, *, long_name: bool = True, chunk_hint: int = 0x10000) -> pathlib.Path:
    """Populate ``root`` with one of everything; sizes straddle ``chunk_hint``."""
    rnd = hashlib.sha256(b"seed").digest()
    blob = b"".join(hashlib.sha256(rnd + i.to_bytes(4, "little")).digest() for i in range(12000))  # 384000 B
    root.mkdir(parents=True, exist_ok=True)
    d = root / "dir"
    (d / "nested" / "deeper" / "deepest").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    _write(root / "empty", b"")
    _write(root / "small.txt", b"hello nydus\n")
    _write(d / "multi", blob[: 3 * chunk_hint + 17])
    _write(d / "exact", blob[: 2 * chunk_hint])
    _write(d / "nested" / "dup-of-exact", blob[: 2 * chunk_hint])
    _write(d / "nested" / "deeper" / "deepest" / "leaf", b"leaf\n" * 100)
    _write(root / "zeros", bytes(2 * chunk_hint + 5))
    with open(root / "sparse", "wb") as f:
        f.truncate(4 * chunk_hint + 123)
        f.seek(chunk_hint + 7)
        f.write(b"data in the middle of holes")
    # Enough entries for several directory blocks (v6 dirents never cross a block).
    many = root / "many"
    many.mkdir()
    for i in range(400):
        _write(many / f"entry-{i:04d}-{'x' * 20}", str(i).encode())
    # Names that sort before "." and "..", and non-ASCII / non-UTF-8 names.
    _write(root / "-dash", b"-")
    _write(root / "+plus", b"+")
    _write(root / "sp ace", b" ")
    _write(root / "ünï", "ü".encode())
    _write(pathlib.Path(os.fsdecode(os.fsencode(root) + b"/\xff\xfe-raw")), b"raw")
    if long_name:
        _write(root / LONG_NAME, b"long name")
    # Symlinks: relative, absolute, dangling, long.
    os.symlink("small.txt", root / "link-small")
    os.symlink("/etc/does/not/exist", root / "link-dangling")
    os.symlink("d" * 3000, root / "link-long")
    os.symlink("dir/nested", root / "link-dir")
    # Hardlinks: three names, two directories.
    _write(d / "hl-a", b"hard linked content\n" * 10)
    os.link(d / "hl-a", root / "hl-b")
    os.link(d / "hl-a", d / "nested" / "hl-c")
    # Special files.
    os.mkfifo(root / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock"))
    finally:
        sock.close()
    if IS_ROOT:
        os.mknod(root / "chr", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "blk", 0o640 | stat.S_IFBLK, os.makedev(8, 1))
        os.mknod(root / "bigdev", 0o600 | stat.S_IFCHR, os.makedev(300, 70000))
    # Permissions with special bits.
    os.chmod(root / "small.txt", 0o4755)
    os.chmod(d / "nested", 0o2775)
    os.chmod(root / "empty-dir", 0o1777)
    # xattrs (user.* is not allowed on symlinks/devices by Linux).
    try:
        os.setxattr(root / "small.txt", "user.comment", b"a value")
        os.setxattr(root / "small.txt", "user.empty", b"")
        os.setxattr(d, "user.dir", b"\x00\x01binary")
        if IS_ROOT:
            os.setxattr(root / "link-small", "trusted.sym", b"on a symlink", follow_symlinks=False)
            os.setxattr(d / "multi", "trusted.overlay.x", b"y")
    except OSError:
        pass  # filesystem without user xattrs: the tree is still rich enough
    # Owners.
    if IS_ROOT:
        os.chown(root / "small.txt", 1000, 1000)
        os.chown(d / "multi", 70000, 70001)
        os.lchown(root / "link-small", 12, 34)
        os.chown(d, 5, 6)
    # Nanosecond mtimes on everything, children before parents.
    for i, (dirpath, dirnames, filenames) in enumerate(sorted(os.walk(root, topdown=False), reverse=True)):
        for j, name in enumerate(dirnames + filenames):
            p = os.path.join(dirpath, name)
            os.utime(p, ns=(1_600_000_000_123_456_789 + i * 1000 + j, 1_600_000_000_123_456_789 + i * 1000 + j),
                     follow_symlinks=False)
    os.utime(root, ns=(1_600_000_000_000_000_001, 1_600_000_000_000_000_001))
    return root


def _xattrs_of(path: str) -> dict[bytes, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        raw = os.fsencode(name)
        if raw.startswith(XATTR_PREFIXES) and not raw.startswith(b"security.selinux"):
            out[raw] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _finish(entries: dict[str, dict], groups: dict[object, list[str]]) -> dict[str, dict]:
    for names in groups.values():
        if len(names) > 1:
            for n in names:
                entries[n]["links"] = sorted(names)
    return entries


def snapshot_dir(root: pathlib.Path, *, owners: bool = True) -> dict[str, dict]:
    """``path -> attributes`` of a host directory (``/`` is the root)."""
    entries: dict[str, dict] = {}
    groups: dict[object, list[str]] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [None] + dirnames + filenames:
            p = dirpath if name is None else os.path.join(dirpath, name)
            if name is None and dirpath != base:
                continue
            rel = "/" + os.path.relpath(p, base).decode("utf-8", "surrogateescape")
            rel = "/" if rel == "/." else rel
            st = os.lstat(p)
            e = {"type": stat.S_IFMT(st.st_mode), "perm": stat.S_IMODE(st.st_mode),
                 "mtime": (st.st_mtime_ns // 10**9, st.st_mtime_ns % 10**9), "xattrs": _xattrs_of(p)}
            if owners:
                e["owner"] = (st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    e["sha256"] = hashlib.sha256(f.read()).hexdigest()
                e["size"] = st.st_size
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            entries[rel] = e
    return _finish(entries, groups)


def read_file_from_image(bs: Bootstrap, ino: int, blob_paths: dict[int, str]) -> bytes:
    """Assemble a file from its chunks, checking every chunk's digest and size."""
    info = bs.inode(ino)
    out = bytearray()
    for c in bs.chunks(ino):
        blob = bs.blobs[c.blob_index]
        with open(blob_paths[c.blob_index], "rb") as f:
            f.seek(c.compressed_offset)
            raw = f.read(c.compressed_size)
        data = decompress(raw, int(blob.compressor), c.uncompressed_size) if c.is_compressed else raw
        assert len(data) == c.uncompressed_size
        assert digest_bytes(int(blob.digester), data) == c.digest, f"chunk {c.index} of inode {ino}: bad digest"
        assert c.file_offset == len(out)
        out += data
    assert len(out) == info.size
    return bytes(out)


def blob_paths_for(bs: Bootstrap, blob_dir: pathlib.Path | None = None, blob: pathlib.Path | None = None
                   ) -> dict[int, str]:
    if blob is not None:
        return {i: str(blob) for i in range(len(bs.blobs))}
    assert blob_dir is not None
    return {i: str(blob_dir / b.blob_id) for i, b in enumerate(bs.blobs)}


def snapshot_image(boot: pathlib.Path, *, blob_dir: pathlib.Path | None = None, blob: pathlib.Path | None = None,
                   owners: bool = True) -> dict[str, dict]:
    """The same description as :func:`snapshot_dir`, read from an image through the format reader."""
    bs = Bootstrap.from_bytes(boot.read_bytes())
    if bs.inlined:
        bs.set_blob_id_from_meta("inline")
    paths = blob_paths_for(bs, blob_dir, blob if blob is not None else (boot if bs.inlined else None))
    entries: dict[str, dict] = {}
    groups: dict[object, list[str]] = {}
    for path, ino, info in bs.walk():
        rel = path.decode("utf-8", "surrogateescape")
        e = {"type": stat.S_IFMT(info.mode), "perm": stat.S_IMODE(info.mode), "mtime": (info.mtime, info.mtime_nsec),
             "xattrs": bs.xattrs(ino) if info.has_xattr else {}}
        if owners:
            e["owner"] = (info.uid, info.gid)
        if info.is_reg:
            e["sha256"] = hashlib.sha256(read_file_from_image(bs, ino, paths)).hexdigest()
            e["size"] = info.size
            groups.setdefault(ino, []).append(rel)
        elif info.is_symlink:
            e["target"] = bs.readlink(ino)
        elif info.is_chr or info.is_blk:
            rdev = info.rdev
            e["rdev"] = ((rdev >> 8) & 0xFFF, (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00))
        entries[rel] = e
    result = _finish(entries, groups)
    # Link counts of regular files must equal the number of names.
    for path, ino, info in bs.walk():
        if info.is_reg:
            assert info.nlink == len(groups[ino]), (path, info.nlink, groups[ino])
    return result


def diff_snapshots(want: dict[str, dict], got: dict[str, dict]) -> list[str]:
    """Human-readable differences (empty when identical)."""
    out = []
    for k in sorted(set(want) | set(got)):
        if k not in got:
            out.append(f"missing {k!r}")
        elif k not in want:
            out.append(f"extra {k!r}")
        elif want[k] != got[k]:
            out.append(f"{k!r}: want {want[k]} got {got[k]}")
    return out
