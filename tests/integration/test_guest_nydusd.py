"""A real Linux 6.1 guest mounts RAFS images served by our own ``nydusd virtiofs``.

What this shows, each through ``mount -t virtiofs nydus /mnt`` in a guest under QEMU:

* the upstream v5 vectors list and read exactly as ``expected-tree.result`` says,
  and the v6 vector's two files read back (digests validated) with the bytes the
  host reads through the Python API, without any guest involved;
* an image built here with ``nydus-image create`` (v6 with the defaults, and v5)
  shows what the builder recorded: stat fields, link targets, xattrs, hard links,
  a 10,000-entry directory listed completely, and refuses writes with EROFS;
* the back-end follows the guest's lifecycle: a reboot (new FUSE_INIT on the same
  vhost-user connection) mounts again, a powered-off guest is followed by a new
  QEMU on the same socket, and SIGTERM ends the daemon with status 0 leaving its
  inputs and the cache in place.

Boots are the expensive part (several seconds each under TCG), so one built image
is shared by the whole module and each served image gets one guest run whose
script prints every check in ``== name`` sections.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import hashlib
import os
import pathlib
import random
import shutil
import stat
import subprocess
import sys
import time

import pytest

from nydus_vfs._native import binding
from tests.guest import Backend, GuestResult, find_kernel, guest_unavailable_reason, \
    parse_tree_result, run_guest, start_backend, tree_result_script
from nydus_vfs.utils.io import FileSegment
from tests.conftest import PROJECT_ROOT, linked_blob_dir
from tests.functional.nydusd_helpers import NYDUSD, write_localfs_config
from tests.integration.guest_helpers import host_tree_listing, split_sections

NYDUS_IMAGE = [sys.executable, "-m", "nydus_vfs.cli.nydus_image"]
# Boots are slow under TCG and the host may be busy with other jobs.
GUEST_TIMEOUT = 240


def _skip_reason() -> str | None:
    reason = guest_unavailable_reason()
    if reason:
        return reason
    reason = binding.unavailable_reason()
    if reason:
        return f"nydusd virtiofs needs the vhost-user shim: {reason}"
    if os.geteuid() != 0:
        return "needs root: the test tree has files owned by other users and a setuid file"
    return None


pytestmark = [pytest.mark.guest, pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


# --------------------------------------------------------------------------------------
# The test tree and the images built from it

MANY = 10_000
BIG_SIZE = (5 << 19) + 123          # three 1 MiB chunks, the last one partial
HELLO = b"hello from a RAFS image\n"
SECRET_IDS = (70_000, 80_000)       # above 16 bits: a v6 compact inode cannot hold them
PRIVATE_IDS = (1234, 5678)
XATTRS = {
    "hello.txt": {"user.greeting": b"hi there", "user.binary": bytes([0, 1, 0xFF, 0x80]),
                  "user.long": bytes(range(256)) + b"tail"},
    "dir": {"user.dir": b"on a directory"},
    "suid": {"user.greeting": b"hi there"},   # the same pair on a second inode
}
# Checked by stat in the guest.  Directory sizes are the builder's own (dirent
# blocks), so they are compared for regular files and symlinks only.
STAT_FILES = ("hello.txt", "dir/hard", "big.bin", "zeros.bin", "lines.txt", "empty", "with space.txt",
              "private/secret", "suid", "link", "dangling", "abs-link", "dir-link")
STAT_DIRS = (".", "dir", "dir/sub", "emptydir", "private", "many")
LINKS = {"link": "hello.txt", "dangling": "nowhere", "abs-link": "/etc/hostname", "dir-link": "dir/sub"}
WRITES = {
    "touch": "touch /mnt/new-file",
    "mkdir": "mkdir /mnt/new-dir",
    "truncate": "echo overwritten > /mnt/hello.txt",
    "append": "echo more >> /mnt/lines.txt",
    "rm": "rm /mnt/hello.txt",
    "rmdir": "rmdir /mnt/emptydir",
    "symlink": "ln -s hello.txt /mnt/new-link",
    "link": "ln /mnt/hello.txt /mnt/new-hard",
    "rename": "mv /mnt/hello.txt /mnt/renamed",
    "chmod": "chmod 600 /mnt/hello.txt",
    "chown": "chown 1:1 /mnt/hello.txt",
    "mknod": "mkfifo /mnt/new-fifo",
}


def _many_names() -> list[str]:
    # Names of varying length, so READDIR(PLUS) replies pack a changing number of entries.
    return [f"entry-{i:05d}" + "x" * (i % 41) for i in range(MANY)]


def _make_tree(root: pathlib.Path) -> None:
    """The source tree: every kind of entry the builder must record faithfully."""
    rng = random.Random(20240501)
    (root / "dir" / "sub").mkdir(parents=True)
    for d in ("emptydir", "private", "many"):
        (root / d).mkdir()
    (root / "hello.txt").write_bytes(HELLO)
    (root / "big.bin").write_bytes(rng.randbytes(BIG_SIZE))
    (root / "zeros.bin").write_bytes(bytes((2 << 20) + 5))    # two identical chunks: dedup
    (root / "lines.txt").write_bytes(b"".join(b"line %06d of a compressible file\n" % i for i in range(6000)))
    (root / "empty").write_bytes(b"")
    (root / "with space.txt").write_bytes(b"spaces\n")
    (root / "dir" / "sub" / "deep.txt").write_bytes(b"deep\n")
    os.link(root / "hello.txt", root / "dir" / "hard")
    for name, target in LINKS.items():
        os.symlink(target, root / name)
    (root / "private" / "secret").write_bytes(b"secret\n")
    (root / "suid").write_bytes(b"#!/bin/sh\necho suid\n")
    for name in _many_names():
        os.close(os.open(root / "many" / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    for rel, attrs in XATTRS.items():
        for key, value in attrs.items():
            os.setxattr(root / rel, key, value)
    os.chown(root / "private" / "secret", *SECRET_IDS)
    os.chmod(root / "private" / "secret", 0o600)
    os.chown(root / "private", *PRIVATE_IDS)
    os.chmod(root / "private", 0o700)
    os.chmod(root / "suid", 0o4755)
    # Distinct mtimes with nanoseconds, set once every entry exists: creating an
    # entry later would move its directory's mtime.
    for k, rel in enumerate(sorted(set(STAT_FILES + STAT_DIRS))):
        ns = (1_500_000_000 + 86_400 * k) * 10**9 + 123_456_789 + k
        os.utime(root / rel, ns=(ns, ns), follow_symlinks=False)


@dataclasses.dataclass
class Built:
    """The source tree and the images ``nydus-image create`` made of it."""

    src: pathlib.Path
    boots: dict[str, pathlib.Path]      # "v6" / "v5" -> bootstrap
    blobs: dict[str, pathlib.Path]      # "v6" / "v5" -> blob dir


def _build(src: pathlib.Path, out: pathlib.Path, version: str, extra: list[str]) -> tuple[pathlib.Path, pathlib.Path]:
    blobs = out / f"blobs-{version}"
    blobs.mkdir()
    boot = out / f"{version}.boot"
    r = subprocess.run(NYDUS_IMAGE + ["create", "--bootstrap", str(boot), "--blob-dir", str(blobs)] + extra
                       + [str(src)], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert r.returncode == 0, f"nydus-image create ({version}) failed:\n{r.stdout}{r.stderr}"
    return boot, blobs


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    out = tmp_path_factory.mktemp("built")
    src = out / "src"
    src.mkdir()
    _make_tree(src)
    boots, blobs = {}, {}
    # v6 with every default (zstd, blake3, 1 MiB chunks); v5 with the other
    # algorithms and small chunks, so both readers and all codecs are in play.
    boots["v6"], blobs["v6"] = _build(src, out, "v6", [])
    boots["v5"], blobs["v5"] = _build(src, out, "v5", ["--fs-version", "5", "--compressor", "lz4_block",
                                                       "--digester", "sha256", "--chunk-size", "0x10000"])
    return Built(src, boots, blobs)


# --------------------------------------------------------------------------------------
# Serving and booting


def _nydusd(workdir: pathlib.Path, boot: pathlib.Path, *args: str) -> Backend:
    sock = workdir / "vhost-user-fs.sock"
    return start_backend(NYDUSD + ["virtiofs", "--sock", str(sock), "--bootstrap", str(boot), *args], sock,
                         timeout=60, cwd=PROJECT_ROOT)


def _unpack(section: str) -> str:
    """Text the guest sent as ``gzip | base64`` (big listings cross the serial console small)."""
    return gzip.decompress(base64.b64decode("".join(section.split()))).decode("utf-8", "surrogateescape")


def _host_libraries(binary: str) -> set[str]:
    proc = subprocess.run(["ldd", binary], capture_output=True, text=True)
    libs = set()
    for line in proc.stdout.splitlines():
        path = line.split("=>", 1)[-1].split("(", 1)[0].strip()
        if path.startswith("/"):
            libs.add(path)
    return libs


def _xattr_tools() -> dict[str, bytes]:
    """getfattr/setfattr (and any library the guest lacks) as extra guest files.

    busybox has no xattr applet, so the host's tools from the ``attr`` package
    are copied in; the guest already has libc and the loader (for ``tree``).
    Empty when the host lacks them: the xattr checks then skip.
    """
    tools = [shutil.which(t) for t in ("getfattr", "setfattr")]
    if None in tools:
        return {}
    present = _host_libraries(str(find_kernel().tree))
    files: dict[str, bytes] = {}
    for tool in tools:
        files[f"/usr/bin/{os.path.basename(tool)}"] = pathlib.Path(tool).read_bytes()
        for lib in _host_libraries(tool) - present:
            files[lib] = pathlib.Path(lib).read_bytes()
    return files


def _guest_path(rel: str) -> str:
    return "/mnt" if rel == "." else f"/mnt/{rel}"


def _q(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"


def _listing_script(mnt: str = "/mnt") -> str:
    """tree JSON of the mount, then md5 lines of every file outside ``many``, gzip+base64.

    tree_result_script() hashes every file; 10,000 empty files would cost minutes of
    FUSE round trips under TCG, so ``many`` is checked by name in its own section.
    """
    return (f"{{ tree -a -J -v {mnt} | sed 's|{mnt}||g'; "
            f"find {mnt} -path {mnt}/many -prune -o -type f -exec md5sum {{}} + | sort | sed 's|{mnt}||g'; }}"
            " | gzip -c | base64\n")


def _main_script(with_xattr_tools: bool) -> str:
    lines = ["mount -t virtiofs nydus /mnt || exit 10"]
    lines.append("echo '== stat-files'")
    lines.append("stat -c '%n|%f|%s|%h|%u|%g|%y' " + " ".join(_q(_guest_path(p)) for p in STAT_FILES))
    lines.append("echo '== stat-dirs'")
    lines.append("stat -c '%n|%f|%h|%u|%g|%y' " + " ".join(_q(_guest_path(p)) for p in STAT_DIRS))
    lines.append("echo '== inodes'; stat -c %i /mnt/hello.txt /mnt/dir/hard")
    lines.append("echo '== readlink'")
    lines += [f"readlink /mnt/{name}" for name in LINKS]
    lines.append("echo '== through-links'; cat /mnt/link /mnt/dir-link/deep.txt")
    if with_xattr_tools:
        lines.append("echo '== xattr-dump'")
        # -h: the symlink's own (absent) xattrs, not its target's.
        lines.append("getfattr -h --absolute-names -d -m - -e hex /mnt/hello.txt /mnt/dir /mnt/suid /mnt/empty "
                     "/mnt/link 2>&1")
        lines.append("echo '== xattr-one'")
        lines.append("getfattr --absolute-names --only-values -n user.greeting /mnt/dir/hard; echo")
        lines.append("getfattr --absolute-names -n user.missing /mnt/hello.txt 2>&1; echo rc=$?")
    lines.append("echo '== many-count'; ls /mnt/many | wc -l; ls -a /mnt/many | wc -l")
    lines.append("echo '== many-names'; ls /mnt/many | gzip -c | base64")
    lines.append("echo '== writes'")
    writes = dict(WRITES)
    if with_xattr_tools:
        writes["setxattr"] = "setfattr -n user.new -v 1 /mnt/hello.txt"
    for name, cmd in writes.items():
        # An assignment's status is that of its command substitution.
        lines.append(f"out=$( {{ {cmd}; }} 2>&1 ); echo \"{name}: $out rc=$?\"")
    lines.append("echo '== after-writes'; ls -a /mnt; md5sum /mnt/hello.txt /mnt/lines.txt")
    lines.append("echo '== statfs'; stat -f -c '%t %l' /mnt")
    lines.append("echo '== listing'")
    lines.append(_listing_script())
    return "\n".join(lines) + "\n"


SECOND_BOOT = """\
echo "mounts before: $(grep -c virtiofs /proc/mounts)"
mount -t virtiofs nydus /mnt || exit 10
md5sum /mnt/big.bin /mnt/hello.txt
cat /mnt/dir/sub/deep.txt
ls /mnt/many | wc -l
"""


@dataclasses.dataclass
class Session:
    """One served image and what the guest printed about it."""

    version: str
    backend: Backend
    workdir: pathlib.Path
    result: GuestResult
    sections: dict[str, str]
    xattr_tools: bool

    def section(self, name: str) -> str:
        """What the first boot printed under ``== name``; fails with the console if absent."""
        if name not in self.sections:
            first = self.result.boots[0]
            pytest.fail(f"the guest printed no '== {name}' section (part 1 exited {first.exit_status}):\n"
                        + "\n".join(self.result.console_log.splitlines()[-60:]))
        return self.sections[name]


def _start_session(built: Built, version: str, tmp: pathlib.Path, *, reboot: bool) -> Session:
    (tmp / "cache").mkdir(parents=True, exist_ok=True)
    cfg = write_localfs_config(tmp / "config.json", built.blobs[version], tmp / "cache", digest_validate=False)
    backend = _nydusd(tmp, built.boots[version], "--config", str(cfg))
    try:
        tools = _xattr_tools()
        parts = [_main_script(bool(tools))] + ([SECOND_BOOT] if reboot else [])
        result = run_guest(backend.sock_path, parts, files=tools, timeout=GUEST_TIMEOUT)
    except BaseException:
        print(backend.log())
        backend.close()
        raise
    return Session(version, backend, tmp, result, split_sections(result.boots[0].output), bool(tools))


@pytest.fixture(scope="module")
def v6_session(built, tmp_path_factory):
    s = _start_session(built, "v6", tmp_path_factory.mktemp("served-v6"), reboot=True)
    yield s
    s.backend.close()


@pytest.fixture(scope="module")
def v5_session(built, tmp_path_factory):
    s = _start_session(built, "v5", tmp_path_factory.mktemp("served-v5"), reboot=False)
    yield s
    s.backend.close()


@pytest.fixture(params=["v6", "v5"])
def session(request) -> Session:
    return request.getfixturevalue(f"{request.param}_session")


def _assert_backend_healthy(backend: Backend) -> None:
    log = backend.log()
    assert "Traceback" not in log and " ERROR " not in log, log


# --------------------------------------------------------------------------------------
# What the host expects of the built image


def _mtime_text(st: os.stat_result) -> str:
    """busybox ``stat %y`` of a UTC guest: seconds in UTC with nine digits of nanoseconds."""
    secs, nsec = divmod(st.st_mtime_ns, 10**9)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs)) + f".{nsec:09d} +0000"


def _expected_stat(src: pathlib.Path, rel: str, *, with_size: bool) -> str:
    st = os.lstat(src / rel)
    fields = [_guest_path(rel), f"{st.st_mode:x}"] + ([str(st.st_size)] if with_size else [])
    fields += [str(st.st_nlink), str(st.st_uid), str(st.st_gid), _mtime_text(st)]
    return "|".join(fields) + "\n"


# --------------------------------------------------------------------------------------
# Built image: one boot per format, many checks


def test_built_image_tree_and_contents_match_the_source(session, built):
    assert session.result.boots[0].exit_status == 0, session.result.console_log
    got = _unpack(session.section("listing"))
    want = host_tree_listing(built.src, prune=("many",))
    # The guest runs the very tree binary used on the host, so the text is identical.
    assert parse_tree_result(got) == parse_tree_result(want)
    assert got == want


def test_built_image_stat_shows_what_the_builder_recorded(session, built):
    want_files = "".join(_expected_stat(built.src, p, with_size=True) for p in STAT_FILES)
    want_dirs = "".join(_expected_stat(built.src, p, with_size=False) for p in STAT_DIRS)
    assert session.section("stat-files") == want_files
    assert session.section("stat-dirs") == want_dirs
    # The hard link pair is one inode in the guest too.
    a, b = session.section("inodes").split()
    assert a == b
    assert session.section("statfs") == "65735546 255\n"   # FUSE_SUPER_MAGIC, name length


def test_built_image_symlinks_read_back(session):
    assert session.section("readlink") == "".join(f"{t}\n" for t in LINKS.values())
    assert session.section("through-links") == HELLO.decode() + "deep\n"


def test_built_image_serves_user_xattrs(session):
    if not session.xattr_tools:
        pytest.skip("the host has no getfattr/setfattr to copy into the guest (apt-get install attr)")
    want = ""
    for rel in ("hello.txt", "dir", "suid"):
        want += f"# file: /mnt/{rel}\n"
        want += "".join(f"{k}=0x{v.hex()}\n" for k, v in sorted(XATTRS[rel].items()))
        want += "\n"
    # /mnt/empty and /mnt/link have none: getfattr prints nothing for them.
    assert session.section("xattr-dump") == want
    one = session.section("xattr-one").splitlines()
    assert one[0] == "hi there"       # through the hard link: the xattrs belong to the inode
    assert one[1:] == ["/mnt/hello.txt: user.missing: No such attribute", "rc=1"]


def test_built_image_lists_a_10000_entry_directory_completely(session):
    assert session.section("many-count") == f"{MANY}\n{MANY + 2}\n"
    names = _unpack(session.section("many-names")).splitlines()
    assert names == sorted(_many_names())


def test_built_image_refuses_writes_with_erofs(session, built):
    lines = session.section("writes").splitlines()
    expected = list(WRITES) + (["setxattr"] if session.xattr_tools else [])
    assert [ln.split(":", 1)[0] for ln in lines] == expected, lines
    for ln in lines:
        assert ln.endswith("Read-only file system rc=1"), ln
    # Nothing changed: no new names, the files keep their bytes.
    after = session.section("after-writes").splitlines()
    assert sorted(after[:-2]) == sorted([".", ".."] + os.listdir(built.src))
    assert after[-2:] == [f"{hashlib.md5((built.src / name).read_bytes()).hexdigest()}  /mnt/{name}"
                          for name in ("hello.txt", "lines.txt")]
    _assert_backend_healthy(session.backend)


def test_reboot_then_second_mount(v6_session, built):
    r = v6_session.result
    assert [(b.part, b.exit_status) for b in r.boots] == [(1, 0), (2, 0)], r.console_log
    big = hashlib.md5((built.src / "big.bin").read_bytes()).hexdigest()
    # "0": nothing survived the reset; the second mount is a new FUSE session.
    assert r.boots[1].output == (f"mounts before: 0\n{big}  /mnt/big.bin\n"
                                 f"{hashlib.md5(HELLO).hexdigest()}  /mnt/hello.txt\ndeep\n{MANY}\n")
    log = v6_session.backend.log()
    # One vhost-user connection carried both boots; the second INIT came without DESTROY.
    assert log.count("vhost-user front-end connected") == 1, log
    assert log.count("FUSE session 7.") == 2, log
    assert log.count("FUSE INIT without DESTROY") == 1, log
    _assert_backend_healthy(v6_session.backend)


# --------------------------------------------------------------------------------------
# The back-end outlives its guests


def _snapshot(root: pathlib.Path, *, contents: bool) -> dict[str, object]:
    """relative path -> kind and content hash (or link target) of everything under ``root``."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("link", os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest() if contents else None)
        else:
            out[rel] = (stat.S_IFMT(st.st_mode), None)
    return out


