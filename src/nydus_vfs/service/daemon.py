"""The daemon: one VFS, one shared blob layer, the mounts, and the lifecycle state.

Everything that turns *configuration* into running objects lives here, so the
command line (``cli.nydusd``) and, later, the HTTP API drive the same methods:

    daemon = Daemon()
    daemon.mount_rafs("/", bootstrap_path, config)      # Python API for pseudo mounts
    server = daemon.fuse_server()                        # handed to a transport
    ...
    daemon.umount("/")
    daemon.close()

All RAFS instances share ``daemon.blob_layer``: two images that reference the same
blob (same backend, same cache work_dir) share its cache state, so each chunk is
fetched from the backend once.
"""

from __future__ import annotations

import logging

from ..config import DaemonConfig
from ..errors import ConfigError, FormatError, FsError, NydusError
from ..fs import RafsFs, Vfs, load_bootstrap
from ..fuse import FuseServer
from ..storage import BlobLayer, CacheSpec, LocalfsBackend
from .state import DaemonStateMachine

__all__ = ["Daemon", "MountError", "backend_from_config", "cache_from_config"]

log = logging.getLogger("nydus_vfs.service")


class MountError(NydusError):
    """A mount request could not be carried out; the message says why."""


def backend_from_config(config: DaemonConfig):
    """The storage backend the config describes; ConfigError for types not served yet."""
    b = config.backend
    if b is None:
        raise ConfigError("backend: a RAFS mount needs a backend section")
    if b.type == "localfs":
        lc = b.localfs
        return LocalfsBackend(dir=lc.dir or None, blob_file=lc.blob_file or None,
                              alt_dirs=tuple(lc.alt_dirs or ()))
    raise ConfigError(f"backend.type: {b.type!r} is not supported by this nydusd yet "
                      f"(supported: localfs)")


def cache_from_config(config: DaemonConfig) -> CacheSpec:
    c = config.cache
    if c is None:
        return CacheSpec(kind="", work_dir=None, validate=False)
    if c.type == "fscache":
        raise ConfigError("cache.type: 'fscache' needs the singleton service, which is not supported yet")
    work_dir = c.work_dir or None
    if c.type in ("blobcache", "filecache"):
        # nydusd's default work dir; the storage layer creates and checks it.
        work_dir = work_dir or "."
    return CacheSpec(kind=c.type, work_dir=work_dir, validate=bool(c.validate))


class Daemon:
    """Owns the VFS, the shared blob layer and the lifecycle state machine."""

    def __init__(self) -> None:
        self.vfs = Vfs()
        self.blob_layer = BlobLayer()
        self.state = DaemonStateMachine()
        self._configs: dict[str, DaemonConfig] = {}

    # -- mounts ---------------------------------------------------------------------
    def mount_rafs(self, mountpoint: str, bootstrap_path: str, config: DaemonConfig,
                   prefetch_files: list[str] | None = None) -> RafsFs:
        """Load ``bootstrap_path`` with ``config`` and mount it at pseudo ``mountpoint``.

        Raises MountError (with the reason) for a bad bootstrap or a busy
        mountpoint, ConfigError for a config this daemon cannot serve (missing
        sections, a backend or cache type not supported yet) and StorageError
        when the blob cache cannot be set up; nothing is left half-mounted.
        """
        if prefetch_files:
            for p in prefetch_files:
                if not p.startswith("/"):
                    raise MountError(f"prefetch file {p!r} must be an absolute path")
            log.warning("%s: prefetch is not implemented yet; %d prefetch files ignored",
                        mountpoint, len(prefetch_files))
        try:
            bootstrap = load_bootstrap(bootstrap_path)
        except OSError as exc:
            raise MountError(f"bootstrap {bootstrap_path}: {exc.strerror}") from None
        except FormatError as exc:
            raise MountError(f"bootstrap {bootstrap_path} is not a valid RAFS image: {exc}") from None
        config.require_rafs_sections()
        backend = backend_from_config(config)
        cache = cache_from_config(config)
        rafs_cfg = config.rafs
        validate = bool(rafs_cfg.validate) if rafs_cfg is not None else False
        xattr = bool(rafs_cfg.enable_xattr) if rafs_cfg is not None else False
        amplify = rafs_cfg.batch_size if rafs_cfg is not None else 0   # v1 amplify_io
        device = self.blob_layer.open_device(bootstrap.blobs, backend, cache, digest_validate=validate,
                                             amplify_io=amplify)
        fs = RafsFs(bootstrap, device, enable_xattr=xattr, source=bootstrap_path)
        try:
            self.vfs.mount(mountpoint, fs)
        except FsError as exc:
            fs.close()
            raise MountError(f"mount at {mountpoint}: {exc.strerror}") from None
        self._configs[mountpoint] = config
        log.info("RAFS v%d %s mounted at %s (%d blobs, digest_validate=%s)", bootstrap.version,
                 bootstrap_path, mountpoint, len(bootstrap.blobs), validate)
        return fs

    def umount(self, mountpoint: str) -> None:
        try:
            fs = self.vfs.umount(mountpoint)
        except FsError as exc:
            raise MountError(f"umount {mountpoint}: {exc.strerror}") from None
        self._configs.pop(mountpoint, None)
        fs.close()

    def fuse_server(self, **kwargs) -> FuseServer:
        """A FUSE server over the VFS (one per transport session set)."""
        return FuseServer(self.vfs, **kwargs)

    def close(self) -> None:
        for mountpoint in list(self.vfs.mounts()):
            try:
                self.umount(mountpoint)
            except MountError as exc:
                log.warning("%s", exc)
