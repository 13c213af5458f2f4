"""The image converter as a library: OCI layers to Nydus layers and back (nydus-surface.md §5).

* owns: nydus-snapshotter's converter API in Python (seed 004): the media
  types and annotation names, :class:`PackOption` / :class:`MergeOption`,
  :func:`pack` (an OCI layer tar stream to a nydus blob layer, the "reverse
  tar" of rafs-format.md §4.2), :func:`merge` (the layers' bootstraps into
  the image's bootstrap, blob ids = layer digests), :func:`unpack` (a nydus
  blob layer back to an OCI tar), and the descriptor tests
  :func:`is_nydus_blob` / :func:`is_nydus_bootstrap`.
  Whole images (``nydusify``): :func:`convert_image` and :func:`check_image`
  over a small OCI distribution client (:class:`Reference`,
  :class:`RegistryClient`, :func:`docker_credentials`).
* does not own: RAFS building (it drives :mod:`nydus_vfs.builder`
  in-process, as upstream drives ``nydus-image``), the command line
  (:mod:`nydus_vfs.cli.nydusify`), serving images (nydusd: it is run as a
  child process by :class:`NydusdMount` for ``nydusify mount`` and ``check``).

Errors: :class:`~nydus_vfs.errors.ConvertError`, naming the entry, layer or
section at fault.
"""

from ._distribution import Reference as Reference
from ._distribution import RegistryClient as RegistryClient
from ._distribution import docker_credentials as docker_credentials
from ._image import CheckOptions as CheckOptions
from ._image import ConvertOptions as ConvertOptions
from ._image import ConvertResult as ConvertResult
from ._image import check_image as check_image
from ._image import convert_image as convert_image
from ._image import copy_image as copy_image
from ._image import fetch_nydus_bootstrap as fetch_nydus_bootstrap
from ._image import host_platform as host_platform
from ._mount import NydusdMount as NydusdMount
from ._mount import fuse_mount_reason as fuse_mount_reason
from ._mount import nydusd_command as nydusd_command
from ._mount import nydusd_config as nydusd_config
from ._mount import write_nydusd_config as write_nydusd_config
from ._object_store import ObjectBlobStore as ObjectBlobStore
from ._object_store import OssBlobStore as OssBlobStore
from ._object_store import S3BlobStore as S3BlobStore
from ._object_store import object_store_from_config as object_store_from_config
from ._pack import PackResult as PackResult
from ._pack import blob_meta_file as blob_meta_file
from ._pack import merge as merge
from ._pack import pack as pack
from ._pack import read_layer_section as read_layer_section
from ._pack import unpack as unpack
from ._types import BOOTSTRAP_FILE_NAME_IN_LAYER as BOOTSTRAP_FILE_NAME_IN_LAYER
from ._types import LAYER_ANNOTATION_FS_VERSION as LAYER_ANNOTATION_FS_VERSION
from ._types import LAYER_ANNOTATION_NYDUS_BLOB as LAYER_ANNOTATION_NYDUS_BLOB
from ._types import LAYER_ANNOTATION_NYDUS_BLOB_DIGEST as LAYER_ANNOTATION_NYDUS_BLOB_DIGEST
from ._types import LAYER_ANNOTATION_NYDUS_BLOB_IDS as LAYER_ANNOTATION_NYDUS_BLOB_IDS
from ._types import LAYER_ANNOTATION_NYDUS_BLOB_SIZE as LAYER_ANNOTATION_NYDUS_BLOB_SIZE
from ._types import LAYER_ANNOTATION_NYDUS_BOOTSTRAP as LAYER_ANNOTATION_NYDUS_BOOTSTRAP
from ._types import LAYER_ANNOTATION_NYDUS_ENCRYPTED_BLOB as LAYER_ANNOTATION_NYDUS_ENCRYPTED_BLOB
from ._types import LAYER_ANNOTATION_NYDUS_REFERENCE_BLOB_IDS as LAYER_ANNOTATION_NYDUS_REFERENCE_BLOB_IDS
from ._types import LAYER_ANNOTATION_NYDUS_SOURCE_CHAINID as LAYER_ANNOTATION_NYDUS_SOURCE_CHAINID
from ._types import LAYER_ANNOTATION_UNCOMPRESSED as LAYER_ANNOTATION_UNCOMPRESSED
from ._types import MANIFEST_NYDUS_CACHE as MANIFEST_NYDUS_CACHE
from ._types import MANIFEST_OS_FEATURE_NYDUS as MANIFEST_OS_FEATURE_NYDUS
from ._types import MEDIA_TYPE_NYDUS_BLOB as MEDIA_TYPE_NYDUS_BLOB
from ._types import MEDIA_TYPE_NYDUS_CONFIG as MEDIA_TYPE_NYDUS_CONFIG
from ._types import MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT as MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT
from ._types import Backend as Backend
from ._types import Layer as Layer
from ._types import MergeOption as MergeOption
from ._types import PackOption as PackOption
from ._types import UnpackOption as UnpackOption
from ._types import is_nydus_blob as is_nydus_blob
from ._types import is_nydus_bootstrap as is_nydus_bootstrap

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
    "Layer",
    "PackOption",
    "MergeOption",
    "UnpackOption",
    "PackResult",
    "pack",
    "merge",
    "unpack",
    "read_layer_section",
    "blob_meta_file",
    "is_nydus_blob",
    "is_nydus_bootstrap",
    "Reference",
    "RegistryClient",
    "docker_credentials",
    "ConvertOptions",
    "ConvertResult",
    "CheckOptions",
    "convert_image",
    "check_image",
    "copy_image",
    "fetch_nydus_bootstrap",
    "host_platform",
    "NydusdMount",
    "fuse_mount_reason",
    "nydusd_command",
    "nydusd_config",
    "write_nydusd_config",
    "ObjectBlobStore",
    "OssBlobStore",
    "S3BlobStore",
    "object_store_from_config",
]