def test_backend_serves_a_new_qemu_then_exits_0_on_sigterm(v6_session, built):
    backend = v6_session.backend
    # The first QEMU has powered off and disconnected; the daemon must still be up.
    assert backend.proc.poll() is None, f"nydusd virtiofs exited with the guest:\n{backend.log()}"
    inputs = built.boots["v6"].parent
    inputs_before = _snapshot(inputs, contents=True)

    r = run_guest(backend.sock_path, "mount -t virtiofs nydus /mnt || exit 10\n"
                  "md5sum /mnt/big.bin\nls /mnt/many | wc -l\n", timeout=GUEST_TIMEOUT)
    big = hashlib.md5((built.src / "big.bin").read_bytes()).hexdigest()
    assert (r.exit_status, r.output) == (0, f"{big}  /mnt/big.bin\n{MANY}\n"), r.console_log
    assert "vhost-user front-end connected (connection 2)" in backend.log()

    served = _snapshot(v6_session.workdir, contents=False)
    sock = pathlib.Path(backend.sock_path).name
    assert served[sock][0] == stat.S_IFSOCK
    assert backend.stop(timeout=20) == 0, backend.log()
    # SIGTERM removes the daemon's own socket and nothing else: config and cache
    # files stay, and the bootstrap, blobs and source tree are byte for byte intact.
    assert _snapshot(v6_session.workdir, contents=False) == {k: v for k, v in served.items() if k != sock}
    assert any(k.startswith("cache/") for k in served), served
    assert _snapshot(inputs, contents=True) == inputs_before
    _assert_backend_healthy(backend)


