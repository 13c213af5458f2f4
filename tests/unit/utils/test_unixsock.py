"""listen_unix: stale socket files replaced, live ones and other files refused, mode applied."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from nydus_vfs.errors import ConfigError, TransportError
from nydus_vfs.utils.unixsock import listen_unix


def test_fresh_stale_live_and_foreign_paths(tmp_path):
    path = str(tmp_path / "s.sock")
    live = listen_unix(path, flag="--sock", backlog=4, mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(TransportError, match="another daemon is serving there"):
        listen_unix(path, flag="--sock", backlog=4)
    live.close()  # the file stays behind: stale now
    again = listen_unix(path, flag="--sock", backlog=4)
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.close()
    again.close()
    other = tmp_path / "file"
    other.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        listen_unix(str(other), flag="--apisock", backlog=4)
    assert other.read_text() == "x"
    with pytest.raises(TransportError, match="cannot listen"):
        listen_unix(str(tmp_path / "missing" / "s.sock"), flag="--sock", backlog=4)
