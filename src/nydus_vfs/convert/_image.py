"""Whole images: convert an OCI image in a registry to a Nydus image, and check one (nydus-surface.md §5.2, §5.4).

:func:`convert_image` (``nydusify convert``):

1. Read the source manifest (or index: pick ``--platform`` s, default the
   host's, or all of them).
2. Per layer, concurrently (``concurrency`` at a time): download it (digest
   checked) into the work dir, :func:`pack` it in a worker thread, ``HEAD`` the
   target and push it unless present, as soon as it is packed.
3. :func:`merge` the packed layers into the bootstrap layer (a gzip tar with
   ``image/image.boot`` and the v6 ``.blob.meta`` files), push it, push the
   rewritten config (``rootfs.diff_ids``, a "Nydus Converter" history entry).
4. Push the manifest (layers and annotations exactly as nydus-surface.md §5.4) and, for several
   platforms or ``--merge-platform``, the index: **tags move last**, so any
   failure before leaves the target tag where it was.

The work dir holds one private sub-directory per run, removed on success and
on failure alike.

:func:`check_image` (``nydusify check``): the manifest rules of nydus-surface.md §5.4, the
bootstrap layer's ``image/image.boot`` validated by the builder's ``check``,
its blob table against the manifest's blob layers, every blob present in the
registry with the right size; with a source image, the two file trees are
compared (:mod:`._tree`).
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import hashlib
import io
import json
import logging
import os
import platform as _platform
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from ..builder import check as _builder_check
from ..builder import unpack as _builder_unpack
from ..errors import BuildError, ConvertError
from ._distribution import (DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, MANIFEST_TYPES, OCI_INDEX, OCI_MANIFEST,
                            Reference, RegistryClient, _check_digest)
from ._mount import NydusdMount, fuse_mount_reason, nydusd_command, nydusd_config, write_nydusd_config
from ._pack import merge, pack
from ._tree import FileTree, diff_trees
from ._types import (BOOTSTRAP_FILE_NAME_IN_LAYER, LAYER_ANNOTATION_FS_VERSION, LAYER_ANNOTATION_NYDUS_BLOB,
                     LAYER_ANNOTATION_NYDUS_BOOTSTRAP, LAYER_ANNOTATION_UNCOMPRESSED, MANIFEST_OS_FEATURE_NYDUS,
                     MEDIA_TYPE_NYDUS_BLOB, MEDIA_TYPE_NYDUS_CONFIG, MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT, Backend,
                     Layer, MergeOption, PackOption)

__all__ = ["ConvertOptions", "ConvertResult", "CheckOptions", "convert_image", "check_image", "copy_image",
           "host_platform", "fetch_nydus_bootstrap", "OCI_LAYER_GZIP", "DOCKER_LAYER_GZIP"]

log = logging.getLogger("nydus_vfs.convert")

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
_SOURCE_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar", OCI_LAYER_GZIP, "application/vnd.oci.image.layer.v1.tar+zstd",
    DOCKER_LAYER_GZIP, "application/vnd.docker.image.rootfs.diff.tar",
}
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}

Progress = Callable[[str, str], None]


def host_platform() -> str:
    """``linux/<GOARCH>`` of this machine, the default ``--platform``."""
    m = _platform.machine()
    return f"linux/{_ARCH.get(m, m)}"


@dataclass
class ConvertOptions:
    """What ``nydusify convert`` takes (flag names of nydus-surface.md §5.2 in Python spelling)."""

    source: str
    target: str
    source_insecure: bool = False
    target_insecure: bool = False
    plain_http: bool = False
    fs_version: str = "6"
    compressor: str = "zstd"
    chunk_size: int = 0x100000
    prefetch_patterns: str = ""
    platforms: list[str] = field(default_factory=list)
    all_platforms: bool = False
    merge_platform: bool = False
    oci: bool = False
    work_dir: str = "./tmp"
    push_chunk_size: int = 0
    concurrency: int = 0
    #: Blob store for the data blobs (``--backend-type``): they go there and the manifest keeps only the
    #: bootstrap layer (nydus-surface.md §5.4).
    backend: Backend | None = None


@dataclass
class ConvertResult:
    """Figures of one conversion; :meth:`metrics` is upstream's ``--output-json`` document."""

    target: str
    manifest_digest: str
    media_type: str
    source_size: int
    target_size: int
    elapsed_ns: int
    platforms: list[str]
    layers_pushed: int = 0
    layers_skipped: int = 0

    def metrics(self) -> dict[str, Any]:
        return {"SourceImageSize": self.source_size, "TargetImageSize": self.target_size,
                "ConversionElapsed": self.elapsed_ns}


