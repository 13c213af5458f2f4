"""nydus_vfs.config: the three formats, what drivers send, defaults, and every refusal."""

from __future__ import annotations

import base64
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.config import (
    MAX_CONFIG_FILE_SIZE,
    CacheConfig,
    DaemonConfig,
    FileCacheConfig,
    PrefetchConfig,
    ProxyConfig,
    RafsConfig,
    load_config_file,
    localfs_dir_config,
    parse_daemon_config,
)
from nydus_vfs.errors import ConfigError

AUTH = base64.b64encode(b"user:secret").decode()


def v1(**over):
    """A minimal valid v1 document (localfs + blobcache), with top-level overrides."""
    doc = {
        "device": {
            "backend": {"type": "localfs", "config": {"dir": "/blobs"}},
            "cache": {"type": "blobcache", "config": {"work_dir": "/cache"}},
        },
        "mode": "direct",
    }
    doc.update(over)
    return doc


def registry_v1(config: dict) -> str:
    return json.dumps({"device": {"backend": {"type": "registry", "config": config}}, "mode": "direct"})


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_daemon_config(text)
    return str(info.value)


# --------------------------------------------------------------------------------------
# nydus-surface.md §2.7: what the drivers actually send.
# --------------------------------------------------------------------------------------

# nydus-snapshotter (fusedev): its template completed by Supplement/FillAuth and then
# json.Marshal'ed by Go, so empty structs such as ``proxy`` still appear, plus the
# keys nydusd ignores (readahead, warmup, id_mapping) and the deprecated one.
SNAPSHOTTER_FUSEDEV = json.dumps({
    "device": {
        "id": "/42",
        "backend": {
            "type": "registry",
            "config": {
                "readahead": False,
                "host": "index.docker.io",
                "repo": "library/ubuntu",
                "auth": AUTH,
                "scheme": "https",
                "ca_cert_files": ["/etc/nydus/certs.d/ca.pem"],
                "proxy": {"fallback": False},
                "timeout": 5,
                "connect_timeout": 5,
                "retry_limit": 2,
            },
        },
        "cache": {"type": "blobcache",
                  "config": {"work_dir": "/var/lib/nydus/cache", "disable_indexed_map": False}},
    },
    "mode": "direct",
    "digest_validate": False,
    "enable_xattr": True,
    "amplify_io": 1048576,
    "fs_prefetch": {"enable": True, "prefetch_all": True, "threads_count": 8, "merging_size": 1048576},
    "warmup": 1024,
    "id_mapping": [0, 100000, 65536],
})


def test_snapshotter_fusedev_config():
    cfg = parse_daemon_config(SNAPSHOTTER_FUSEDEV)
    assert cfg.format == "v1-json"
    assert cfg.id == "/42"
    reg = cfg.backend.registry
    assert cfg.backend.type == "registry" and cfg.backend.active is reg
    assert (reg.host, reg.repo, reg.auth, reg.scheme) == ("index.docker.io", "library/ubuntu", AUTH, "https")
    assert reg.retry_limit == 2 and reg.ca_cert_files == ("/etc/nydus/certs.d/ca.pem",)
    # A Go-marshalled empty proxy struct turns fallback off but keeps the other defaults.
    assert reg.proxy == ProxyConfig(fallback=False)
    assert cfg.cache.type == "blobcache" and cfg.cache.work_dir == "/var/lib/nydus/cache"
    assert cfg.rafs.enable_xattr and cfg.rafs.mode == "direct"
    assert cfg.rafs.prefetch == PrefetchConfig(enable=True, threads=8, batch_size=1048576, prefetch_all=True)
    # fs_prefetch doubles as the blob-level prefetch when enabled.
    assert cfg.cache.prefetch == cfg.rafs.prefetch
    assert set(cfg.unknown_keys) == {"warmup", "id_mapping", "device.backend.config.readahead"}


