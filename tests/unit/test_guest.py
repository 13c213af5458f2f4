"""Unit tests of tests/guest.py: everything but a real boot.

The archive writer is checked against GNU cpio, the module planner against
synthetic modules.dep trees, the console conversation with arbitrary read
boundaries, the QEMU driver against fake QEMUs (timeouts must kill), and the tree
normalizer against the upstream v5 result file and the host's own tree.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests import guest
from tests.guest import (
    GuestError,
    GuestTimeoutError,
    GuestUnavailableError,
    parse_tree_result,
    resolve_modules,
    start_backend,
    tree_result_script,
)

# --------------------------------------------------------------------------------------
# newc archives


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_archive_is_read_back_by_gnu_cpio(tmp_path):
    a = guest._NewcArchive()
    a.file("/etc/deep/er/file.txt", b"hello\n", 0o640)
    a.file("/odd", b"x" * 5)  # length not a multiple of 4: padding must follow
    a.symlink("/bin/sh", "/bin/busybox")
    a.chardev("/dev/console", 5, 1)
    data = a.finish()
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=data, capture_output=True, check=True).stdout
    lines = listing.decode().splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines]
    # Parents are created before their children, as the kernel's unpacker needs.
    assert names == ["etc", "etc/deep", "etc/deep/er", "etc/deep/er/file.txt", "odd", "bin", "bin/sh", "dev",
                     "dev/console"]
    by_name = dict(zip(names, lines))
    assert by_name["etc/deep/er/file.txt"].startswith("-rw-r-----")
    assert by_name["bin/sh"].startswith("lrwxrwxrwx") and by_name["bin/sh"].endswith("-> /bin/busybox")
    assert by_name["dev/console"].startswith("crw-------") and "5,   1" in by_name["dev/console"]

    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames", "--nonmatching", "dev/*"],
                   input=data, cwd=out, check=True)
    assert (out / "etc/deep/er/file.txt").read_bytes() == b"hello\n"
    assert (out / "odd").read_bytes() == b"xxxxx"
    assert os.readlink(out / "bin/sh") == "/bin/busybox"


@pytest.mark.parametrize("path", ["", "/", "/a/../b", "a\0b"])
def test_archive_rejects_bad_paths(path):
    with pytest.raises(ValueError, match="bad archive path"):
        guest._NewcArchive().file(path, b"")


def test_archive_rejects_duplicates():
    a = guest._NewcArchive()
    a.file("/x", b"1")
    with pytest.raises(ValueError, match="duplicate"):
        a.file("x", b"2")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed")
def test_run_archive_holds_the_parts_and_extra_files(tmp_path):
    import gzip
    data = gzip.decompress(guest._run_archive("feed", ["echo one", "echo two"], {"/etc/extra": b"\x00\x01"}))
    subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "guest/nonce").read_text() == "feed"
    assert (tmp_path / "guest/parts").read_text() == "2\n"
    assert (tmp_path / "guest/part.2.sh").read_text() == "echo two"
    assert (tmp_path / "etc/extra").read_bytes() == b"\x00\x01"


def test_run_archive_refuses_files_inside_guest_dir():
    with pytest.raises(ValueError, match="outside /guest"):
        guest._run_archive("n", ["true"], {"/guest/part.1.sh": "x"})
    with pytest.raises(ValueError, match="absolute"):
        guest._run_archive("n", ["true"], {"relative": "x"})


# --------------------------------------------------------------------------------------
# kernel modules


def _modules_tree(tmp_path, dep: str, builtin: str = "", files=()) -> pathlib.Path:
    d = tmp_path / "lib/modules/9.9"
    d.mkdir(parents=True)
    (d / "modules.dep").write_text(textwrap.dedent(dep))
    (d / "modules.builtin").write_text(textwrap.dedent(builtin))
    for f in files:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).write_bytes(b"\x7fELF")
    return d


def test_modules_come_after_their_dependencies(tmp_path):
    # modules.dep lists dependencies in "load from the end" order; the planner must
    # not rely on that order, so this file lists them front to back on purpose.
    d = _modules_tree(tmp_path, """\
        kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
        kernel/fs/fuse/fuse.ko:
        kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
        kernel/drivers/virtio/virtio_ring.ko:
        kernel/drivers/virtio/virtio-pci.ko: kernel/drivers/virtio/virtio.ko
        """, builtin="kernel/drivers/virtio/virtio_pci_modern_dev.ko\n",
        files=["kernel/fs/fuse/virtiofs.ko", "kernel/fs/fuse/fuse.ko", "kernel/drivers/virtio/virtio.ko",
               "kernel/drivers/virtio/virtio_ring.ko", "kernel/drivers/virtio/virtio-pci.ko"])
    load, builtin = resolve_modules(d)
    names = [n for n, _ in load]
    assert sorted(names) == ["fuse", "virtio", "virtio_pci", "virtio_ring", "virtiofs"]
    for mod, deps in {"virtio": ["virtio_ring"], "virtio_pci": ["virtio"],
                      "virtiofs": ["fuse", "virtio", "virtio_ring"]}.items():
        assert all(names.index(dep) < names.index(mod) for dep in deps), names
    assert builtin == ["virtio_pci_modern_dev"]
    assert dict(load)["virtio_pci"] == d / "kernel/drivers/virtio/virtio-pci.ko"


def test_builtin_modules_are_not_loaded(tmp_path):
    d = _modules_tree(tmp_path, "kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko\n",
                      builtin="kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n"
                              "kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/fuse/fuse.ko\n",
                      files=["kernel/fs/fuse/virtiofs.ko"])
    load, builtin = resolve_modules(d)
    assert [n for n, _ in load] == ["virtiofs"]
    assert builtin == ["virtio_ring", "virtio", "virtio_pci", "fuse"]


def test_missing_required_module_is_named(tmp_path):
    d = _modules_tree(tmp_path, "kernel/fs/fuse/fuse.ko:\n", files=["kernel/fs/fuse/fuse.ko"])
    with pytest.raises(GuestError, match="virtio_ring neither as a module nor built in"):
        resolve_modules(d)


def test_missing_dependency_and_cycles_are_reported(tmp_path):
    d = _modules_tree(tmp_path, "a.ko: b.ko\nb.ko: a.ko\nc.ko: nothere.ko\n", files=["a.ko", "b.ko", "c.ko"])
    with pytest.raises(GuestError, match="cycle: a -> b -> a"):
        resolve_modules(d, ["a"])
    with pytest.raises(GuestError, match="nothere .*needed by c"):
        resolve_modules(d, ["c"])


def test_module_file_named_by_modules_dep_must_exist(tmp_path):
    d = _modules_tree(tmp_path, "kernel/x.ko:\n")
    with pytest.raises(GuestError, match="does not exist"):
        resolve_modules(d, ["x"])


def test_compressed_modules_are_unpacked(tmp_path):
    import gzip
    import lzma
    (tmp_path / "a.ko.xz").write_bytes(lzma.compress(b"\x7fELF-a"))
    (tmp_path / "b.ko.gz").write_bytes(gzip.compress(b"\x7fELF-b"))
    assert guest._module_bytes(tmp_path / "a.ko.xz") == b"\x7fELF-a"
    assert guest._module_bytes(tmp_path / "b.ko.gz") == b"\x7fELF-b"


# --------------------------------------------------------------------------------------
# the console conversation


NONCE = "0123abcd"


def _tag(rest: str) -> bytes:
    return f"@@NYDUS-GUEST:{NONCE}:{rest}@@".encode()


def _boot_transcript(part: int, body: bytes, status: int) -> bytes:
    return (b"SeaBIOS noise\r\n" + _tag("BOOT") + b"\n" + _tag(f"BEGIN {part}") + b"\n" + body
            + b"\n" + _tag(f"END {part} {status}") + b"\n[ 1.0] reboot: Power down\r\n")


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_console_follows_two_boots_whatever_the_read_boundaries(cuts):
    body1 = b"line one\n\tno carriage returns\r\n" + _tag("BOOT").replace(NONCE.encode(), b"ffff")
    body2 = b"last line without newline"
    stream = _boot_transcript(1, body1, 3) + _boot_transcript(2, body2, 0)
    console = guest._Console(NONCE, 2)
    answers = b""
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for lo, hi in zip(bounds, bounds[1:]):
        answers += console.feed(stream[lo:hi])
    assert answers == b"1\n2\n"
    assert console.done
    assert [(b.part, b.exit_status) for b in console.results] == [(1, 3), (2, 0)]
    assert console.results[0].output.encode("utf-8", "surrogateescape") == body1
    assert console.results[1].output == body2.decode()


def test_console_keeps_non_utf8_output_bytes():
    console = guest._Console(NONCE, 1)
    console.feed(_boot_transcript(1, b"\xff\xfe name", 0))
    assert console.results[0].output.encode("utf-8", "surrogateescape") == b"\xff\xfe name"


def test_console_rejects_reboot_in_the_middle_of_a_part():
    console = guest._Console(NONCE, 2)
    console.feed(_tag("BOOT") + _tag("BEGIN 1") + b"\nworking...")
    with pytest.raises(GuestError, match="rebooted while part 1 was running"):
        console.feed(b"Kernel panic\r\n" + _tag("BOOT"))


def test_console_rejects_more_boots_than_parts():
    console = guest._Console(NONCE, 1)
    console.feed(_boot_transcript(1, b"ok", 0))
    with pytest.raises(GuestError, match="booted again after the last part"):
        console.feed(_tag("BOOT"))


def test_console_rejects_parts_out_of_order():
    console = guest._Console(NONCE, 2)
    console.feed(_tag("BOOT"))
    with pytest.raises(GuestError, match="began part 2 during boot 1"):
        console.feed(_tag("BEGIN 2"))


def test_console_output_is_capped():
    console = guest._Console(NONCE, 1, limit=1000)
    console.feed(b"x" * 900)
    with pytest.raises(GuestError, match="exceeded 1000 bytes"):
        console.feed(b"x" * 200)


# --------------------------------------------------------------------------------------
# driving QEMU (fake QEMUs: shell scripts speaking the /init side of the protocol)


def _fake_qemu(tmp_path, body: str) -> list[str]:
    script = tmp_path / "fake-qemu"
    script.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return [str(script)]


def test_drive_answers_boots_and_collects_output(tmp_path):
    cmd = _fake_qemu(tmp_path, f"""\
        echo 'Booting from ROM..@@NYDUS-GUEST:{NONCE}:BOOT@@'
        read part
        printf '@@NYDUS-GUEST:{NONCE}:BEGIN %s@@\\nasked for part %s\\n\\n@@NYDUS-GUEST:{NONCE}:END %s 7@@\\n' \\
            "$part" "$part" "$part"
        echo 'after the end marker'
        echo 'qemu warning' >&2
        """)
    console = guest._Console(NONCE, 1)
    stderr, _elapsed = guest._drive(cmd, console, timeout=10)
    assert console.results == [guest.BootResult(1, "asked for part 1\n", 7)]
    assert "after the end marker" in console.text()
    assert stderr == "qemu warning\n"


def test_drive_kills_qemu_on_timeout(tmp_path):
    pidfile = tmp_path / "pid"
    cmd = _fake_qemu(tmp_path, f"""\
        echo $$ > {pidfile}
        echo 'booting forever'
        exec sleep 60
        """)
    with pytest.raises(GuestTimeoutError, match="did not finish within 1 s") as info:
        guest._drive(cmd, guest._Console(NONCE, 1), timeout=1)
    assert "booting forever" in info.value.console_log
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_drive_reports_qemu_dying_early(tmp_path):
    cmd = _fake_qemu(tmp_path, """\
        echo "qemu-system-x86_64: -chardev socket,id=char0,path=/nope: Failed to connect" >&2
        exit 1
        """)
    with pytest.raises(GuestError, match=r"(?s)exited with status 1 before the guest finished.*Failed to connect"):
        guest._drive(cmd, guest._Console(NONCE, 1), timeout=10)


def test_drive_reports_abort_by_signal(tmp_path):
    cmd = _fake_qemu(tmp_path, "kill -ABRT $$\n")
    with pytest.raises(GuestError, match="killed by SIGABRT"):
        guest._drive(cmd, guest._Console(NONCE, 1), timeout=10)


def test_run_guest_validates_arguments():
    with pytest.raises(ValueError, match="non-empty"):
        guest.run_guest(None, [])
    with pytest.raises(ValueError, match="mem"):
        guest.run_guest(None, "true", mem="lots")
    with pytest.raises(ValueError, match="tag"):
        guest.run_guest(None, "true", tag="x" * 37)


# --------------------------------------------------------------------------------------
# cache and kernel discovery


def test_find_kernel_says_how_to_fetch(tmp_path):
    with pytest.raises(GuestUnavailableError, match="run qemu/fetch-kernel"):
        guest.find_kernel(tmp_path)
    (tmp_path / "kernel.env").write_text("KVER=1\nVMLINUZ=vmlinuz\nMODULES=m\nBUSYBOX=bb\nTREE=tree\n")
    with pytest.raises(GuestUnavailableError, match="vmlinuz named by .* is missing"):
        guest.find_kernel(tmp_path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NYDUS_VFS_CACHE", str(tmp_path))
    assert guest.cache_dir() == tmp_path / "guest"
    monkeypatch.delenv("NYDUS_VFS_CACHE")
    assert guest.cache_dir() == guest.PROJECT_ROOT / ".cache" / "guest"


def test_select_accel_honours_explicit_choices(monkeypatch):
    assert guest.select_accel("tcg") == "tcg"
    monkeypatch.setenv("NYDUS_VFS_GUEST_ACCEL", "tcg")
    assert guest.select_accel("auto") == "tcg"
    with pytest.raises(ValueError):
        guest.select_accel("xen")


@pytest.mark.parametrize("blob", [b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\xff" * 80, os.urandom(4096)])
def test_kernel_image_parsers_survive_garbage(blob):
    assert guest._has_pvh_entry(blob) is False
    assert guest._bzimage_payload(blob) is None


def test_real_kernel_has_a_pvh_entry():
    try:
        kernel = guest.find_kernel()
    except GuestUnavailableError as exc:
        pytest.skip(str(exc))
    elf = guest._bzimage_payload(kernel.vmlinuz.read_bytes())
    assert elf is not None and elf[:4] == b"\x7fELF"
    assert guest._has_pvh_entry(elf)


# --------------------------------------------------------------------------------------
# back-ends


def _listener(path) -> list[str]:
    code = (f"import socket,time; s=socket.socket(socket.AF_UNIX); s.bind({str(path)!r}); "
            "time.sleep(0.3); s.listen(1); print('listening', flush=True); time.sleep(60)")
    return [sys.executable, "-c", code]


def test_start_backend_waits_for_listen_not_just_bind(tmp_path):
    sock = tmp_path / "s.sock"
    with start_backend(_listener(sock), sock, timeout=10) as backend:
        assert guest._listening(str(sock)) is True
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(sock))  # would be refused between bind() and listen()
        c.close()
        pid = backend.proc.pid
    assert backend.proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_backend_reports_early_exit_with_log(tmp_path):
    with pytest.raises(GuestError, match=r"(?s)exited with status 2 before listening.*no such option"):
        start_backend(["sh", "-c", "echo 'no such option' >&2; exit 2"], tmp_path / "s.sock")


def test_start_backend_gives_up_after_timeout(tmp_path):
    with pytest.raises(GuestError, match="did not listen .* within 0.5 s"):
        start_backend(["sleep", "30"], tmp_path / "s.sock", timeout=0.5)


# --------------------------------------------------------------------------------------
# tree results


def test_tree_result_script_follows_upstream_recipe():
    s = tree_result_script("/mnt/x.y")
    assert "tree -a -J -v /mnt/x.y | sed 's|/mnt/x\\.y||g'" in s
    assert "find /mnt/x.y -type f -exec md5sum {} + | sort |" in s
    with pytest.raises(ValueError):
        tree_result_script("/mnt; rm -rf /")
    with pytest.raises(ValueError):
        tree_result_script("relative")


def _build_from_listing(root: pathlib.Path, node: dict) -> None:
    for child in node.get("contents", []):
        path = root / child["name"]
        if child["type"] == "directory":
            path.mkdir()
            _build_from_listing(path, child)
        elif child["type"] == "file":
            path.write_bytes(b"")
        elif child["type"] == "link":
            os.symlink(child["target"], path)


def test_tree_versions_normalize_to_the_same_result(v5_vector, tmp_path):
    """tree 1.8 wrote upstream's file; the host's tree (2.x on Debian 12) must compare equal."""
    tree = guest.find_kernel().tree if guest.guest_unavailable_reason() is None else shutil.which("tree")
    if tree is None:
        pytest.skip("tree is not installed")
    expected_text = v5_vector["expected"].read_text()
    expected = parse_tree_result(expected_text)
    # Rebuild the listed tree on the host (empty files; md5 lines are not tree's business).
    root = tmp_path / "t"
    root.mkdir()
    _build_from_listing(root, expected.tree[0])
    out = subprocess.run([str(tree), "-a", "-J", "-v", str(root)], capture_output=True, text=True, check=True,
                         env={**os.environ, "LC_ALL": "C"}).stdout
    md5_part = expected_text[expected_text.index("\n]\n") + 3:]
    host = parse_tree_result(out.replace(str(root), "") + md5_part)
    assert host == expected
    assert len(expected.md5sums) == 23

    # Any real difference must still show.
    (root / "symlink-test" / "foo").unlink()
    changed = subprocess.run([str(tree), "-a", "-J", "-v", str(root)], capture_output=True, text=True,
                             check=True).stdout
    assert parse_tree_result(changed.replace(str(root), "") + md5_part) != expected


def test_parse_tree_result_rejects_non_json():
    with pytest.raises(ValueError, match="does not start with tree's JSON"):
        parse_tree_result("d41d8cd98f00b204e9800998ecf8427e  /a\n")
    with pytest.raises(ValueError, match="not an array"):
        parse_tree_result(json.dumps({"type": "directory"}))
