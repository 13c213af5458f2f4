"""Boot a real Linux guest against a vhost-user-fs socket and collect what a script printed.

The guest is Debian's ``linux-image-amd64`` kernel (6.1 on bookworm) with a busybox
initramfs, run by ``qemu-system-x86_64`` with the ``vhost-user-fs-pci`` device whose
tag is ``nydus``.  A test hands :func:`run_guest` a shell script; the guest runs it
and powers off, and the test gets the script's output and exit status::

    with start_backend([VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={d}"], sock):
        r = run_guest(sock, "mount -t virtiofs nydus /mnt && cat /mnt/hello")
    assert r.exit_status == 0 and r.output == "hi\\n"

Where the pieces come from:

* ``qemu/fetch-kernel`` unpacks the kernel, a static busybox and Debian's ``tree``
  into the guest cache (``$NYDUS_VFS_CACHE/guest``, default ``<project>/.cache/guest``)
  and describes them in ``kernel.env``; :func:`find_kernel` reads that.
* :func:`build_initramfs` packs the base initramfs (busybox and its applet links, the
  real ``tree`` with its shared libraries and loader, the virtio/FUSE modules in
  dependency order, ``qemu/init``) and caches it under a key of all its inputs.
* :func:`run_guest` appends a second, per-run archive holding the script (the kernel
  unpacks concatenated archives in order), boots, and follows the conversation that
  ``qemu/init`` documents.  A list of scripts means one part per boot: the guest
  reboots with ``reboot -f`` between parts, through QEMU's real reset path (the
  back-end sees the rings stop and a new FUSE_INIT with no DESTROY).

Everything here is standard library only (plus ``nydus_vfs.errors`` from ``src/``), so
``qemu/run-guest`` can load this file by path with any Python 3.11.  It lives in
``tests/`` because it needs the checkout (``qemu/init``, the ``.cache`` beside it).  Failures raise :class:`GuestError`; missing tooling raises
:class:`GuestUnavailableError`, and :func:`guest_unavailable_reason` says why up front
so tests can skip with that reason.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import pathlib
import re
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence

from nydus_vfs.errors import NydusError

__all__ = [
    "GUEST_MODULES",
    "Backend",
    "BootResult",
    "GuestError",
    "GuestKernel",
    "GuestResult",
    "GuestTimeoutError",
    "GuestUnavailableError",
    "TreeResult",
    "build_initramfs",
    "cache_dir",
    "find_kernel",
    "guest_unavailable_reason",
    "parse_tree_result",
    "resolve_modules",
    "run_guest",
    "select_accel",
    "start_backend",
    "tree_result_script",
]

# This file lives in the checkout (tests/guest.py) and boots what qemu/ next to it holds;
# it is test tooling, not part of the installed package.
PROJECT_ROOT = pathlib.Path(__file__).resolve().parent.parent
QEMU_DIR = PROJECT_ROOT / "qemu"
QEMU = "qemu-system-x86_64"

#: Modules the guest needs for virtio-fs, in the order they are checked.  Each is
#: either built into the kernel or loaded (with its modules.dep dependencies).
GUEST_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
                 "virtio_pci", "fuse", "virtiofs")
# Split out of virtio_pci in 5.15/5.16; older kernels simply do not have them.
_OPTIONAL_MODULES = frozenset({"virtio_pci_modern_dev", "virtio_pci_legacy_dev"})

# Bump when the layout of the base initramfs changes without its inputs changing.
_INITRAMFS_FORMAT = b"nydus-guest-initramfs/1"
_KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"
_KVM_PROBE_TIMEOUT = 20.0
_KVM_GET_API_VERSION = 0xAE00
_CONSOLE_LIMIT = 64 << 20


class GuestError(NydusError):
    """The guest could not be run or did not follow the /init conversation.

    ``console_log`` and ``qemu_stderr`` hold what was captured before the failure;
    the message already ends with their tails.
    """

    def __init__(self, message: str, *, console_log: str = "", qemu_stderr: str = "") -> None:
        self.console_log = console_log
        self.qemu_stderr = qemu_stderr
        detail = message
        if qemu_stderr.strip():
            detail += "\n--- qemu stderr (tail) ---\n" + _tail(qemu_stderr, 20)
        if console_log.strip():
            detail += "\n--- guest console (tail) ---\n" + _tail(console_log, 40)
        super().__init__(detail)


class GuestTimeoutError(GuestError, TimeoutError):
    """The guest did not finish within the timeout; QEMU has been killed."""


class GuestUnavailableError(GuestError):
    """Something the guest needs (QEMU, the cached kernel, busybox, tree) is missing.

    The message says what to install or run; tests skip with it.
    """


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# --------------------------------------------------------------------------------------
# The cached kernel and tools


def cache_dir() -> pathlib.Path:
    """The guest cache: ``$NYDUS_VFS_CACHE/guest``, by default ``<project>/.cache/guest``."""
    base = os.environ.get("NYDUS_VFS_CACHE")
    return (pathlib.Path(base) if base else PROJECT_ROOT / ".cache") / "guest"


@dataclasses.dataclass(frozen=True)
class GuestKernel:
    """What ``qemu/fetch-kernel`` put in the cache (absolute paths)."""

    version: str
    vmlinuz: pathlib.Path
    modules_dir: pathlib.Path
    busybox: pathlib.Path
    tree: pathlib.Path


def find_kernel(directory: pathlib.Path | None = None) -> GuestKernel:
    """Read ``kernel.env`` of the guest cache and check that every file it names exists.

    Raises :class:`GuestUnavailableError` naming the command that fixes it.
    """
    root = directory or cache_dir()
    env_file = root / "kernel.env"
    fix = "run qemu/fetch-kernel (as root, after apt-get update)"
    try:
        text = env_file.read_text()
    except OSError:
        raise GuestUnavailableError(f"no guest kernel in {root}: {fix}") from None
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    missing = {"KVER", "VMLINUZ", "MODULES", "BUSYBOX", "TREE"} - values.keys()
    if missing:
        raise GuestUnavailableError(f"{env_file} lacks {sorted(missing)}: {fix}")
    kernel = GuestKernel(
        version=values["KVER"],
        vmlinuz=root / values["VMLINUZ"],
        modules_dir=root / values["MODULES"],
        busybox=root / values["BUSYBOX"],
        tree=root / values["TREE"],
    )
    for path in (kernel.vmlinuz, kernel.modules_dir / "modules.dep", kernel.busybox, kernel.tree):
        if not path.exists():
            raise GuestUnavailableError(f"{path} named by {env_file} is missing: {fix}")
    return kernel


def guest_unavailable_reason() -> str | None:
    """Why :func:`run_guest` cannot work on this machine, or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (apt-get install qemu-system-x86)"
    if not (QEMU_DIR / "init").is_file():
        return f"{QEMU_DIR / 'init'} is missing (the guest tooling needs the project checkout)"
    try:
        find_kernel()
    except GuestUnavailableError as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------