def test_snapshotter_bearer_token_and_secret_filtered_copy():
    token = json.loads(SNAPSHOTTER_FUSEDEV)
    cfg_backend = token["device"]["backend"]["config"]
    del cfg_backend["auth"]
    cfg_backend["registry_token"] = "  bearer-xyz \n"
    assert parse_daemon_config(json.dumps(token)).backend.registry.registry_token == "bearer-xyz"
    # With enable_backend_source the snapshotter writes the file without secrets.
    del cfg_backend["registry_token"]
    reg = parse_daemon_config(json.dumps(token)).backend.registry
    assert reg.auth is None and reg.registry_token is None


def test_kata_sends_snapshotter_localfs_string_verbatim(caplog):
    # Kata passes the snapshotter's extraoption config string unchanged.
    text = json.dumps({
        "device": {"backend": {"type": "localfs",
                               "config": {"dir": "/var/lib/nydus/cache/", "readahead": False}},
                   "cache": {"type": "blobcache", "config": {"work_dir": "/var/lib/nydus/cache",
                                                             "disable_indexed_map": False}}},
        "mode": "direct", "digest_validate": False, "enable_xattr": True, "amplify_io": 1048576,
        "fs_prefetch": {"enable": True, "prefetch_all": False, "threads_count": 2},
    })
    with caplog.at_level(logging.DEBUG, logger="nydus_vfs.config"):
        cfg = parse_daemon_config(text)
    assert cfg.backend.localfs.dir == "/var/lib/nydus/cache/"
    assert cfg.rafs.prefetch == PrefetchConfig(enable=True, threads=2, batch_size=1048576)
    logged = [r.getMessage() for r in caplog.records if r.name == "nydus_vfs.config"]
    assert any("device.backend.config.readahead" in m for m in logged)
    assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "nydus_vfs.config")


def test_nydusify_check_config():
    text = """{
      "device": {
        "backend": {"type": "localfs", "config": {"dir": "/fake"}},
        "external_backend": {"config_path": "/tmp/ext.json"},
        "cache": {"type": "blobcache", "config": {"work_dir": "/tmp/cache"}}
      },
      "mode": "direct",
      "iostats_files": false,
      "fs_prefetch": {"enable": true, "threads_count": 10, "merging_size": 131072},
      "digest_validate": true,
      "enable_xattr": true
    }"""
    cfg = parse_daemon_config(text)
    assert "device.external_backend" in cfg.unknown_keys
    # prefetch_all defaults to TRUE when fs_prefetch is present without it.
    assert cfg.rafs.prefetch == PrefetchConfig(enable=True, threads=10, batch_size=131072, prefetch_all=True)
    assert cfg.rafs.validate and cfg.chunk_validation_enabled


@pytest.mark.parametrize("cache_type", ["blobcache", ""])
@pytest.mark.parametrize("mode", ["direct", "cached"])
def test_smoke_test_v1_config(cache_type, mode):
    text = json.dumps({
        "id": "/mnt",
        "device": {
            "backend": {"type": "localfs", "config": {"dir": "/blobs"}},
            "external_backend": {"config_path": ""},
            "cache": {"type": cache_type, "config": {"compressed": True, "work_dir": "/cache"}},
        },
        "mode": mode,
        "iostats_files": True,
        "fs_prefetch": {"enable": False, "threads_count": 10, "merging_size": 131072},
        "digest_validate": False,
        "enable_xattr": True,
        "latest_read_files": True,
        "access_pattern": True,
        "amplify_io": 268435456,
    })
    cfg = parse_daemon_config(text)
    assert cfg.id == ""  # the top-level id is ignored; only device.id counts
    assert "id" in cfg.unknown_keys
    assert cfg.rafs.mode == mode and cfg.rafs.batch_size == 0x10000000
    assert cfg.rafs.iostats_files and cfg.rafs.latest_read_files and cfg.rafs.access_pattern
    assert cfg.cache.type == cache_type
    assert cfg.cache.work_dir == ("/cache" if cache_type else None)
    # A disabled fs_prefetch is not copied: the cache keeps upstream's default.
    assert cfg.cache.prefetch == PrefetchConfig(prefetch_all=True)


