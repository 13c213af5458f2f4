"""Version and build information, in the shape nydusd reports it.

The same five values appear in ``nydusd --version`` and in the daemon-info API
(``version.{package_ver, git_commit, build_time, profile, rustc}``).
nydus-snapshotter compares the ``Git Commit:`` line of ``--version`` with the
API's ``git_commit`` of every live daemon and hot-upgrades the daemons when they
differ, so both must come from :func:`version_info` and must be stable for a
given installed tree.

Where the commit comes from: a release build may ship a generated
``nydus_vfs/_build_info.py`` defining ``GIT_COMMIT`` and ``BUILD_TIME`` (nothing
in this tree writes it yet; pyproject has no build hook).  Without it, when the
package is imported from a git checkout, git is asked once per process for the
HEAD commit and its commit time (used as the build time); otherwise both are
``"unknown"``.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["__version__", "version_info", "version_text"]

__version__ = "0.1.0"

_HERE = Path(__file__).resolve()
# Where this file sits inside the project tree; anything else means we are not
# running from this project's checkout (e.g. a venv inside some other repo).
_RELPATH_IN_CHECKOUT = Path("src") / "nydus_vfs" / "_version.py"
_UNKNOWN = "unknown"


def _from_build_info() -> tuple[str, str] | None:
    try:
        from . import _build_info  # type: ignore[attr-defined]
    except ImportError:
        return None
    return str(getattr(_build_info, "GIT_COMMIT", _UNKNOWN)), str(getattr(_build_info, "BUILD_TIME", _UNKNOWN))


def _from_git() -> tuple[str, str] | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["LC_ALL"] = "C"
    try:
        top = subprocess.run(["git", "-C", str(_HERE.parent), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, timeout=5, env=env, check=False)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() / _RELPATH_IN_CHECKOUT != _HERE:
            return None
        head = subprocess.run(["git", "-C", str(_HERE.parent), "log", "-1", "--format=%H %ct"],
                              capture_output=True, text=True, timeout=5, env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    parts = head.stdout.split()
    if head.returncode != 0 or len(parts) != 2 or not parts[1].isdigit():
        return None
    when = datetime.datetime.fromtimestamp(int(parts[1]), datetime.timezone.utc)
    return parts[0], when.strftime("%Y-%m-%dT%H:%M:%S.000000000Z")


@functools.cache
def version_info() -> dict[str, str]:
    """``{package_ver, git_commit, build_time, profile, rustc}``, computed once per process.

    ``rustc`` carries the Python implementation and version (e.g. ``"CPython 3.11.7"``)
    and ``profile`` is always ``"release"``.
    """
    commit, built = _from_build_info() or _from_git() or (_UNKNOWN, _UNKNOWN)
    return {
        "package_ver": __version__,
        "git_commit": commit,
        "build_time": built,
        "profile": "release",
        "rustc": f"{platform.python_implementation()} {platform.python_version()}",
    }


def version_text(prog: str) -> str:
    """Exactly what ``<prog> --version`` prints, byte for byte as clap does upstream.

    clap writes ``"<name> <version>\\n"`` and nydusd's version string starts with a
    carriage return, so a terminal shows only the ``Version:`` block.  Write the
    result verbatim (``sys.stdout.write``): argparse's ``version`` action re-wraps
    text and would destroy the tabs and newlines.
    """
    v = version_info()
    return (f"{prog} \rVersion: \t{v['package_ver']}\nGit Commit: \t{v['git_commit']}\n"
            f"Build Time: \t{v['build_time']}\nProfile: \t{v['profile']}\nRustc: \t\t{v['rustc']}\n\n")