# Kernel modules


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    # modprobe treats '-' and '_' in module names as the same character.
    return base.replace("-", "_")


def resolve_modules(modules_dir: pathlib.Path,
                    wanted: Sequence[str] = GUEST_MODULES,
                    ) -> tuple[list[tuple[str, pathlib.Path]], list[str]]:
    """Decide how the guest gets each of ``wanted``: built in, or loaded from a file.

    Returns ``(load, builtin)``: ``load`` lists ``(name, path)`` in an order where
    every module comes after all of its dependencies (from modules.dep, followed
    transitively), ``builtin`` the wanted names that are built into the kernel.
    Raises :class:`GuestError` when a wanted module (other than the optional
    virtio-pci helpers) is neither, or modules.dep names a file that is not there.
    """
    builtin_names = set()
    builtin_file = modules_dir / "modules.builtin"
    if builtin_file.exists():
        builtin_names = {_module_name(line) for line in builtin_file.read_text().split()}
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path, [_module_name(d) for d in rest.split()])

    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin_names:
            return
        if name in visiting:
            raise GuestError(f"modules.dep has a dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in deps:
            raise GuestError(f"module {name} (needed by {' -> '.join(chain) or 'the guest'}) is neither "
                             f"built in nor listed in {modules_dir / 'modules.dep'}")
        visiting.add(name)
        for dep in deps[name][1]:
            visit(dep, chain + (name,))
        visiting.discard(name)
        order.append(name)

    builtin: list[str] = []
    for name in wanted:
        name = _module_name(name)
        if name in builtin_names:
            builtin.append(name)
        elif name in deps:
            visit(name, ())
        elif name not in _OPTIONAL_MODULES:
            raise GuestError(f"kernel in {modules_dir} has {name} neither as a module nor built in")
    load = []
    for name in order:
        path = modules_dir / deps[name][0]
        if not path.is_file():
            raise GuestError(f"modules.dep names {path}, which does not exist")
        load.append((name, path))
    return load, builtin


def _module_bytes(path: pathlib.Path) -> bytes:
    # busybox insmod takes plain ELF only, so compressed modules are unpacked here.
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise GuestUnavailableError(f"{path} is zstd-compressed and zstd is not installed")
        return subprocess.run(["zstd", "-dcq", str(path)], check=True, capture_output=True).stdout
    return data


# --------------------------------------------------------------------------------------
# cpio "newc" archives (the format the kernel unpacks as initramfs)


class _NewcArchive:
    """An in-memory newc cpio archive with root-owned entries and mtime 0.

    Building it in memory (rather than with cpio(1) over a staging directory) gives
    device nodes without root and the same bytes for the same inputs.  Parent
    directories are added automatically, before their children, as the kernel's
    unpacker needs.
    """

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0
        self._paths: set[str] = set()

    def _entry(self, path: str, mode: int, data: bytes = b"", *, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        name = path.strip("/")
        if not name or ".." in name.split("/") or "\0" in name:
            raise ValueError(f"bad archive path {path!r}")
        if name in self._paths:
            raise ValueError(f"duplicate archive path {path!r}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._paths:
            self.directory(parent)
        self._paths.add(name)
        self._ino += 1
        self._append(name, mode, data, nlink, rdev)

    def _append(self, name: str, mode: int, data: bytes, nlink: int, rdev: tuple[int, int]) -> None:
        raw = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        self._out += b"070701" + b"".join(b"%08x" % f for f in fields) + raw
        self._out += b"\0" * (-len(self._out) % 4)
        self._out += data
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, path: str, mode: int = 0o755) -> None:
        if path.strip("/") not in self._paths:
            self._entry(path, 0o040000 | mode, nlink=2)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(path, 0o100000 | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(path, 0o120777, target.encode())

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(path, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer; the object must not be used afterwards."""
        self._ino += 1
        self._append("TRAILER!!!", 0, b"", 1, (0, 0))
        return bytes(self._out)


# --------------------------------------------------------------------------------------
# The base initramfs


def _shared_libraries(binary: pathlib.Path) -> list[str]:
    """Absolute paths of the libraries and loader ``binary`` needs, as ldd resolves them."""
    proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if proc.returncode != 0 or "not a dynamic executable" in proc.stdout + proc.stderr:
        return []
    libs = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise GuestUnavailableError(f"{binary} needs a library the host lacks: {line}")
        path = line.split("=>", 1)[1] if "=>" in line else line
        path = path.split("(", 1)[0].strip()
        if path.startswith("/"):
            libs.append(path)
    return libs


def _initramfs_inputs(kernel: GuestKernel) -> tuple[list[tuple[str, str, object, int]], list[str]]:
    """Everything the base initramfs holds: (kind, guest path, content, mode) rows.

    Also returns the names of the wanted modules that are built in (for reporting).
    """
    init = QEMU_DIR / "init"
    if not init.is_file():
        raise GuestUnavailableError(f"{init} is missing")
    rows: list[tuple[str, str, object, int]] = [
        ("file", "/init", init.read_bytes(), 0o755),
        ("file", "/bin/busybox", kernel.busybox.read_bytes(), 0o755),
    ]
    applets = subprocess.run([str(kernel.busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    for applet in sorted(set(applets)):
        if applet != "bin/busybox":
            rows.append(("symlink", "/" + applet, "/bin/busybox", 0))
    # The real tree, so that `tree -a -J -v` in the guest prints exactly what the
    # host's tree prints; its libraries go where ldd found them (merged-/usr hosts
    # report /lib paths, which here become real directories).
    rows.append(("file", "/usr/bin/tree", kernel.tree.read_bytes(), 0o755))
    for lib in _shared_libraries(kernel.tree):
        rows.append(("file", lib, pathlib.Path(lib).read_bytes(), 0o755))
    load, builtin = resolve_modules(kernel.modules_dir)
    for name, path in load:
        rows.append(("file", f"/lib/modules/{name}.ko", _module_bytes(path), 0o644))
    rows.append(("file", "/etc/nydus-guest/modules",
                 "".join(f"{name}\n" for name, _ in load).encode(), 0o644))
    rows.append(("file", "/etc/nydus-guest/kernel", f"{kernel.version}\n".encode(), 0o644))
    return rows, builtin


def build_initramfs(kernel: GuestKernel | None = None, *, force: bool = False) -> pathlib.Path:
    """Return the cached base initramfs (gzip'd newc cpio), building it if needed.

    The file name carries a hash of every input (init, busybox, tree and its
    libraries, the modules and their order), so a changed input gives a new file;
    older ones are removed.  Safe to call from several processes at once: the file
    appears atomically.
    """
    kernel = kernel or find_kernel()
    rows, _ = _initramfs_inputs(kernel)
    digest = hashlib.sha256(_INITRAMFS_FORMAT)
    for kind, path, content, mode in rows:
        data = content if isinstance(content, bytes) else str(content).encode()
        digest.update(b"%s\0%s\0%o\0%d\0" % (kind.encode(), path.encode(), mode, len(data)))
        digest.update(data)
    out = cache_dir() / f"initramfs-{digest.hexdigest()[:20]}.cpio.gz"
    if out.exists() and not force:
        return out
    archive = _NewcArchive()
    for d in ("/dev", "/proc", "/sys", "/tmp", "/run", "/mnt", "/root", "/etc",
              "/bin", "/sbin", "/usr/bin", "/usr/sbin"):
        archive.directory(d)
    # The kernel opens /dev/console for init's stdin/stdout before devtmpfs is up.
    archive.chardev("/dev/console", 5, 1)
    archive.chardev("/dev/null", 1, 3, 0o666)
    for kind, path, content, mode in rows:
        if kind == "file":
            archive.file(path, content, mode)  # type: ignore[arg-type]
        else:
            archive.symlink(path, str(content))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    os.replace(tmp, out)
    for old in out.parent.glob("initramfs-*.cpio.gz"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


def _run_archive(nonce: str, parts: Sequence[str], files: Mapping[str, bytes | str]) -> bytes:
    archive = _NewcArchive()
    archive.file("/guest/nonce", nonce.encode())
    archive.file("/guest/parts", f"{len(parts)}\n".encode())
    for k, part in enumerate(parts, 1):
        archive.file(f"/guest/part.{k}.sh", part.encode(), 0o755)
    for path, content in files.items():
        if not path.startswith("/") or path.startswith("/guest/"):
            raise ValueError(f"extra guest file {path!r} must be absolute and outside /guest")
        archive.file(path, content.encode() if isinstance(content, str) else content, 0o755)
    return gzip.compress(archive.finish(), compresslevel=1, mtime=0)


# --------------------------------------------------------------------------------------
# Direct (PVH) boot


_XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_NOTE = 4


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether ``elf`` is an ELF64 kernel with the PVH entry note QEMU boots directly."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        ph = phoff + i * phentsize
        if phentsize < 56 or ph + 56 > len(elf):
            return False
        p_type, = struct.unpack_from("<I", elf, ph)
        if p_type != _PT_NOTE:
            continue
        p_offset, = struct.unpack_from("<Q", elf, ph + 8)
        p_filesz, = struct.unpack_from("<Q", elf, ph + 32)
        pos, end = p_offset, min(p_offset + p_filesz, len(elf))
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz]
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
            if name == b"Xen\0" and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
    return False


def _bzimage_payload(image: bytes) -> bytes | None:
    """The uncompressed vmlinux inside a bzImage, or None when it cannot be had here.

    Boot protocol 2.08+ records where the compressed kernel sits
    (``payload_offset``/``payload_length``, relative to the protected-mode code).
    """
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        return None
    version, = struct.unpack_from("<H", image, 0x206)
    if version < 0x208:
        return None
    setup_sects = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = image[start:start + length]
    try:
        if payload.startswith(b"\xfd7zXZ\x00"):
            # The build appends the uncompressed size after the stream; the
            # decompressor object stops at the end of the stream and ignores it.
            return lzma.LZMADecompressor().decompress(payload)
        if payload.startswith(b"\x1f\x8b"):
            return gzip.GzipFile(fileobj=io.BytesIO(payload)).read()
    except (lzma.LZMAError, OSError, EOFError):
        return None
    return None


def _boot_image(kernel: GuestKernel) -> pathlib.Path:
    """The image to hand QEMU's ``-kernel``: the uncompressed vmlinux when possible.

    Booting the vmlinux through its PVH entry skips the bzImage decompressor, which
    takes about 3 s under TCG (a whole boot then takes about 2.5 s instead of 5.5).
    The kernel that runs is the same.  ``NYDUS_VFS_GUEST_BOOT=bzimage`` forces the
    vmlinuz; kernels without the PVH note fall back to it as well.
    """
    if os.environ.get("NYDUS_VFS_GUEST_BOOT") == "bzimage":
        return kernel.vmlinuz
    image = kernel.vmlinuz.read_bytes()
    key = hashlib.sha256(image).hexdigest()[:16]
    out = cache_dir() / f"vmlinux-{kernel.version}-{key}"
    no_pvh = out.with_name(out.name + ".nopvh")
    if out.exists():
        return out
    if no_pvh.exists():
        return kernel.vmlinuz
    elf = _bzimage_payload(image)
    if elf is None or not _has_pvh_entry(elf):
        no_pvh.touch()
        return kernel.vmlinuz
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(elf)
    os.replace(tmp, out)
    for old in out.parent.glob("vmlinux-*"):
        if old != out:
            old.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------------------
# Accelerator choice


def _kvm_device_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


_accel_memo: dict[str, str] = {}


def select_accel(accel: str = "auto") -> str:
    """``"kvm"`` or ``"tcg"``.

    ``auto`` honours ``$NYDUS_VFS_GUEST_ACCEL``, else uses KVM only if it really
    boots this guest: /dev/kvm must answer KVM_GET_API_VERSION, then a probe guest
    must finish under KVM within 20 s (on nested hosts KVM can hang right after
    the kernel is decompressed, or QEMU aborts on an MSR it cannot set).  The probe
    result is cached per host boot, QEMU binary and kernel, in ``kvm-probe.json``.
    """
    if accel in ("kvm", "tcg"):
        return accel
    if accel != "auto":
        raise ValueError(f"accel must be 'auto', 'kvm' or 'tcg', not {accel!r}")
    forced = os.environ.get("NYDUS_VFS_GUEST_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    if "auto" in _accel_memo:
        return _accel_memo["auto"]
    result = "tcg"
    if _kvm_device_usable():
        kernel = find_kernel()
        qemu = pathlib.Path(shutil.which(QEMU) or QEMU).resolve()
        try:
            boot_id = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
            st = qemu.stat()
            key = f"{boot_id}:{qemu}:{st.st_size}:{st.st_mtime_ns}:{kernel.version}"
        except OSError:
            key = ""
        probe_file = cache_dir() / "kvm-probe.json"
        try:
            cached = json.loads(probe_file.read_text())
        except (OSError, ValueError):
            cached = {}
        if key and cached.get("key") == key:
            result = cached.get("accel", "tcg")
        else:
            try:
                r = run_guest(None, "true", accel="kvm", mem="256M", timeout=_KVM_PROBE_TIMEOUT)
                result = "kvm" if r.exit_status == 0 else "tcg"
            except GuestError:
                result = "tcg"
            if key:
                tmp = probe_file.with_name(f".kvm-probe.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key, "accel": result}))
                os.replace(tmp, probe_file)
    _accel_memo["auto"] = result
    return result


# --------------------------------------------------------------------------------------
# Running a guest


@dataclasses.dataclass(frozen=True)
class BootResult:
    """What one script part printed (stdout and stderr merged) and its exit status.

    ``output`` is decoded as UTF-8 with ``surrogateescape``, so
    ``output.encode("utf-8", "surrogateescape")`` gives back the exact bytes.
    """

    part: int
    output: str
    exit_status: int


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """The outcome of :func:`run_guest`.

    ``output``/``exit_status`` belong to the last part (the only one for a single
    script); ``boots`` holds every part in order.  ``console_log`` is the whole
    serial console (firmware noise, markers, the parts' output, kernel messages
    after a failing part); ``qemu_stderr`` is what QEMU itself reported.
    """

    output: str
    exit_status: int
    console_log: str
    boots: tuple[BootResult, ...]
    qemu_stderr: str
    elapsed: float


_MARKER = rb"@@NYDUS-GUEST:%s:(?:(BOOT)|BEGIN (\d+)|END (\d+) (\d+))@@"
_MARKER_MAX = 96


class _Console:
    """Follows the /init conversation in the console byte stream (no I/O).

    :meth:`feed` takes console bytes as they arrive and returns the bytes to type
    into the guest (the number of the part to run, once per boot).  Violations
    (a reboot in the middle of a part, more boots than parts, a part out of
    order, too much output) raise :class:`GuestError`.
    """

    def __init__(self, nonce: str, parts: int, limit: int = _CONSOLE_LIMIT) -> None:
        self.log = bytearray()
        self.results: list[BootResult] = []
        self.boots = 0
        self._parts = parts
        self._limit = limit
        self._marker = re.compile(_MARKER % re.escape(nonce.encode()))
        self._scan_from = 0
        self._running: int | None = None
        self._begin = 0

    @property
    def done(self) -> bool:
        return len(self.results) == self._parts

    def text(self) -> str:
        return self.log.decode("utf-8", "replace")

    def _fail(self, message: str) -> GuestError:
        return GuestError(message, console_log=self.text())

    def feed(self, data: bytes) -> bytes:
        if len(self.log) + len(data) > self._limit:
            raise self._fail(f"guest console output exceeded {self._limit} bytes")
        # A marker may straddle two reads, so rescan a marker's length of old bytes.
        start = max(self._scan_from, len(self.log) - _MARKER_MAX)
        self.log += data
        answer = b""
        for m in self._marker.finditer(self.log, start):
            self._scan_from = m.end()
            if m.group(1):
                answer += self._on_boot()
            elif m.group(2):
                self._on_begin(int(m.group(2)), m.end())
            else:
                self._on_end(int(m.group(3)), int(m.group(4)), m.start())
        return answer

    def _on_boot(self) -> bytes:
        if self._running is not None:
            raise self._fail(f"the guest rebooted while part {self._running} was running "
                             "(kernel panic, or the script rebooted by itself)")
        if self.done:
            raise self._fail("the guest booted again after the last part")
        self.boots += 1
        if self.boots != len(self.results) + 1:
            raise self._fail(f"boot {self.boots} started before part {len(self.results) + 1} ended")
        return b"%d\n" % self.boots

    def _on_begin(self, part: int, end: int) -> None:
        if part != self.boots or self._running is not None:
            raise self._fail(f"the guest began part {part} during boot {self.boots}")
        self._running = part
        self._begin = end

    def _on_end(self, part: int, status: int, start: int) -> None:
        if part != self._running:
            raise self._fail(f"the guest ended part {part} but part {self._running} was running")
        raw = bytes(self.log[self._begin:start])
        # /init frames the output with the BEGIN line's newline and a newline of its own.
        raw = raw[1:] if raw.startswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        self.results.append(BootResult(part, raw.decode("utf-8", "surrogateescape"), status))
        self._running = None


def _exit_text(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        # A vCPU stuck inside a broken KVM can delay the exit; never block a test on it.
        pass


def _drive(cmd: Sequence[str], console: _Console, timeout: float) -> tuple[str, float]:
    """Run ``cmd`` (QEMU), feeding its stdout to ``console`` until the last part ends.

    Returns (qemu stderr, elapsed seconds).  QEMU is always gone or killed on return.
    """
    started = time.monotonic()
    deadline = started + timeout
    stderr = bytearray()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    sel = selectors.DefaultSelector()
    try:
        assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        open_streams = 2
        finished_at: float | None = None
        while open_streams:
            now = time.monotonic()
            if finished_at is None and console.done:
                # Give /init time to power off (and to print dmesg after a failure).
                finished_at = now
                deadline = min(deadline, now + 15)
            if now >= deadline:
                if finished_at is not None:
                    break
                raise GuestTimeoutError(
                    f"guest did not finish within {timeout:g} s (boot {console.boots}, "
                    f"{len(console.results)} part(s) done); QEMU killed",
                    console_log=console.text(), qemu_stderr=stderr.decode("utf-8", "replace"))
            for key, _ in sel.select(deadline - now):
                chunk = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                elif key.data == "err":
                    if len(stderr) < 1 << 20:
                        stderr += chunk
                else:
                    answer = console.feed(chunk)
                    if answer:
                        try:
                            proc.stdin.write(answer)
                            proc.stdin.flush()
                        except BrokenPipeError:
                            pass
        _kill(proc)
        if not console.done:
            raise GuestError(f"QEMU {_exit_text(proc.returncode)} before the guest finished "
                             f"(boot {console.boots}, {len(console.results)} part(s) done)",
                             console_log=console.text(), qemu_stderr=stderr.decode("utf-8", "replace"))
        return stderr.decode("utf-8", "replace"), time.monotonic() - started
    finally:
        sel.close()
        _kill(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def run_guest(sock_path: str | os.PathLike | None,
              script: str | Sequence[str],
              *,
              mem: str = "512M",
              timeout: float = 120.0,
              accel: str = "auto",
              smp: int = 1,
              tag: str = "nydus",
              files: Mapping[str, bytes | str] | None = None,
              ) -> GuestResult:
    """Boot the guest against the vhost-user-fs back-end at ``sock_path`` and run ``script``.

    ``script`` is run by busybox ``sh`` in the guest, with stdout and stderr merged
    into a pipe (not a tty) and stdin from /dev/null; the device's tag is ``tag``,
    so ``mount -t virtiofs nydus /mnt`` mounts it.  A sequence of scripts runs one
    per boot, with a ``reboot -f`` (a real guest reset, no unmount) between them.
    ``files`` are extra files (absolute guest path -> content) put into the guest.

    The back-end must already listen on ``sock_path`` (see :func:`start_backend`);
    QEMU connects once and keeps the connection across reboots.  ``None`` boots
    without the virtio-fs device.  ``accel`` is ``auto`` (see :func:`select_accel`),
    ``kvm`` or ``tcg``.

    Returns when the last part has ended and QEMU has exited.  Raises
    :class:`GuestTimeoutError` after ``timeout`` seconds (QEMU is killed),
    :class:`GuestError` when QEMU dies or the guest strays from its protocol, and
    :class:`GuestUnavailableError` when QEMU or the cached kernel is missing.
    """
    parts = [script] if isinstance(script, str) else list(script)
    if not parts or not all(isinstance(p, str) for p in parts):
        raise ValueError("script must be a string or a non-empty sequence of strings")
    if not re.fullmatch(r"[1-9][0-9]*[MG]", mem):
        raise ValueError(f"mem must look like 512M or 1G, not {mem!r}")
    if not 0 < len(tag.encode()) <= 36 or "\n" in tag or "," in tag:
        raise ValueError(f"tag must be 1..36 bytes without newline or comma, not {tag!r}")
    if shutil.which(QEMU) is None:
        raise GuestUnavailableError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
    kernel = find_kernel()
    base = build_initramfs(kernel)
    chosen = select_accel(accel)
    nonce = secrets.token_hex(8)

    with tempfile.TemporaryDirectory(prefix="nydus-guest-") as tmp:
        initrd = pathlib.Path(tmp) / "initrd.cpio.gz"
        # The kernel unpacks concatenated (separately compressed) archives in order.
        initrd.write_bytes(base.read_bytes() + _run_archive(nonce, parts, files or {}))
        cmd = [QEMU, "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
               "-smp", str(smp), "-m", mem,
               "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
               "-numa", "node,memdev=mem",
               "-kernel", str(_boot_image(kernel)), "-initrd", str(initrd),
               "-append", _KERNEL_CMDLINE]
        if chosen == "kvm":
            cmd += ["-accel", "kvm", "-cpu", "host"]
        else:
            cmd += ["-accel", "tcg,thread=multi" if smp > 1 else "tcg"]
        if len(parts) == 1:
            # A panic then ends QEMU at once instead of rebooting into a second boot.
            cmd.append("-no-reboot")
        if sock_path is not None:
            # QEMU option values escape commas by doubling them.
            chardev_path = os.fspath(sock_path).replace(",", ",,")
            cmd += ["-chardev", f"socket,id=char0,path={chardev_path}",
                    "-device", f"vhost-user-fs-pci,queue-size=1024,chardev=char0,tag={tag}"]
        console = _Console(nonce, len(parts))
        stderr, elapsed = _drive(cmd, console, timeout)
    last = console.results[-1]
    return GuestResult(output=last.output, exit_status=last.exit_status, console_log=console.text(),
                       boots=tuple(console.results), qemu_stderr=stderr, elapsed=elapsed)


# --------------------------------------------------------------------------------------
# Back-ends


_SO_ACCEPTCON = 0x10000


def _listening(path: str) -> bool | None:
    """Whether a unix socket is listening at ``path`` (None: /proc/net/unix unreadable).

    Connecting to find out is not an option: back-ends such as virtiofsd accept a
    single front-end and exit when it goes away.
    """
    try:
        lines = pathlib.Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split(None, 7)
        if len(cols) == 8 and int(cols[3], 16) & _SO_ACCEPTCON:
            if os.path.realpath(cols[7]) == path:
                return True
    return False


class Backend:
    """A vhost-user back-end process started by :func:`start_backend`.

    A context manager: leaving it stops the process (its whole process group).
    """

    def __init__(self, proc: subprocess.Popen, sock_path: str, log_file) -> None:
        self.proc = proc
        self.sock_path = sock_path
        self._log_file = log_file

    def log(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        return os.pread(self._log_file.fileno(), 1 << 24, 0).decode("utf-8", "replace")

    def stop(self, timeout: float = 5.0) -> int | None:
        """Stop the back-end: SIGTERM, then SIGKILL after ``timeout``; its exit status."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        # The leader may be gone while forked helpers (virtiofsd's sandbox child) live on.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._log_file.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_backend(cmd: Sequence[str], sock_path: str | os.PathLike, *, timeout: float = 10.0,
                  env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None) -> Backend:
    """Start ``cmd`` and return once it listens on the unix socket ``sock_path``.

    Works for any command that creates the listening socket itself (virtiofsd,
    ``nydusd virtiofs``).  The process gets its own process group, stdout and
    stderr go to a temporary file (:meth:`Backend.log`).  Raises
    :class:`GuestError` with that log when the process exits early or does not
    listen within ``timeout`` seconds (the process is stopped then).
    """
    path = os.path.realpath(os.fspath(sock_path))
    log_file = tempfile.TemporaryFile(prefix="nydus-backend-")
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            env=None if env is None else dict(env), cwd=cwd, start_new_session=True)
    backend = Backend(proc, path, log_file)
    deadline = time.monotonic() + timeout
    while True:
        state = _listening(path)
        if state or (state is None and os.path.exists(path)):
            if state is None:
                time.sleep(0.1)  # no /proc: the socket file exists; give listen() a moment
            return backend
        if proc.poll() is not None:
            log = backend.log()
            backend.close()
            raise GuestError(f"back-end {cmd[0]} {_exit_text(proc.returncode)} before "
                             f"listening on {path}:\n{_tail(log, 30)}")
        if time.monotonic() >= deadline:
            log = backend.log()
            backend.close()
            raise GuestError(f"back-end {cmd[0]} did not listen on {path} within {timeout:g} s:\n"
                             f"{_tail(log, 30)}")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------
# `tree` results as upstream nydus compares them


def tree_result_script(mountpoint: str = "/mnt") -> str:
    """Shell commands printing a mount the way upstream's ``*.result`` files show it.

    Upstream's smoke tests take ``tree -a -J -v MNT`` followed by
    ``find MNT -type f -exec md5sum {} + | sort`` and delete every occurrence of the
    mount path; the v5 vector's ``expected-tree.result`` is such a file.
    """
    if not re.fullmatch(r"/[A-Za-z0-9_./-]*[A-Za-z0-9_-]", mountpoint):
        raise ValueError(f"mountpoint {mountpoint!r} must be a plain absolute path")
    pattern = mountpoint.replace(".", r"\.")
    return (f"tree -a -J -v {mountpoint} | sed 's|{pattern}||g'\n"
            f"find {mountpoint} -type f -exec md5sum {{}} + | sort | sed 's|{pattern}||g'\n")


@dataclasses.dataclass(frozen=True)
class TreeResult:
    """A ``*.result`` text in a form that does not depend on the version of ``tree``.

    ``tree`` is the JSON document without its ``report`` entry, every node's
    ``contents`` present (empty for files, links and empty directories);
    ``md5sums`` are the md5sum lines in the order given.
    """

    tree: list
    md5sums: tuple[str, ...]


def _normalize_tree_node(node: object) -> object:
    if not isinstance(node, dict):
        return node
    out = {k: v for k, v in node.items() if k != "contents"}
    out["contents"] = [_normalize_tree_node(c) for c in node.get("contents") or []]
    return out


def parse_tree_result(text: str) -> TreeResult:
    """Parse tree JSON followed by md5sum lines (either part may be absent from the tail).

    tree 1.8 (which produced upstream's files) and tree 2.x (Debian 12) print the
    same listing differently: 1.8 writes ``"contents":[]`` for links and empty
    directories where 2.x writes nothing, and 2.x counts the top directory in its
    report where 1.8 does not.  Both are normalized away here; names, types, link
    targets and order are compared as printed.  Raises ValueError on text that
    does not start with a JSON array.
    """
    decoder = json.JSONDecoder()
    stripped = text.lstrip()
    try:
        doc, end = decoder.raw_decode(stripped)
    except json.JSONDecodeError as exc:
        raise ValueError(f"tree result does not start with tree's JSON: {exc}") from None
    if not isinstance(doc, list):
        raise ValueError("tree result JSON is not an array")
    tree = [_normalize_tree_node(n) for n in doc if not (isinstance(n, dict) and n.get("type") == "report")]
    md5 = tuple(line for line in stripped[end:].splitlines() if line.strip())
    return TreeResult(tree=tree, md5sums=md5)
