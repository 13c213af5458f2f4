"""Daemon configuration: nydusd's v1 JSON, v2 JSON and v2 TOML, as frozen dataclasses.

Strategy
--------
Upstream (``api/src/config.rs``) accepts a config *string* and tries three
parsers in order, keeping the first that succeeds:

1. **v2 JSON.**  Deserialisation succeeds as soon as the text is a JSON object
   with an unsigned ``version`` and well-typed known keys; the result is then
   validated and a validation failure is final ("invalid configuration"): a v2
   document is never re-read as v1.
2. **v2 TOML**, same rules.
3. **v1 JSON** (``RafsConfig``), converted to v2 and validated; any failure here
   only contributes to the final "failed to parse configuration information".

We reproduce that order exactly, including its two kinds of failure: a *shape*
error (missing required key, wrong JSON type: serde refused to deserialise, so
the next parser gets a go) and a *validation* error (the document deserialised
but says something impossible).  Each error names the key path as the operator
wrote it: v1 documents are validated with v1 paths (``device.backend.config.host``,
``fs_prefetch.threads_count``, ``amplify_io``), v2 documents with v2 paths.

Unknown keys are ignored at every level, as upstream has no strict mode and the
drivers really do send extras (``warmup``, ``id_mapping``, ``readahead``,
``device.external_backend``...).  Their dotted paths are kept in
``DaemonConfig.unknown_keys`` and each is logged at DEBUG on the
``nydus_vfs.config`` logger.  An unknown key that is a near miss of a known one
(the shipped ``[backend.registy]`` example) is quoted in the error message when
the document is refused, because that typo is usually *why* it is refused.

Deliberate differences from upstream, all in the direction of refusing earlier
and saying why:

* ``backend.registry.auth`` is checked (base64, UTF-8, ``user:password``) at
  parse time; upstream checks it when the backend is created, i.e. at mount.
* ``filecache.encryption_key`` must be 64 hex digits when ``enable_encryption``
  is set; upstream fails later when the cache file is opened.
* An ``http-proxy`` ``addr`` that is a Unix socket path must be absolute; its
  existence is *not* checked here (parsers do no I/O), the backend checks it.

No function here does file I/O except :func:`load_config_file`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import json
import logging
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

__all__ = [
    "BACKEND_TYPES",
    "CACHE_TYPES",
    "RAFS_MODES",
    "MAX_CONFIG_FILE_SIZE",
    "DaemonConfig",
    "BackendConfig",
    "LocalfsConfig",
    "LocaldiskConfig",
    "RegistryConfig",
    "OssConfig",
    "S3Config",
    "HttpProxyConfig",
    "ProxyConfig",
    "CacheConfig",
    "FileCacheConfig",
    "FsCacheConfig",
    "RafsConfig",
    "PrefetchConfig",
    "OverlayConfig",
    "ExternalBackendConfig",
    "parse_daemon_config",
    "load_config_file",
    "localfs_dir_config",
]

log = logging.getLogger("nydus_vfs.config")

#: Backend type names accepted in a v2 document (v1 accepts all but ``http-proxy``).
BACKEND_TYPES = ("localfs", "localdisk", "oss", "s3", "registry", "http-proxy")
#: Cache type names; ``""`` and ``dummycache`` mean "no cache".  ``dummy`` is *not* one.
CACHE_TYPES = ("blobcache", "filecache", "fscache", "dummycache", "")
RAFS_MODES = ("direct", "cached")
#: Upstream's typed loaders refuse config files larger than this.
MAX_CONFIG_FILE_SIZE = 0x100000

_MIB = 1024 * 1024
_MAX_BATCH = 0x10000000
_MAX_THREADS = 1024
_FAILED = "failed to parse configuration information"
_INVALID = "invalid configuration"


# --------------------------------------------------------------------------------------
# The typed configuration.  Field names follow the v2 keys; ``_key`` metadata gives the
# serialised name where Python cannot spell it.
# --------------------------------------------------------------------------------------

def _renamed(key: str, default: Any = None) -> Any:
    return field(default=default, metadata={"key": key})


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """HTTP proxy in front of a remote backend (e.g. Dragonfly dfdaemon)."""

    url: str = ""
    ping_url: str = ""
    fallback: bool = True
    check_interval: int = 5
    use_http: bool = False
    check_pause_elapsed: int = 300
    dragonfly_scheduler_endpoint: str = ""


@dataclass(frozen=True, kw_only=True)
class _ConnectionConfig:
    """Keys common to every remote backend (registry, oss, s3, http-proxy)."""

    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    timeout: int = 5
    connect_timeout: int = 5
    retry_limit: int = 0
    proxy: ProxyConfig = ProxyConfig()


@dataclass(frozen=True, kw_only=True)
class LocalfsConfig:
    """Blobs as plain files: ``blob_file``, else ``dir/<blob_id>`` then each alt dir."""

    blob_file: str = ""
    dir: str = ""
    alt_dirs: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class LocaldiskConfig:
    """Blobs as GPT partitions of a disk or disk image (experimental upstream)."""

    device_path: str = ""
    disable_gpt: bool = False


@dataclass(frozen=True, kw_only=True)
class RegistryConfig(_ConnectionConfig):
    """An OCI registry.  ``auth`` and ``registry_token`` are trimmed; blank means None."""

    scheme: str = "https"
    host: str
    repo: str
    auth: str | None = field(default=None, repr=False)
    registry_token: str | None = field(default=None, repr=False)
    blob_url_scheme: str = ""
    blob_redirected_host: str = ""


@dataclass(frozen=True, kw_only=True)
class OssConfig(_ConnectionConfig):
    """Aliyun OSS: object key is ``object_prefix + blob_id``."""

    scheme: str = "https"
    endpoint: str
    bucket_name: str
    object_prefix: str = ""
    access_key_id: str = field(default="", repr=False)
    access_key_secret: str = field(default="", repr=False)


@dataclass(frozen=True, kw_only=True)
class S3Config(_ConnectionConfig):
    """S3: ``endpoint`` may be empty (AWS), ``region`` may not."""

    scheme: str = "https"
    endpoint: str
    region: str
    bucket_name: str
    object_prefix: str = ""
    access_key_id: str = field(default="", repr=False)
    access_key_secret: str = field(default="", repr=False)


@dataclass(frozen=True, kw_only=True)
class HttpProxyConfig(_ConnectionConfig):
    """A plain HTTP(S) server or Unix socket serving ``addr + path + "/" + blob_id``."""

    addr: str
    path: str = ""


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    """``type`` selects which of the sub-configs is used; the others may be present too."""

    type: str
    localdisk: LocaldiskConfig | None = None
    localfs: LocalfsConfig | None = None
    oss: OssConfig | None = None
    s3: S3Config | None = None
    registry: RegistryConfig | None = None
    http_proxy: HttpProxyConfig | None = _renamed("http-proxy")

    @property
    def active(self) -> Any:
        """The sub-config named by ``type`` (None when absent; a validated config has it)."""
        return getattr(self, _BACKEND_ATTR.get(self.type, "_missing"), None)


_BACKEND_ATTR = {t: t.replace("-", "_") for t in BACKEND_TYPES}


@dataclass(frozen=True, kw_only=True)
class PrefetchConfig:
    """Prefetch settings (v2 names).  When the table is absent every field is zero/false."""

    enable: bool = False
    threads: int = 0
    batch_size: int = 0
    bandwidth_limit: int = 0
    prefetch_all: bool = False
    stream_prefetch: bool = False


@dataclass(frozen=True, kw_only=True)
class FileCacheConfig:
    """Local file cache (``blobcache``/``filecache``).  ``work_dir`` defaults to ``.``."""

    work_dir: str = "."
    disable_indexed_map: bool = False
    enable_encryption: bool = False
    enable_convergent_encryption: bool = False
    encryption_key: str = ""


@dataclass(frozen=True, kw_only=True)
class FsCacheConfig:
    """Kernel cachefiles (fscache) working directory."""

    work_dir: str = "."


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The blob cache.  ``type`` is one of :data:`CACHE_TYPES`; ``compressed`` is legacy."""

    type: str = ""
    compressed: bool = False
    validate: bool = False
    prefetch: PrefetchConfig = PrefetchConfig()
    filecache: FileCacheConfig | None = None
    fscache: FsCacheConfig | None = None

    @property
    def is_filecache(self) -> bool:
        return self.type in ("blobcache", "filecache")

    @property
    def is_fscache(self) -> bool:
        return self.type == "fscache"

    @property
    def work_dir(self) -> str | None:
        """The working directory of the selected cache type, or None for no cache."""
        if self.is_filecache and self.filecache is not None:
            return self.filecache.work_dir
        if self.is_fscache and self.fscache is not None:
            return self.fscache.work_dir
        return None


