"""What the real-guest tests share: reading a guest script's output, and the host's answer to compare it with.

* :func:`split_sections` cuts a guest script's output at its ``== name`` lines.
* :func:`host_tree_listing` computes on the host what
  :func:`tests.guest.tree_result_script` prints in the guest:
  ``tree -a -J -v`` of the directory, then the sorted md5 lines of its regular
  files, with the directory's own path removed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess

from tests.guest import find_kernel

__all__ = ["split_sections", "host_tree_listing"]


def split_sections(output: str) -> dict[str, str]:
    """Section name -> the lines printed under ``== name`` (text before the first header is dropped)."""
    out: dict[str, str] = {}
    name = None
    for line in output.splitlines(keepends=True):
        if line.startswith("== "):
            name = line[3:].strip()
            out[name] = ""
        elif name is not None:
            out[name] += line
    return out


def host_tree_listing(root: pathlib.Path, *, prune: tuple[str, ...] = ()) -> str:
    """The guest's tree listing, computed over ``root`` on the host.

    ``tree`` is the very binary the guest runs, so its text matches byte for
    byte.  Top-level directories named in ``prune`` are left out of the md5
    lines (not of the tree), as a guest script that prunes them in ``find``.
    """
    tree = subprocess.run([str(find_kernel().tree), "-a", "-J", "-v", str(root)], capture_output=True,
                          text=True, check=True, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}).stdout
    lines = []
    for dirpath, dirs, files in os.walk(root):
        if dirpath == str(root):
            dirs[:] = [d for d in dirs if d not in prune]
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                digest = hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest()
                lines.append(f"{digest}  {path[len(str(root)):]}\n")
    # busybox sort compares bytes, as upstream's results were sorted.
    return tree.replace(str(root), "") + "".join(sorted(lines, key=str.encode))
