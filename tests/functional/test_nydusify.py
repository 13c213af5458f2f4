"""``nydusify`` against Debian's docker-registry, judged by skopeo, umoci and curl (issue 11).

The source image is written as an OCI layout here and copied into the
registry by skopeo; its reference tree is what umoci unpacks.  The converted
image is read back by skopeo (manifest, config), by plain HTTP (blobs), by
``nydus-image check`` / ``unpack`` (bootstrap and data), and by ``nydusify
check``.  Failures are provoked with a deleted blob and with an aiohttp proxy
that answers 500 / 401 to one upload in front of the registry.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import urllib.request

import pytest
from aiohttp import ClientSession, web
from multidict import CIMultiDict

from tests.functional.oci_helpers import (LOWER, UPPER, need, skopeo_push, skopeo_raw, tar_bytes, two_layer_image,
                                          write_oci_layout)
from tests.functional.registry_helpers import DockerRegistry, TokenServer, make_ca

NYDUSIFY = [sys.executable, "-m", "nydus_vfs.cli.nydusify"]
NYDUS_IMAGE = [sys.executable, "-m", "nydus_vfs.cli.nydus_image"]
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    need("docker-registry", "skopeo")
    with DockerRegistry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def source(registry, tmp_path_factory):
    layout = tmp_path_factory.mktemp("oci") / "layout"
    two_layer_image(layout, "v1")
    skopeo_push(layout, "v1", f"{registry.host}/app:v1")
    return layout


@pytest.fixture(scope="module")
def nydus_v1(registry, source, tmp_path_factory):
    """app:v1 converted once to app:v1-nydus; (stdout of the conversion, its --output-json document)."""
    tmp = tmp_path_factory.mktemp("v1-nydus")
    r = _converted(registry, source, tmp, "v1-nydus")
    return r.stdout.decode(), json.loads((tmp / "metrics.json").read_text())


def nydusify(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(NYDUSIFY + list(args), capture_output=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(env or {})})


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


def _fetch_image(registry, blobs: list, boot: dict, tmp_path):
    """The converted image's blobs (into tmp/blobs, named by digest) and tmp/image.boot, by plain HTTP."""
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    for d in blobs:
        (blob_dir / d["digest"][7:]).write_bytes(_get(f"http://{registry.host}/v2/app/blobs/{d['digest']}"))
    with tarfile.open(fileobj=io.BytesIO(_get(f"http://{registry.host}/v2/app/blobs/{boot['digest']}"))) as tf:
        (tmp_path / "image.boot").write_bytes(tf.extractfile("image/image.boot").read())
    return blob_dir


def _converted(registry, source, tmp_path, tag: str, *extra: str, repo: str = "app"):
    work = tmp_path / "work"
    r = nydusify("convert", "--source", f"{registry.host}/app:v1", "--target", f"{registry.host}/{repo}:{tag}",
                 "--plain-http", "--work-dir", str(work), "--output-json", str(tmp_path / "metrics.json"), *extra)
    assert r.returncode == 0, r.stderr.decode()
    assert os.listdir(work) == []   # the run's private work dir is gone
    return r


