"""The daemon: mounts, transports, backends, caches, tasks and the lifecycle, in one owner.

:class:`NydusDaemon` is the whole nydusd service as an asyncio object.  The
command line (``cli.nydusd``), the HTTP API (:mod:`.api`) and a Python program
embedding the service drive the same methods::

    async with NydusDaemon() as d:                      # INIT
        await d.mount("/pseudo_1", bootstrap, config)   # any time before STOPPED
        await d.serve_fuse("/mnt")                      # INIT -> READY -> RUNNING
        await d.serve_virtiofs("vhost-user-fs.sock")    # may run beside FUSE
        await d.serve_api("api.sock")
        await d.wait()                                  # until a signal, the API or the FUSE session ends
    # leaving the block stops the daemon: unmounts FUSE, releases everything

Ownership, and the order things are released in (``stop``): the API server
first (its socket file disappears, so drivers see the daemon going), then the
FUSE mount is detached *while the transport still serves* (the kernel may need
answers while it detaches), then the transports stop, prefetch tasks are
cancelled, every instance is unmounted and its blob device closed, and each
backend is closed when its last instance goes.  Backends are shared by
instances whose backend configs are alike (``BlobBackend.identity``), and the
blob layer shares per-blob cache state between them, so two mounts of images
with a common blob fetch each chunk once.

Lifecycle (``state.py``, nydus-surface.md §1.7): serving FUSE fires ``Mount``
then ``Start``; serving virtio-fs does the same as soon as the listener is up,
before any VMM connects (Kata polls for ``RUNNING``, nydus-surface.md §0 item
16).  :meth:`stop` fires ``Stop`` twice (RUNNING -> READY -> STOPPED, with the
unmount), :meth:`exit` fires ``Stop`` then ``Exit`` (STOPPED *without*
unmounting: hot upgrade hands the session to a successor).

Thread-safety: none; everything runs on the daemon's event loop.  Bootstrap
parsing and the blocking parts of (un)mounting run in worker threads so the
loop keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import errno
import logging
import os
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from .._version import version_info
from ..config import DaemonConfig, parse_daemon_config
from ..errors import ConfigError, FormatError, FsError, StorageError
from ..fs.metrics import FsMetrics
from ..fs import (PassthroughFs, RafsFs, Vfs, load_bootstrap, normalize_pseudo_path, prefetch_config,
                  prefetch_rafs)
from ..fuse import FuseServer
from ..storage import BlobBackend, BlobLayer, CacheSpec
from ..storage.backend import backend_events, create_backend
from ._errors import MountError, NotReadyError, ServiceError, UnsupportedError
from .metrics import DaemonMetrics
from .state import DaemonEvent, DaemonState, DaemonStateMachine

__all__ = [
    "NydusDaemon",
    "ServiceError",
    "MountError",
    "NotReadyError",
    "UnsupportedError",
    "FS_TYPES",
    "cache_from_config",
]

log = logging.getLogger("nydus_vfs.service")

#: ``fs_type`` values a mount accepts (nydus-surface.md §3.4), mapped to the kind served.
FS_TYPES = {"rafs": "rafs", "passthrough": "passthrough_fs", "passthroughfs": "passthrough_fs",
            "passthrough_fs": "passthrough_fs"}


_ALREADY_EXISTS = "object or filesystem already exists"

#: Settings ``PUT /api/v1/config`` accepts (nydus-surface.md §3.6), and the backend
#: method each is handed to (None, or a backend without it: the value is stored only;
#: no backend here acts on a Dragonfly scheduler).
_RUNTIME_SETTERS = {"registry_auth": "set_auth", "proxy_url": "set_proxy_url",
                    "dragonfly_scheduler_endpoint": None}
RUNTIME_CONFIG_KEYS = tuple(_RUNTIME_SETTERS)


def cache_from_config(config: DaemonConfig) -> CacheSpec:
    """The blob cache the config asks for; ConfigError for what is refused."""
    c = config.cache
    if c is None:
        return CacheSpec(kind="", work_dir=None, validate=False)
    if c.type == "fscache":
        raise ConfigError("cache.type: 'fscache' needs the singleton service, which is not supported yet")
    fc = c.filecache
    if fc is not None and fc.enable_encryption:
        # Writing the cache unencrypted when the operator asked for encryption at
        # rest would be a silent security failure: refuse instead.
        raise ConfigError("cache.filecache.enable_encryption: encrypting the blob cache is not "
                          "supported by this nydusd; refusing to write it unencrypted")
    work_dir = c.work_dir or None
    if c.type in ("blobcache", "filecache"):
        # nydusd's default work dir; the storage layer creates and checks it.
        work_dir = work_dir or "."
    return CacheSpec(kind=c.type, work_dir=work_dir, validate=bool(c.validate))


_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def _warn_ignored_settings(config: DaemonConfig, where: str) -> None:
    """One warning per setting this daemon parses but does not act on yet."""
    if config.overlay is not None:
        _warn_once("overlay", "%s: the overlay section (writable userspace overlay over RAFS) is "
                   "not supported by this nydusd; the image is served read-only", where)


@dataclass(eq=False)
class _SharedBackend:
    backend: BlobBackend
    users: int = 0


@dataclass(eq=False)
class _Instance:
    """A filesystem mounted at a pseudo path, and what the daemon holds for it."""

    mountpoint: str
    fs_type: str
    source: str
    fs: Any
    config: DaemonConfig | None
    backend_key: Hashable | None
    prefetch_files: list[str] = field(default_factory=list)
    mounted_time: datetime.datetime = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))
    metrics: FsMetrics | None = None
    prefetch: asyncio.Task | None = None


class NydusDaemon:
    """The nydusd service: see the module docstring for the order of everything.

    ``id`` and ``supervisor`` are reported in the daemon info (upstream requires
    them together).  Methods raise :class:`ServiceError` subclasses (or
    ConfigError for a bad config) and leave nothing half-done.
    """

    def __init__(self, *, id: str | None = None, supervisor: str | None = None,
                 writable: bool = False) -> None:
        self.id = id
        self.supervisor = supervisor
        #: Whether the export may hold read-write instances (passthrough_fs): the
        #: FUSE servers then pass write opcodes on, and OPEN/FLUSH always reach us.
        self.writable = writable
        self.vfs = Vfs(writable=writable)
        self.blob_layer = BlobLayer()
        self._machine = DaemonStateMachine()
        self._instances: dict[str, _Instance] = {}
        self._backends: dict[Hashable, _SharedBackend] = {}
        self._lock = asyncio.Lock()
        self._servers: list[FuseServer] = []
        self._fuse: _FuseSession | None = None
        self._virtiofs: list[_VirtioFsSession] = []
        self._api = None
        self._stopped = asyncio.Event()   # binds to the running loop on first use
        self._stopping: asyncio.Task | None = None
        self.exit_code = 0
        #: Hot-reloadable settings (``PUT /api/v1/config``): ``"<id>:<key>" -> value``.
        self.runtime_config: dict[str, str] = {}
        self.metrics = DaemonMetrics(self)

    # -- lifecycle ------------------------------------------------------------------
    @property
    def state(self) -> DaemonState:
        return self._machine.state

    def _fire(self, event: DaemonEvent):
        action = self._machine.fire(event)
        log.info("daemon state %s (event %s)", self._machine.state.value, event.value)
        return action

    async def __aenter__(self) -> "NydusDaemon":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        """Return once the daemon is STOPPED (signal, API exit, FUSE session ended, :meth:`stop`)."""
        await self._stopped.wait()
        if self._stopping is not None:
            await asyncio.shield(self._stopping)

    def request_stop(self, reason: str = "") -> None:
        """Start :meth:`stop` from a callback (signal handler, transport end); idempotent."""
        self._request(True, f"stopping: {reason}" if reason else "")

    def request_exit(self) -> None:
        """Start :meth:`exit` from a callback (``PUT /daemon/exit``); idempotent."""
        self._request(False, "exit requested: stopping without unmounting")

    def _request(self, unmount: bool, message: str) -> None:
        if self._stopping is None and self.state is not DaemonState.STOPPED:
            if message:
                log.info("%s", message)
            self._stopping = asyncio.ensure_future(self._stop(unmount=unmount))

    async def stop(self) -> None:
        """Stop serving, unmount FUSE, release everything; idempotent."""
        self.request_stop()
        await self._stopped_too()

    async def exit(self) -> None:
        """Stop serving and release everything but leave the FUSE mount in place (hot upgrade)."""
        self.request_exit()
        await self._stopped_too()

    async def _stopped_too(self) -> None:
        if self._stopping is not None:
            await asyncio.shield(self._stopping)

    async def _stop(self, *, unmount: bool) -> None:
        try:
            if self.state is DaemonState.RUNNING:
                self._fire(DaemonEvent.STOP)
            if self.state is not DaemonState.STOPPED:
                self._fire(DaemonEvent.STOP if unmount or self.state is DaemonState.INIT else DaemonEvent.EXIT)
            if self._api is not None:
                api, self._api = self._api, None
                await api.close()
            if self._fuse is not None:
                fuse, self._fuse = self._fuse, None
                await fuse.close(unmount=unmount)
            for session in self._virtiofs:
                await session.close()
            self._virtiofs.clear()
            for server in self._servers:
                with contextlib.suppress(Exception):
                    server.close()
            self._servers.clear()
            async with self._lock:
                for mountpoint in sorted(self._instances, key=len, reverse=True):
                    await self._umount_locked(mountpoint)
            self.blob_layer.close()
        except Exception:
            log.exception("error while stopping the daemon")
            self.exit_code = 1
        finally:
            self._stopped.set()

    # -- mounts ---------------------------------------------------------------------
    def mounts(self) -> dict[str, _Instance]:
        return dict(self._instances)

    async def mount(self, mountpoint: str, source: str, config: str | DaemonConfig | None = None, *,
                    fs_type: str = "rafs", prefetch_files: list[str] | None = None) -> None:
        """Mount ``source`` at pseudo path ``mountpoint`` (nydus-surface.md §3.4).

        ``config`` is a config text (v1/v2 JSON or TOML) or a parsed config; it is
        required for RAFS and ignored for passthrough.  Raises ConfigError for a
        bad config, MountError for a bad source, a busy path or a bad prefetch
        list, NotReadyError once stopping.
        """
        kind = _fs_kind(fs_type)
        _check_prefetch_files(prefetch_files)
        async with self._lock:
            self._check_alive()
            path = _norm(mountpoint)
            if self.vfs.instance_at(path) is not None:
                raise MountError(_ALREADY_EXISTS)
            inst = await self._open(path, kind, source, config, prefetch_files)
            try:
                self.vfs.mount(path, inst.fs, metrics=inst.metrics)
            except FsError as exc:
                await self._release(inst)
                if exc.errno == errno.EEXIST:
                    raise MountError(_ALREADY_EXISTS) from None
                raise MountError(f"mount at {mountpoint}: {exc.strerror}") from None
            self._instances[path] = inst
            self._after_mount(inst)

    async def remount(self, mountpoint: str, source: str, config: str | DaemonConfig | None = None, *,
                      fs_type: str = "rafs", prefetch_files: list[str] | None = None) -> None:
        """Swap the bootstrap and config of the RAFS instance at ``mountpoint``.

        The new image is loaded completely before anything changes; on failure
        the old one keeps serving.  Open files of the old image answer ESTALE
        afterwards (its nodeids belong to the old instance).
        """
        kind = _fs_kind(fs_type)
        if kind != "rafs":
            raise UnsupportedError("remount is only supported for RAFS")
        _check_prefetch_files(prefetch_files)
        async with self._lock:
            self._check_alive()
            path = _norm(mountpoint)
            old = self._instances.get(path)
            if old is None:
                raise MountError(f"no filesystem is mounted at {mountpoint}")
            if old.fs_type != "rafs":
                raise UnsupportedError("remount is only supported for RAFS")
            inst = await self._open(path, kind, source, config, prefetch_files)
            try:
                self.vfs.umount(path)
                self.vfs.mount(path, inst.fs, metrics=inst.metrics)
            except FsError as exc:  # pragma: no cover - the path was just freed
                await self._release(inst)
                raise MountError(f"remount at {mountpoint}: {exc.strerror}") from None
            self._instances[path] = inst
            await self._release(old)
            await self._invalidate(path)
            self._after_mount(inst)

    async def umount(self, mountpoint: str) -> None:
        """Unmount the filesystem at pseudo path ``mountpoint``; MountError if there is none."""
        async with self._lock:
            path = _norm(mountpoint)
            if path not in self._instances:
                raise MountError(f"no filesystem is mounted at {mountpoint}")
            await self._umount_locked(path)

    async def _umount_locked(self, path: str) -> None:
        inst = self._instances.pop(path)
        with contextlib.suppress(FsError):
            self.vfs.umount(path)
        await self._release(inst)
        await self._invalidate(path)
        log.info("%s unmounted (%s)", path, inst.source)

    def _check_alive(self) -> None:
        if self.state is DaemonState.STOPPED or self._stopping is not None:
            raise NotReadyError("the daemon is stopping")

    async def _open(self, path: str, kind: str, source: str,
                    config: str | DaemonConfig | None, prefetch_files: list[str] | None) -> _Instance:
        """A new instance for normalised pseudo path ``path`` (not yet in the VFS)."""
        if not isinstance(source, str) or not source:
            raise MountError("source: a mount needs a source path")
        if kind == "passthrough_fs":
            return await self._open_passthrough(path, source)
        cfg = _parse_config(config)
        cfg.require_rafs_sections()
        cache = cache_from_config(cfg)
        _warn_ignored_settings(cfg, path)
        loop = asyncio.get_running_loop()
        try:
            bootstrap = await loop.run_in_executor(None, load_bootstrap, source)
        except OSError as exc:
            raise MountError(f"bootstrap {source}: {exc.strerror or exc}") from None
        except FormatError as exc:
            raise MountError(f"bootstrap {source} is not a valid RAFS image: {exc}") from None
        key, backend = await self._acquire_backend(cfg, path)
        rafs = cfg.rafs
        validate = bool(rafs.validate) if rafs is not None else False
        xattr = bool(rafs.enable_xattr) if rafs is not None else False
        amplify = rafs.batch_size if rafs is not None else 0   # v1 amplify_io
        try:
            device = self.blob_layer.open_device(bootstrap.blobs, backend, cache, digest_validate=validate,
                                                 amplify_io=amplify)
        except (StorageError, ConfigError, OSError) as exc:
            await self._drop_backend(key)
            raise MountError(f"blob cache for {source}: {exc}") from None
        fs = RafsFs(bootstrap, device, enable_xattr=xattr, source=source)
        log.info("RAFS v%d %s loaded for %s (%d blobs, digest_validate=%s)", bootstrap.version,
                 source, path, len(bootstrap.blobs), validate)
        metrics = FsMetrics(path, files=bool(rafs and rafs.iostats_files),
                            access_pattern=bool(rafs and rafs.access_pattern),
                            latest_read_files=bool(rafs and rafs.latest_read_files))
        return _Instance(path, kind, source, fs, cfg, key, list(prefetch_files or ()), metrics=metrics)

    async def _open_passthrough(self, path: str, source: str) -> _Instance:
        if not self.writable:
            raise UnsupportedError("passthrough_fs needs a daemon serving a writable export (nydusd "
                                   "virtiofs without --bootstrap, or fuse with --shared-dir/--writable)")
        loop = asyncio.get_running_loop()
        try:
            fs = await loop.run_in_executor(None, lambda: PassthroughFs.from_path(source, writable=True))
        except ConfigError as exc:
            raise MountError(str(exc)) from None
        log.info("passthrough_fs %s opened for %s", source, path)
        return _Instance(path, "passthrough_fs", source, fs, None, None)

    def _after_mount(self, inst: _Instance) -> None:
        """Start what runs beside a fresh instance: its background prefetch."""
        if inst.fs_type != "rafs" or inst.config is None:
            return
        cfg = prefetch_config(inst.config)
        if inst.prefetch_files and not cfg.enable:
            # Files named in the mount request are a request to prefetch them.
            cfg = dataclasses.replace(cfg, enable=True)
        if not cfg.enable:
            return
        task = asyncio.ensure_future(prefetch_rafs(inst.fs, inst.prefetch_files or None, cfg))
        inst.prefetch = task
        task.add_done_callback(lambda t: self._prefetch_done(inst, t))

    def _prefetch_done(self, inst: _Instance, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s: prefetch failed: %r", inst.mountpoint, exc)
            return
        report = task.result()
        log.info("%s: prefetch done: %s", inst.mountpoint, report)

    async def prefetched(self, mountpoint: str):
        """Wait for the background prefetch of the instance at ``mountpoint``; its report (None if none ran)."""
        inst = self._instances.get(_norm(mountpoint))
        if inst is None or inst.prefetch is None:
            return None
        return await asyncio.shield(inst.prefetch)

    async def _release(self, inst: _Instance) -> None:
        """Close an instance that left the VFS (umount, remount, stop): its prefetch, fs, backend."""
        task = inst.prefetch
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        fs = inst.fs
        with contextlib.suppress(Exception):
            fs.close()
        if inst.backend_key is not None:
            await self._drop_backend(inst.backend_key)

    async def _acquire_backend(self, cfg: DaemonConfig, backend_id: str) -> tuple[Hashable, BlobBackend]:
        backend = create_backend(cfg.backend, backend_id=backend_id)
        key = backend.identity
        shared = self._backends.get(key)
        if shared is None:
            shared = self._backends[key] = _SharedBackend(backend)
        else:
            await backend.aclose()
        shared.users += 1
        return key, shared.backend

    async def _drop_backend(self, key: Hashable) -> None:
        shared = self._backends.get(key)
        if shared is None:
            return
        shared.users -= 1
        if shared.users <= 0:
            del self._backends[key]
            try:
                await shared.backend.aclose()
            except Exception:
                log.exception("closing backend %s failed", shared.backend.type_name)
            log.debug("%s backend closed (last user gone)", shared.backend.type_name)

    def backends(self) -> list[BlobBackend]:
        """The live backends, each once (shared by the instances configured alike)."""
        return [s.backend for s in self._backends.values()]

    async def _invalidate(self, path: str) -> None:
        """Make FUSE forget the dentry at ``path`` so the next lookup sees the change.

        Done before the mount request is answered, so a client that looks right
        after a 204 sees the new state.  virtio-fs has no notification queue in
        QEMU 7.2: its guests see changes when the 1 s pseudo entry timeout ends.
        """
        if self._fuse is not None:
            await self._fuse.invalidate(path)

    # -- transports -----------------------------------------------------------------
    def new_fuse_server(self, **kwargs: Any) -> FuseServer:
        """A FUSE server over the daemon's VFS (one per transport); closed on stop."""
        kwargs.setdefault("readonly", not self.writable)
        server = FuseServer(self.vfs, **kwargs)
        self._servers.append(server)
        return server

    def _check_one_session(self) -> None:
        # Passthrough inodes live as long as the kernel's lookup counts of *one* FUSE
        # session: a second session's FORGETs would drop inodes the first still uses.
        if self.writable and (self._fuse is not None or self._virtiofs):
            raise UnsupportedError("a writable export (passthrough_fs) is served over one transport at a "
                                   "time; serve read-only exports to FUSE and virtio-fs at once")

    def _enter_running(self) -> None:
        if self.state is DaemonState.INIT:
            self._fire(DaemonEvent.MOUNT)
        if self.state is DaemonState.READY:
            self._fire(DaemonEvent.START)

    async def serve_fuse(self, mountpoint: str) -> None:
        """Mount the VFS on ``mountpoint`` over ``/dev/fuse`` and serve it (returns at once).

        TransportError when the mount is refused (already mounted, not root...).
        The daemon stops when the session ends (someone unmounted it).
        """
        self._check_alive()
        if self._fuse is not None:
            raise ServiceError(f"already serving FUSE on {self._fuse.mount.path}")
        self._check_one_session()
        from ..transport.fusedev import mount_fuse

        loop = asyncio.get_running_loop()
        mount = await loop.run_in_executor(None, lambda: mount_fuse(mountpoint, readonly=not self.writable))
        if self._stopping is not None or self.state is DaemonState.STOPPED:
            # A stop came while the kernel was mounting: it could not see this mount.
            await loop.run_in_executor(None, mount.unmount)
            mount.close()
            raise NotReadyError("the daemon is stopping")
        server = self.new_fuse_server()
        session = _FuseSession(self, mount, server)
        self._fuse = session
        session.start()
        self._enter_running()

    async def serve_virtiofs(self, sock: str | os.PathLike, **kwargs: Any) -> None:
        """Listen for vhost-user-fs front-ends on ``sock`` and serve them (returns once listening).

        RUNNING as soon as the listener is up.  TransportError (the shim is not
        built, the socket cannot be bound) before anything is started.
        """
        self._check_alive()
        self._check_one_session()
        from ..transport.virtiofs import VirtioFsTransport

        server = self.new_fuse_server()
        transport = VirtioFsTransport(server, **kwargs)
        session = _VirtioFsSession(transport)
        await session.start(sock)
        self._virtiofs.append(session)
        self._enter_running()

    async def serve_api(self, sock: str | os.PathLike) -> None:
        """Serve the HTTP API (nydus-surface.md §3) on the unix socket ``sock``."""
        from .api import ApiServer

        self._check_alive()
        api = ApiServer(self)
        await api.start(os.fspath(sock))
        self._api = api

    def start(self) -> None:
        """``PUT /daemon/start``: READY -> RUNNING (UnexpectedEventError otherwise)."""
        self._fire(DaemonEvent.START)

    # -- information ----------------------------------------------------------------
    def info(self, *, with_backends: bool = True) -> dict[str, Any]:
        """DaemonInfo (nydus-surface.md §3.5), secrets blanked."""
        coll = None
        if with_backends:
            coll = {}
            for path, inst in sorted(self._instances.items()):
                coll[path] = {
                    "backend_type": "Rafs" if inst.fs_type == "rafs" else "PassthroughFs",
                    "mountpoint": path,
                    "mounted_time": _human_time(inst.mounted_time),
                    "config": inst.config.to_v2_dict(redact=True) if inst.config is not None else None,
                }
        return {
            "version": dict(version_info()),
            "id": self.id,
            "supervisor": self.supervisor,
            "state": self.state.value,
            "backend_collection": coll,
        }

    def instance(self, mountpoint: str) -> _Instance | None:
        return self._instances.get(_norm(mountpoint))

    @property
    def fuse_session(self) -> "_FuseSession | None":
        return self._fuse

    def events(self) -> dict[str, Any]:
        """The ring of recent backend read failures (``/api/v1/daemon/events``)."""
        return backend_events()

    def superblock_info(self, mountpoint: str) -> dict[str, Any]:
        """``/api/v1/daemon/backend``: the RAFS superblock summary of the instance at ``mountpoint``."""
        inst = self._instances.get(_norm(mountpoint))
        if inst is None or inst.fs_type != "rafs":
            raise ServiceError(f"no RAFS instance is mounted at {mountpoint}")
        return _superblock_summary(inst.fs.bootstrap)

    def get_runtime_config(self, id: str | None) -> dict[str, str]:
        """``GET /api/v1/config``: ``{key: value}`` for ``id``, or every ``"<id>:<key>"`` entry."""
        if id is None:
            return dict(self.runtime_config)
        prefix = id + ":"
        return {k[len(prefix):]: v for k, v in self.runtime_config.items() if k.startswith(prefix)}

    def set_runtime_config(self, id: str, values: dict[str, str]) -> None:
        """``PUT /api/v1/config``: store and apply hot-reloadable settings for backend ``id``.

        Keys are applied in order; an unknown key stops there (the ones before it
        stay applied), as upstream.  ``id`` is the backend id: the mountpoint.
        """
        for key, value in values.items():
            if key not in RUNTIME_CONFIG_KEYS:
                raise ServiceError(f"unknown configuration key {key!r} (known: "
                                   f"{', '.join(RUNTIME_CONFIG_KEYS)})")
            self.runtime_config[f"{id}:{key}"] = value
            for inst in self._instances.values():
                if inst.fs_type != "rafs" or (id and inst.mountpoint != id):
                    continue
                backend = inst.fs.device.backend
                name = _RUNTIME_SETTERS[key]
                setter = getattr(backend, name, None) if name else None
                if setter is not None:
                    setter(value)
            log.info("runtime setting %s updated for backend id %r", key, id)