# --------------------------------------------------------------------------------------
# The upstream vectors


@pytest.mark.parametrize("which", [0, 1], ids=["sha256-none", "blake3-none"])
def test_v5_vector_shows_expected_tree(which, v5_vector, tmp_path):
    blobs = linked_blob_dir(v5_vector["blob_dir"], tmp_path / "blobs")
    script = "mount -t virtiofs nydus /mnt || exit 10\n" + tree_result_script("/mnt")
    with _nydusd(tmp_path, v5_vector["boots"][which], "--localfs-dir", str(blobs)) as backend:
        r = run_guest(backend.sock_path, script, timeout=GUEST_TIMEOUT)
        _assert_backend_healthy(backend)
    assert r.exit_status == 0, r.console_log
    got = parse_tree_result(r.output)
    want = parse_tree_result(v5_vector["expected"].read_text())
    assert got.tree == want.tree
    assert len(want.md5sums) > 0
    assert got.md5sums == want.md5sums


async def _read_through_api(boot: pathlib.Path, blob_dir: pathlib.Path, cache: pathlib.Path,
                            names: tuple[str, ...]) -> dict[str, bytes]:
    """The files' bytes as the Python API (RafsFs over the storage layer) reads them."""
    from nydus_vfs.fs import RafsFs

    fs = RafsFs.from_paths(str(boot), str(blob_dir), cache_dir=str(cache), digest_validate=True)
    try:
        out = {}
        for name in names:
            ino = fs.lookup(fs.root_ino, name.encode()).nodeid
            data = bytearray()
            while True:
                reply = await fs.read(ino, 0, len(data), 1 << 20)
                parts = reply if isinstance(reply, list) else [reply]
                before = len(data)
                for part in parts:
                    if isinstance(part, FileSegment):
                        chunk = os.pread(part.fd, part.length, part.offset)
                        assert len(chunk) == part.length
                        data += chunk
                    else:
                        data += part
                if len(data) == before:
                    break
            out[name] = bytes(data)
        return out
    finally:
        fs.close()


