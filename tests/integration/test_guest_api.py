"""A real guest sees pseudo mounts come and go while it has ``nydusd virtiofs`` mounted (issue 8).

``nydusd virtiofs --sock S --apisock A`` starts with no image; the guest mounts
the empty root; the host mounts two images through the HTTP API with curl; the
guest lists and reads both without remounting; ``DELETE /pseudo_1`` makes it
disappear in the guest, and mounting it again brings it back.

Host and guest move in lock step without any side channel: the guest signals
"phase done" by reading a flag file of a small signal image mounted at
``/sigN``, and the host waits for that read in the ``/sigN`` instance's FS
metrics (``fop_hits[4]``, nydus-surface.md §3.5) before its next API call.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
import time

import pytest

from nydus_vfs._native import binding
from tests.functional.nydusd_helpers import NYDUSD
from tests.guest import guest_unavailable_reason, run_guest, start_backend
from tests.image_helpers import localfs_config_text, make_image

GUEST_TIMEOUT = 240


def _skip_reason() -> str | None:
    return guest_unavailable_reason() or (binding.unavailable_reason() and
                                          f"nydusd virtiofs needs the shim: {binding.unavailable_reason()}")


pytestmark = [pytest.mark.guest, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


def _curl(sock, method, path, body=None):
    cmd = ["curl", "-s", "-o", "/dev/stderr", "-w", "%{http_code}", "--unix-socket", str(sock), "-X", method,
           f"http://localhost{path}"]
    if body is not None:
        cmd += ["--data-binary", body]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return int(r.stdout or 0), r.stderr


def _reads(sock, mountpoint) -> int:
    status, text = _curl(sock, "GET", f"/api/v1/metrics?id={mountpoint}")
    return json.loads(text)["fop_hits"][4] if status == 200 else -1


def _wait_for_read(sock, mountpoint, deadline) -> None:
    while time.monotonic() < deadline:
        if _reads(sock, mountpoint) > 0:
            return
        time.sleep(0.1)
    raise TimeoutError(f"the guest never read {mountpoint}/flag")


GUEST_SCRIPT = r"""
wait_for() {  # wait_for <test expression...>: poll up to 60 s
  i=0; while ! "$@"; do i=$((i+1)); [ $i -gt 600 ] && { echo "TIMEOUT $*"; exit 3; }; sleep 0.1; done
}
mount -t virtiofs nydus /mnt || exit 10
echo "== empty"; ls -A /mnt | grep -v '^sig' | wc -l
cat /mnt/sig0/flag >/dev/null
wait_for test -e /mnt/pseudo_2/two.txt
wait_for test -e /mnt/pseudo_1/one.txt
echo "== listing"; ls /mnt | grep pseudo
echo "== read"; cat /mnt/pseudo_1/one.txt /mnt/pseudo_2/two.txt; md5sum /mnt/pseudo_1/big.bin | cut -d' ' -f1
cat /mnt/sig1/flag >/dev/null
wait_for test ! -e /mnt/pseudo_1
echo "== gone"; ls /mnt | grep pseudo
cat /mnt/sig2/flag >/dev/null
wait_for test -e /mnt/pseudo_1/one.txt
echo "== again"; cat /mnt/pseudo_1/one.txt; md5sum /mnt/pseudo_1/big.bin | cut -d' ' -f1
"""


def test_guest_sees_api_mounts_appear_and_disappear(tmp_path):
    big = os.urandom(3 << 20)
    one, blobs = make_image(tmp_path, "one", {"one.txt": b"first image\n", "big.bin": big})
    two, _ = make_image(tmp_path, "two", {"two.txt": b"second image\n"})
    sig, _ = make_image(tmp_path, "sig", {"flag": b"x\n"})
    cfg = localfs_config_text(blobs, tmp_path / "cache")
    body = lambda boot: json.dumps({"source": str(boot), "fs_type": "rafs", "config": cfg})  # noqa: E731
    sock, api = tmp_path / "vhost-user-fs.sock", tmp_path / "api.sock"
    with start_backend(NYDUSD + ["virtiofs", "--sock", str(sock), "--apisock", str(api),
                                 "--log-file", str(tmp_path / "nydusd.log")], sock) as backend:
        deadline = time.monotonic() + 20
        while not api.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status, text = _curl(api, "GET", "/api/v1/daemon")
        assert status == 200 and json.loads(text)["state"] == "RUNNING", "RUNNING before any VMM connects"
        for n in (0, 1, 2):
            assert _curl(api, "POST", f"/api/v1/mount?mountpoint=/sig{n}", body(sig))[0] == 204
        errors: list[str] = []

        def host() -> None:
            try:
                end = time.monotonic() + GUEST_TIMEOUT
                _wait_for_read(api, "/sig0", end)  # the guest mounted and saw an empty root
                for mp, boot in (("/pseudo_1", one), ("/pseudo_2", two)):
                    status, text = _curl(api, "POST", f"/api/v1/mount?mountpoint={mp}", body(boot))
                    assert status == 204, text
                _wait_for_read(api, "/sig1", end)
                assert _curl(api, "DELETE", "/api/v1/mount?mountpoint=/pseudo_1")[0] == 204
                _wait_for_read(api, "/sig2", end)
                assert _curl(api, "POST", "/api/v1/mount?mountpoint=/pseudo_1", body(one))[0] == 204
            except Exception as exc:  # reported below
                errors.append(repr(exc))

        t = threading.Thread(target=host, daemon=True)
        t.start()
        r = run_guest(backend.sock_path, GUEST_SCRIPT, timeout=GUEST_TIMEOUT)
        t.join(30)
        assert not errors, errors
        out = r.output
        assert r.exit_status == 0, out
        sections = dict(part.split("\n", 1) for part in out.split("== ")[1:])
        assert sections["empty"].strip() == "0"
        assert sections["listing"].split() == ["pseudo_1", "pseudo_2"]
        md5 = hashlib.md5(big).hexdigest()
        assert sections["read"].split("\n")[:3] == ["first image", "second image", md5]
        assert sections["gone"].split() == ["pseudo_2"]
        assert sections["again"].split("\n")[:2] == ["first image", md5]
        assert backend.proc.poll() is None, "the daemon must still run"
