"""``pack``, ``merge`` and ``unpack``: OCI layers to nydus blob layers and back (nydus-surface.md §5.3-§5.4).

All three run our builder in-process (:mod:`nydus_vfs.builder`), the way
upstream's converter runs ``nydus-image``:

* :func:`pack` = ``create --type tar-rafs --blob-inline-meta --features blob-toc
  --whiteout-spec none --prefetch-policy fs`` (no ``blob-toc`` for RAFS v5) on
  the layer stream, read once front to back (gzip and zstd layers are
  inflated on the fly; nothing is unpacked to disk).  The builder writes the
  "reverse tar" of rafs-format.md §3.1/§4.2 itself::

      chunk data | hdr(image.blob) | ci | ci header | hdr(blob.meta) | digests | hdr(blob.digest)
                 | zstd(bootstrap) | hdr(image.boot) | ToC | hdr(rafs.blob.toc)

  (RAFS v5: ``chunk data | hdr(image.blob) | bootstrap | hdr(image.boot)``).
* :func:`merge` extracts each layer's ``image.boot`` from its tail (ToC first,
  then the tar-header walk; only the tail is read), names it by the layer
  digest and runs ``merge --blob-digests <layer digests>``, so every blob id
  in the result is the layer's OCI digest, which is what nydusd asks the
  registry for.
* :func:`unpack` extracts ``image.boot`` the same way and writes the layer's
  tree back as an OCI tar (``unpack --blob``).

Bad input (a ``..`` entry, a hardlink to a missing target, a 256-byte name,
a truncated gzip stream, a corrupt blob) raises :class:`ConvertError` naming
the entry or section; no output file is left behind.  Absolute member names
are taken relative to the layer root, as tar and the OCI layer rules do.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO

from ..builder import BuildOptions, MergeOptions, parse_prefetch_patterns
from ..builder import build as _build
from ..builder import merge as _merge
from ..builder import unpack as _unpack
from ..errors import BuildError, ConvertError, FormatError
from ..format.blob import BlobTail
from ..format.types import Compressor, Digester
from ._types import Layer, MergeOption, PackOption, UnpackOption

__all__ = ["PackResult", "pack", "merge", "unpack", "read_layer_section", "blob_meta_file"]

log = logging.getLogger("nydus_vfs.convert")

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COPY = 1 << 20


@dataclass
class PackResult:
    """What :func:`pack` produced: the layer's OCI ``digest`` (sha256 of the whole
    file), its ``size``, and the builder's ``blob_id`` (rafs-format.md §3.8, not the digest)."""

    digest: str
    size: int
    blob_id: str
    fs_version: int


def _deadline(timeout: datetime.timedelta | float | None) -> float | None:
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, datetime.timedelta) else float(timeout)
    if seconds <= 0:
        raise ConvertError(f"timeout must be positive, not {seconds:g} s")
    return time.monotonic() + seconds


class _LayerStream:
    """The layer as the builder reads it: zstd sniffed and inflated, the deadline enforced per read."""

    def __init__(self, raw: BinaryIO, deadline: float | None, timeout_text: str) -> None:
        head = raw.read(4)
        self._head = head
        self._raw = raw
        self._deadline = deadline
        self._timeout_text = timeout_text
        self._inner: BinaryIO | None = None
        if head == _ZSTD_MAGIC:
            import zstandard

            self._inner = zstandard.ZstdDecompressor().stream_reader(_Prepended(head, raw),
                                                                    read_across_frames=True)
            self._head = b""

    def read(self, n: int = -1) -> bytes:
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise ConvertError(f"pack timed out after {self._timeout_text}")
        if self._inner is not None:
            try:
                return self._inner.read(n if n is not None and n >= 0 else 1 << 30)
            except Exception as exc:  # zstandard.ZstdError
                raise ConvertError(f"zstd layer stream is corrupt: {exc}") from None
        if self._head:
            if n is None or n < 0:
                data, self._head = self._head + self._raw.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            if len(data) < n:
                data += self._raw.read(n - len(data))
            return data
        return self._raw.read(n)


class _Prepended:
    def __init__(self, head: bytes, raw: BinaryIO) -> None:
        self._head = head
        self._raw = raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return self._raw.read(n)