def test_smoke_test_v2_overlay_config():
    text = """{
      "version": 2,
      "backend": {"type": "localfs", "localfs": {"dir": "/blobs"}},
      "cache": {"type": "blobcache", "filecache": {"work_dir": "/cache"}},
      "rafs": {"mode": "direct", "enable_xattr": true},
      "overlay": {"upper_dir": "/upper", "work_dir": "/work"}
    }"""
    cfg = parse_daemon_config(text)
    assert cfg.format == "v2-json" and cfg.unknown_keys == ()
    assert (cfg.overlay.upper_dir, cfg.overlay.work_dir) == ("/upper", "/work")
    assert cfg.rafs == RafsConfig(enable_xattr=True)
    assert cfg.cache.filecache == FileCacheConfig(work_dir="/cache")


def test_shipped_v1_template_without_host_is_refused():
    # misc/configs/nydusd-config.json is a template the snapshotter completes.
    msg = refused(registry_v1({"timeout": 5, "connect_timeout": 5, "retry_limit": 2,
                               "skip_verify": False, "ca_cert_files": ["/ca.pem"]}))
    assert msg == "failed to parse configuration information: device.backend.config.host: missing required key"


# A condensed version of misc/configs/nydusd-config-v2.toml with its two mistakes:
# the ``[backend.registy]`` typo and ``enable_encryption`` under [cache].
SHIPPED_TOML = """
version = 2
id = "my_id"

[backend]
type = "localfs"

[backend.localfs]
blob_file = "/tmp/nydus.blob.data"
dir = "/tmp"
alt_dirs = ["/var/nydus/cache"]

[backend.oss]
scheme = "http"
endpoint = "my_endpoint"
bucket_name = "my_bucket_name"
access_key_id = "id"
access_key_secret = "secret"
timeout = 10

[backend.oss.proxy]
url = "localhost:6789"
check_interval = 5

[backend.registy]
host = "my.registry.com"
repo = "nydus"
auth = "base64_encoded"

[backend.registry.proxy]
url = "localhost:6789"
fallback = true

[cache]
type = "filecache"
compressed = true
validate = true
enable_encryption = true

[cache.filecache]
work_dir = "."

[cache.prefetch]
enable = true
threads = 8
batch_size = 1000000
bandwidth_limit = 10000000

[rafs]
mode = "direct"
batch_size = 1000000
validate = true

[rafs.prefetch]
enable = true
threads = 8
prefetch_all = true
"""


def test_shipped_toml_with_registy_typo_is_refused_with_reason():
    # ``[backend.registry.proxy]`` creates a registry table that has no host, because
    # the host went into the misspelt table: upstream refuses it too.
    msg = refused(SHIPPED_TOML)
    assert msg.startswith("failed to parse configuration information: backend.registry.host: missing required key")
    assert "unknown key 'backend.registy': did you mean 'backend.registry'?" in msg


def test_toml_typo_with_registry_selected_is_refused_with_reason():
    text = SHIPPED_TOML.replace('type = "localfs"', 'type = "registry"', 1).replace(
        "[backend.registry.proxy]", "[backend.other]")
    msg = refused(text)
    assert msg.startswith("invalid configuration: backend.registry: missing, required by backend.type = 'registry'")
    assert "did you mean 'backend.registry'" in msg


def test_toml_typo_is_only_ignored_when_the_localfs_backend_is_selected():
    cfg = parse_daemon_config(SHIPPED_TOML.replace("[backend.registry.proxy]", "[backend.other]"))
    assert cfg.format == "v2-toml" and cfg.id == "my_id"
    assert cfg.backend.localfs.alt_dirs == ("/var/nydus/cache",)
    assert cfg.backend.oss.timeout == 10 and cfg.backend.oss.proxy.url == "localhost:6789"
    assert {"backend.registy", "backend.other", "cache.enable_encryption"} <= set(cfg.unknown_keys)
    assert cfg.cache.filecache.enable_encryption is False
    assert cfg.cache.prefetch == PrefetchConfig(enable=True, threads=8, batch_size=1000000,
                                                bandwidth_limit=10000000)
    assert cfg.rafs.prefetch == PrefetchConfig(enable=True, threads=8, batch_size=1048576, prefetch_all=True)


# --------------------------------------------------------------------------------------
# Defaults.
# --------------------------------------------------------------------------------------

