"""Converter names and descriptor tests: values exactly as nydus-snapshotter's (seed 004, nydus-surface.md §5.4)."""

from __future__ import annotations

import dataclasses

import pytest

from nydus_vfs import convert


def test_constants_have_upstream_values():
    assert convert.MANIFEST_OS_FEATURE_NYDUS == "nydus.remoteimage.v1"
    assert convert.MEDIA_TYPE_NYDUS_BLOB == "application/vnd.oci.image.layer.nydus.blob.v1"
    assert convert.BOOTSTRAP_FILE_NAME_IN_LAYER == "image/image.boot"
    assert convert.MANIFEST_NYDUS_CACHE == "containerd.io/snapshot/nydus-cache"
    expected = {
        "FS_VERSION": "nydus-fs-version", "NYDUS_BLOB": "nydus-blob", "NYDUS_BLOB_DIGEST": "nydus-blob-digest",
        "NYDUS_BLOB_SIZE": "nydus-blob-size", "NYDUS_BLOB_IDS": "nydus-blob-ids",
        "NYDUS_BOOTSTRAP": "nydus-bootstrap", "NYDUS_SOURCE_CHAINID": "nydus-source-chainid",
        "NYDUS_REFERENCE_BLOB_IDS": "nydus-reference-blob-ids", "NYDUS_ENCRYPTED_BLOB": "nydus-encrypted-blob",
    }
    for suffix, name in expected.items():
        assert getattr(convert, f"LAYER_ANNOTATION_{suffix}") == f"containerd.io/snapshot/{name}"
    assert convert.LAYER_ANNOTATION_UNCOMPRESSED == "containerd.io/uncompressed"
    assert convert.MEDIA_TYPE_NYDUS_MANIFEST_ARTIFACT == "application/vnd.nydus.image.manifest.v1+json"
    assert convert.MEDIA_TYPE_NYDUS_CONFIG == "application/vnd.nydus.image.config.v1+json"


def test_public_names_are_exactly_all():
    public = {n for n in dir(convert) if not n.startswith("_")}
    assert set(convert.__all__) == public - {"annotations"}
    for name in convert.__all__:
        assert getattr(convert, name) is not None


def test_option_fields_follow_upstream():
    pack = {f.name for f in dataclasses.fields(convert.PackOption)}
    assert {"work_dir", "fs_version", "chunk_dict_path", "prefetch_patterns", "compressor", "backend",
            "timeout"} <= pack
    merge = {f.name for f in dataclasses.fields(convert.MergeOption)}
    assert {"work_dir", "fs_version", "chunk_dict_path", "prefetch_patterns", "with_tar", "backend",
            "timeout"} <= merge
    assert convert.PackOption().fs_version_int() == 6
    with pytest.raises(ValueError):
        convert.MergeOption(fs_version="7").fs_version_int()


def test_descriptor_predicates_test_the_annotation_key():
    blob = {"mediaType": convert.MEDIA_TYPE_NYDUS_BLOB, "annotations": {convert.LAYER_ANNOTATION_NYDUS_BLOB: "true"}}
    boot = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "annotations": {convert.LAYER_ANNOTATION_NYDUS_BOOTSTRAP: "true",
                            convert.LAYER_ANNOTATION_FS_VERSION: "6"}}
    plain = {"mediaType": convert.MEDIA_TYPE_NYDUS_BLOB}
    assert convert.is_nydus_blob(blob) and not convert.is_nydus_bootstrap(blob)
    assert convert.is_nydus_bootstrap(boot) and not convert.is_nydus_blob(boot)
    # Upstream looks at the annotation only, not the media type or the value.
    assert not convert.is_nydus_blob(plain)
    assert convert.is_nydus_blob({"annotations": {convert.LAYER_ANNOTATION_NYDUS_BLOB: "false"}})
    assert not convert.is_nydus_blob({"annotations": None}) and not convert.is_nydus_blob({})

    class Desc:
        annotations = {convert.LAYER_ANNOTATION_NYDUS_BOOTSTRAP: "true"}

    assert convert.is_nydus_bootstrap(Desc())
