"""utils.mountinfo: parsing /proc/self/mountinfo and resolving mountpoints without stat'ing them."""

from __future__ import annotations


def test_mountinfo_parsing_and_the_visible_mount():
    from nydus_vfs.utils.mountinfo import parse_mountinfo, top_mount

    text = ("22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
            "40 22 0:50 / /mnt/with\\040space rw - fuse rafs rw,user_id=0\n"
            "41 40 0:51 / /mnt/with\\040space rw - tmpfs stacked rw\n"
            "garbage line\n")
    mounts = parse_mountinfo(text)
    assert [m.mount_id for m in mounts] == [22, 40, 41]
    here = [m for m in mounts if m.mountpoint == "/mnt/with space"]
    assert [(m.fstype, m.source) for m in here] == [("fuse", "rafs"), ("tmpfs", "stacked")]
    assert top_mount(here).mount_id == 41, "the tmpfs sits on the FUSE mount (parent 40)"
    assert top_mount(here[:1]).mount_id == 40 and top_mount([]) is None


def test_resolve_mountpoint_never_touches_the_last_component(tmp_path):
    from nydus_vfs.utils.mountinfo import resolve_mountpoint

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert resolve_mountpoint(str(tmp_path / "link" / "mnt")) == str(tmp_path / "real" / "mnt")
    assert resolve_mountpoint("/") == "/"
