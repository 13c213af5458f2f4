"""convert_image against a hostile registry (our own aiohttp server): bad descriptors are named, nothing escapes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import pytest
from aiohttp import web

from nydus_vfs.convert import ConvertOptions, convert_image
from nydus_vfs.errors import ConvertError


def _serve(manifest: dict, blobs: dict[str, bytes]):
    body = json.dumps(manifest).encode()

    async def handler(request: web.Request) -> web.Response:
        path = request.path
        if "/manifests/" in path:
            return web.Response(body=body, content_type=manifest.get("mediaType", "application/json"))
        digest = path.rsplit("/", 1)[-1]
        if digest in blobs:
            return web.Response(body=blobs[digest])
        return web.json_response({"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


async def _convert(tmp_path, manifest, blobs):
    runner = web.AppRunner(_serve(manifest, blobs), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host = "127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
    try:
        return await convert_image(ConvertOptions(source=f"{host}/evil:t", target=f"{host}/evil:n",
                                                  plain_http=True, work_dir=str(tmp_path / "work")))
    finally:
        await runner.cleanup()


CONFIG = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
CONFIG_DIGEST = "sha256:" + hashlib.sha256(CONFIG).hexdigest()


def _manifest(layers):
    return {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": CONFIG_DIGEST,
                       "size": len(CONFIG)}, "layers": layers}


@pytest.mark.parametrize("layers,message", [
    ([{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:../../../escape",
       "size": 1}], "is not a sha256:<64 hex> digest"),
    ([{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": 42, "size": 1}],
     "is not a sha256:<64 hex> digest"),
    (["not a descriptor"], "layer 0 is not a valid descriptor"),
    ([{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "a" * 64, "size": -5}],
     "layer 0 is not a valid descriptor"),
    ([{"mediaType": "application/x-foreign", "digest": "sha256:" + "a" * 64, "size": 1}],
     "unsupported layer media type"),
    ([{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "b" * 64, "size": 1}],
     r"layer 1/1 sha256:bbbbbbbbbbbb: .*HTTP 404 BLOB_UNKNOWN"),
])
def test_hostile_descriptors_are_named_and_nothing_escapes_the_work_dir(tmp_path, layers, message):
    with pytest.raises(ConvertError, match=message):
        asyncio.run(_convert(tmp_path, _manifest(layers), {CONFIG_DIGEST: CONFIG}))
    assert os.listdir(tmp_path / "work") == []
    assert sorted(os.listdir(tmp_path)) == ["work"]


def test_a_blob_that_does_not_match_its_digest_is_refused(tmp_path):
    digest = "sha256:" + "c" * 64
    layers = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": 3}]
    with pytest.raises(ConvertError, match="does not match its digest"):
        asyncio.run(_convert(tmp_path, _manifest(layers), {CONFIG_DIGEST: CONFIG, digest: b"abc"}))
    assert os.listdir(tmp_path / "work") == []


def test_a_garbage_index_is_refused_by_name(tmp_path):
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": ["x", {"platform": "linux/amd64", "digest": "sha256:" + "d" * 64},
                           {"platform": {"os": "linux", "architecture": "amd64"}, "digest": "../../etc"}]}
    from nydus_vfs.convert import host_platform
    index["manifests"][2]["platform"]["architecture"] = host_platform().split("/")[1]
    with pytest.raises(ConvertError, match="neither a tag nor a sha256 digest"):
        asyncio.run(_convert(tmp_path, index, {}))
    index["manifests"].pop()
    with pytest.raises(ConvertError, match="no manifest for platform"):
        asyncio.run(_convert(tmp_path, index, {}))
    assert os.listdir(tmp_path / "work") == []
