from __future__ import annotations

import os

import pytest

from nydus_vfs.builder._output import Outputs, PendingFile, write_atomically
from nydus_vfs.errors import BuildError


def test_commit_renames_into_place(tmp_path):
    f = PendingFile(str(tmp_path))
    f.file.write(b"data")
    assert os.listdir(tmp_path) == [os.path.basename(f.tmp)] and f.tmp.endswith(".tmp")
    f.commit(str(tmp_path / "final"))
    assert (tmp_path / "final").read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["final"]
    assert oct((tmp_path / "final").stat().st_mode & 0o777) == "0o644"


def test_outputs_discard_what_was_not_committed(tmp_path):
    (tmp_path / "keep").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with Outputs() as outs:
            a = outs.new(str(tmp_path), str(tmp_path / "keep"))
            a.file.write(b"new")
            b = outs.new(str(tmp_path))
            b.file.write(b"x")
            raise RuntimeError
    assert os.listdir(tmp_path) == ["keep"] and (tmp_path / "keep").read_bytes() == b"old"


def test_errors_are_build_errors(tmp_path):
    with pytest.raises(BuildError, match="cannot create"):
        PendingFile(str(tmp_path / "missing"))
    f = PendingFile(str(tmp_path))
    with pytest.raises(BuildError, match="no name"):
        f.commit()
    f.discard()
    write_atomically(str(tmp_path / "w"), b"abc")
    assert (tmp_path / "w").read_bytes() == b"abc"