def test_v1_defaults():
    cfg = parse_daemon_config(json.dumps(v1()))
    assert cfg.version == 2 and cfg.id == ""
    assert cfg.rafs == RafsConfig(mode="direct", batch_size=1048576)
    # No fs_prefetch at all: every field zero/false.
    assert cfg.rafs.prefetch == PrefetchConfig()
    assert cfg.backend.localfs.blob_file == "" and cfg.backend.localfs.alt_dirs == ()
    assert cfg.cache == CacheConfig(type="blobcache", prefetch=PrefetchConfig(prefetch_all=True),
                                    filecache=FileCacheConfig(work_dir="/cache"))
    assert cfg.overlay is None and cfg.external_backends == ()


def test_v1_fs_prefetch_present_defaults():
    cfg = parse_daemon_config(json.dumps(v1(fs_prefetch={})))
    assert cfg.rafs.prefetch == PrefetchConfig(enable=False, threads=8, batch_size=1048576, prefetch_all=True)


def test_v1_cache_defaults_to_no_cache_and_work_dir_to_dot():
    doc = v1()
    del doc["device"]["cache"]
    cfg = parse_daemon_config(json.dumps(doc))
    assert cfg.cache.type == "" and cfg.cache.work_dir is None
    doc["device"]["cache"] = {"type": "filecache", "config": {}}
    assert parse_daemon_config(json.dumps(doc)).cache.work_dir == "."
    doc["device"]["cache"] = {"type": "fscache", "config": {}}
    cfg = parse_daemon_config(json.dumps(doc))
    assert cfg.cache.is_fscache and cfg.cache.fscache.work_dir == "."


def test_registry_defaults():
    reg = parse_daemon_config(registry_v1({"host": "h", "repo": "r"})).backend.registry
    assert (reg.scheme, reg.timeout, reg.connect_timeout, reg.retry_limit, reg.skip_verify) == (
        "https", 5, 5, 0, False)
    assert reg.auth is None and reg.registry_token is None
    assert reg.blob_url_scheme == "" and reg.blob_redirected_host == ""
    assert reg.proxy == ProxyConfig(url="", ping_url="", fallback=True, check_interval=5, use_http=False,
                                    check_pause_elapsed=300, dragonfly_scheduler_endpoint="")


def test_v2_defaults():
    cfg = parse_daemon_config('version = 2\n[backend]\ntype = "localfs"\n[backend.localfs]\ndir = "/b"\n'
                              '[cache]\n[rafs]\n[rafs.prefetch]\nenable = false\n')
    assert cfg.rafs == RafsConfig(prefetch=PrefetchConfig(threads=8, batch_size=1048576))
    assert cfg.cache == CacheConfig()
    assert cfg.rafs.prefetch.prefetch_all is False  # v2 default differs from v1


def test_v2_without_sections_parses_but_cannot_mount_rafs():
    cfg = parse_daemon_config('{"version": 2, "id": "x"}')
    assert cfg.backend is None and cfg.cache is None and cfg.rafs is None
    with pytest.raises(ConfigError, match=r"^rafs: no configuration information for rafs"):
        parse_daemon_config('{"version": 2, "backend": {"type": "localfs", "localfs": {"dir": "/"}}, '
                            '"cache": {}}').require_rafs_sections()
    parse_daemon_config(json.dumps(v1())).require_rafs_sections()


@pytest.mark.parametrize("kind", ["", "dummycache", "blobcache", "filecache", "fscache"])
def test_accepted_cache_types(kind):
    doc = v1()
    doc["device"]["cache"]["type"] = kind
    assert parse_daemon_config(json.dumps(doc)).cache.type == kind


def test_all_backend_types_parse_in_v1_and_v2():
    subs = {
        "localdisk": {"device_path": "/dev/sdb", "disable_gpt": True},
        "oss": {"endpoint": "oss.example.com", "bucket_name": "b", "object_prefix": "nydus/",
                "access_key_id": "id", "access_key_secret": "secret", "retry_limit": 3},
        "s3": {"endpoint": "", "region": "us-east-1", "bucket_name": "b", "scheme": "http"},
        "registry": {"host": "h", "repo": "r", "skip_verify": True, "registry_token": "t"},
    }
    for kind, sub in subs.items():
        cfg1 = parse_daemon_config(json.dumps({"device": {"backend": {"type": kind, "config": sub}},
                                               "mode": "cached"}))
        cfg2 = parse_daemon_config(json.dumps({"version": 2, "backend": {"type": kind, kind: sub}}))
        assert cfg1.backend == cfg2.backend
        assert cfg1.backend.active is not None
    hp = parse_daemon_config(json.dumps({"version": 2, "backend": {
        "type": "http-proxy", "http-proxy": {"addr": "/run/proxy.sock", "path": "/ignored"}}}))
    assert hp.backend.http_proxy.addr == "/run/proxy.sock" and hp.backend.http_proxy.timeout == 5