def _sha256_file(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while True:
            piece = f.read(_COPY)
            if not piece:
                break
            h.update(piece)
            size += len(piece)
    return "sha256:" + h.hexdigest(), size


def _patterns(text: str):
    lines = [line for line in (text or "").splitlines() if line.strip()] or ["/"]
    try:
        return parse_prefetch_patterns(lines)
    except BuildError as exc:
        raise ConvertError(f"prefetch patterns: {exc}") from None


def _is_path(dest) -> bool:
    return isinstance(dest, (str, bytes, os.PathLike))


def _work_dir(opt_dir: str | None) -> str:
    d = opt_dir or tempfile.gettempdir()
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as exc:
        raise ConvertError(f"work dir {d!r}: {exc.strerror}") from None
    return d


def pack(src: BinaryIO, dest: str | os.PathLike | BinaryIO, opt: PackOption | None = None) -> PackResult:
    """Convert the OCI layer tar stream ``src`` (plain, gzip or zstd) into a nydus blob layer.

    ``dest`` is a path (written atomically: complete or absent) or a writable
    binary file object (the layer is built in ``opt.work_dir`` and then copied
    into it).  Returns the layer's digest and size.  Raises
    :class:`ConvertError` naming the bad entry.
    """
    opt = opt or PackOption()
    try:
        fs_version = opt.fs_version_int()
        compressor = Compressor.from_cli(opt.compressor)
        digester = Digester.from_cli(opt.digester)
    except (ValueError, KeyError) as exc:
        raise ConvertError(f"invalid pack option: {exc}") from None
    if opt.batch_size:
        raise ConvertError(f"batch_size {opt.batch_size:#x} is not supported by this builder (only 0)")
    if opt.encrypt:
        raise ConvertError("encrypt is not supported by this builder (images are never encrypted)")
    deadline = _deadline(opt.timeout)
    stream = _LayerStream(src, deadline, str(opt.timeout))
    work = _work_dir(opt.work_dir)
    tmp_dir = None
    if _is_path(dest):
        out_path = os.fsdecode(dest)
    else:
        tmp_dir = tempfile.mkdtemp(prefix="nydus-pack-", dir=work)
        out_path = os.path.join(tmp_dir, "layer.blob")
    try:
        bopts = BuildOptions(source_type="tar-rafs", fs_version=fs_version, compressor=compressor,
                             digester=digester, chunk_size=opt.chunk_size, blob=out_path, blob_inline_meta=True,
                             blob_toc=fs_version == 6, whiteout_spec="none", prefetch_policy="fs",
                             prefetch_patterns=_patterns(opt.prefetch_patterns), chunk_dict=opt.chunk_dict_path,
                             aligned_chunk=opt.aligned_chunk)
        try:
            result = _build(stream, bopts)  # type: ignore[arg-type]
        except (BuildError, FormatError) as exc:
            raise ConvertError(f"pack: {exc}") from None
        except OSError as exc:
            raise ConvertError(f"pack: {exc}") from None
        digest, size = _sha256_file(out_path)
        if not _is_path(dest):
            with open(out_path, "rb") as f:
                shutil.copyfileobj(f, dest, _COPY)  # type: ignore[arg-type]
        if opt.backend is not None:
            try:
                opt.backend.push(out_path, digest)
            except Exception as exc:
                raise ConvertError(f"pack: pushing blob {digest} to the {opt.backend.type()} backend failed: "
                                   f"{exc}") from exc
        log.debug("packed layer %s (%d bytes, RAFS v%d)", digest, size, fs_version)
        return PackResult(digest=digest, size=size, blob_id=result.blob_id or "", fs_version=fs_version)
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _read_at(fd: int):
    def read_at(offset: int, size: int) -> bytes:
        return os.pread(fd, size, offset)
    return read_at


def read_layer_section(blob: str, name: str) -> bytes:
    """Section ``name`` (``image.boot``, ``blob.meta``, ...) of the nydus blob layer file ``blob``, decoded.

    Only the tail is read (ToC, or the reverse tar headers).  ConvertError
    names the file when it is not a nydus blob layer or lacks the section.
    """
    try:
        fd = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConvertError(f"nydus blob {blob!r}: {exc.strerror}") from None
    try:
        size = os.fstat(fd).st_size
        tail = BlobTail.parse(_read_at(fd), size)
        return tail.extract(name, _read_at(fd), max_size=1 << 30)
    except FormatError as exc:
        raise ConvertError(f"nydus blob {blob!r} is not a valid nydus blob layer: {exc}") from None
    finally:
        os.close(fd)


def blob_meta_file(blob: str) -> bytes | None:
    """The ``<blob id>.blob.meta`` content of a RAFS v6 layer (rafs-format.md §3.9), or None (v5, no chunks).

    Built from the ToC sections ``blob.meta`` (decompressed ci area), zero
    padding to 4 KiB and ``blob.meta.header``, as nydus-snapshotter's Merge does.
    """
    try:
        fd = os.open(blob, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConvertError(f"nydus blob {blob!r}: {exc.strerror}") from None
    try:
        tail = BlobTail.parse(_read_at(fd), os.fstat(fd).st_size)
        if "blob.meta" not in tail or tail.toc is None or tail.toc.get("blob.meta.header") is None:
            return None
        ci = tail.extract("blob.meta", _read_at(fd), max_size=1 << 30)
        header = tail.extract("blob.meta.header", _read_at(fd))
    except FormatError as exc:
        raise ConvertError(f"nydus blob {blob!r}: cannot read its blob meta: {exc}") from None
    finally:
        os.close(fd)
    return ci + bytes(-len(ci) % 4096) + header


def _hex(digest: str, what: str) -> str:
    algo, _, hexd = digest.partition(":")
    if algo != "sha256" or len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise ConvertError(f"{what}: {digest!r} is not a sha256:<64 hex> digest")
    return hexd


def _tar_member(tf: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if data is None:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)
    else:
        info.mode = 0o444
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))


