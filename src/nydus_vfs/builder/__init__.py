"""``nydus-image`` as a library: build, merge, check, inspect and unpack RAFS images.

* owns: turning a directory or layer tar into a RAFS v5/v6 bootstrap and a
  native data blob (chunking, dedup, parallel digest+compress, blob meta,
  ToC, inlined bootstrap), merging layer bootstraps with whiteouts,
  validating and inspecting images, and unpacking them back to a tar.
* does not own: the byte layout of any on-disk structure (every struct is
  encoded by its class in :mod:`nydus_vfs.format`), algorithms
  (:mod:`nydus_vfs.utils`), command-line parsing (:mod:`nydus_vfs.cli.nydus_image`).

Layout: ``_tree`` (the model), ``_source``/``_tar`` (inputs), ``_chunker`` and
``_blob`` (data), ``_v5``/``_v6`` (bootstraps), ``_build``, ``_merge``,
``_unpack``, ``_inspect`` (commands), ``_load`` (bootstrap back to a tree).
"""

from ._build import DEFAULT_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from ._build import PREFETCH_POLICIES as PREFETCH_POLICIES
from ._build import SOURCE_TYPES as SOURCE_TYPES
from ._build import BuildOptions as BuildOptions
from ._build import BuildResult as BuildResult
from ._build import build as build
from ._build import parse_prefetch_patterns as parse_prefetch_patterns
from ._build import validate_chunk_size as validate_chunk_size
from ._inspect import INSPECT_COMMANDS as INSPECT_COMMANDS
from ._inspect import CheckResult as CheckResult
from ._inspect import check as check
from ._inspect import format_blob_features as format_blob_features
from ._inspect import inspect_request as inspect_request
from ._load import LoadedImage as LoadedImage
from ._load import load_bootstrap as load_bootstrap
from ._load import parse_chunk_dict_arg as parse_chunk_dict_arg
from ._merge import InconsistentFilesystemError as InconsistentFilesystemError
from ._merge import MergeOptions as MergeOptions
from ._merge import merge as merge
from ._source import WhiteoutSpec as WhiteoutSpec
from ._unpack import BlobReader as BlobReader
from ._unpack import unpack as unpack

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "PREFETCH_POLICIES",
    "SOURCE_TYPES",
    "BuildOptions",
    "BuildResult",
    "build",
    "parse_prefetch_patterns",
    "validate_chunk_size",
    "INSPECT_COMMANDS",
    "CheckResult",
    "check",
    "format_blob_features",
    "inspect_request",
    "LoadedImage",
    "load_bootstrap",
    "parse_chunk_dict_arg",
    "InconsistentFilesystemError",
    "MergeOptions",
    "merge",
    "WhiteoutSpec",
    "BlobReader",
    "unpack",
]