# --------------------------------------------------------------------------------------
# Refusals: each names the key path.
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.pop("mode"), "mode: missing required key"),
    (lambda d: d.pop("device"), "device: missing required key"),
    (lambda d: d["device"].pop("backend"), "device.backend: missing required key"),
    (lambda d: d["device"]["backend"].pop("config"), "device.backend.config: missing required key"),
    (lambda d: d["device"]["backend"].pop("type"), "device.backend.type: missing required key"),
    (lambda d: d["device"]["cache"].pop("config"), "device.cache.config: missing"),
    (lambda d: d.update(mode="lazy"), "mode: must be 'direct' or 'cached', got 'lazy'"),
    (lambda d: d.update(mode=1), "mode: must be a string, got 1"),
    (lambda d: d.update(digest_validate="yes"), "digest_validate: must be true or false"),
    (lambda d: d.update(amplify_io=0x10000001), "amplify_io: must be at most 0x10000000, got 0x10000001"),
    (lambda d: d.update(amplify_io=-1), "amplify_io: must be an unsigned 64-bit integer, got -1"),
    (lambda d: d.update(fs_prefetch=None), "fs_prefetch: must be an object/table, got null"),
    (lambda d: d.update(fs_prefetch={"enable": True, "threads_count": 0}),
     "fs_prefetch.threads_count: must be 1-1024 when prefetch is enabled, got 0"),
    (lambda d: d.update(fs_prefetch={"enable": True, "threads_count": 1025}),
     "fs_prefetch.threads_count: must be 1-1024 when prefetch is enabled, got 1025"),
    (lambda d: d.update(fs_prefetch={"enable": True, "merging_size": 0x10000001}),
     "fs_prefetch.merging_size: must be at most 0x10000000"),
    (lambda d: d.update(fs_prefetch={"enable": True, "bandwidth_rate": 1 << 32}),
     "fs_prefetch.bandwidth_rate: must be an unsigned 32-bit integer"),
    (lambda d: d["device"]["cache"].update(type="dummy"), "device.cache.type: unsupported cache type 'dummy'"),
    (lambda d: d["device"]["cache"]["config"].update(work_dir=""),
     "device.cache.config.work_dir: must be a non-empty string"),
    (lambda d: d["device"]["cache"]["config"].update(enable_encryption=True, encryption_key="abcd"),
     "device.cache.config.encryption_key: must be 64 hex digits"),
    (lambda d: d["device"]["backend"].update(type="http-proxy"),
     "device.backend.type: 'http-proxy' is only accepted in a v2 configuration"),
    (lambda d: d["device"]["backend"].update(type="nfs"), "device.backend.type: unsupported backend type 'nfs'"),
    (lambda d: d["device"]["backend"]["config"].update(dir=""),
     "device.backend.config: one of 'blob_file' or 'dir' must be a non-empty string"),
    (lambda d: d["device"]["backend"]["config"].update(alt_dirs=["/a", 2]),
     "device.backend.config.alt_dirs[1]: must be a string, got 2"),
    (lambda d: d["device"].update(external_backends=[{"type": "x", "config": {}}]),
     "device.external_backends[0].patch: missing required key"),
])
def test_v1_refusals_name_the_key(mutate, expected):
    doc = v1()
    mutate(doc)
    msg = refused(json.dumps(doc))
    assert msg.startswith("failed to parse configuration information: " + expected), msg


