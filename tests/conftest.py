"""Shared fixtures: where the upstream vectors are, and gates for real-I/O tests.

The vectors are used from ``../shared/vectors/nydus`` beside the project (never
copied into it); tests that need them skip with the reason when it is absent.
"""

from __future__ import annotations

import os
import pathlib
import time

import pytest
from hypothesis import HealthCheck, settings

PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = PROJECT_ROOT.parent / "shared" / "vectors" / "nydus"

settings.register_profile("default", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _need(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        pytest.skip(f"upstream test vectors not found at {path} (they live in ../shared beside the project)")
    return path


@pytest.fixture(scope="session")
def vectors_dir() -> pathlib.Path:
    """``../shared/vectors/nydus``; skips the test when absent."""
    return _need(VECTORS)


@pytest.fixture(scope="session")
def v5_vector(vectors_dir):
    """(bootstrap paths, blob dir, expected-tree.result path) of the v5 vectors."""
    d = vectors_dir / "v5"
    return {
        "boots": [d / "sha256-none.boot", d / "blake3-none.boot"],
        "blob_dir": d / "blobs",
        "expected": d / "expected-tree.result",
    }


@pytest.fixture(scope="session")
def v6_vector(vectors_dir):
    d = vectors_dir / "v6"
    return {"boot": d / "zstd-blake3-2.2.boot", "blob_dir": d / "blobs"}


def fuse_unavailable_reason() -> str | None:
    """Why real FUSE mounts cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to mount FUSE (run the suite as root, as CI does)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing on this machine"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"/dev/fuse cannot be opened: {exc}"
    os.close(fd)
    return None


requires_fuse = pytest.mark.skipif(fuse_unavailable_reason() is not None,
                                   reason=fuse_unavailable_reason() or "")


def linked_blob_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """A fresh directory of symlinks to the blobs in ``src``.

    ``--localfs-dir D`` makes D the cache work dir too, so tests point nydusd at
    a private directory of links, never at ../shared (which must stay pristine).
    """
    dst.mkdir(parents=True, exist_ok=True)
    for blob in src.iterdir():
        (dst / blob.name).symlink_to(blob)
    return dst


@pytest.fixture(scope="session", autouse=True)
def _shared_vectors_stay_pristine():
    """Fail the run if any test wrote into ../shared/vectors (and remove what it wrote).

    Only files that appeared *during* this session and are newer than its start
    are removed: when the vectors were not visible at the start (``../shared``
    missing or briefly moved), nothing is removed at all, or this fixture would
    delete every vector that shows up later (it did once).
    """
    started = time.time()
    existed = VECTORS.exists()
    before = {p for p in VECTORS.rglob("*")} if existed else set()
    yield
    if not existed or not VECTORS.exists():
        return
    added = sorted({p for p in VECTORS.rglob("*")} - before)
    for p in added:
        try:
            fresh = p.lstat().st_mtime >= started - 1
        except FileNotFoundError:
            continue
        if fresh and (p.is_file() or p.is_symlink()):
            p.unlink()
    assert not added, f"tests wrote into the shared vectors: {[str(p) for p in added]}"