@dataclass
class _Packed:
    digest: str
    size: int
    path: str
    source_digest: str


def _loads(body: bytes, what: str) -> dict:
    try:
        doc = json.loads(body)
    except ValueError:
        raise ConvertError(f"{what} is not JSON") from None
    if not isinstance(doc, dict):
        raise ConvertError(f"{what} is not a JSON object")
    return doc


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _platform_of(desc: dict) -> str:
    p = desc.get("platform") if isinstance(desc, dict) else None
    if not isinstance(p, dict):
        return "/"
    text = f"{p.get('os', '')}/{p.get('architecture', '')}"
    if p.get("variant"):
        text += f"/{p['variant']}"
    return text


def _matches(want: str, have: str) -> bool:
    w, h = want.split("/"), have.split("/")
    return w[:2] == h[:2] and (len(w) < 3 or w[2:] == h[2:])


def _work(work_dir: str) -> str:
    try:
        os.makedirs(work_dir, exist_ok=True)
        return tempfile.mkdtemp(prefix="nydusify-", dir=work_dir)
    except OSError as exc:
        raise ConvertError(f"work dir {work_dir!r}: {exc.strerror}") from None


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300))


def _gzip_file(src: bytes, dest: str) -> tuple[str, int]:
    with open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(src)
    h = hashlib.sha256()
    with open(dest, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            h.update(piece)
    return "sha256:" + h.hexdigest(), os.path.getsize(dest)


class _Converter:
    def __init__(self, opts: ConvertOptions, progress: Progress | None, session: aiohttp.ClientSession,
                 work: str) -> None:
        self.opts = opts
        self.progress = progress or (lambda label, text: None)
        self.src = Reference.parse(opts.source)
        self.dst = Reference.parse(opts.target)
        if self.dst.digest:
            raise ConvertError(f"target {opts.target!r} must be a tag, not a digest")
        self.sc = RegistryClient(session, self.src.registry, plain_http=opts.plain_http,
                                 insecure=opts.source_insecure)
        self.tc = (self.sc if (self.src.registry == self.dst.registry
                               and opts.source_insecure == opts.target_insecure)
                   else RegistryClient(session, self.dst.registry, plain_http=opts.plain_http,
                                       insecure=opts.target_insecure))
        self.work = work
        workers = opts.concurrency or max(1, min(4, os.cpu_count() or 1))
        self.sem = asyncio.Semaphore(workers)
        # Our own pool: after a failure, convert_image waits for packs still running in it (a thread
        # cannot be cancelled) before it removes the work dir they write into.
        self.pool = ThreadPoolExecutor(max_workers=workers + 1, thread_name_prefix="nydusify")
        self.layer_tasks: dict[str, asyncio.Task] = {}
        self.pushed_blobs: set[str] = set()
        self.pushed = 0
        self.skipped = 0
        self.source_size = 0
        self.target_size = 0
        self.pack_opt = PackOption(work_dir=work, fs_version=opts.fs_version, compressor=opts.compressor,
                                   chunk_size=opts.chunk_size, prefetch_patterns=opts.prefetch_patterns)
        try:
            self.fs_version = self.pack_opt.fs_version_int()
        except ValueError as exc:
            raise ConvertError(str(exc)) from None

    async def push_file(self, path: str, digest: str, size: int, label: str) -> None:
        if digest in self.pushed_blobs:
            return
        if await self.tc.blob_exists(self.dst.repository, digest) is not None:
            self.skipped += 1
            self.progress(label, f"blob {digest[:19]} already in the target, skipped")
        else:
            await self.tc.push_blob(self.dst.repository, path, digest, size, chunk_size=self.opts.push_chunk_size,
                                    what=f"{label}: push blob {digest}")
            self.pushed += 1
            self.progress(label, f"pushed {digest[:19]} ({size} bytes)")
        self.pushed_blobs.add(digest)

    async def push_to_backend(self, path: str, digest: str, size: int, label: str) -> None:
        backend = self.opts.backend
        assert backend is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.pool, backend.check, digest)
            self.skipped += 1
            self.progress(label, f"blob {digest[:19]} already in the {backend.type()} backend, skipped")
            return
        except FileNotFoundError:
            pass
        await loop.run_in_executor(self.pool, backend.push, path, digest)
        self.pushed += 1
        self.progress(label, f"pushed {digest[:19]} ({size} bytes) to the {backend.type()} backend")

    async def _convert_layer(self, index: int, count: int, desc: dict) -> _Packed:
        digest = desc.get("digest", "")
        label = f"layer {index + 1}/{count} {str(digest)[:19]}"
        try:
            if desc.get("mediaType") not in _SOURCE_LAYER_TYPES:
                raise ConvertError(f"unsupported layer media type {desc.get('mediaType')!r}")
            hexd = _check_digest(digest, "layer digest").partition(":")[2]
            async with self.sem:
                src_path = os.path.join(self.work, f"src-{hexd}")
                self.progress(label, "pulling")
                size = await self.sc.download_blob(self.src.repository, digest, src_path)
                self.progress(label, f"pulled {size} bytes, packing")
                out = os.path.join(self.work, f"nydus-{hexd}")
                loop = asyncio.get_running_loop()
                res = await loop.run_in_executor(self.pool, self._pack_file, src_path, out)
                self.progress(label, f"packed into {res.digest[:19]} ({res.size} bytes)")
            if self.opts.merge_platform:
                await self.push_file(src_path, digest, size, label + " (source)")
            os.unlink(src_path)
            if self.opts.backend is not None:
                await self.push_to_backend(out, res.digest, res.size, label)
            else:
                await self.push_file(out, res.digest, res.size, label)
            return _Packed(res.digest, res.size, out, digest)
        except ConvertError as exc:
            raise ConvertError(f"{label}: {exc}") from None
        except OSError as exc:
            raise ConvertError(f"{label}: {exc}") from None

    def _pack_file(self, src_path: str, out: str):
        with open(src_path, "rb") as f:
            return pack(f, out, self.pack_opt)

    def layer(self, index: int, count: int, desc: dict) -> asyncio.Task:
        key = str(desc.get("digest", f"#{index}"))
        task = self.layer_tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(self._convert_layer(index, count, desc))
            self.layer_tasks[key] = task
        return task

    async def convert_manifest(self, body: bytes, media_type: str, what: str) -> tuple[bytes, str, dict]:
        """Convert one platform's manifest; returns (nydus manifest bytes, its media type, its config doc)."""
        doc = _loads(body, what)
        layers = doc.get("layers")
        config_desc = doc.get("config")
        if not isinstance(layers, list) or not isinstance(config_desc, dict):
            raise ConvertError(f"{what} has no layers/config")
        for i, d in enumerate(layers):
            if not isinstance(d, dict) or not isinstance(d.get("size", 0), int) or d.get("size", 0) < 0:
                raise ConvertError(f"{what}: layer {i} is not a valid descriptor")
        if any(isinstance(d, dict) and d.get("mediaType") == MEDIA_TYPE_NYDUS_BLOB for d in layers):
            raise ConvertError(f"{what} is already a nydus image")
        config = _loads(await self.sc.get_blob(self.src.repository, config_desc.get("digest", "")),
                        f"config of {what}")
        self.source_size += sum(int(d.get("size", 0)) for d in layers)
        tasks = [self.layer(i, len(layers), d) for i, d in enumerate(layers)]
        try:
            packed = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        # Merge into the bootstrap layer.
        loop = asyncio.get_running_loop()
        sink = io.BytesIO()
        mopt = MergeOption(work_dir=self.work, fs_version=self.opts.fs_version, with_tar=True,
                           prefetch_patterns=self.opts.prefetch_patterns)
        used = await loop.run_in_executor(
            self.pool, merge, [Layer(p.digest, p.path, p.source_digest) for p in packed], sink, mopt)
        boot_tar = sink.getvalue()
        boot_path = os.path.join(self.work, f"bootstrap-{len(os.listdir(self.work))}")
        boot_digest, boot_size = await loop.run_in_executor(self.pool, _gzip_file, boot_tar, boot_path)
        await self.push_file(boot_path, boot_digest, boot_size, "bootstrap layer")
        self.progress("bootstrap layer", f"{boot_digest[:19]} ({boot_size} bytes), blobs used: {len(used)}")

        docker = media_type == DOCKER_MANIFEST and not self.opts.oci
        by_digest = {p.digest: p for p in packed}
        new_layers = []
        for d in used:
            p = by_digest.get(d)
            if p is None:
                raise ConvertError(f"{what}: the merged bootstrap names blob {d}, which no layer produced")
            self.target_size += p.size
            if self.opts.backend is None:   # with a blob store the manifest keeps only the bootstrap layer
                new_layers.append({"mediaType": MEDIA_TYPE_NYDUS_BLOB, "digest": d, "size": p.size,
                                   "annotations": {LAYER_ANNOTATION_NYDUS_BLOB: "true"}})
        new_layers.append({"mediaType": DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP, "digest": boot_digest,
                           "size": boot_size,
                           "annotations": {LAYER_ANNOTATION_NYDUS_BOOTSTRAP: "true",
                                           LAYER_ANNOTATION_FS_VERSION: str(self.fs_version)}})
        self.target_size += boot_size
        for layer in new_layers:
            layer["annotations"].pop(LAYER_ANNOTATION_UNCOMPRESSED, None)
        new_config = copy.deepcopy(config)
        blob_diff_ids = list(used) if self.opts.backend is None else []
        new_config["rootfs"] = {"type": "layers",
                                "diff_ids": blob_diff_ids + ["sha256:" + hashlib.sha256(boot_tar).hexdigest()]}
        history = new_config.get("history")
        if not isinstance(history, list):
            history = []
        history.append({"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"})
        new_config["history"] = history
        config_bytes = _dumps(new_config)
        config_digest = await self.tc.push_bytes(self.dst.repository, config_bytes, f"config of {what}")
        if self.opts.merge_platform:
            config_type = MEDIA_TYPE_NYDUS_CONFIG
        else:
            config_type = DOCKER_CONFIG if docker else OCI_CONFIG
        manifest = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
                    "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_bytes)},
                    "layers": new_layers}
        if isinstance(doc.get("annotations"), dict) and not docker:
            manifest["annotations"] = doc["annotations"]
        if self.opts.merge_platform:
            # Keep the source image in the target too: push its config (layers were pushed by _convert_layer).
            src_config = await self.sc.get_blob(self.src.repository, config_desc["digest"])
            await self.tc.push_bytes(self.dst.repository, src_config, f"source config of {what}")
        return _dumps(manifest), manifest["mediaType"], new_config

    async def run(self) -> ConvertResult:
        t0 = time.monotonic_ns()
        body, media_type, digest = await self.sc.get_manifest(self.src.repository, self.src.ref)
        what = f"source {self.src}"
        picks: list[tuple[dict | None, bytes, str, str]] = []
        source_index: dict | None = None
        if media_type in INDEX_TYPES:
            source_index = _loads(body, what)
            manifests = [m for m in source_index.get("manifests") or [] if isinstance(m, dict)]
            runnable = [m for m in manifests if _platform_of(m).split("/")[0] not in ("unknown", "")]
            if self.opts.all_platforms:
                chosen = runnable
            else:
                wants = self.opts.platforms or [host_platform()]
                chosen = [m for m in runnable if any(_matches(w, _platform_of(m)) for w in wants)]
            if not chosen:
                raise ConvertError(f"{what}: no manifest for platform(s) "
                                   f"{', '.join(self.opts.platforms or [host_platform()])}; the index has "
                                   f"{', '.join(_platform_of(m) for m in manifests) or 'none'}")
            for m in chosen:
                mbody, mtype, mdigest = await self.sc.get_manifest(self.src.repository, m.get("digest", ""))
                if mtype not in MANIFEST_TYPES:
                    raise ConvertError(f"{what}: manifest {m.get('digest')} has media type {mtype!r}")
                picks.append((m, mbody, mtype, mdigest))
        elif media_type in MANIFEST_TYPES:
            picks.append((None, body, media_type, digest))
        else:
            raise ConvertError(f"{what}: unsupported manifest media type {media_type!r}")

        converted = []
        for desc, mbody, mtype, mdigest in picks:
            label = f"{what} ({_platform_of(desc)})" if desc else what
            nbody, ntype, nconfig = await self.convert_manifest(mbody, mtype, label)
            converted.append((desc, mbody, mtype, mdigest, nbody, ntype, nconfig))

        use_index = self.opts.merge_platform or len(converted) > 1 or (
            source_index is not None and self.opts.all_platforms)
        repo = self.dst.repository
        if not use_index:
            nbody, ntype = converted[0][4], converted[0][5]
            final_digest = await self.tc.put_manifest(repo, self.dst.ref, nbody, ntype)
            final_type = ntype
        else:
            docker_list = (source_index is not None and media_type == DOCKER_LIST
                           or source_index is None and converted[0][2] == DOCKER_MANIFEST) and not self.opts.oci
            entries = []
            for desc, mbody, mtype, mdigest, nbody, ntype, nconfig in converted:
                plat = dict((desc or {}).get("platform") or {}) or {
                    "os": nconfig.get("os", "linux"), "architecture": nconfig.get("architecture", "amd64")}
                if self.opts.merge_platform:
                    await self.tc.put_manifest(repo, mdigest, mbody, mtype)
                    entries.append({"mediaType": mtype, "digest": mdigest, "size": len(mbody), "platform": plat})
                ndigest = await self.tc.put_manifest(repo, "sha256:" + hashlib.sha256(nbody).hexdigest(), nbody,
                                                     ntype)
                entry = {"mediaType": ntype, "digest": ndigest, "size": len(nbody), "platform": dict(plat)}
                if self.opts.merge_platform:
                    entry["artifactType"] = MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT
                    entry["platform"]["os.features"] = [MANIFEST_OS_FEATURE_NYDUS]
                entries.append(entry)
            index = {"schemaVersion": 2, "mediaType": DOCKER_LIST if docker_list else OCI_INDEX,
                     "manifests": entries}
            final_type = index["mediaType"]
            final_digest = await self.tc.put_manifest(repo, self.dst.ref, _dumps(index), final_type)
        self.progress("manifest", f"{self.dst} -> {final_digest}")
        return ConvertResult(target=str(self.dst), manifest_digest=final_digest, media_type=final_type,
                             source_size=self.source_size, target_size=self.target_size,
                             elapsed_ns=time.monotonic_ns() - t0,
                             platforms=[_platform_of(c[0]) if c[0] else "" for c in converted],
                             layers_pushed=self.pushed, layers_skipped=self.skipped)


