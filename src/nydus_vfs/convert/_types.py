"""Names, options and descriptor tests of the converter (nydus-snapshotter ``pkg/converter``, seed 004).

Constants keep upstream's values and its names in Python spelling
(``LayerAnnotationNydusBlob`` -> ``LAYER_ANNOTATION_NYDUS_BLOB``).
Descriptors are plain OCI descriptor dicts (``mediaType``, ``digest``,
``size``, ``annotations``), as JSON decodes them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

__all__ = [
    "MANIFEST_OS_FEATURE_NYDUS",
    "MEDIA_TYPE_NYDUS_BLOB",
    "BOOTSTRAP_FILE_NAME_IN_LAYER",
    "MANIFEST_NYDUS_CACHE",
    "LAYER_ANNOTATION_FS_VERSION",
    "LAYER_ANNOTATION_NYDUS_BLOB",
    "LAYER_ANNOTATION_NYDUS_BLOB_DIGEST",
    "LAYER_ANNOTATION_NYDUS_BLOB_SIZE",
    "LAYER_ANNOTATION_NYDUS_BLOB_IDS",
    "LAYER_ANNOTATION_NYDUS_BOOTSTRAP",
    "LAYER_ANNOTATION_NYDUS_SOURCE_CHAINID",
    "LAYER_ANNOTATION_NYDUS_REFERENCE_BLOB_IDS",
    "LAYER_ANNOTATION_UNCOMPRESSED",
    "LAYER_ANNOTATION_NYDUS_ENCRYPTED_BLOB",
    "MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT",
    "MEDIA_TYPE_NYDUS_CONFIG",
    "Backend",
    "PackOption",
    "MergeOption",
    "UnpackOption",
    "Layer",
    "is_nydus_blob",
    "is_nydus_bootstrap",
]

MANIFEST_OS_FEATURE_NYDUS = "nydus.remoteimage.v1"
MEDIA_TYPE_NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
BOOTSTRAP_FILE_NAME_IN_LAYER = "image/image.boot"
MANIFEST_NYDUS_CACHE = "containerd.io/snapshot/nydus-cache"
LAYER_ANNOTATION_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"
LAYER_ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
LAYER_ANNOTATION_NYDUS_BLOB_DIGEST = "containerd.io/snapshot/nydus-blob-digest"
LAYER_ANNOTATION_NYDUS_BLOB_SIZE = "containerd.io/snapshot/nydus-blob-size"
LAYER_ANNOTATION_NYDUS_BLOB_IDS = "containerd.io/snapshot/nydus-blob-ids"
LAYER_ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
LAYER_ANNOTATION_NYDUS_SOURCE_CHAINID = "containerd.io/snapshot/nydus-source-chainid"
LAYER_ANNOTATION_NYDUS_REFERENCE_BLOB_IDS = "containerd.io/snapshot/nydus-reference-blob-ids"
LAYER_ANNOTATION_UNCOMPRESSED = "containerd.io/uncompressed"
#: nydus-surface.md §5.4 (set on blob layers of encrypted images; this builder never encrypts).
LAYER_ANNOTATION_NYDUS_ENCRYPTED_BLOB = "containerd.io/snapshot/nydus-encrypted-blob"
#: ``artifactType`` of a nydus manifest in a merged (``--merge-platform``) index (nydus-surface.md §5.4).
MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT = "application/vnd.nydus.image.manifest.v1+json"
#: Config media type of the nydus manifest in a merged index (nydus-surface.md §5.4).
MEDIA_TYPE_NYDUS_CONFIG = "application/vnd.nydus.image.config.v1+json"


@runtime_checkable
class Backend(Protocol):
    """Remote storage for nydus blobs (upstream's ``converter.Backend``: OSS, S3 ...).

    ``push`` uploads the blob file at ``path`` under ``blob_digest``
    (``sha256:<hex>``); ``check`` returns where the blob is, or raises when it
    is absent; ``type`` names the backend.
    """

    def push(self, path: str, blob_digest: str) -> None: ...

    def check(self, blob_digest: str) -> str: ...

    def type(self) -> str: ...


def _fs_version(value: str | int) -> int:
    text = str(value)
    if text not in ("5", "6"):
        raise ValueError(f"fs_version must be '5' or '6', not {value!r}")
    return int(text)


@dataclass
class PackOption:
    """Options of :func:`~nydus_vfs.convert.pack` (upstream ``PackOption``).

    ``prefetch_patterns`` holds absolute paths, one per line (``"/"`` when
    empty, as upstream).  ``chunk_dict_path`` is a bootstrap path (or
    ``bootstrap=PATH``).  ``timeout`` (a :class:`datetime.timedelta` or
    seconds) bounds the whole pack; the layer stream is checked against it
    as it is read.  ``backend``, when set, receives the packed blob after a
    successful pack.  ``work_dir`` holds temporary files (default: the system
    temp dir).  ``batch_size`` other than 0 and ``encrypt`` are refused: this
    builder does neither.  (Upstream's ``BuilderPath`` has no equivalent: the
    builder runs in-process.)
    """

    work_dir: str | None = None
    fs_version: str = "6"
    chunk_dict_path: str | None = None
    prefetch_patterns: str = ""
    compressor: str = "zstd"
    chunk_size: int = 0x100000
    digester: str = "blake3"
    aligned_chunk: bool = False
    batch_size: int = 0
    encrypt: bool = False
    backend: Backend | None = None
    timeout: datetime.timedelta | float | None = None

    def fs_version_int(self) -> int:
        return _fs_version(self.fs_version)


@dataclass
class MergeOption:
    """Options of :func:`~nydus_vfs.convert.merge` (upstream ``MergeOption``).

    ``with_tar`` writes the bootstrap as a tar stream (not gzipped) holding
    ``image/image.boot`` (plus ``image/<layer hex>.blob.meta`` per RAFS v6
    layer) instead of the raw bootstrap.  ``backend``, when set, must hold
    every blob the merged bootstrap references (checked after the merge).
    ``fs_version`` must match the layers' (it is checked, not converted).
    """

    work_dir: str | None = None
    fs_version: str = "6"
    chunk_dict_path: str | None = None
    prefetch_patterns: str = ""
    with_tar: bool = False
    backend: Backend | None = None
    timeout: datetime.timedelta | float | None = None

    def fs_version_int(self) -> int:
        return _fs_version(self.fs_version)


@dataclass
class UnpackOption:
    """Options of :func:`~nydus_vfs.convert.unpack`: ``work_dir`` for the extracted bootstrap."""

    work_dir: str | None = None


@dataclass
class Layer:
    """One nydus blob layer for :func:`~nydus_vfs.convert.merge`.

    ``digest`` is the layer's OCI digest (``sha256:<hex>``), which becomes
    the blob id nydusd asks the registry for; ``blob`` is the path of the
    layer file (the reverse tar that :func:`pack` wrote).
    """

    digest: str
    blob: str
    original_digest: str | None = None


def _annotations(desc: Mapping[str, Any] | Any) -> Mapping[str, Any]:
    if isinstance(desc, Mapping):
        ann = desc.get("annotations")
    else:
        ann = getattr(desc, "annotations", None)
    return ann if isinstance(ann, Mapping) else {}


def is_nydus_blob(desc: Mapping[str, Any] | Any) -> bool:
    """True when the descriptor carries the ``nydus-blob`` annotation (upstream tests the key only)."""
    return LAYER_ANNOTATION_NYDUS_BLOB in _annotations(desc)


def is_nydus_bootstrap(desc: Mapping[str, Any] | Any) -> bool:
    """True when the descriptor carries the ``nydus-bootstrap`` annotation (upstream tests the key only)."""
    return LAYER_ANNOTATION_NYDUS_BOOTSTRAP in _annotations(desc)
