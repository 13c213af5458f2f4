"""Synthetic images and configs for daemon tests (no ../shared needed): built in-process."""

from __future__ import annotations

import json
import pathlib

from nydus_vfs.builder import BuildOptions, build

__all__ = ["make_image", "localfs_config_text"]


def make_image(tmp: pathlib.Path, name: str, files: dict[str, bytes], *, fs_version: int = 6,
               blob_dir: pathlib.Path | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """Build ``files`` (relative path -> content) into ``tmp/name.boot``; returns (bootstrap, blob dir)."""
    src = tmp / f"{name}-src"
    for rel, data in files.items():
        p = src / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    blob_dir = blob_dir or tmp / "blobs"
    blob_dir.mkdir(exist_ok=True)
    boot = tmp / f"{name}.boot"
    build(str(src), BuildOptions(fs_version=fs_version, bootstrap=str(boot), blob_dir=str(blob_dir),
                                 chunk_size=0x10000))
    return boot, blob_dir


def localfs_config_text(blob_dir: pathlib.Path, cache_dir: pathlib.Path, **extra) -> str:
    """A v1 config string as drivers send it: localfs blobs, a blobcache, direct mode."""
    doc = {"device": {"backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                      "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}}},
           "mode": "direct", "digest_validate": True}
    doc.update(extra)
    return json.dumps(doc)