def merge(layers: list[Layer], dest: str | os.PathLike | BinaryIO, opt: MergeOption | None = None) -> list[str]:
    """Merge the bootstraps of nydus blob ``layers`` (lowest first) into one; returns the blob digests it uses.

    The merged bootstrap (or, with ``opt.with_tar``, a tar holding
    ``image/image.boot`` and the v6 ``image/<hex>.blob.meta`` files) goes to
    ``dest`` (a path, written atomically, or a writable binary file).  The
    returned list is the merged blob table as ``sha256:<hex>`` digests, in
    table order (layers whose files were all deleted by upper layers drop out).
    """
    opt = opt or MergeOption()
    if not layers:
        raise ConvertError("merge: no layers given")
    try:
        fs_version = opt.fs_version_int()
    except ValueError as exc:
        raise ConvertError(f"invalid merge option: {exc}") from None
    deadline = _deadline(opt.timeout)
    work = _work_dir(opt.work_dir)
    tmp_dir = tempfile.mkdtemp(prefix="nydus-merge-", dir=work)
    try:
        boots, hexes, metas = [], [], []
        for i, layer in enumerate(layers):
            if deadline is not None and time.monotonic() > deadline:
                raise ConvertError(f"merge timed out after {opt.timeout} (at layer {i}, {layer.digest})")
            hexd = _hex(layer.digest, f"merge: layer {i}")
            try:
                boot = read_layer_section(os.fsdecode(layer.blob), "image.boot")
            except ConvertError as exc:
                raise ConvertError(f"merge: layer {i} ({layer.digest}): {exc}") from None
            path = os.path.join(tmp_dir, hexd)
            if os.path.exists(path):
                raise ConvertError(f"merge: layer {i} ({layer.digest}) appears twice")
            with open(path, "wb") as f:
                f.write(boot)
            boots.append(path)
            hexes.append(hexd)
            if opt.with_tar and fs_version == 6:
                meta = blob_meta_file(os.fsdecode(layer.blob))
                if meta is not None:
                    metas.append((hexd, meta))
        merged = os.path.join(tmp_dir, "merged.boot")
        mopts = MergeOptions(bootstrap=merged, chunk_dict=opt.chunk_dict_path, prefetch_policy="fs",
                             prefetch_patterns=_patterns(opt.prefetch_patterns), blob_digests=hexes)
        try:
            result = _merge(boots, mopts)
        except (BuildError, FormatError) as exc:
            raise ConvertError(f"merge: {exc}") from None
        if result.fs_version != fs_version:
            raise ConvertError(f"merge: the layers are RAFS v{result.fs_version}, the option asks for "
                               f"v{fs_version}")
        with open(merged, "rb") as f:
            bootstrap = f.read()
        if opt.with_tar:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                _tar_member(tf, "image", None)
                _tar_member(tf, "image/image.boot", bootstrap)
                used = set(result.blobs)
                for hexd, meta in metas:
                    if hexd in used:
                        _tar_member(tf, f"image/{hexd}.blob.meta", meta)
            payload = buf.getvalue()
        else:
            payload = bootstrap
        digests = ["sha256:" + b for b in result.blobs]
        if opt.backend is not None:
            for d in digests:
                try:
                    opt.backend.check(d)
                except Exception as exc:
                    raise ConvertError(f"merge: blob {d} is not in the {opt.backend.type()} backend: {exc}") from exc
        if _is_path(dest):
            final = os.fsdecode(dest)
            tmp = final + ".tmp-merge"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, final)
        else:
            dest.write(payload)  # type: ignore[union-attr]
        return digests
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def unpack(nydus_blob: str | os.PathLike, dest: str | os.PathLike | BinaryIO,
           opt: UnpackOption | None = None) -> int:
    """Write the tree of the nydus blob layer file ``nydus_blob`` as an OCI layer tar; returns the entry count.

    Chunk data is read, decompressed and digest-checked from the layer
    itself, so a corrupt layer is reported (naming blob and chunk), never
    turned into a wrong tar.
    """
    opt = opt or UnpackOption()
    blob = os.fsdecode(nydus_blob)
    work = _work_dir(opt.work_dir)
    tmp_dir = tempfile.mkdtemp(prefix="nydus-unpack-", dir=work)
    try:
        boot = os.path.join(tmp_dir, "image.boot")
        with open(boot, "wb") as f:
            f.write(read_layer_section(blob, "image.boot"))
        out = os.fsdecode(dest) if _is_path(dest) else os.path.join(tmp_dir, "layer.tar")
        try:
            count = _unpack(boot, out, blob=blob)
        except (BuildError, FormatError) as exc:
            raise ConvertError(f"unpack {blob!r}: {exc}") from None
        if not _is_path(dest):
            with open(out, "rb") as f:
                shutil.copyfileobj(f, dest, _COPY)  # type: ignore[arg-type]
        return count
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
