"""utils.fops: upstream's counter names, each the name of its FUSE opcode (the VFS maps them so)."""

from __future__ import annotations

from nydus_vfs.fuse import abi
from nydus_vfs.utils.fops import FOPS


def test_every_counter_is_named_after_its_opcode_and_upstreams_order_holds():
    assert FOPS[:5] == ("getattr", "readlink", "open", "release", "read") and len(FOPS) == 15
    assert [int(abi.Opcode[name.upper()]) for name in FOPS] == [3, 5, 14, 18, 15, 17, 22, 23, 27, 1, 28, 44, 34,
                                                                 2, 42]