@pytest.mark.parametrize("config, expected", [
    ({"repo": "r"}, "device.backend.config.host: missing required key"),
    ({"host": "h"}, "device.backend.config.repo: missing required key"),
    ({"host": "", "repo": "r"}, "device.backend.config.host: must be a non-empty string"),
    ({"host": "h", "repo": ""}, "device.backend.config.repo: must be a non-empty string"),
    ({"host": "h", "repo": "r", "auth": "not base64!"}, "device.backend.config.auth: invalid base64"),
    ({"host": "h", "repo": "r", "auth": base64.b64encode(b"nocolon").decode()},
     "device.backend.config.auth: registry auth must be base64 of 'username:password'"),
    ({"host": "h", "repo": "r", "auth": base64.b64encode(b"\xff:\xfe").decode()},
     "device.backend.config.auth: registry auth does not decode to UTF-8"),
    ({"host": "h", "repo": "r", "retry_limit": 256},
     "device.backend.config.retry_limit: must be an unsigned 8-bit integer, got 256"),
    ({"host": "h", "repo": "r", "timeout": 5.0}, "device.backend.config.timeout: must be an unsigned 32-bit"),
    ({"host": "h", "repo": "r", "proxy": None}, "device.backend.config.proxy: must be an object/table, got null"),
    ({"host": "h", "repo": "r", "proxy": {"check_interval": "5"}},
     "device.backend.config.proxy.check_interval: must be an unsigned 64-bit integer"),
    ({"host": "h", "repo": "r", "ca_cert_files": "/ca.pem"},
     "device.backend.config.ca_cert_files: must be an array of strings"),
])
def test_registry_refusals(config, expected):
    msg = refused(registry_v1(config))
    assert msg.startswith("failed to parse configuration information: " + expected), msg


def test_blank_auth_means_none_and_valid_auth_is_kept():
    assert parse_daemon_config(registry_v1({"host": "h", "repo": "r", "auth": "  "})).backend.registry.auth is None
    assert parse_daemon_config(registry_v1({"host": "h", "repo": "r", "auth": AUTH})).backend.registry.auth == AUTH


@pytest.mark.parametrize("backend, expected", [
    ({"type": "oss", "oss": {"bucket_name": "b"}}, "backend.oss.endpoint: missing required key"),
    ({"type": "oss", "oss": {"endpoint": "", "bucket_name": "b"}}, "backend.oss.endpoint: must be a non-empty"),
    ({"type": "s3", "s3": {"region": "r", "bucket_name": "b"}}, "backend.s3.endpoint: missing required key"),
    ({"type": "s3", "s3": {"endpoint": "", "region": "", "bucket_name": "b"}},
     "backend.s3.region: must be a non-empty string"),
    ({"type": "localdisk", "localdisk": {}}, "backend.localdisk.device_path: must be a non-empty string"),
    ({"type": "http-proxy", "http-proxy": {}}, "backend.http-proxy.addr: missing required key"),
    ({"type": "http-proxy", "http-proxy": {"addr": "relative.sock"}}, "backend.http-proxy.addr: must start with"),
    ({"type": "registry"}, "backend.registry: missing, required by backend.type = 'registry'"),
    ({"type": "ftp"}, "backend.type: unsupported backend type 'ftp'"),
    ({"localfs": {"dir": "/"}}, "backend.type: missing required key"),
])
def test_v2_backend_refusals(backend, expected):
    msg = refused(json.dumps({"version": 2, "backend": backend}))
    assert expected in msg, msg