async def convert_image(opts: ConvertOptions, progress: Progress | None = None) -> ConvertResult:
    """Convert ``opts.source`` to a Nydus image at ``opts.target`` (see the module docstring)."""
    work = _work(opts.work_dir)
    conv = None
    try:
        async with _session() as session:
            conv = _Converter(opts, progress, session, work)
            return await conv.run()
    finally:
        if conv is not None:
            await asyncio.to_thread(conv.pool.shutdown, True)
        shutil.rmtree(work, ignore_errors=True)


# -- check -------------------------------------------------------------------------------------------------------

@dataclass
class CheckOptions:
    """What ``nydusify check`` takes."""

    target: str
    source: str | None = None
    target_insecure: bool = False
    source_insecure: bool = False
    plain_http: bool = False
    platform: str | None = None
    work_dir: str = "./output"
    #: Where the data blobs are when the image was converted with ``--backend-type``.
    backend: Backend | None = None
    #: How the Nydus image's files are read for the comparison with ``source``:
    #: True mounts it with ``nydusd`` (from the registry; from downloaded blobs
    #: for an external ``backend``), False unpacks it with the builder, None
    #: mounts when a FUSE mount can be made here (root, /dev/fuse) and unpacks
    #: otherwise.  The report line says which was used.
    mount: bool | None = None
    #: The nydusd command to mount with (split like a shell); default ours.
    nydusd: str | None = None