def test_convert_two_layer_image_manifest_annotations_and_check(registry, nydus_v1, tmp_path):
    out, metrics = nydus_v1
    # stdout is a pipe: plain progress lines, one per event, naming the layer.
    assert "layer 1/2 sha256:" in out and "layer 2/2 sha256:" in out and "pushed" in out
    assert "\x1b[" not in out
    assert set(metrics) == {"SourceImageSize", "TargetImageSize", "ConversionElapsed"}
    src_manifest = skopeo_raw(f"{registry.host}/app:v1")
    assert metrics["SourceImageSize"] == sum(d["size"] for d in src_manifest["layers"])

    manifest = skopeo_raw(f"{registry.host}/app:v1-nydus")
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    *blobs, boot = manifest["layers"]
    assert len(blobs) == 2
    for d in blobs:
        assert d["mediaType"] == NYDUS_BLOB
        assert d["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
    assert boot["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
    assert boot["annotations"] == {"containerd.io/snapshot/nydus-bootstrap": "true",
                                   "containerd.io/snapshot/nydus-fs-version": "6"}
    assert metrics["TargetImageSize"] == sum(d["size"] for d in manifest["layers"])

    config = skopeo_raw(f"{registry.host}/app:v1-nydus", config=True)
    boot_gz = _get(f"http://{registry.host}/v2/app/blobs/{boot['digest']}")
    assert "sha256:" + hashlib.sha256(boot_gz).hexdigest() == boot["digest"]
    boot_tar = gzip.decompress(boot_gz)
    assert config["rootfs"]["diff_ids"] == [d["digest"] for d in blobs] + [
        "sha256:" + hashlib.sha256(boot_tar).hexdigest()]
    assert config["history"][-1] == {"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"}
    with tarfile.open(fileobj=io.BytesIO(boot_tar)) as tf:
        names = tf.getnames()
    assert "image/image.boot" in names
    assert {f"image/{d['digest'][7:]}.blob.meta" for d in blobs} <= set(names)

    r = nydusify("check", "--target", f"{registry.host}/app:v1-nydus", "--source", f"{registry.host}/app:v1",
                 "--plain-http", "--work-dir", str(tmp_path / "check"))
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert "file trees: source" in out and "are equal" in out
    # As root with /dev/fuse (these tests), the image is mounted from the registry by nydusd.
    assert "(mounted by nydusd)" in out, out
    assert not [line for line in open("/proc/self/mountinfo") if str(tmp_path) in line]
    r = nydusify("check", "--target", f"{registry.host}/app:v1-nydus", "--source", f"{registry.host}/app:v1",
                 "--plain-http", "--unpack", "--work-dir", str(tmp_path / "check"))
    assert r.returncode == 0 and "(unpacked by nydus-image)" in r.stdout.decode(), r.stderr.decode()


def _tree_of_dir(root: str) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            desc = {"mode": stat.S_IMODE(st.st_mode), "type": stat.S_IFMT(st.st_mode), "uid": st.st_uid,
                    "gid": st.st_gid}
            if stat.S_ISREG(st.st_mode):
                desc["sha"] = hashlib.sha256(open(p, "rb").read()).hexdigest()
                desc["mtime"] = int(st.st_mtime)
            elif stat.S_ISLNK(st.st_mode):
                desc["link"] = os.readlink(p)
                del desc["mode"]   # Linux symlinks have no permissions of their own
            elif stat.S_ISCHR(st.st_mode):
                desc["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            out[rel] = desc
    return out


def _tree_of_tar(path: str) -> dict:
    out = {}
    kinds = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.REGTYPE: stat.S_IFREG, tarfile.SYMTYPE: stat.S_IFLNK,
             tarfile.CHRTYPE: stat.S_IFCHR, tarfile.LNKTYPE: stat.S_IFREG}
    with tarfile.open(path) as tf:
        members = {m.name.strip("/").removeprefix("./"): m for m in tf.getmembers()}
        for name, m in members.items():
            if name in ("", "."):
                continue
            src = members[m.linkname.strip("/").removeprefix("./")] if m.islnk() else m
            desc = {"mode": src.mode, "type": kinds[src.type], "uid": src.uid, "gid": src.gid}
            if src.isfile():
                desc["sha"] = hashlib.sha256(tf.extractfile(src).read()).hexdigest()
                desc["mtime"] = int(src.mtime)
            elif src.issym():
                desc["link"] = src.linkname
                del desc["mode"]
            elif src.ischr():
                desc["rdev"] = (src.devmajor, src.devminor)
            out[name] = desc
    return out


def test_bootstrap_is_valid_and_the_image_equals_the_umoci_unpacked_source(registry, source, nydus_v1, tmp_path):
    need("umoci")
    if os.geteuid() != 0:
        pytest.skip("umoci unpack of a device node needs root")
    manifest = skopeo_raw(f"{registry.host}/app:v1-nydus")
    *blobs, boot = manifest["layers"]
    # Fetch everything by plain HTTP, independently of nydusify.
    blob_dir = _fetch_image(registry, blobs, boot, tmp_path)
    r = subprocess.run(NYDUS_IMAGE + ["check", str(tmp_path / "image.boot"), "--blob-dir", str(blob_dir)],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    listed = r.stdout.decode()
    assert listed.startswith("RAFS filesystem metadata is valid")
    for d in blobs:
        assert d["digest"][7:] in listed
    r = subprocess.run(NYDUS_IMAGE + ["unpack", str(tmp_path / "image.boot"), "--blob-dir", str(blob_dir),
                                      "--output", str(tmp_path / "nydus.tar")], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    r = subprocess.run(["umoci", "unpack", "--image", f"{source}:v1", str(tmp_path / "bundle")],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    want = _tree_of_dir(str(tmp_path / "bundle" / "rootfs"))
    got = _tree_of_tar(str(tmp_path / "nydus.tar"))
    assert got == want
    # The overlay did what the second layer says.
    assert "etc/old" not in got and "gone-dir" not in got and "var/lib/app/hidden1" not in got
    assert "var/lib/app/sub" not in got and got["var/lib/app"]["mode"] == 0o700
    assert got["etc/over"]["uid"] == 7 and "var/lib/app/new" in got


def test_second_conversion_skips_existing_blobs_and_gives_the_same_manifest(registry, source, tmp_path):
    _converted(registry, source, tmp_path, "again-1", repo="again")
    first = skopeo_raw(f"{registry.host}/again:again-1")
    r = _converted(registry, source, tmp_path, "again-2", repo="again")
    out = r.stdout.decode()
    assert out.count("already in the target, skipped") == 3 and " pushed " not in out
    assert skopeo_raw(f"{registry.host}/again:again-2") == first


def test_chunked_push_gives_the_same_image(registry, source, tmp_path):
    _converted(registry, source, tmp_path, "mono", repo="chunk-a")
    _converted(registry, source, tmp_path, "chunked", "--push-chunk-size", "1MB", repo="chunk-b")
    assert skopeo_raw(f"{registry.host}/chunk-a:mono") == skopeo_raw(f"{registry.host}/chunk-b:chunked")
    r = nydusify("check", "--target", f"{registry.host}/chunk-b:chunked", "--source", f"{registry.host}/app:v1",
                 "--plain-http", "--work-dir", str(tmp_path / "check"))
    assert r.returncode == 0, r.stderr.decode()


def test_insecure_falls_back_to_plain_http(registry, source, tmp_path):
    r = nydusify("convert", "--source", f"{registry.host}/app:v1", "--target", f"{registry.host}/insecure:v1",
                 "--source-insecure", "--target-insecure", "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr.decode()
    assert "falling back to plain HTTP" in r.stderr.decode()
    assert skopeo_raw(f"{registry.host}/insecure:v1")["layers"][-1]["annotations"][
        "containerd.io/snapshot/nydus-bootstrap"] == "true"


def test_tls_registry_needs_insecure_or_a_trusted_ca(tmp_path):
    ca, cert, key = make_ca(tmp_path)
    with DockerRegistry(tmp_path, tls=(cert, key)) as reg:
        layout = tmp_path / "layout"
        write_oci_layout(layout, "v1", [tar_bytes(UPPER)])
        skopeo_push(layout, "v1", f"{reg.host}/tls:v1")
        args = ["convert", "--source", f"{reg.host}/tls:v1", "--target", f"{reg.host}/tls:v1-nydus",
                "--work-dir", str(tmp_path / "w")]
        r = nydusify(*args)
        assert r.returncode == 1 and "TLS certificate not trusted" in r.stderr.decode()
        assert skopeo_raw(f"{reg.host}/tls:v1-nydus") is None
        r = nydusify(*args, "--source-insecure", "--target-insecure")
        assert r.returncode == 0, r.stderr.decode()
        r = nydusify(*args[:-2], "--target", f"{reg.host}/tls:v1-ca", "--work-dir", str(tmp_path / "w2"),
                     env={"SSL_CERT_FILE": str(ca)})
        assert r.returncode == 0, r.stderr.decode()
        assert skopeo_raw(f"{reg.host}/tls:v1-ca") == skopeo_raw(f"{reg.host}/tls:v1-nydus")


def test_docker_source_keeps_docker_media_types_unless_oci(registry, source, tmp_path):
    r = subprocess.run(["skopeo", "copy", "--quiet", "--format", "v2s2", "--dest-tls-verify=false",
                        f"oci:{source}:v1", f"docker://{registry.host}/dock:v1"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    for extra, want in (((), "docker"), (("--oci",), "oci")):
        tag = f"nydus-{want}"
        r = nydusify("convert", "--source", f"{registry.host}/dock:v1", "--target", f"{registry.host}/dock:{tag}",
                     "--plain-http", "--work-dir", str(tmp_path / "w"), *extra)
        assert r.returncode == 0, r.stderr.decode()
        m = skopeo_raw(f"{registry.host}/dock:{tag}")
        if want == "docker":
            assert m["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
            assert m["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
            assert m["layers"][-1]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
        else:
            assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
            assert m["layers"][-1]["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert all(d["mediaType"] == NYDUS_BLOB for d in m["layers"][:-1])


def test_merge_platform_pushes_an_index_with_both_manifests(registry, source, tmp_path):
    _converted(registry, source, tmp_path, "merged", "--merge-platform", repo="merged")
    index = skopeo_raw(f"{registry.host}/merged:merged")
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    oci, nydus = index["manifests"]
    assert "artifactType" not in oci and oci["platform"]["os"] == "linux"
    assert nydus["artifactType"] == "application/vnd.nydus.image.manifest.v1+json"
    assert nydus["platform"]["os.features"] == ["nydus.remoteimage.v1"]
    nm = skopeo_raw(f"{registry.host}/merged@{nydus['digest']}")
    assert nm["config"]["mediaType"] == "application/vnd.nydus.image.config.v1+json"
    # The original image is complete in the target repo too.
    om = skopeo_raw(f"{registry.host}/merged@{oci['digest']}")
    assert om == skopeo_raw(f"{registry.host}/app:v1")
    for d in om["layers"]:
        urllib.request.urlopen(urllib.request.Request(f"http://{registry.host}/v2/merged/blobs/{d['digest']}",
                                                      method="HEAD"), timeout=10)
    r = nydusify("check", "--target", f"{registry.host}/merged:merged", "--source", f"{registry.host}/app:v1",
                 "--plain-http", "--work-dir", str(tmp_path / "check"))
    assert r.returncode == 0, r.stderr.decode()


def test_copy_a_nydus_image_and_a_merged_index(registry, source, nydus_v1, tmp_path):
    r = nydusify("copy", "--source", f"{registry.host}/app:v1-nydus", "--target", f"{registry.host}/copied:v1",
                 "--plain-http", "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr.decode()
    assert skopeo_raw(f"{registry.host}/copied:v1") == skopeo_raw(f"{registry.host}/app:v1-nydus")
    r = nydusify("check", "--target", f"{registry.host}/copied:v1", "--plain-http", "--work-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr.decode()
    # Again: every blob is already there.
    r = nydusify("copy", "--source", f"{registry.host}/app:v1-nydus", "--target", f"{registry.host}/copied:v2",
                 "--plain-http", "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 0 and r.stdout.decode().count("already in the target") == 4
    # A merged index, whole.
    _converted(registry, source, tmp_path, "merged", "--merge-platform", repo="tocopy")
    r = nydusify("copy", "--source", f"{registry.host}/tocopy:merged", "--target", f"{registry.host}/copied:idx",
                 "--all-platforms", "--plain-http", "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr.decode()
    assert skopeo_raw(f"{registry.host}/copied:idx") == skopeo_raw(f"{registry.host}/tocopy:merged")
    r = nydusify("check", "--target", f"{registry.host}/copied:idx", "--source", f"{registry.host}/app:v1",
                 "--plain-http", "--work-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr.decode()
    assert os.listdir(tmp_path / "w") == []


def test_check_fails_against_a_different_source(registry, source, nydus_v1, tmp_path):
    other = tmp_path / "other"
    write_oci_layout(other, "v1", [tar_bytes(LOWER)])   # only the lower layer
    skopeo_push(other, "v1", f"{registry.host}/other:v1")
    r = nydusify("check", "--target", f"{registry.host}/app:v1-nydus", "--source", f"{registry.host}/other:v1",
                 "--plain-http", "--work-dir", str(tmp_path / "check"))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert "differs from source" in err and "/etc/old: only in the source image" in err
    assert "(mounted by nydusd)" in err
    # A nydusd that cannot mount: a clear error, nothing left mounted.
    r = nydusify("check", "--target", f"{registry.host}/app:v1-nydus", "--source", f"{registry.host}/app:v1",
                 "--plain-http", "--nydusd", "/bin/false", "--work-dir", str(tmp_path / "check"))
    assert r.returncode == 1 and "nydusd exited with status 1 before mounting" in r.stderr.decode()
    assert not [line for line in open("/proc/self/mountinfo") if str(tmp_path) in line]
    # A plain OCI image is not a nydus image.
    r = nydusify("check", "--target", f"{registry.host}/app:v1", "--plain-http", "--work-dir", str(tmp_path / "c"))
    assert r.returncode == 1 and "breaks the nydus manifest rules" in r.stderr.decode()


# -- bad input -------------------------------------------------------------------------------------------------

def test_manifest_pointing_at_a_missing_blob(registry, tmp_path):
    layout = tmp_path / "layout"
    two_layer_image(layout, "v1")
    skopeo_push(layout, "v1", f"{registry.host}/broken:v1")
    manifest = skopeo_raw(f"{registry.host}/broken:v1")
    gone = manifest["layers"][1]["digest"]
    req = urllib.request.Request(f"http://{registry.host}/v2/broken/blobs/{gone}", method="DELETE")
    assert urllib.request.urlopen(req, timeout=10).status == 202
    work = tmp_path / "work"
    r = nydusify("convert", "--source", f"{registry.host}/broken:v1", "--target",
                 f"{registry.host}/broken:v1-nydus", "--plain-http", "--work-dir", str(work))
    assert r.returncode == 1
    err = r.stderr.decode()
    assert f"layer 2/2 {gone[:19]}" in err and "404" in err
    assert skopeo_raw(f"{registry.host}/broken:v1-nydus") is None
    assert os.listdir(work) == []


@pytest.mark.parametrize("case", ["dotdot", "hardlink", "truncated-gzip"])
def test_bad_layer_is_named_and_nothing_is_pushed(registry, tmp_path, case):
    layout = tmp_path / "layout"
    upper = list(UPPER)
    mangle = None
    if case == "dotdot":
        upper.append(("etc/../../escape", "file", {"data": b"x"}))
    elif case == "hardlink":
        upper.append(("etc/hl", "hard", {"link": "etc/no-such-file"}))
    else:
        def mangle(i, gz):
            return gz[: len(gz) // 2] if i == 1 else gz
    write_oci_layout(layout, "v1", [tar_bytes(LOWER), tar_bytes(upper)], mangle=mangle)
    repo = f"bad-{case}"
    skopeo_push(layout, "v1", f"{registry.host}/{repo}:v1")
    work = tmp_path / "work"
    r = nydusify("convert", "--source", f"{registry.host}/{repo}:v1", "--target", f"{registry.host}/{repo}:nydus",
                 "--plain-http", "--work-dir", str(work))
    assert r.returncode == 1
    err = r.stderr.decode()
    layer2 = skopeo_raw(f"{registry.host}/{repo}:v1")["layers"][1]["digest"]
    assert f"layer 2/2 {layer2[:19]}" in err, err
    want = {"dotdot": "etc/../../escape", "hardlink": "hardlink target '/etc/no-such-file' does not exist",
            "truncated-gzip": "gzip stream: truncated"}[case]
    assert want in err, err
    assert skopeo_raw(f"{registry.host}/{repo}:nydus") is None
    assert os.listdir(work) == []


class FailingProxy:
    """An aiohttp reverse proxy to the registry that answers ``status`` to the ``nth`` blob upload PUT."""

    def __init__(self, upstream: str, *, nth: int, status: int) -> None:
        self.upstream = upstream
        self.nth = nth
        self.status = status
        self.puts = 0
        self.failed: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def handler(request: web.Request) -> web.StreamResponse:
            if request.method == "PUT" and "/blobs/uploads/" in request.path:
                self.puts += 1
                if self.puts == self.nth:
                    await request.read()
                    self.failed.append(request.path_qs)
                    headers = {"WWW-Authenticate": 'Basic realm="proxy"'} if self.status == 401 else {}
                    return web.json_response({"errors": [{"code": "INJECTED", "message": "injected failure"}]},
                                             status=self.status, headers=headers)
            body = await request.read()
            headers = CIMultiDict((k, v) for k, v in request.headers.items()
                                  if k.lower() not in ("content-length", "transfer-encoding"))
            async with self.session.request(request.method, f"http://{self.upstream}{request.path_qs}",
                                            headers=headers, data=body or None, allow_redirects=False) as resp:
                payload = await resp.read()
                out = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length",
                                                                                  "transfer-encoding",
                                                                                  "content-encoding")}
                return web.Response(status=resp.status, body=payload, headers=out)

        async def start():
            self.session = ClientSession(auto_decompress=False)
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", handler)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self.host = f"127.0.0.1:{self.port}"
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def stop(self) -> None:
        async def stop():
            await self.session.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.mark.parametrize("status", [500, 401])
def test_registry_failing_mid_push_leaves_no_manifest(registry, source, tmp_path, status):
    proxy = FailingProxy(registry.host, nth=2, status=status)
    work = tmp_path / "work"
    repo = f"midpush{status}"
    try:
        r = nydusify("convert", "--source", f"{proxy.host}/app:v1", "--target", f"{proxy.host}/{repo}:v1-nydus",
                     "--plain-http", "--work-dir", str(work), "--concurrency", "1",
                     env={"DOCKER_CONFIG": str(tmp_path / "no-docker-config")})
    finally:
        proxy.stop()
    assert r.returncode == 1, r.stdout.decode()
    err = r.stderr.decode()
    assert proxy.failed, "the proxy never saw a second upload"
    assert f"HTTP {status}" in err
    assert "layer 2/2 sha256:" in err or "bootstrap layer" in err, err
    if status == 500:
        assert "injected failure" in err
    else:
        assert "unauthorized" in err
    assert skopeo_raw(f"{registry.host}/{repo}:v1-nydus") is None
    assert os.listdir(work) == []


def _docker_config(tmp_path, host: str, user: str, password: str):
    cfg = tmp_path / "docker"
    cfg.mkdir(parents=True, exist_ok=True)
    (cfg / "config.json").write_text(json.dumps(
        {"auths": {host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}}))
    return cfg


def _convert_and_check_with_auth(reg, tmp_path, user: str, password: str) -> None:
    layout = tmp_path / "layout"
    write_oci_layout(layout, "v1", [tar_bytes(UPPER)])
    skopeo_push(layout, "v1", f"{reg.host}/sec:v1", creds=f"{user}:{password}")
    cfg = _docker_config(tmp_path, reg.host, user, password)
    args = ["convert", "--source", f"{reg.host}/sec:v1", "--target", f"{reg.host}/sec:v1-nydus", "--plain-http",
            "--work-dir", str(tmp_path / "w")]
    r = nydusify(*args, env={"DOCKER_CONFIG": str(tmp_path / "empty")})
    assert r.returncode == 1 and "401" in r.stderr.decode() and "no credentials" in r.stderr.decode()
    r = nydusify(*args, env={"DOCKER_CONFIG": str(_docker_config(tmp_path / "bad", reg.host, user, "wrong"))})
    assert r.returncode == 1 and "401" in r.stderr.decode()
    r = nydusify(*args, env={"DOCKER_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr.decode()
    r = nydusify("check", "--target", f"{reg.host}/sec:v1-nydus", "--source", f"{reg.host}/sec:v1",
                 "--plain-http", "--work-dir", str(tmp_path / "c"), env={"DOCKER_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr.decode()


def test_basic_auth_registry_with_docker_config(tmp_path):
    need("htpasswd")
    with DockerRegistry(tmp_path, auth="htpasswd") as reg:
        _convert_and_check_with_auth(reg, tmp_path, reg.user, reg.password)


def test_token_auth_registry_shares_the_backends_auth(tmp_path):
    tokens = TokenServer(tmp_path)
    tokens.start_in_thread()
    try:
        with DockerRegistry(tmp_path, auth=tokens) as reg:
            _convert_and_check_with_auth(reg, tmp_path, tokens.user, tokens.password)
        scopes = {q.get("scope", "") for _, q in tokens.requests}
        assert "repository:sec:pull,push" in scopes or any("sec:" in s and "push" in s for s in scopes), scopes
    finally:
        tokens.stop_thread()


# -- mounted by nydusd from the registry -------------------------------------------------------------------------

def _mounted(mnt) -> bool:
    # /proc/self/mountinfo, not stat(): the test must not warm the mount it checks.
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mnt) for line in f)


def _wait_mount(proc: subprocess.Popen, mnt, log_path) -> str:
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _mounted(mnt):
            return ""
        if proc.poll() is not None:
            return open(log_path, errors="replace").read()
        time.sleep(0.05)
    return "did not mount within 30 s"


def _need_fuse():
    from tests.conftest import fuse_unavailable_reason
    reason = fuse_unavailable_reason()
    if reason:
        pytest.skip(reason)


def _stop(proc: subprocess.Popen, mnt) -> int:
    import signal
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if _mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    return proc.returncode


def test_nydusify_mount_from_the_registry_equals_the_umoci_tree(registry, source, nydus_v1, tmp_path):
    _need_fuse()
    need("umoci")
    r = subprocess.run(["umoci", "unpack", "--image", f"{source}:v1", str(tmp_path / "bundle")],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    mnt = tmp_path / "mnt"
    log_path = tmp_path / "mount.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(NYDUSIFY + ["mount", "--target", f"{registry.host}/app:v1-nydus", "--plain-http",
                                            "--mount-path", str(mnt), "--work-dir", str(tmp_path / "mw")],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        error = _wait_mount(proc, mnt, log_path)
        if "'registry' is not supported by this nydusd" in error:
            pytest.skip("this nydusd does not serve the registry backend yet")
        assert not error, error
        assert _tree_of_dir(str(mnt)) == _tree_of_dir(str(tmp_path / "bundle" / "rootfs"))
    finally:
        rc = _stop(proc, mnt)
    assert rc == 0
    assert os.listdir(tmp_path / "mw") == []


def test_backend_proxy_serves_converted_blobs_to_nydusd(registry, source, nydus_v1, tmp_path):
    """nydus-backend-proxy over a dir of layer blobs, nydusd's registry backend (http, one-segment repo)."""
    _need_fuse()
    manifest = skopeo_raw(f"{registry.host}/app:v1-nydus")
    *blobs, boot = manifest["layers"]
    blob_dir = _fetch_image(registry, blobs, boot, tmp_path)
    proxy = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydus_backend_proxy", "--blobsdir",
                              str(blob_dir), "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proxy.stdout.readline().decode()
        host = line.rsplit("http://", 1)[1].strip()
        config = {"device": {"backend": {"type": "registry",
                                         "config": {"scheme": "http", "host": host, "repo": "blobs"}},
                             "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
                  "mode": "direct", "digest_validate": True, "enable_xattr": True}
        (tmp_path / "nydusd.json").write_text(json.dumps(config))
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        log_path = tmp_path / "nydusd.log"
        nydusd = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydusd", "fuse", "--config",
                                   str(tmp_path / "nydusd.json"), "--bootstrap", str(tmp_path / "image.boot"),
                                   "--mountpoint", str(mnt), "--log-file", str(log_path)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            error = _wait_mount(nydusd, mnt, log_path)
            if "'registry' is not supported by this nydusd" in error:
                pytest.skip("this nydusd does not serve the registry backend yet")
            assert not error, error
            assert (mnt / "etc" / "over").read_bytes() == b"upper version\n"
            big = dict(UPPER_FILES)["opt/big"]
            assert hashlib.sha256((mnt / "opt" / "big").read_bytes()).digest() == hashlib.sha256(big).digest()
            tool = dict(LOWER_FILES)["usr/bin/tool"]
            assert (mnt / "usr" / "bin" / "tool").read_bytes() == tool
        finally:
            _stop(nydusd, mnt)
    finally:
        proxy.terminate()
        proxy.wait(10)


def test_converted_blobs_mounted_by_nydusd_from_a_blob_dir_equal_the_umoci_tree(registry, source, nydus_v1,
                                                                                 tmp_path):
    """The same check with the layer blobs fetched by plain HTTP into a localfs dir (no registry backend needed)."""
    _need_fuse()
    need("umoci")
    manifest = skopeo_raw(f"{registry.host}/app:v1-nydus")
    *blobs, boot = manifest["layers"]
    blob_dir = _fetch_image(registry, blobs, boot, tmp_path)
    r = subprocess.run(["umoci", "unpack", "--image", f"{source}:v1", str(tmp_path / "bundle")],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log_path = tmp_path / "nydusd.log"
    nydusd = subprocess.Popen([sys.executable, "-m", "nydus_vfs.cli.nydusd", "fuse", "--bootstrap",
                               str(tmp_path / "image.boot"), "--localfs-dir", str(blob_dir), "--mountpoint",
                               str(mnt), "--log-file", str(log_path)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    try:
        error = _wait_mount(nydusd, mnt, log_path)
        assert not error, error
        assert _tree_of_dir(str(mnt)) == _tree_of_dir(str(tmp_path / "bundle" / "rootfs"))
    finally:
        assert _stop(nydusd, mnt) == 0


LOWER_FILES = [(n, o["data"]) for n, k, o in LOWER if k == "file" and "data" in o]
UPPER_FILES = [(n, o["data"]) for n, k, o in UPPER if k == "file" and "data" in o]


def test_backend_type_s3_puts_blobs_in_the_bucket_and_only_the_bootstrap_in_the_registry(registry, source,
                                                                                         tmp_path):
    from tests.functional.registry_helpers import MotoS3

    with MotoS3(tmp_path) as s3:
        client = s3.client("s3", s3.key_id, s3.secret)
        client.create_bucket(Bucket="nydus")
        config = json.dumps({"scheme": "http", "endpoint": s3.endpoint, "region": "us-east-1",
                             "bucket_name": "nydus", "object_prefix": "blobs/", "access_key_id": s3.key_id,
                             "access_key_secret": s3.secret})
        r = _converted(registry, source, tmp_path, "s3", "--backend-type", "s3", "--backend-config", config,
                       repo="s3img")
        assert "to the s3 backend" in r.stdout.decode()
        manifest = skopeo_raw(f"{registry.host}/s3img:s3")
        assert len(manifest["layers"]) == 1
        assert manifest["layers"][0]["annotations"]["containerd.io/snapshot/nydus-bootstrap"] == "true"
        config_doc = skopeo_raw(f"{registry.host}/s3img:s3", config=True)
        assert config_doc["rootfs"]["diff_ids"] == [
            "sha256:" + hashlib.sha256(gzip.decompress(_get(
                f"http://{registry.host}/v2/s3img/blobs/{manifest['layers'][0]['digest']}"))).hexdigest()]
        keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="nydus")["Contents"])
        assert len(keys) == 2 and all(k.startswith("blobs/") for k in keys)
        for k in keys:
            data = client.get_object(Bucket="nydus", Key=k)["Body"].read()
            assert hashlib.sha256(data).hexdigest() == k[len("blobs/"):]
        # check reads the blobs back from the bucket and compares the trees.
        r = nydusify("check", "--target", f"{registry.host}/s3img:s3", "--source", f"{registry.host}/app:v1",
                     "--plain-http", "--work-dir", str(tmp_path / "check"), "--target-backend-type", "s3",
                     "--target-backend-config", config)
        assert r.returncode == 0, r.stderr.decode()
        assert "present in the s3 backend" in r.stdout.decode()
        # Without the backend the image is incomplete for check; with a wrong key the push fails clearly.
        bad = json.dumps({**json.loads(config), "access_key_secret": "wrong"})
        r = nydusify("convert", "--source", f"{registry.host}/app:v1", "--target", f"{registry.host}/s3img:bad",
                     "--plain-http", "--work-dir", str(tmp_path / "w2"), "--backend-type", "s3", "--backend-config",
                     bad)
        assert r.returncode == 1 and "HTTP 403" in r.stderr.decode()
        assert skopeo_raw(f"{registry.host}/s3img:bad") is None