@pytest.mark.parametrize("doc, expected", [
    ({"version": 1}, "invalid configuration: version: must be 2, got 1"),
    ({"version": 2, "cache": {"type": "blobcache"}},
     "invalid configuration: cache.filecache: missing, required by cache.type = 'blobcache'"),
    ({"version": 2, "cache": {"type": "fscache", "fscache": {"work_dir": ""}}},
     "invalid configuration: cache.fscache.work_dir: must be a non-empty string"),
    ({"version": 2, "cache": {"type": "dummy"}}, "invalid configuration: cache.type: unsupported cache type 'dummy'"),
    ({"version": 2, "cache": {"prefetch": {"enable": True, "threads": 0}}},
     "invalid configuration: cache.prefetch.threads: must be 1-1024 when prefetch is enabled, got 0"),
    ({"version": 2, "rafs": {"prefetch": {"enable": True, "batch_size": 0x10000001}}},
     "invalid configuration: rafs.prefetch.batch_size: must be at most 0x10000000"),
    ({"version": 2, "rafs": {"mode": "lazy"}}, "invalid configuration: rafs.mode: must be 'direct' or 'cached'"),
    ({"version": 2, "rafs": {"batch_size": 0x10000001}}, "invalid configuration: rafs.batch_size: must be at most"),
    ({"version": 2, "rafs": {"prefetch": {"threads": 4}}},
     "failed to parse configuration information: rafs.prefetch.enable: missing required key"),
    ({"version": 2, "overlay": {"upper_dir": "/u"}},
     "failed to parse configuration information: overlay.work_dir: missing required key"),
    ({"version": "2"}, "failed to parse configuration information: version: must be an unsigned 32-bit integer"),
    ({"version": 2, "external_backends": [{"patch": {"a": 1}, "type": "t", "config": {}}]},
     "failed to parse configuration information: external_backends[0].patch.a: must be a string, got 1"),
])
def test_v2_refusals(doc, expected):
    msg = refused(json.dumps(doc))
    assert msg.startswith(expected), msg


def test_disabled_prefetch_is_not_range_checked():
    # Upstream only checks threads/batch_size when the prefetch is enabled.
    cfg = parse_daemon_config(json.dumps(v1(fs_prefetch={"enable": False, "threads_count": 0})))
    assert cfg.rafs.prefetch.threads == 0


@pytest.mark.parametrize("text, expected", [
    ("", "the configuration is empty"),
    ("   \n", "the configuration is empty"),
    ("{", "not valid JSON"),
    ("mode = ", "not valid TOML"),
    ("[1, 2]", "must be a JSON object or a TOML document, got an array"),
    ("42", "must be a JSON object or a TOML document, got 42"),
    ('{"mode": NaN}', "not valid JSON"),
    ("[" * 100000, "not valid"),
    ('{"a": ' + "9" * 10000 + "}", "not valid JSON"),
    ('title = "x"', "version: missing required key"),
])
def test_unparseable_text(text, expected):
    msg = refused(text)
    assert msg.startswith("failed to parse configuration information: ") and expected in msg, msg


def test_non_text_is_refused():
    with pytest.raises(ConfigError, match="must be text"):
        parse_daemon_config(b"{}")  # type: ignore[arg-type]


def test_v2_shape_error_falls_through_to_v1():
    # A v1 document carrying a non-numeric "version" is not a v2 document (serde
    # refuses it), so upstream goes on and accepts it as v1.
    cfg = parse_daemon_config(json.dumps(v1(version="1.0")))
    assert cfg.format == "v1-json" and "version" in cfg.unknown_keys


def test_v1_typo_hint_names_the_near_miss():
    msg = refused(json.dumps({"device": v1()["device"], "mdoe": "direct"}))
    assert msg.startswith("failed to parse configuration information: mode: missing required key")
    assert "unknown key 'mdoe': did you mean 'mode'?" in msg


# --------------------------------------------------------------------------------------
# Conversions and helpers.
# --------------------------------------------------------------------------------------

def test_localfs_dir_config():
    cfg = localfs_dir_config("/var/lib/images")
    assert cfg.backend.type == "localfs" and cfg.backend.localfs.dir == "/var/lib/images"
    assert cfg.cache.type == "blobcache" and cfg.cache.work_dir == "/var/lib/images"
    assert cfg.rafs.mode == "direct" and not cfg.rafs.validate
    weird = localfs_dir_config('/tmp/a "quoted"\\dir')
    assert weird.backend.localfs.dir == '/tmp/a "quoted"\\dir'