@dataclass(frozen=True, kw_only=True)
class RafsConfig:
    """The RAFS filesystem.  ``batch_size`` is v1 ``amplify_io``, ``validate`` v1 ``digest_validate``."""

    mode: str = "direct"
    batch_size: int = _MIB
    validate: bool = False
    enable_xattr: bool = False
    iostats_files: bool = False
    access_pattern: bool = False
    latest_read_files: bool = False
    prefetch: PrefetchConfig = PrefetchConfig()


@dataclass(frozen=True, kw_only=True)
class OverlayConfig:
    """Writable userspace overlay over RAFS (used with ``--writable``)."""

    upper_dir: str
    work_dir: str


@dataclass(frozen=True, kw_only=True)
class ExternalBackendConfig:
    """Merged with the backend description stored in an image (external/model blobs)."""

    patch: Mapping[str, str]
    type: str
    config: Mapping[str, str]

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.patch.items())), self.type, tuple(sorted(self.config.items()))))


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    """A parsed, validated daemon configuration, always in the v2 model.

    ``format`` says which parser accepted it (``"v2-json"``, ``"v2-toml"`` or
    ``"v1-json"``) and ``unknown_keys`` lists the ignored keys by dotted path;
    neither takes part in equality.  ``backend``, ``cache`` and ``rafs`` are None
    only for a v2 document that omits them (v1 always yields all three); a RAFS
    mount checks them with :meth:`require_rafs_sections`.
    """

    version: int = 2
    id: str = ""
    backend: BackendConfig | None = None
    external_backends: tuple[ExternalBackendConfig, ...] = ()
    cache: CacheConfig | None = None
    rafs: RafsConfig | None = None
    overlay: OverlayConfig | None = None
    format: str = field(default="v2-json", compare=False, metadata={"dump": False})
    unknown_keys: tuple[str, ...] = field(default=(), compare=False, metadata={"dump": False})

    def validate(self) -> None:
        """Check the semantic rules (v2 key paths in messages); raise ConfigError."""
        try:
            _validate(self, _V2_NAMES)
        except _Refusal as exc:
            raise ConfigError(f"{_INVALID}: {exc}") from None

    def require_rafs_sections(self) -> None:
        """Raise ConfigError unless ``backend``, ``cache`` and ``rafs`` are all present."""
        for name in ("backend", "cache", "rafs"):
            if getattr(self, name) is None:
                raise ConfigError(f"{name}: no configuration information for {name} "
                                  f"(a RAFS mount needs the [{name}] section, even if empty)")

    @property
    def chunk_validation_enabled(self) -> bool:
        """True when either ``cache.validate`` or ``rafs.validate`` asks for digest checks."""
        return bool((self.cache and self.cache.validate) or (self.rafs and self.rafs.validate))

    def with_registry_auth(self, auth: str | None) -> DaemonConfig:
        """A copy whose registry backend uses ``auth`` (IMAGE_PULL_AUTH); unchanged otherwise.

        Like upstream, ``None`` changes nothing and a non-registry config is returned
        as is.  The new value is validated like the one in a config file.
        """
        if auth is None or self.backend is None or self.backend.registry is None:
            return self
        try:
            value = _check_auth(_trimmed(auth), "IMAGE_PULL_AUTH")
        except _Refusal as exc:
            raise ConfigError(str(exc)) from None
        registry = dataclasses.replace(self.backend.registry, auth=value)
        return dataclasses.replace(self, backend=dataclasses.replace(self.backend, registry=registry))

    def to_v2_dict(self, redact: bool = True) -> dict[str, Any]:
        """The v2 JSON form (every key, None for absent sections), as upstream serialises it.

        With ``redact`` the OSS ``access_key_id``/``access_key_secret`` are blanked and
        the registry ``auth``/``registry_token`` become None; S3 keys are kept, as
        upstream does.  This is what the daemon-info ``backend_collection`` shows.
        """
        cfg = self
        if redact and cfg.backend is not None:
            backend = cfg.backend
            if backend.oss is not None:
                backend = dataclasses.replace(
                    backend, oss=dataclasses.replace(backend.oss, access_key_id="", access_key_secret=""))
            if backend.registry is not None:
                backend = dataclasses.replace(
                    backend, registry=dataclasses.replace(backend.registry, auth=None, registry_token=None))
            cfg = dataclasses.replace(cfg, backend=backend)
        return _dump(cfg)


