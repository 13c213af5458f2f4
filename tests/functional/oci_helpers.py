"""OCI images and a real registry for the nydusify tests (``tests.functional.oci_helpers``).

* The registry itself is ``registry_helpers.DockerRegistry`` (Debian's
  ``docker-registry`` on a free 127.0.0.1 port, plain, htpasswd or token auth).
* :func:`write_oci_layout` writes an OCI image layout directory (gzip layers,
  config with ``rootfs.diff_ids``, ``index.json`` with the tag) that skopeo
  copies into the registry and umoci unpacks for the reference tree.
* :func:`two_layer_image` is the image the issue asks for: the second layer
  deletes a file (whiteout), overrides another and hides a directory's lower
  contents (opaque dir).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import subprocess
import tarfile

from tests.functional.registry_helpers import need as _need

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def need(*tools: str) -> None:
    for t in tools:
        _need(t)


def tar_bytes(entries) -> bytes:
    """A layer tar from (name, kind, opts) tuples (kinds: file dir sym hard chr fifo)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, opts in entries:
            ti = tarfile.TarInfo(name)
            ti.mode = opts.get("mode", 0o755 if kind == "dir" else 0o644)
            ti.uid, ti.gid = opts.get("uid", 0), opts.get("gid", 0)
            ti.mtime = opts.get("mtime", 1_700_000_000)
            if kind == "file":
                data = opts.get("data", b"")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
                continue
            ti.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                       "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
            ti.linkname = opts.get("link", "")
            ti.devmajor, ti.devminor = opts.get("dev", (0, 0))
            tf.addfile(ti)
    return buf.getvalue()


def _blob(layout, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    d = layout / "blobs" / "sha256"
    d.mkdir(parents=True, exist_ok=True)
    (d / digest).write_bytes(data)
    return "sha256:" + digest


def write_oci_layout(layout, tag: str, layers: list[bytes], *, docker: bool = False, mangle=None) -> str:
    """Write an image with ``layers`` (uncompressed tars) to the OCI layout dir; returns the manifest digest.

    ``mangle(index, gzip_bytes) -> bytes`` may corrupt a layer blob (its digest follows the new bytes).
    """
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    descs, diff_ids = [], []
    for i, raw in enumerate(layers):
        gz = gzip.compress(raw, mtime=0)
        if mangle is not None:
            gz = mangle(i, gz)
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _blob(layout, gz),
                      "size": len(gz)})
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
    config = {"architecture": ARCH, "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids},
              "history": [{"created_by": f"layer {i}"} for i in range(len(layers))]}
    cbytes = json.dumps(config).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _blob(layout, cbytes),
                           "size": len(cbytes)}, "layers": descs}
    mbytes = json.dumps(manifest).encode()
    mdigest = _blob(layout, mbytes)
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": manifest["mediaType"], "digest": mdigest, "size": len(mbytes),
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return mdigest


def _data(n: int, seed: str) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


LOWER = [
    ("etc", "dir", {}), ("etc/keep", "file", {"data": b"kept\n"}), ("etc/old", "file", {"data": b"deleted above\n"}),
    ("etc/over", "file", {"data": b"lower version\n"}), ("etc/link", "sym", {"link": "keep"}),
    ("usr", "dir", {}), ("usr/bin", "dir", {}), ("usr/bin/tool", "file", {"data": _data(2_500_000, "tool"),
                                                                          "mode": 0o755}),
    ("usr/bin/tool-hardlink", "hard", {"link": "usr/bin/tool"}),
    ("var", "dir", {}), ("var/lib", "dir", {}), ("var/lib/app", "dir", {"mode": 0o750}),
    ("var/lib/app/hidden1", "file", {"data": b"hidden by the opaque dir\n"}),
    ("var/lib/app/sub", "dir", {}), ("var/lib/app/sub/hidden2", "file", {"data": _data(70_000, "h2")}),
    ("dev", "dir", {}), ("dev/null", "chr", {"dev": (1, 3), "mode": 0o666}),
    ("gone-dir", "dir", {}), ("gone-dir/x", "file", {"data": b"x"}),
]
UPPER = [
    ("etc", "dir", {}), ("etc/.wh.old", "file", {}), ("etc/over", "file", {"data": b"upper version\n", "uid": 7}),
    ("var", "dir", {}), ("var/lib", "dir", {}), ("var/lib/app", "dir", {"mode": 0o700}),
    ("var/lib/app/.wh..wh..opq", "file", {}), ("var/lib/app/new", "file", {"data": _data(300_000, "new")}),
    (".wh.gone-dir", "file", {}),
    ("opt", "dir", {}), ("opt/big", "file", {"data": _data(1_200_000, "big"), "mode": 0o600, "uid": 1000,
                                                "gid": 1000}),
]


def two_layer_image(layout, tag: str = "v1") -> str:
    return write_oci_layout(layout, tag, [tar_bytes(LOWER), tar_bytes(UPPER)])


def skopeo_push(layout, tag: str, ref: str, *, creds: str | None = None) -> None:
    need("skopeo")
    cmd = ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{ref}"]
    if creds:
        cmd[2:2] = ["--dest-creds", creds]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()


def skopeo_raw(ref: str, *, config: bool = False) -> dict | None:
    """The raw manifest (or config) of ``ref``, or None when the registry has no such manifest."""
    need("skopeo")
    cmd = ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"]
    if config:
        cmd.insert(3, "--config")
    r = subprocess.run(cmd, capture_output=True, timeout=60)
    if r.returncode != 0:
        if b"manifest unknown" in r.stderr or b"not found" in r.stderr.lower():
            return None
        raise AssertionError(r.stderr.decode())
    return json.loads(r.stdout)