def test_to_v2_dict_redacts_oss_and_registry_secrets_only():
    reg = parse_daemon_config(registry_v1({"host": "h", "repo": "r", "auth": AUTH, "registry_token": "t"}))
    out = reg.to_v2_dict()
    assert out["backend"]["registry"]["auth"] is None and out["backend"]["registry"]["registry_token"] is None
    assert out["backend"]["registry"]["host"] == "h"
    assert reg.to_v2_dict(redact=False)["backend"]["registry"]["auth"] == AUTH
    assert reg.backend.registry.auth == AUTH  # redaction never touches the live config

    keys = {"endpoint": "e", "bucket_name": "b", "access_key_id": "id", "access_key_secret": "sk", "region": "r"}
    oss = parse_daemon_config(json.dumps({"version": 2, "backend": {
        "type": "oss", "oss": {k: v for k, v in keys.items() if k != "region"}, "s3": keys}})).to_v2_dict()
    assert oss["backend"]["oss"]["access_key_id"] == "" and oss["backend"]["oss"]["access_key_secret"] == ""
    assert oss["backend"]["s3"]["access_key_secret"] == "sk"  # upstream keeps S3 keys


def test_to_v2_dict_shape():
    out = parse_daemon_config(SNAPSHOTTER_FUSEDEV).to_v2_dict()
    assert list(out) == ["version", "id", "backend", "external_backends", "cache", "rafs", "overlay"]
    assert out["overlay"] is None and out["backend"]["http-proxy"] is None
    assert out["rafs"]["prefetch"]["threads"] == 8 and out["cache"]["filecache"]["work_dir"] == "/var/lib/nydus/cache"
    json.dumps(out)  # serialisable as is


@pytest.mark.parametrize("text", [SNAPSHOTTER_FUSEDEV, json.dumps(v1(fs_prefetch={"enable": True})),
                                  SHIPPED_TOML.replace("[backend.registry.proxy]", "[backend.other]"),
                                  json.dumps({"version": 2, "external_backends": [
                                      {"patch": {"id": "x"}, "type": "registry", "config": {"host": "h"}}]})])
def test_v2_dict_round_trips(text):
    cfg = parse_daemon_config(text)
    again = parse_daemon_config(json.dumps(cfg.to_v2_dict(redact=False)))
    assert again == cfg and again.format == "v2-json" and again.unknown_keys == ()
    assert hash(again) == hash(cfg)


def test_with_registry_auth():
    cfg = parse_daemon_config(SNAPSHOTTER_FUSEDEV)
    other = base64.b64encode(b"a:b").decode()
    assert cfg.with_registry_auth(other).backend.registry.auth == other
    assert cfg.with_registry_auth(None) is cfg
    with pytest.raises(ConfigError, match="IMAGE_PULL_AUTH: invalid base64"):
        cfg.with_registry_auth("%%%")
    local = localfs_dir_config("/d")
    assert local.with_registry_auth(other) is local


def test_validate_on_hand_built_config():
    cfg = DaemonConfig(rafs=RafsConfig(mode="lazy"))
    with pytest.raises(ConfigError, match=r"^invalid configuration: rafs.mode"):
        cfg.validate()
    DaemonConfig(rafs=RafsConfig()).validate()


def test_load_config_file(tmp_path):
    good = tmp_path / "nydusd.json"
    good.write_text(SNAPSHOTTER_FUSEDEV)
    assert load_config_file(good).backend.registry.host == "index.docker.io"
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_CONFIG_FILE_SIZE + 1))
    with pytest.raises(ConfigError, match="configuration file size is too big"):
        load_config_file(big)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b'{"mode": "\xff"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(binary)
    with pytest.raises(ConfigError, match="cannot read configuration file .*missing.json"):
        load_config_file(tmp_path / "missing.json")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 1 << 40) | st.text(max_size=8)
    | st.sampled_from(["direct", "registry", "localfs", "blobcache", "fscache", "version", "2"]),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(["device", "backend", "cache", "config", "type", "mode", "version",
                                       "rafs", "prefetch", "enable", "threads", "host", "repo", "dir",
                                       "fs_prefetch", "localfs", "registry", "work_dir", "filecache"]),
                      inner, max_size=5),
    max_leaves=25,
)


@given(_json)
def test_arbitrary_documents_parse_or_raise_config_error(doc):
    try:
        cfg = parse_daemon_config(json.dumps(doc))
    except ConfigError as exc:
        assert str(exc).startswith(("failed to parse configuration information", "invalid configuration"))
    else:
        assert cfg.version == 2


@given(st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_config_error(text):
    try:
        parse_daemon_config(text)
    except ConfigError:
        pass