class _FuseSession:
    """The ``/dev/fuse`` mount and the transport task serving it."""

    def __init__(self, daemon: NydusDaemon, mount, server: FuseServer) -> None:
        from ..transport.fusedev import FuseDevTransport

        self.daemon = daemon
        self.mount = mount
        self.server = server
        self.transport = FuseDevTransport(mount.fd, server, bufsize=server.max_write)
        self.task: asyncio.Task | None = None
        self._closing = False

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.transport.run())
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if self._closing:
            return
        if not task.cancelled() and task.exception() is not None:
            log.error("FUSE transport failed: %r", task.exception())
        # The kernel ended the session (someone unmounted us): nydusd exits.
        self.daemon.request_stop("the FUSE session ended")

    async def invalidate(self, path: str) -> None:
        parent, name = self.daemon.vfs.stale_entry(path)
        if parent is None or self.mount.fd < 0:
            return
        from ..transport.fusedev import notify_inval_entry

        # In a worker thread while the loop serves: the kernel may wait for us to
        # answer a LOOKUP in that directory first.  Bounded, so a kernel that
        # never lets go cannot hang the API.
        fut = asyncio.get_running_loop().run_in_executor(None, notify_inval_entry, self.mount.fd, parent, name)
        try:
            await asyncio.wait_for(asyncio.shield(fut), 5.0)
        except asyncio.TimeoutError:
            log.warning("FUSE entry invalidation of %s is taking long; answering anyway", path)

    async def close(self, *, unmount: bool) -> None:
        self._closing = True
        loop = asyncio.get_running_loop()
        if unmount:
            # Detach while the transport still answers the kernel.
            await loop.run_in_executor(None, self.mount.unmount)
        self.transport.stop()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)
        self.mount.close()


