"""Bad input to ``nydus-image``: a clear message naming the entry, exit status 1, nothing left behind."""

from __future__ import annotations

import errno
import gzip
import io
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

from nydus_vfs.builder import BuildOptions, build
from nydus_vfs.builder import _source
from nydus_vfs.errors import BuildError

NYDUS_IMAGE = [sys.executable, "-m", "nydus_vfs.cli.nydus_image"]


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info


def _run_cli(tmp_path: pathlib.Path, source: pathlib.Path, *extra: str) -> subprocess.CompletedProcess:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return subprocess.run(NYDUS_IMAGE + ["create", "--type", "tar-rafs", "--bootstrap", str(out / "boot"),
                                         "--blob-dir", str(out), *extra, str(source)],
                          capture_output=True, text=True, timeout=120)


BAD_TARS = {
    "dotdot": ([_file("a/../../etc/passwd")], "would escape the image root"),
    "duplicate": ([_file("dir/f", b"1"), _file("dir/f", b"2")], "duplicate entry"),
    "long-component": ([_file("d/" + "n" * 256)], "longer than NAME_MAX"),
    "long-path": ([_file("/".join(["p" * 200] * 21))], "longer than PATH_MAX"),
    "below-a-file": ([_file("f"), _file("f/child")], "is not a directory"),
    "dangling-hardlink": ([(_link("link", "nope"), None)], "does not exist"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TARS))
def test_bad_tar_entries_are_refused_with_the_entry_named(tmp_path, kind):
    members, message = BAD_TARS[kind]
    src = tmp_path / "bad.tar"
    src.write_bytes(_tar(members))
    p = _run_cli(tmp_path, src)
    assert p.returncode == 1, p.stderr
    assert message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    name = members[-1][0].name
    assert name[:40] in p.stderr or name.split("/")[-1][:40] in p.stderr
    assert os.listdir(tmp_path / "out") == []


def test_truncated_tar_names_the_entry(tmp_path):
    raw = _tar([_file("first", b"ok"), _file("big-file", os.urandom(5000))])
    src = tmp_path / "t.tar"
    src.write_bytes(raw[:512 * 5])
    p = _run_cli(tmp_path, src)
    assert p.returncode == 1 and "big-file" in p.stderr and "ends early" in p.stderr, p.stderr
    assert os.listdir(tmp_path / "out") == []


def test_corrupt_and_truncated_gzip(tmp_path):
    raw = gzip.compress(_tar([_file("f", os.urandom(100_000))]))
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0xFF
    for name, data, words in (("corrupt.tgz", bytes(bad), "gzip stream"), ("cut.tgz", raw[: len(raw) // 2],
                                                                           "truncated")):
        src = tmp_path / name
        src.write_bytes(data)
        p = _run_cli(tmp_path, src, "--type", "targz-rafs")
        assert p.returncode == 1, p.stderr
        assert words in p.stderr, p.stderr
        assert os.listdir(tmp_path / "out") == []


def test_tar_bomb_metadata_is_refused_without_allocating(tmp_path):
    """A PAX header claiming 1 GiB of records is refused before anything is read into memory."""
    hdr = tarfile.TarInfo("PaxHeaders/x")
    hdr.type = tarfile.XHDTYPE
    hdr.size = 1 << 30
    block = hdr.tobuf(format=tarfile.USTAR_FORMAT)
    src = tmp_path / "bomb.tar"
    src.write_bytes(block + b"\0" * 1024)
    p = _run_cli(tmp_path, src)
    assert p.returncode == 1 and "exceeds" in p.stderr, p.stderr


def test_garbage_is_not_a_tar(tmp_path):
    src = tmp_path / "garbage.tar"
    src.write_bytes(os.urandom(4096))
    p = _run_cli(tmp_path, src)
    assert p.returncode == 1 and "not a tar stream or corrupt" in p.stderr, p.stderr


def test_unreadable_file_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "fine").write_bytes(b"fine")
    (src / "d" / "broken").write_bytes(b"x" * 10000)
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def failing_open(path, flags, *a, **kw):
        if os.fsencode(path).endswith(b"broken"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(_source.os, "open", failing_open)
    with pytest.raises(BuildError, match=r"/d/broken: cannot open: Permission denied"):
        build(str(src), BuildOptions(bootstrap=str(out / "boot"), blob_dir=str(out)))
    assert os.listdir(out) == []


def test_failed_build_keeps_the_previous_outputs(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    good = tmp_path / "good.tar"
    good.write_bytes(_tar([_file("a", b"a")]))
    build(str(good), BuildOptions(source_type="tar-rafs", bootstrap=str(out / "boot"), blob_dir=str(out)))
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    bad = tmp_path / "bad.tar"
    bad.write_bytes(_tar([_file("a"), _file("a")]))
    with pytest.raises(BuildError):
        build(str(bad), BuildOptions(source_type="tar-rafs", bootstrap=str(out / "boot"), blob_dir=str(out)))
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before


def test_cli_usage_errors(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cases = [
        (["create", "--bootstrap", str(tmp_path / "b"), str(src)], "--blob-dir are missing"),
        (["create", "--blob-dir", str(tmp_path), "--chunk-size", "0x3000", str(src)], "invalid chunk size"),
        (["create", "--blob-dir", str(tmp_path), "--encrypt", str(src)], "--encrypt is not supported"),
        (["create", "--blob-dir", str(tmp_path), "--batch-size", "0x1000", str(src)], "--batch-size"),
        (["create", "--blob-dir", str(tmp_path), "--fs-version", "5", "--features", "blob-toc", str(src)],
         "blob-toc"),
        (["create", "--blob-dir", str(tmp_path / "nope"), str(src)], "does not exist"),
        (["create", "--type", "tar-rafs", "--blob-dir", str(tmp_path), str(src)], "regular/fifo/char_device"),
        (["create", "--blob-dir", str(tmp_path), str(tmp_path / "missing")], "must be a directory"),
        (["check", str(tmp_path / "missing.boot")], "No such file"),
        (["unpack", str(src), "--output", str(tmp_path / "o.tar")], "bootstrap"),
    ]
    for argv, message in cases:
        p = subprocess.run(NYDUS_IMAGE + argv, capture_output=True, text=True, timeout=60)
        assert p.returncode in (1, 2), (argv, p.returncode, p.stderr)
        assert message in p.stderr, (argv, p.stderr)
        assert "Traceback" not in p.stderr
    # --batch-size 0 is accepted (the converter may pass it).
    p = subprocess.run(NYDUS_IMAGE + ["create", "--blob-dir", str(tmp_path), "--batch-size", "0", str(src)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


def test_check_refuses_corrupt_bootstrap(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"content")
    r = build(str(src), BuildOptions(bootstrap=str(tmp_path / "boot"), blob_dir=str(tmp_path)))
    data = bytearray((tmp_path / "boot").read_bytes())
    data[1024:1028] = b"\0\0\0\0"  # EROFS magic
    (tmp_path / "bad").write_bytes(bytes(data))
    p = subprocess.run(NYDUS_IMAGE + ["check", str(tmp_path / "bad")], capture_output=True, text=True)
    assert p.returncode == 1 and "not a valid RAFS image" in p.stderr, p.stderr
    (tmp_path / r.blob_id).write_bytes(b"short")
    p = subprocess.run(NYDUS_IMAGE + ["check", "-D", str(tmp_path), str(tmp_path / "boot")], capture_output=True,
                       text=True)
    assert p.returncode == 1 and r.blob_id in p.stderr, p.stderr