async def _pick_manifest(client: RegistryClient, ref: Reference, platform: str, *, nydus: bool | None
                         ) -> tuple[dict, str, str]:
    body, media_type, digest = await client.get_manifest(ref.repository, ref.ref)
    if media_type in INDEX_TYPES:
        index = _loads(body, f"index {ref}")
        entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)
                   and _matches(platform, _platform_of(m))]

        def is_nydus(m: dict) -> bool:
            return (m.get("artifactType") == MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT
                    or MANIFEST_OS_FEATURE_NYDUS in ((m.get("platform") or {}).get("os.features") or []))

        if nydus is not None and any(is_nydus(m) for m in entries):
            entries = [m for m in entries if is_nydus(m) == nydus]
        if not entries:
            raise ConvertError(f"{ref}: the index has no manifest for {platform}")
        body, media_type, digest = await client.get_manifest(ref.repository, entries[0]["digest"])
    if media_type not in MANIFEST_TYPES:
        raise ConvertError(f"{ref}: manifest media type {media_type!r} is not an image manifest")
    return _loads(body, f"manifest {ref}"), media_type, digest


def _check_rules(manifest: dict, config: dict) -> list[str]:
    """The manifest rules of nydus-surface.md §5.4; a list of violations."""
    bad = []
    layers = manifest.get("layers") or []
    if not isinstance(layers, list) or not layers:
        return ["the manifest has no layers"]
    if not all(isinstance(d, dict) for d in layers) or not isinstance(config.get("rootfs", {}), dict):
        return ["the manifest's layers or the config's rootfs are not JSON objects"]
    boot = layers[-1]
    if boot.get("mediaType") not in (OCI_LAYER_GZIP, DOCKER_LAYER_GZIP):
        bad.append(f"bootstrap layer media type {boot.get('mediaType')!r} is not a tar+gzip type")
    ann = boot.get("annotations") or {}
    if ann.get(LAYER_ANNOTATION_NYDUS_BOOTSTRAP) != "true":
        bad.append(f"the last layer lacks {LAYER_ANNOTATION_NYDUS_BOOTSTRAP}: \"true\"")
    if ann.get(LAYER_ANNOTATION_FS_VERSION) not in ("5", "6"):
        bad.append(f"the bootstrap layer's {LAYER_ANNOTATION_FS_VERSION} is {ann.get(LAYER_ANNOTATION_FS_VERSION)!r}")
    for i, layer in enumerate(layers[:-1]):
        if layer.get("mediaType") != MEDIA_TYPE_NYDUS_BLOB:
            bad.append(f"layer {i} media type {layer.get('mediaType')!r} is not {MEDIA_TYPE_NYDUS_BLOB}")
        if (layer.get("annotations") or {}).get(LAYER_ANNOTATION_NYDUS_BLOB) != "true":
            bad.append(f"layer {i} lacks {LAYER_ANNOTATION_NYDUS_BLOB}: \"true\"")
    for i, layer in enumerate(layers):
        if LAYER_ANNOTATION_UNCOMPRESSED in (layer.get("annotations") or {}):
            bad.append(f"layer {i} still carries {LAYER_ANNOTATION_UNCOMPRESSED}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(layers):
        bad.append(f"config rootfs.diff_ids has {len(diff_ids)} entries for {len(layers)} layers")
    else:
        for i, layer in enumerate(layers[:-1]):
            if diff_ids[i] != layer.get("digest"):
                bad.append(f"diff_id {i} {diff_ids[i]} is not blob layer digest {layer.get('digest')}")
    return bad


def _extract_bootstrap(gz: bytes) -> bytes:
    try:
        with tarfile.open(fileobj=io.BytesIO(gz), mode="r:*") as tf:
            for m in tf:
                if m.name.lstrip("./") == BOOTSTRAP_FILE_NAME_IN_LAYER and m.isfile():
                    f = tf.extractfile(m)
                    return f.read() if f else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ConvertError(f"the bootstrap layer is not a readable tar: {exc}") from None
    raise ConvertError(f"the bootstrap layer has no {BOOTSTRAP_FILE_NAME_IN_LAYER}")


async def check_image(opts: CheckOptions, progress: Progress | None = None) -> list[str]:
    """Check the Nydus image ``opts.target``; returns the report lines, raises ConvertError listing violations."""
    say = progress or (lambda label, text: None)
    platform = opts.platform or host_platform()
    target = Reference.parse(opts.target)
    work = _work(opts.work_dir)
    report: list[str] = []
    try:
        async with _session() as session:
            tc = RegistryClient(session, target.registry, plain_http=opts.plain_http, insecure=opts.target_insecure)
            manifest, mtype, mdigest = await _pick_manifest(tc, target, platform, nydus=True)
            config = _loads(await tc.get_blob(target.repository, (manifest.get("config") or {}).get("digest", "")),
                            f"config of {target}")
            problems = _check_rules(manifest, config)
            if problems:
                raise ConvertError(f"{target} ({mdigest}) breaks the nydus manifest rules:\n  " +
                                   "\n  ".join(problems))
            report.append(f"manifest {mdigest}: {len(manifest['layers']) - 1} blob layer(s) + bootstrap layer, "
                          "media types and annotations valid")
            say("check", report[-1])
            layers = manifest["layers"]
            boot_desc = layers[-1]
            if opts.backend is not None and len(layers) > 1:
                raise ConvertError(f"{target}: has blob layers although its blobs are said to be in the "
                                   f"{opts.backend.type()} backend")
            boot_gz = await tc.get_blob(target.repository, boot_desc["digest"], max_size=1 << 30)
            boot_tar = gzip.decompress(boot_gz)
            diff_ids = config["rootfs"]["diff_ids"]
            if diff_ids[-1] != "sha256:" + hashlib.sha256(boot_tar).hexdigest():
                raise ConvertError(f"{target}: the bootstrap layer's diff_id does not match its uncompressed tar")
            boot_path = os.path.join(work, "nydus_bootstrap")
            with open(boot_path, "wb") as f:
                f.write(_extract_bootstrap(boot_gz))
            try:
                result = await asyncio.get_running_loop().run_in_executor(None, _builder_check, boot_path)
            except BuildError as exc:
                raise ConvertError(f"{target}: the bootstrap is invalid: {exc}") from None
            want_fs = boot_desc["annotations"][LAYER_ANNOTATION_FS_VERSION]
            if str(result.fs_version) != want_fs:
                raise ConvertError(f"{target}: the bootstrap is RAFS v{result.fs_version}, the annotation says "
                                   f"{want_fs}")
            blob_ids = ["sha256:" + b.blob_id for b in result.blobs]
            layer_digests = [d["digest"] for d in layers[:-1]]
            if opts.backend is not None:
                for b in blob_ids:
                    try:
                        await asyncio.get_running_loop().run_in_executor(None, opts.backend.check, b)
                    except FileNotFoundError:
                        raise ConvertError(f"{target}: blob {b} is missing from the {opts.backend.type()} "
                                           "backend") from None
                report.append(f"blobs: all {len(blob_ids)} present in the {opts.backend.type()} backend")
                say("check", report[-1])
            elif sorted(blob_ids) != sorted(layer_digests):
                raise ConvertError(f"{target}: the bootstrap's blobs {blob_ids} are not the manifest's blob layers "
                                   f"{layer_digests}")
            report.append(f"bootstrap: RAFS v{result.fs_version}, {result.inodes} inodes, valid; blobs = blob layers")
            say("check", report[-1])
            for d in layers[:-1] if opts.backend is None else ():
                size = await tc.blob_exists(target.repository, d["digest"])
                if size is None:
                    raise ConvertError(f"{target}: blob layer {d['digest']} is missing from the registry")
                if size >= 0 and size != d.get("size"):
                    raise ConvertError(f"{target}: blob layer {d['digest']} is {size} bytes, the manifest says "
                                       f"{d.get('size')}")
            if opts.backend is None:
                report.append(f"blobs: all {len(layers) - 1} present with their sizes")
                say("check", report[-1])
            if opts.source:
                report.append(await _compare_with_source(session, opts, tc, target, blob_ids, boot_path, work,
                                                         platform))
                say("check", report[-1])
            with open(os.path.join(work, "nydus_manifest.json"), "wb") as f:
                f.write(_dumps(manifest))
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _compare_with_source(session, opts: CheckOptions, tc: RegistryClient, target: Reference,
                               blob_ids: list[str], boot_path: str, work: str, platform: str) -> str:
    source = Reference.parse(opts.source)  # type: ignore[arg-type]
    sc = RegistryClient(session, source.registry, plain_http=opts.plain_http, insecure=opts.source_insecure)
    smanifest, _, sdigest = await _pick_manifest(sc, source, platform, nydus=False)
    if any(d.get("mediaType") == MEDIA_TYPE_NYDUS_BLOB for d in smanifest.get("layers") or []):
        raise ConvertError(f"source {source} is itself a nydus image")
    src_tree = FileTree()
    for i, d in enumerate(smanifest.get("layers") or []):
        path = os.path.join(work, f"src-{i}")
        await sc.download_blob(source.repository, d["digest"], path)
        with open(path, "rb") as f:
            src_tree.apply_layer(f, name=f"source layer {i} {d['digest']}")
        os.unlink(path)
    loop = asyncio.get_running_loop()
    reason = fuse_mount_reason()
    if opts.mount and reason:
        raise ConvertError(f"cannot mount {target} to compare its files: {reason} (check without mounting "
                           "unpacks the image instead)")
    mount = reason is None if opts.mount is None else opts.mount
    blob_dir = None
    if opts.backend is not None or not mount:
        # nydusd reads a registry itself; other blobs are downloaded for it or the builder.
        blob_dir = os.path.join(work, "blobs")
        os.makedirs(blob_dir, exist_ok=True)
        for b in blob_ids:
            dest = os.path.join(blob_dir, b.split(":")[1])
            if opts.backend is not None:
                fetch = getattr(opts.backend, "fetch", None)
                if fetch is None:
                    raise ConvertError(f"cannot read blobs back from the {opts.backend.type()} backend")
                await loop.run_in_executor(None, fetch, b, dest)
            else:
                await tc.download_blob(target.repository, b, dest)
    if mount:
        how = "mounted by nydusd"
        config = write_nydusd_config(os.path.join(work, "nydusd.json"), nydusd_config(
            target, plain_http=opts.plain_http, insecure=opts.target_insecure,
            cache_dir=os.path.join(work, "cache"), blob_dir=blob_dir))
        mnt = NydusdMount(nydusd_command(opts.nydusd), config, boot_path, os.path.join(work, "mnt"),
                          log_path=os.path.join(work, "nydusd.log"))

        def walk() -> FileTree:
            with mnt:
                tree = FileTree()
                tree.add_directory(mnt.mountpoint)
                return tree

        nydus_tree = await loop.run_in_executor(None, walk)
    else:
        how = f"unpacked by nydus-image ({reason})" if reason else "unpacked by nydus-image"
        out = os.path.join(work, "nydus.tar")
        try:
            await loop.run_in_executor(None, lambda: _builder_unpack(boot_path, out, blob_dir=blob_dir))
        except BuildError as exc:
            raise ConvertError(f"{target}: cannot read the image's files: {exc}") from None
        nydus_tree = FileTree()
        with open(out, "rb") as f:
            nydus_tree.apply_layer(f, name="nydus image", whiteouts=False)
    diffs = diff_trees(src_tree, nydus_tree)
    if diffs:
        raise ConvertError(f"{target} ({how}) differs from source {source} ({sdigest}):\n  " + "\n  ".join(diffs))
    return f"file trees: source {source} and {target} ({how}) are equal ({len(src_tree.entries)} entries)"


async def fetch_nydus_bootstrap(target: str, dest: str, *, plain_http: bool = False, insecure: bool = False,
                                platform: str | None = None) -> Reference:
    """Download the bootstrap (``image/image.boot``) of Nydus image ``target`` to ``dest``; returns its reference."""
    ref = Reference.parse(target)
    async with _session() as session:
        client = RegistryClient(session, ref.registry, plain_http=plain_http, insecure=insecure)
        manifest, _, digest = await _pick_manifest(client, ref, platform or host_platform(), nydus=True)
        layers = manifest.get("layers") or []
        if not layers or LAYER_ANNOTATION_NYDUS_BOOTSTRAP not in (layers[-1].get("annotations") or {}):
            raise ConvertError(f"{ref} ({digest}) is not a Nydus image: its last layer is not a bootstrap layer")
        gz = await client.get_blob(ref.repository, layers[-1]["digest"], max_size=1 << 30)
    data = _extract_bootstrap(gz)
    with open(dest, "wb") as f:
        f.write(data)
    return ref


async def copy_image(source: str, target: str, *, source_insecure: bool = False, target_insecure: bool = False,
                     plain_http: bool = False, platforms: list[str] | None = None, all_platforms: bool = False,
                     work_dir: str = "./tmp", push_chunk_size: int = 0, progress: Progress | None = None) -> str:
    """Copy an image (OCI or Nydus, manifest or index) between registries; returns the target's digest.

    Blobs the target already has are skipped; child manifests are put by
    digest and the tag last.  An index is copied whole with ``all_platforms``;
    otherwise the manifest of the chosen platform (default the host's) is.
    """
    say = progress or (lambda label, text: None)
    src, dst = Reference.parse(source), Reference.parse(target)
    if dst.digest:
        raise ConvertError(f"target {target!r} must be a tag, not a digest")
    work = _work(work_dir)
    try:
        async with _session() as session:
            sc = RegistryClient(session, src.registry, plain_http=plain_http, insecure=source_insecure)
            tc = RegistryClient(session, dst.registry, plain_http=plain_http, insecure=target_insecure)

            async def copy_blob(desc: dict, label: str) -> None:
                digest = desc.get("digest", "")
                if await tc.blob_exists(dst.repository, digest) is not None:
                    say(label, f"{digest[:19]} already in the target, skipped")
                    return
                path = os.path.join(work, digest.replace(":", "-"))
                size = await sc.download_blob(src.repository, digest, path)
                await tc.push_blob(dst.repository, path, digest, size, chunk_size=push_chunk_size,
                                   what=f"{label}: push blob {digest}")
                os.unlink(path)
                say(label, f"copied {digest[:19]} ({size} bytes)")

            async def copy_manifest(body: bytes, media_type: str, ref: str, label: str) -> str:
                doc = _loads(body, label)
                blobs = [doc.get("config") or {}] + list(doc.get("layers") or [])
                for i, d in enumerate(blobs):
                    await copy_blob(d, f"{label} {'config' if i == 0 else f'layer {i}/{len(blobs) - 1}'}")
                return await tc.put_manifest(dst.repository, ref, body, media_type)

            body, media_type, digest = await sc.get_manifest(src.repository, src.ref)
            if media_type in MANIFEST_TYPES:
                final = await copy_manifest(body, media_type, dst.ref, str(src))
            elif media_type in INDEX_TYPES:
                index = _loads(body, f"index {src}")
                entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
                if all_platforms:
                    for m in entries:
                        mbody, mtype, mdigest = await sc.get_manifest(src.repository, m.get("digest", ""))
                        await copy_manifest(mbody, mtype, mdigest, f"{src} ({_platform_of(m)})")
                    final = await tc.put_manifest(dst.repository, dst.ref, body, media_type)
                else:
                    wants = platforms or [host_platform()]
                    chosen = [m for m in entries if any(_matches(w, _platform_of(m)) for w in wants)
                              and m.get("artifactType") != MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT]
                    if not chosen:
                        raise ConvertError(f"{src}: no manifest for {', '.join(wants)}")
                    mbody, mtype, _ = await sc.get_manifest(src.repository, chosen[0]["digest"])
                    final = await copy_manifest(mbody, mtype, dst.ref, f"{src} ({_platform_of(chosen[0])})")
            else:
                raise ConvertError(f"{src}: unsupported manifest media type {media_type!r}")
            say("manifest", f"{dst} -> {final}")
            return final
    finally:
        shutil.rmtree(work, ignore_errors=True)