class _VirtioFsSession:
    """A vhost-user listener and the task serving its front-ends."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self, sock: str | os.PathLike) -> None:
        from ..transport.virtiofs import listen_vhost_user

        listener, path = listen_vhost_user(sock)
        self.task = asyncio.ensure_future(self.transport.serve(listener, stop_event=self.stop_event,
                                                               path=path))
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("virtio-fs transport failed: %r", task.exception())

    async def close(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


def _fs_kind(fs_type: str) -> str:
    kind = FS_TYPES.get(fs_type or "") if isinstance(fs_type, str) else None
    if kind is None:
        raise MountError(f"only 'rafs' and 'passthrough_fs' are supported, got {fs_type!r}")
    return kind


def _check_prefetch_files(files: list[str] | None) -> None:
    if files is None:
        return
    if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
        raise MountError("prefetch_files must be a list of absolute paths")
    for p in files:
        if not p.startswith("/"):
            raise MountError(f"prefetch file {p!r} must be an absolute path")


def _parse_config(config: str | DaemonConfig | None) -> DaemonConfig:
    if isinstance(config, DaemonConfig):
        return config
    if config is None or (isinstance(config, str) and not config.strip()):
        raise ConfigError("a RAFS mount needs a configuration (v1/v2 JSON or TOML)")
    return parse_daemon_config(config)


def _norm(mountpoint: str) -> str:
    try:
        return normalize_pseudo_path(mountpoint)
    except FsError as exc:
        raise MountError(exc.strerror) from None


def _superblock_summary(b) -> dict[str, Any]:
    """Upstream's ``RafsSuperMeta`` fields for ``/api/v1/daemon/backend`` (nydus-surface.md §3.5)."""
    sb = b.superblock
    ext = getattr(b, "superblock_ext", None)
    if b.version == 5:
        magic, version, sb_size = sb.s_magic, sb.s_fs_version, sb.s_sb_size
        inode_table = (sb.s_inode_table_offset, sb.s_inode_table_entries * 4)
        blob_table = (sb.s_blob_table_offset, sb.s_blob_table_size)
        prefetch = (sb.s_prefetch_table_offset, sb.s_prefetch_table_entries * 4)
        chunk_table = (0, 0)
        meta_blkaddr = root_nid = 0
    else:
        magic, version, sb_size = ext.s_magic if hasattr(ext, "s_magic") else 0, 6, 0
        inode_table = (0, 0)
        blob_table = (ext.s_blob_table_offset, ext.s_blob_table_size)
        prefetch = (ext.s_prefetch_table_offset, ext.s_prefetch_table_size)
        chunk_table = (ext.s_chunk_table_offset, ext.s_chunk_table_size)
        meta_blkaddr = getattr(sb, "s_meta_blkaddr", 0)
        root_nid = b.root_ino
    return {
        "magic": magic, "version": version, "sb_size": sb_size, "root_inode": b.root_ino,
        "chunk_size": b.chunk_size, "batch_size": 0, "inodes_count": b.inodes_count,
        "flags": int(b.flags), "inode_table_offset": inode_table[0], "inode_table_entries": inode_table[1] // 4,
        "blob_table_offset": blob_table[0], "blob_table_size": blob_table[1],
        "prefetch_table_offset": prefetch[0], "prefetch_table_entries": prefetch[1] // 4,
        "chunk_table_offset": chunk_table[0], "chunk_table_size": chunk_table[1],
        "attr_timeout": {"secs": 86400, "nanos": 0}, "entry_timeout": {"secs": 86400, "nanos": 0},
        "is_chunk_dict": False, "meta_blkaddr": meta_blkaddr, "root_nid": root_nid,
    }


def _human_time(t: datetime.datetime) -> str:
    # Upstream's rendering: "2024-01-01 12:34:56.123456789 +00:00:00".
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond * 1000:09d} +00:00:00"

