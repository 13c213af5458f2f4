"""The Nydus manifest rules ``nydusify check`` applies (nydus-surface.md §5.4), and platform matching."""

from __future__ import annotations

import copy

from nydus_vfs.convert._image import _check_rules, _matches, host_platform

B1, B2, BOOT = ("sha256:" + c * 64 for c in "abc")
GOOD = {
    "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "layers": [
        {"mediaType": "application/vnd.oci.image.layer.nydus.blob.v1", "digest": B1, "size": 1,
         "annotations": {"containerd.io/snapshot/nydus-blob": "true"}},
        {"mediaType": "application/vnd.oci.image.layer.nydus.blob.v1", "digest": B2, "size": 1,
         "annotations": {"containerd.io/snapshot/nydus-blob": "true"}},
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": BOOT, "size": 1,
         "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                         "containerd.io/snapshot/nydus-fs-version": "6"}},
    ],
}
CONFIG = {"rootfs": {"type": "layers", "diff_ids": [B1, B2, "sha256:" + "d" * 64]}}


def test_a_good_manifest_passes():
    assert _check_rules(GOOD, CONFIG) == []


def test_each_rule_is_reported():
    cases = []
    m = copy.deepcopy(GOOD)
    m["layers"][0]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
    cases.append((m, CONFIG, "is not application/vnd.oci.image.layer.nydus.blob.v1"))
    m = copy.deepcopy(GOOD)
    del m["layers"][1]["annotations"]
    cases.append((m, CONFIG, "layer 1 lacks containerd.io/snapshot/nydus-blob"))
    m = copy.deepcopy(GOOD)
    m["layers"][2]["annotations"]["containerd.io/snapshot/nydus-fs-version"] = "7"
    cases.append((m, CONFIG, "nydus-fs-version is '7'"))
    m = copy.deepcopy(GOOD)
    m["layers"][2]["mediaType"] = "application/vnd.oci.image.layer.v1.tar"
    cases.append((m, CONFIG, "is not a tar+gzip type"))
    m = copy.deepcopy(GOOD)
    m["layers"][0]["annotations"]["containerd.io/uncompressed"] = B1
    cases.append((m, CONFIG, "still carries containerd.io/uncompressed"))
    cases.append((GOOD, {"rootfs": {"diff_ids": [B1]}}, "has 1 entries for 3 layers"))
    cases.append((GOOD, {"rootfs": {"diff_ids": [B2, B1, BOOT]}}, "is not blob layer digest"))
    cases.append(({"layers": []}, CONFIG, "no layers"))
    cases.append(({"layers": ["x"]}, CONFIG, "not JSON objects"))
    cases.append(({"layers": "x"}, CONFIG, "no layers"))
    for manifest, config, text in cases:
        problems = _check_rules(manifest, config)
        assert any(text in p for p in problems), (text, problems)


def test_platform_matching():
    assert _matches("linux/amd64", "linux/amd64")
    assert _matches("linux/arm64", "linux/arm64/v8")
    assert not _matches("linux/arm/v7", "linux/arm/v6")
    assert not _matches("linux/amd64", "windows/amd64")
    assert host_platform().startswith("linux/")