def _dump(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if f.metadata.get("dump", True):
                out[f.metadata.get("key", f.name)] = _dump(getattr(value, f.name))
        return out
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _dump(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------
# Reading untyped JSON/TOML trees.
# --------------------------------------------------------------------------------------

class _Refusal(Exception):
    """A validation failure: the document deserialised but is not acceptable."""


class _Shape(_Refusal):
    """A deserialisation failure: upstream's serde refused it, so the next parser runs."""


_REQUIRED = object()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"{value!r}"
    if isinstance(value, str):
        return f"the string {value[:64]!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class _Ctx:
    """Per-attempt record of ignored keys, and near misses worth quoting on failure."""

    def __init__(self) -> None:
        self.unknown: list[str] = []
        self.hints: list[str] = []

    def table(self, value: Any, path: str, known: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _Shape(f"{path or 'configuration'}: must be an object/table, got {_describe(value)}")
        for key in value:
            if key not in known:
                where = _join(path, key)
                self.unknown.append(where)
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
                if close:
                    self.hints.append(f"unknown key {where!r}: did you mean {_join(path, close[0])!r}?")
        return value


def _get(d: dict[str, Any], key: str, path: str, default: Any) -> Any:
    if key in d:
        return d[key]
    if default is _REQUIRED:
        raise _Shape(f"{_join(path, key)}: missing required key")
    return default


def _str(d: dict[str, Any], key: str, path: str, default: Any = _REQUIRED) -> str:
    v = _get(d, key, path, default)
    if not isinstance(v, str):
        raise _Shape(f"{_join(path, key)}: must be a string, got {_describe(v)}")
    return v


def _opt_str(d: dict[str, Any], key: str, path: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _Shape(f"{_join(path, key)}: must be a string or null, got {_describe(v)}")
    return v


def _bool(d: dict[str, Any], key: str, path: str, default: Any = False) -> bool:
    v = _get(d, key, path, default)
    if type(v) is not bool:
        raise _Shape(f"{_join(path, key)}: must be true or false, got {_describe(v)}")
    return v


def _uint(d: dict[str, Any], key: str, path: str, bits: int, default: Any) -> int:
    v = _get(d, key, path, default)
    if type(v) is not int or not 0 <= v < (1 << bits):
        raise _Shape(f"{_join(path, key)}: must be an unsigned {bits}-bit integer, got {_describe(v)}")
    return v


def _str_list(d: dict[str, Any], key: str, path: str) -> tuple[str, ...]:
    v = _get(d, key, path, [])
    where = _join(path, key)
    if not isinstance(v, list):
        raise _Shape(f"{where}: must be an array of strings, got {_describe(v)}")
    for i, item in enumerate(v):
        if not isinstance(item, str):
            raise _Shape(f"{where}[{i}]: must be a string, got {_describe(item)}")
    return tuple(v)


def _str_map(d: dict[str, Any], key: str, path: str) -> Mapping[str, str]:
    v = _get(d, key, path, _REQUIRED)
    where = _join(path, key)
    if not isinstance(v, dict):
        raise _Shape(f"{where}: must be an object of strings, got {_describe(v)}")
    for k, item in v.items():
        if not isinstance(item, str):
            raise _Shape(f"{_join(where, k)}: must be a string, got {_describe(item)}")
    return MappingProxyType(dict(v))


def _optional(d: dict[str, Any], key: str, path: str, parse: Callable[[Any, str], Any]) -> Any:
    v = d.get(key)
    return None if v is None else parse(v, _join(path, key))


# --------------------------------------------------------------------------------------
# Section parsers (shape only).  The same struct parsers serve v1 and v2: only the
# path they are given differs.
# --------------------------------------------------------------------------------------

_PROXY_KEYS = tuple(f.name for f in dataclasses.fields(ProxyConfig))
_CONN_KEYS = tuple(f.name for f in dataclasses.fields(_ConnectionConfig))


def _proxy(ctx: _Ctx, v: Any, path: str) -> ProxyConfig:
    d = ctx.table(v, path, _PROXY_KEYS)
    return ProxyConfig(
        url=_str(d, "url", path, ""),
        ping_url=_str(d, "ping_url", path, ""),
        fallback=_bool(d, "fallback", path, True),
        check_interval=_uint(d, "check_interval", path, 64, 5),
        use_http=_bool(d, "use_http", path, False),
        check_pause_elapsed=_uint(d, "check_pause_elapsed", path, 64, 300),
        dragonfly_scheduler_endpoint=_str(d, "dragonfly_scheduler_endpoint", path, ""),
    )


def _connection(ctx: _Ctx, d: dict[str, Any], path: str) -> dict[str, Any]:
    return {
        "skip_verify": _bool(d, "skip_verify", path),
        "ca_cert_files": _str_list(d, "ca_cert_files", path),
        "timeout": _uint(d, "timeout", path, 32, 5),
        "connect_timeout": _uint(d, "connect_timeout", path, 32, 5),
        "retry_limit": _uint(d, "retry_limit", path, 8, 0),
        "proxy": _proxy(ctx, _get(d, "proxy", path, {}), _join(path, "proxy")),
    }


def _localfs(ctx: _Ctx, v: Any, path: str) -> LocalfsConfig:
    d = ctx.table(v, path, ("blob_file", "dir", "alt_dirs"))
    return LocalfsConfig(blob_file=_str(d, "blob_file", path, ""), dir=_str(d, "dir", path, ""),
                         alt_dirs=_str_list(d, "alt_dirs", path))


def _localdisk(ctx: _Ctx, v: Any, path: str) -> LocaldiskConfig:
    d = ctx.table(v, path, ("device_path", "disable_gpt"))
    return LocaldiskConfig(device_path=_str(d, "device_path", path, ""),
                           disable_gpt=_bool(d, "disable_gpt", path))


def _registry(ctx: _Ctx, v: Any, path: str) -> RegistryConfig:
    d = ctx.table(v, path, ("scheme", "host", "repo", "auth", "registry_token", "blob_url_scheme",
                            "blob_redirected_host") + _CONN_KEYS)
    return RegistryConfig(
        scheme=_str(d, "scheme", path, "https"),
        host=_str(d, "host", path),
        repo=_str(d, "repo", path),
        auth=_trimmed(_opt_str(d, "auth", path)),
        registry_token=_trimmed(_opt_str(d, "registry_token", path)),
        blob_url_scheme=_str(d, "blob_url_scheme", path, ""),
        blob_redirected_host=_str(d, "blob_redirected_host", path, ""),
        **_connection(ctx, d, path),
    )


def _object_store(ctx: _Ctx, v: Any, path: str, config: type, *, region: bool) -> Any:
    """OSS (``config=OssConfig``) or S3 (``S3Config``, ``region=True``): the same keys but ``region``.

    Keys are read in the declared order, so the first bad one is the one reported.
    """
    head = ("scheme", "endpoint") + (("region",) if region else ())
    d = ctx.table(v, path, head + ("bucket_name", "object_prefix", "access_key_id", "access_key_secret")
                  + _CONN_KEYS)
    values = {"scheme": _str(d, "scheme", path, "https"), "endpoint": _str(d, "endpoint", path)}
    if region:
        values["region"] = _str(d, "region", path)
    return config(
        **values,
        bucket_name=_str(d, "bucket_name", path),
        object_prefix=_str(d, "object_prefix", path, ""),
        access_key_id=_str(d, "access_key_id", path, ""),
        access_key_secret=_str(d, "access_key_secret", path, ""),
        **_connection(ctx, d, path),
    )


def _oss(ctx: _Ctx, v: Any, path: str) -> OssConfig:
    return _object_store(ctx, v, path, OssConfig, region=False)


def _s3(ctx: _Ctx, v: Any, path: str) -> S3Config:
    return _object_store(ctx, v, path, S3Config, region=True)


def _http_proxy(ctx: _Ctx, v: Any, path: str) -> HttpProxyConfig:
    d = ctx.table(v, path, ("addr", "path") + _CONN_KEYS)
    return HttpProxyConfig(addr=_str(d, "addr", path), path=_str(d, "path", path, ""),
                           **_connection(ctx, d, path))


_BACKEND_PARSERS: dict[str, Callable[[_Ctx, Any, str], Any]] = {
    "localdisk": _localdisk,
    "localfs": _localfs,
    "oss": _oss,
    "s3": _s3,
    "registry": _registry,
    "http-proxy": _http_proxy,
}


def _filecache(ctx: _Ctx, v: Any, path: str) -> FileCacheConfig:
    d = ctx.table(v, path, tuple(f.name for f in dataclasses.fields(FileCacheConfig)))
    return FileCacheConfig(
        work_dir=_str(d, "work_dir", path, "."),
        disable_indexed_map=_bool(d, "disable_indexed_map", path),
        enable_encryption=_bool(d, "enable_encryption", path),
        enable_convergent_encryption=_bool(d, "enable_convergent_encryption", path),
        encryption_key=_str(d, "encryption_key", path, ""),
    )


def _fscache(ctx: _Ctx, v: Any, path: str) -> FsCacheConfig:
    d = ctx.table(v, path, ("work_dir",))
    return FsCacheConfig(work_dir=_str(d, "work_dir", path, "."))


def _prefetch_v2(ctx: _Ctx, v: Any, path: str) -> PrefetchConfig:
    # ``enable`` has no default upstream: a present table must say whether it is on.
    d = ctx.table(v, path, tuple(f.name for f in dataclasses.fields(PrefetchConfig)))
    return PrefetchConfig(
        enable=_bool(d, "enable", path, _REQUIRED),
        threads=_uint(d, "threads", path, 64, 8),
        batch_size=_uint(d, "batch_size", path, 64, _MIB),
        bandwidth_limit=_uint(d, "bandwidth_limit", path, 32, 0),
        prefetch_all=_bool(d, "prefetch_all", path),
        stream_prefetch=_bool(d, "stream_prefetch", path),
    )


def _v2_backend(ctx: _Ctx, v: Any, path: str) -> BackendConfig:
    d = ctx.table(v, path, ("type",) + BACKEND_TYPES)
    subs = {_BACKEND_ATTR[name]: _optional(d, name, path, lambda x, p, f=parse: f(ctx, x, p))
            for name, parse in _BACKEND_PARSERS.items()}
    return BackendConfig(type=_str(d, "type", path), **subs)


def _v2_cache(ctx: _Ctx, v: Any, path: str) -> CacheConfig:
    d = ctx.table(v, path, ("type", "compressed", "validate", "prefetch", "filecache", "fscache"))
    return CacheConfig(
        type=_str(d, "type", path, ""),
        compressed=_bool(d, "compressed", path),
        validate=_bool(d, "validate", path),
        prefetch=_prefetch_v2(ctx, d["prefetch"], _join(path, "prefetch"))
        if "prefetch" in d else PrefetchConfig(),
        filecache=_optional(d, "filecache", path, lambda x, p: _filecache(ctx, x, p)),
        fscache=_optional(d, "fscache", path, lambda x, p: _fscache(ctx, x, p)),
    )


def _v2_rafs(ctx: _Ctx, v: Any, path: str) -> RafsConfig:
    d = ctx.table(v, path, tuple(f.name for f in dataclasses.fields(RafsConfig)))
    return RafsConfig(
        mode=_str(d, "mode", path, "direct"),
        batch_size=_uint(d, "batch_size", path, 64, _MIB),
        validate=_bool(d, "validate", path),
        enable_xattr=_bool(d, "enable_xattr", path),
        iostats_files=_bool(d, "iostats_files", path),
        access_pattern=_bool(d, "access_pattern", path),
        latest_read_files=_bool(d, "latest_read_files", path),
        prefetch=_prefetch_v2(ctx, d["prefetch"], _join(path, "prefetch"))
        if "prefetch" in d else PrefetchConfig(),
    )


def _overlay(ctx: _Ctx, v: Any, path: str) -> OverlayConfig:
    d = ctx.table(v, path, ("upper_dir", "work_dir"))
    return OverlayConfig(upper_dir=_str(d, "upper_dir", path), work_dir=_str(d, "work_dir", path))


def _external_backends(ctx: _Ctx, d: dict[str, Any], key: str, path: str) -> tuple[ExternalBackendConfig, ...]:
    v = _get(d, key, path, [])
    where = _join(path, key)
    if not isinstance(v, list):
        raise _Shape(f"{where}: must be an array, got {_describe(v)}")
    out = []
    for i, item in enumerate(v):
        p = f"{where}[{i}]"
        e = ctx.table(item, p, ("patch", "type", "config"))
        out.append(ExternalBackendConfig(patch=_str_map(e, "patch", p), type=_str(e, "type", p),
                                         config=_str_map(e, "config", p)))
    return tuple(out)


def _v2_document(ctx: _Ctx, doc: Any) -> DaemonConfig:
    d = ctx.table(doc, "", ("version", "id", "backend", "external_backends", "cache", "rafs", "overlay"))
    # Read ``version`` first so a v1 document fails on it, not on some later key.
    version = _uint(d, "version", "", 32, _REQUIRED)
    return DaemonConfig(
        version=version,
        id=_str(d, "id", "", ""),
        backend=_optional(d, "backend", "", lambda x, p: _v2_backend(ctx, x, p)),
        external_backends=_external_backends(ctx, d, "external_backends", ""),
        cache=_optional(d, "cache", "", lambda x, p: _v2_cache(ctx, x, p)),
        rafs=_optional(d, "rafs", "", lambda x, p: _v2_rafs(ctx, x, p)),
        overlay=_optional(d, "overlay", "", lambda x, p: _overlay(ctx, x, p)),
    )


# v1 ---------------------------------------------------------------------------------

def _v1_fs_prefetch(ctx: _Ctx, d: dict[str, Any]) -> PrefetchConfig:
    if "fs_prefetch" not in d:
        return PrefetchConfig()
    path = "fs_prefetch"
    p = ctx.table(d["fs_prefetch"], path, ("enable", "threads_count", "merging_size", "bandwidth_rate",
                                           "prefetch_all", "stream_prefetch"))
    # Defaults apply per key once the table is present: prefetch_all is *true* here.
    return PrefetchConfig(
        enable=_bool(p, "enable", path),
        threads=_uint(p, "threads_count", path, 64, 8),
        batch_size=_uint(p, "merging_size", path, 64, _MIB),
        bandwidth_limit=_uint(p, "bandwidth_rate", path, 32, 0),
        prefetch_all=_bool(p, "prefetch_all", path, True),
        stream_prefetch=_bool(p, "stream_prefetch", path),
    )


def _v1_backend(ctx: _Ctx, device: dict[str, Any]) -> BackendConfig:
    path = "device.backend"
    b = ctx.table(_get(device, "backend", "device", _REQUIRED), path, ("type", "config"))
    kind = _str(b, "type", path)
    config = _get(b, "config", path, _REQUIRED)
    if kind == "http-proxy":
        raise _Shape(f"{path}.type: 'http-proxy' is only accepted in a v2 configuration")
    if kind not in _BACKEND_PARSERS:
        raise _Shape(f"{path}.type: unsupported backend type {kind!r} "
                     f"(expected one of {', '.join(t for t in BACKEND_TYPES if t != 'http-proxy')})")
    sub = _BACKEND_PARSERS[kind](ctx, config, f"{path}.config")
    return BackendConfig(type=kind, **{_BACKEND_ATTR[kind]: sub})


def _v1_cache(ctx: _Ctx, device: dict[str, Any]) -> CacheConfig:
    path = "device.cache"
    c = ctx.table(_get(device, "cache", "device", {}), path, ("type", "compressed", "config", "validate"))
    kind = _str(c, "type", path, "")
    base = CacheConfig(type=kind, compressed=_bool(c, "compressed", path), validate=_bool(c, "validate", path),
                       # v1 never reads a blob-level prefetch config; upstream's default has prefetch_all.
                       prefetch=PrefetchConfig(prefetch_all=True))
    if kind in ("blobcache", "filecache", "fscache"):
        if c.get("config") is None:
            raise _Shape(f"{path}.config: missing, an object is required for cache type {kind!r}")
        if kind == "fscache":
            return dataclasses.replace(base, fscache=_fscache(ctx, c["config"], f"{path}.config"))
        return dataclasses.replace(base, filecache=_filecache(ctx, c["config"], f"{path}.config"))
    if kind in ("", "dummycache"):
        return base
    raise _Shape(f"{path}.type: unsupported cache type {kind!r} "
                 f"(expected blobcache, filecache, fscache, dummycache or \"\")")


def _v1_document(ctx: _Ctx, doc: Any) -> DaemonConfig:
    d = ctx.table(doc, "", ("device", "mode", "digest_validate", "iostats_files", "fs_prefetch",
                            "enable_xattr", "access_pattern", "latest_read_files", "amplify_io"))
    device = ctx.table(_get(d, "device", "", _REQUIRED), "device",
                       ("id", "backend", "external_backends", "cache"))
    mode = _str(d, "mode", "")
    prefetch = _v1_fs_prefetch(ctx, d)
    rafs = RafsConfig(
        mode=mode,
        batch_size=_uint(d, "amplify_io", "", 64, _MIB),
        validate=_bool(d, "digest_validate", ""),
        enable_xattr=_bool(d, "enable_xattr", ""),
        iostats_files=_bool(d, "iostats_files", ""),
        access_pattern=_bool(d, "access_pattern", ""),
        latest_read_files=_bool(d, "latest_read_files", ""),
        prefetch=prefetch,
    )
    backend = _v1_backend(ctx, device)
    cache = _v1_cache(ctx, device)
    # fs_prefetch doubles as the blob-level prefetch when it is enabled (pitfall 11).
    if not cache.prefetch.enable and prefetch.enable:
        cache = dataclasses.replace(cache, prefetch=prefetch)
    return DaemonConfig(
        version=2,
        id=_str(device, "id", "device", ""),
        backend=backend,
        external_backends=_external_backends(ctx, device, "external_backends", "device"),
        cache=cache,
        rafs=rafs,
        format="v1-json",
    )


# --------------------------------------------------------------------------------------
# Validation (semantic rules), parameterised by how the key paths are spelled.
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Names:
    backend_type: str
    backend_section: Callable[[str], str]
    cache_type: str
    cache_section: Callable[[str], str]
    cache_prefetch: str
    rafs_mode: str
    rafs_batch_size: str
    rafs_prefetch: str
    threads: str
    batch_size: str


_V2_NAMES = _Names(
    backend_type="backend.type", backend_section=lambda t: f"backend.{t}",
    cache_type="cache.type", cache_section=lambda k: f"cache.{k}", cache_prefetch="cache.prefetch",
    rafs_mode="rafs.mode", rafs_batch_size="rafs.batch_size", rafs_prefetch="rafs.prefetch",
    threads="threads", batch_size="batch_size",
)
_V1_NAMES = _Names(
    backend_type="device.backend.type", backend_section=lambda t: "device.backend.config",
    cache_type="device.cache.type", cache_section=lambda k: "device.cache.config", cache_prefetch="fs_prefetch",
    rafs_mode="mode", rafs_batch_size="amplify_io", rafs_prefetch="fs_prefetch",
    threads="threads_count", batch_size="merging_size",
)


def _trimmed(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _check_auth(auth: str | None, where: str) -> str | None:
    if auth is None:
        return None
    try:
        raw = base64.b64decode(auth.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise _Refusal(f"{where}: invalid base64 encoded registry auth ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refusal(f"{where}: registry auth does not decode to UTF-8 text") from None
    if ":" not in text:
        raise _Refusal(f"{where}: registry auth must be base64 of 'username:password'")
    return auth


def _need_nonempty(value: str, where: str) -> None:
    if not value:
        raise _Refusal(f"{where}: must be a non-empty string")


def _validate_backend(b: BackendConfig, n: _Names) -> None:
    if b.type not in BACKEND_TYPES:
        raise _Refusal(f"{n.backend_type}: unsupported backend type {b.type!r} "
                       f"(expected one of {', '.join(BACKEND_TYPES)})")
    section = n.backend_section(b.type)
    sub = b.active
    if sub is None:
        raise _Refusal(f"{section}: missing, required by {n.backend_type} = {b.type!r}")
    if isinstance(sub, LocalfsConfig):
        if not sub.blob_file and not sub.dir:
            raise _Refusal(f"{section}: one of 'blob_file' or 'dir' must be a non-empty string")
    elif isinstance(sub, LocaldiskConfig):
        _need_nonempty(sub.device_path, f"{section}.device_path")
    elif isinstance(sub, OssConfig):
        _need_nonempty(sub.endpoint, f"{section}.endpoint")
        _need_nonempty(sub.bucket_name, f"{section}.bucket_name")
    elif isinstance(sub, S3Config):
        _need_nonempty(sub.region, f"{section}.region")
        _need_nonempty(sub.bucket_name, f"{section}.bucket_name")
    elif isinstance(sub, RegistryConfig):
        _need_nonempty(sub.host, f"{section}.host")
        _need_nonempty(sub.repo, f"{section}.repo")
        _check_auth(sub.auth, f"{section}.auth")
    elif isinstance(sub, HttpProxyConfig):
        if not (sub.addr.startswith(("http://", "https://")) or os.path.isabs(sub.addr)):
            raise _Refusal(f"{section}.addr: must start with http:// or https://, or be an absolute "
                           f"Unix socket path, got {sub.addr!r}")


def _validate_prefetch(p: PrefetchConfig, where: str, n: _Names) -> None:
    if not p.enable:
        return
    if p.batch_size > _MAX_BATCH:
        raise _Refusal(f"{where}.{n.batch_size}: must be at most {_MAX_BATCH:#x}, got {p.batch_size:#x}")
    if not 1 <= p.threads <= _MAX_THREADS:
        raise _Refusal(f"{where}.{n.threads}: must be 1-{_MAX_THREADS} when prefetch is enabled, "
                       f"got {p.threads}")


def _validate_cache(c: CacheConfig, n: _Names) -> None:
    if c.type in ("blobcache", "filecache"):
        section = n.cache_section("filecache")
        if c.filecache is None:
            raise _Refusal(f"{section}: missing, required by {n.cache_type} = {c.type!r}")
        _need_nonempty(c.filecache.work_dir, f"{section}.work_dir")
        key = c.filecache.encryption_key
        if c.filecache.enable_encryption and (len(key) != 64 or any(ch not in "0123456789abcdefABCDEF"
                                                                    for ch in key)):
            raise _Refusal(f"{section}.encryption_key: must be 64 hex digits when enable_encryption is true")
    elif c.type == "fscache":
        section = n.cache_section("fscache")
        if c.fscache is None:
            raise _Refusal(f"{section}: missing, required by {n.cache_type} = {c.type!r}")
        _need_nonempty(c.fscache.work_dir, f"{section}.work_dir")
    elif c.type not in ("", "dummycache"):
        raise _Refusal(f"{n.cache_type}: unsupported cache type {c.type!r} "
                       f"(expected blobcache, filecache, fscache, dummycache or \"\")")
    _validate_prefetch(c.prefetch, n.cache_prefetch, n)


def _validate_rafs(r: RafsConfig, n: _Names) -> None:
    if r.mode not in RAFS_MODES:
        raise _Refusal(f"{n.rafs_mode}: must be 'direct' or 'cached', got {r.mode!r}")
    if r.batch_size > _MAX_BATCH:
        raise _Refusal(f"{n.rafs_batch_size}: must be at most {_MAX_BATCH:#x}, got {r.batch_size:#x}")
    _validate_prefetch(r.prefetch, n.rafs_prefetch, n)


def _validate(cfg: DaemonConfig, n: _Names) -> None:
    if cfg.version != 2:
        raise _Refusal(f"version: must be 2, got {cfg.version}")
    if cfg.backend is not None:
        _validate_backend(cfg.backend, n)
    if cfg.cache is not None:
        _validate_cache(cfg.cache, n)
    if cfg.rafs is not None:
        _validate_rafs(cfg.rafs, n)


# --------------------------------------------------------------------------------------
# Entry points.
# --------------------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text, parse_constant=_reject_constant), None
    except RecursionError:
        return None, "JSON nesting is too deep"
    except ValueError as exc:  # JSONDecodeError, and ints over the digit limit
        return None, f"not valid JSON ({exc})"


def _load_toml(text: str) -> tuple[Any, str | None]:
    try:
        return tomllib.loads(text), None
    except RecursionError:
        return None, "TOML nesting is too deep"
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        return None, f"not valid TOML ({exc})"


def _with_hints(reason: str, ctx: _Ctx | None) -> str:
    if ctx is not None and ctx.hints:
        return f"{reason} ({'; '.join(ctx.hints)})"
    return reason


def _accept(cfg: DaemonConfig, ctx: _Ctx, fmt: str) -> DaemonConfig:
    for key in ctx.unknown:
        log.debug("ignoring unknown configuration key %s", key)
    return dataclasses.replace(cfg, format=fmt, unknown_keys=tuple(ctx.unknown))


def _try_v2(doc: Any, fmt: str) -> tuple[DaemonConfig | None, str, _Ctx]:
    """Parse a v2 tree: (config, "", ctx) on success, (None, reason, ctx) on a shape error.

    A validation failure is final, as upstream: it raises ConfigError.
    """
    ctx = _Ctx()
    try:
        cfg = _v2_document(ctx, doc)
    except _Shape as exc:
        return None, str(exc), ctx
    try:
        _validate(cfg, _V2_NAMES)
    except _Refusal as exc:
        raise ConfigError(f"{_INVALID}: {_with_hints(str(exc), ctx)}") from None
    return _accept(cfg, ctx, fmt), "", ctx


def parse_daemon_config(text: str) -> DaemonConfig:
    """Parse a daemon config string the way nydusd does: v2 JSON, v2 TOML, then v1 JSON.

    Returns a validated :class:`DaemonConfig`.  Raises :class:`ConfigError`:
    ``"invalid configuration: <key path>: <reason>"`` when a v2 document is
    well-formed but invalid, otherwise ``"failed to parse configuration
    information: <reason>"`` with the reason from the parser the text was most
    likely meant for (a JSON object with ``version`` → v2 JSON, any other JSON
    object → v1, parseable TOML → v2 TOML, else the syntax error).
    """
    if not isinstance(text, str):
        raise ConfigError(f"{_FAILED}: the configuration must be text, got {type(text).__name__}")
    if not text.strip():
        raise ConfigError(f"{_FAILED}: the configuration is empty")

    json_doc, json_err = _load_json(text)
    v2_json_reason = v2_json_ctx = None
    if isinstance(json_doc, dict):
        cfg, v2_json_reason, v2_json_ctx = _try_v2(json_doc, "v2-json")
        if cfg is not None:
            return cfg

    toml_doc, toml_err = _load_toml(text)
    toml_reason = toml_ctx = None
    if toml_err is None:
        cfg, toml_reason, toml_ctx = _try_v2(toml_doc, "v2-toml")
        if cfg is not None:
            return cfg

    if isinstance(json_doc, dict):
        ctx = _Ctx()
        try:
            cfg = _v1_document(ctx, json_doc)
            _validate(cfg, _V1_NAMES)
        except _Refusal as exc:
            if "version" in json_doc:
                reason = _with_hints(str(v2_json_reason), v2_json_ctx)
            else:
                reason = _with_hints(str(exc), ctx)
            raise ConfigError(f"{_FAILED}: {reason}") from None
        return _accept(cfg, ctx, "v1-json")

    if json_err is None:
        reason = f"configuration: must be a JSON object or a TOML document, got {_describe(json_doc)}"
    elif toml_reason is not None:
        reason = _with_hints(toml_reason, toml_ctx)
    elif text.lstrip().startswith("{"):
        reason = str(json_err)
    else:
        reason = str(toml_err)
    raise ConfigError(f"{_FAILED}: {reason}")


def load_config_file(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read and parse a config file; refuses files over 1 MiB as upstream's typed loaders do."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {os.fspath(path)}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_FILE_SIZE:
        raise ConfigError(f"configuration file {os.fspath(path)}: configuration file size is too big "
                          f"(more than {MAX_CONFIG_FILE_SIZE} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {os.fspath(path)}: not UTF-8 text ({exc.reason} "
                          f"at byte {exc.start})") from None
    return parse_daemon_config(text)


def localfs_dir_config(dir: str) -> DaemonConfig:
    """The config ``--localfs-dir DIR`` synthesises: localfs at DIR, blobcache in DIR, direct mode.

    Built from the same v1 JSON text upstream formats, so it goes through the same
    parser (its ``readahead`` and ``compressed`` keys are ignored there too).
    """
    quoted = json.dumps(os.fspath(dir))
    text = (
        '{"device": {"backend": {"type": "localfs", "config": {"dir": %s, "readahead": true}},'
        ' "cache": {"type": "blobcache", "config": {"compressed": false, "work_dir": %s}}},'
        ' "mode": "direct", "digest_validate": false, "iostats_files": false}' % (quoted, quoted)
    )
    return parse_daemon_config(text)
