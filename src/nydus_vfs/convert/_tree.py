"""A file tree described for comparison, built by applying OCI layer tars with the OCI whiteout rules.

``nydusify check --source`` compares the OCI image (its layers applied here)
with the nydus image (mounted by nydusd and walked, :meth:`FileTree.add_directory`,
or where no FUSE mount can be made, its bootstrap unpacked by the builder):
this model is written independently of the builder's overlay code on
purpose, so the check is a second opinion, not the builder agreeing with itself.

Rules (OCI image spec, "Representing Changes"): in each layer, ``.wh..wh..opq``
hides everything the *lower* layers had below its directory, ``.wh.NAME``
removes NAME (and its subtree) from the lower layers; a non-directory
replacing a directory removes the directory's subtree; a directory over a
directory takes the new attributes and keeps the children.  Hardlinks are
described by their target's content.  Member names are normalised (``./``,
leading ``/``).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from typing import BinaryIO

from ..errors import ConvertError

__all__ = ["FileTree", "diff_trees"]

_WH = ".wh."
_OPQ = ".wh..wh..opq"


def _norm(name: str) -> str:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ConvertError(f"tar member {name!r} contains '..'")
    return "/".join(parts)


class FileTree:
    """``entries``: path -> description dict (type, mode, uid, gid, and per type sha256/size, link, dev)."""

    def __init__(self) -> None:
        self.entries: dict[str, dict] = {}

    def _remove_subtree(self, path: str) -> None:
        self.entries.pop(path, None)
        prefix = path + "/"
        for p in [p for p in self.entries if p.startswith(prefix)]:
            del self.entries[p]

    def _ensure_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            e = self.entries.get(p)
            if e is None or e["type"] != "dir":
                if e is not None:
                    self._remove_subtree(p)
                self.entries[p] = {"type": "dir", "implicit": True}

    def apply_layer(self, stream: BinaryIO, *, name: str = "layer", whiteouts: bool = True) -> None:
        """Apply one layer tar (plain or gzip) read from ``stream``."""
        layer: dict[str, dict] = {}
        removed: list[str] = []
        opaque: list[str] = []
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for m in tf:
                    path = _norm(m.name)
                    if not path:
                        continue
                    base = path.rsplit("/", 1)[-1]
                    parent = path[: -len(base)].rstrip("/")
                    if whiteouts and base == _OPQ:
                        opaque.append(parent)
                        continue
                    if whiteouts and base.startswith(_WH):
                        removed.append((parent + "/" if parent else "") + base[len(_WH):])
                        continue
                    layer[path] = self._describe(tf, m, layer)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ConvertError(f"{name}: cannot read the layer tar: {exc}") from None
        for d in opaque:
            prefix = d + "/" if d else ""
            for p in [p for p in self.entries if p.startswith(prefix) and p != d]:
                del self.entries[p]
        for p in removed:
            self._remove_subtree(p)
        for path in sorted(layer, key=lambda p: p.count("/")):
            desc = layer[path]
            old = self.entries.get(path)
            if old is not None and old["type"] == "dir" and desc["type"] != "dir":
                self._remove_subtree(path)
            self._ensure_parents(path)
            self.entries[path] = desc

    def add_directory(self, root: str) -> None:
        """Describe every entry below ``root`` (a mounted image) as a layer tar would.

        Symlinks are not followed and mounts below ``root`` are not entered;
        xattrs are read without following links and keyed as tar's PAX
        ``SCHILY.xattr.*`` headers (decoded the way ``tarfile`` decodes them), so
        the description compares equal to the tar of the same tree.  Raises
        ``ConvertError`` naming the path that cannot be read.
        """
        try:
            root_dev = os.lstat(root).st_dev
        except OSError as exc:
            raise ConvertError(f"{root}: cannot list the directory: {exc.strerror}") from None
        stack = [("", root)]
        while stack:
            rel, path = stack.pop()
            try:
                with os.scandir(path) as it:
                    children = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                raise ConvertError(f"/{rel}: cannot list the directory: {exc.strerror}") from None
            for entry in children:
                crel = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    st = os.lstat(entry.path)
                    desc = self._describe_path(entry.path, st)
                except OSError as exc:
                    raise ConvertError(f"/{crel}: cannot read it: {exc.strerror}") from None
                self.entries[crel] = desc
                if desc["type"] == "dir" and st.st_dev == root_dev:
                    stack.append((crel, entry.path))

    @staticmethod
    def _describe_path(path: str, st: os.stat_result) -> dict:
        desc: dict = {"mode": st.st_mode & 0o7777, "uid": st.st_uid, "gid": st.st_gid}
        fmt = stat.S_IFMT(st.st_mode)
        if fmt == stat.S_IFDIR:
            desc["type"] = "dir"
        elif fmt == stat.S_IFREG:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                while piece := f.read(1 << 20):
                    h.update(piece)
            desc.update(type="file", size=st.st_size, sha256=h.hexdigest(), mtime=int(st.st_mtime))
        elif fmt == stat.S_IFLNK:
            desc.update(type="symlink", link=os.readlink(path))
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            desc.update(type="chr" if fmt == stat.S_IFCHR else "blk",
                        dev=(os.major(st.st_rdev), os.minor(st.st_rdev)))
        elif fmt == stat.S_IFIFO:
            desc["type"] = "fifo"
        else:
            desc["type"] = f"other:{fmt:#o}"
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            names = []
        xattrs = {}
        for name in names:
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError:
                continue
            xattrs["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
        if xattrs:
            desc["xattrs"] = xattrs
        return desc

    @staticmethod
    def _describe(tf: tarfile.TarFile, m: tarfile.TarInfo, layer: dict[str, dict]) -> dict:
        desc: dict = {"mode": m.mode & 0o7777, "uid": m.uid, "gid": m.gid}
        if m.islnk():
            target = layer.get(_norm(m.linkname))
            if target is None:
                raise ConvertError(f"tar member {m.name!r}: hardlink target {m.linkname!r} is not in this layer")
            return dict(target)
        if m.isdir():
            desc["type"] = "dir"
        elif m.isfile():
            h = hashlib.sha256()
            f = tf.extractfile(m)
            while f is not None:
                piece = f.read(1 << 20)
                if not piece:
                    break
                h.update(piece)
            desc.update(type="file", size=m.size, sha256=h.hexdigest(), mtime=int(m.mtime))
        elif m.issym():
            desc.update(type="symlink", link=m.linkname)
        elif m.ischr() or m.isblk():
            desc.update(type="chr" if m.ischr() else "blk", dev=(m.devmajor, m.devminor))
        elif m.isfifo():
            desc["type"] = "fifo"
        else:
            desc["type"] = f"other:{m.type!r}"
        xattrs = {k: v for k, v in m.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        if xattrs:
            desc["xattrs"] = xattrs
        return desc


def diff_trees(a: FileTree, b: FileTree, *, limit: int = 20) -> list[str]:
    """Human-readable differences between ``a`` (source) and ``b`` (nydus); empty when equal.

    Implicit directories (named by no tar entry) are compared by type only.
    """
    out: list[str] = []
    for path in sorted(set(a.entries) | set(b.entries)):
        x, y = a.entries.get(path), b.entries.get(path)
        if x is None or y is None:
            out.append(f"/{path}: only in the {'nydus' if x is None else 'source'} image")
        elif x.get("implicit") or y.get("implicit"):
            if x["type"] != y["type"]:
                out.append(f"/{path}: type {x['type']} vs {y['type']}")
        else:
            keys = sorted((set(x) | set(y)) - {"implicit"})
            bad = [k for k in keys if x.get(k) != y.get(k)]
            if bad:
                out.append(f"/{path}: " + ", ".join(f"{k} {x.get(k)!r} vs {y.get(k)!r}" for k in bad))
        if len(out) >= limit:
            out.append("...")
            break
    return out

