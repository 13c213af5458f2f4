"""nydus_vfs.fuse.abi against the kernel header and the reference struct-size table."""

from __future__ import annotations

import pathlib
import re

import pytest

from nydus_vfs.fuse import abi
from nydus_vfs.fuse.abi import InitFlags, Opcode

FUSE_H = pathlib.Path("/usr/include/linux/fuse.h")


@pytest.fixture(scope="module")
def fuse_h() -> str:
    if not FUSE_H.exists():
        pytest.skip(f"{FUSE_H} is missing (install linux-libc-dev to compare with the kernel header)")
    return FUSE_H.read_text()


# reference/vhost-user-fs.md §3.10 (protocol 7.38)
@pytest.mark.parametrize("struct_, size", [
    (abi.fuse_in_header, 40), (abi.fuse_out_header, 16), (abi.fuse_init_in, 64),
    (abi.fuse_init_out, 64), (abi.fuse_attr, 88), (abi.fuse_getattr_in, 16),
    (abi.fuse_open_in, 8), (abi.fuse_open_out, 16), (abi.fuse_read_in, 40),
    (abi.fuse_release_in, 24), (abi.fuse_flush_in, 24), (abi.fuse_forget_in, 8),
    (abi.fuse_batch_forget_in, 8), (abi.fuse_forget_one, 16), (abi.fuse_kstatfs, 80),
    (abi.fuse_dirent, 24), (abi.fuse_getxattr_in, 8), (abi.fuse_getxattr_out, 8),
    (abi.fuse_lseek_in, 24), (abi.fuse_lseek_out, 8), (abi.fuse_syncfs_in, 8),
    (abi.fuse_fsync_in, 16), (abi.fuse_access_in, 8), (abi.fuse_interrupt_in, 8),
    (abi.fuse_init_in_compat, 16),
])
def test_struct_sizes_match_reference_table(struct_, size):
    assert struct_.size == size


def test_composite_sizes():
    assert abi.FUSE_ENTRY_OUT_SIZE == 128
    assert abi.FUSE_ATTR_OUT_SIZE == 104
    assert abi.FUSE_NAME_OFFSET == 24
    assert abi.FUSE_NAME_OFFSET_DIRENTPLUS == 152


def test_init_out_field_offsets():
    # vhost-user-fs.md §3.10: max_pages at 28, map_alignment at 30, flags2 at 32
    raw = abi.fuse_init_out.pack(7, 38, 0, 0, 0, 0, 0, 0, 0x1234, 0x5678, 0x9ABCDEF0)
    assert raw[28:30] == b"\x34\x12"
    assert raw[30:32] == b"\x78\x56"
    assert raw[32:36] == bytes.fromhex("f0debc9a")


def test_every_struct_is_little_endian():
    for name in abi.__all__:
        value = getattr(abi, name)
        if hasattr(value, "format"):
            assert value.format.startswith("<"), name


def test_opcodes_match_kernel_header(fuse_h):
    enum_body = re.search(r"enum fuse_opcode \{(.*?)\};", fuse_h, re.S).group(1)
    kernel = {m.group(1): int(m.group(2)) for m in re.finditer(r"FUSE_(\w+)\s*=\s*(\d+)", enum_body)}
    kernel = {k: v for k, v in kernel.items() if not k.endswith("BSWAP_RESERVED")}
    ours = {op.name: op.value for op in Opcode}
    assert ours == kernel


def test_init_flags_match_kernel_header(fuse_h):
    found = 0
    for flag in InitFlags:
        m = re.search(rf"#define FUSE_{flag.name}\s+\((1U?L*L*) << (\d+)\)", fuse_h)
        assert m, f"FUSE_{flag.name} not in fuse.h"
        assert flag.value == 1 << int(m.group(2)), flag.name
        found += 1
    assert found == len(InitFlags)


def test_kernel_version(fuse_h):
    assert f"#define FUSE_KERNEL_MINOR_VERSION {abi.FUSE_KERNEL_MINOR_VERSION}" in fuse_h
    for name in ("FUSE_COMPAT_ENTRY_OUT_SIZE", "FUSE_COMPAT_ATTR_OUT_SIZE", "FUSE_COMPAT_STATFS_SIZE",
                 "FUSE_COMPAT_INIT_OUT_SIZE", "FUSE_COMPAT_22_INIT_OUT_SIZE"):
        assert f"#define {name} {getattr(abi, name)}" in fuse_h


def test_opcode_classes_are_disjoint_and_cover_the_read_only_table():
    groups = [abi.WRITE_OPCODES, abi.NOSYS_OPCODES, abi.NO_REPLY_OPCODES]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not a & b
    # vhost-user-fs.md §3.4: every write opcode a 6.1 guest may send is EROFS material
    assert {Opcode.SETATTR, Opcode.CREATE, Opcode.TMPFILE, Opcode.COPY_FILE_RANGE} <= abi.WRITE_OPCODES
    assert {Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING, Opcode.POLL} <= abi.NOSYS_OPCODES
    # IOCTL is answered ENOTTY and locks reach the filesystem: neither is blanket ENOSYS
    assert not {Opcode.IOCTL, Opcode.GETLK, Opcode.SETLK, Opcode.SETLKW} & abi.NOSYS_OPCODES


def test_write_structs_have_the_kernel_sizes():
    sizes = {"fuse_setattr_in": 88, "fuse_mknod_in": 16, "fuse_mkdir_in": 8, "fuse_rename_in": 8,
             "fuse_rename2_in": 16, "fuse_link_in": 8, "fuse_write_in": 40, "fuse_write_out": 8,
             "fuse_create_in": 16, "fuse_setxattr_in": 16, "fuse_setxattr_in_compat": 8,
             "fuse_fallocate_in": 32, "fuse_copy_file_range_in": 56, "fuse_file_lock": 24,
             "fuse_lk_in": 48, "fuse_lk_out": 24}
    assert {name: getattr(abi, name).size for name in sizes} == sizes
    assert abi.FUSE_COMPAT_SETXATTR_IN_SIZE == abi.fuse_setxattr_in_compat.size


def test_dirent_align():
    assert [abi.fuse_dirent_align(x) for x in (0, 1, 7, 8, 9, 25)] == [0, 8, 8, 8, 16, 32]


def test_open_flags_are_linux_values():
    # asm-generic/fcntl.h, independent of the host's os module
    assert (abi.O_CREAT, abi.O_EXCL, abi.O_TRUNC, abi.O_APPEND) == (0o100, 0o200, 0o1000, 0o2000)
    assert abi.O_TMPFILE_BIT == 0o20000000