def test_v6_vector_reads_back_with_digest_validation(v6_vector, tmp_path):
    names = ("lib.rs", "sync_io.rs")
    blobs = linked_blob_dir(v6_vector["blob_dir"], tmp_path / "blobs")
    host = asyncio.run(_read_through_api(v6_vector["boot"], blobs, tmp_path / "host-cache", names))
    assert {n: len(b) for n, b in host.items()} == {"lib.rs": 16931, "sync_io.rs": 13400}

    (tmp_path / "cache").mkdir(parents=True, exist_ok=True)
    cfg = write_localfs_config(tmp_path / "config.json", blobs, tmp_path / "cache", digest_validate=True)
    script = ("mount -t virtiofs nydus /mnt || exit 10\nls -a /mnt\n"
              "stat -c '%n %s' /mnt/lib.rs /mnt/sync_io.rs\nmd5sum /mnt/lib.rs /mnt/sync_io.rs\n")
    with _nydusd(tmp_path, v6_vector["boot"], "--config", str(cfg)) as backend:
        r = run_guest(backend.sock_path, script, timeout=GUEST_TIMEOUT)
        log = backend.log()
        _assert_backend_healthy(backend)
    assert "digest_validate=True" in log, log
    assert r.exit_status == 0, r.console_log
    want = (".\n..\nlib.rs\nsync_io.rs\n/mnt/lib.rs 16931\n/mnt/sync_io.rs 13400\n"
            + "".join(f"{hashlib.md5(host[n]).hexdigest()}  /mnt/{n}\n" for n in names))
    assert r.output == want
