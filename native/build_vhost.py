"""cffi builder for the vhost-user shim (API mode, out-of-line).

Used by setuptools through ``cffi_modules=["native/build_vhost.py:ffibuilder"]``
(``pip install -e .`` compiles it).

The package version is compiled into the module (``vhs_version()``) so that
``nydus_vfs._native.binding`` can refuse a stale build.  ``python
native/build_vhost.py`` rebuilds it in place (under ``build/cffi``, then copied
next to ``binding.py``) without going through pip.
"""

from __future__ import annotations

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _package_version() -> str:
    """``__version__`` as the package defines it (read, not imported: no deps at build time)."""
    pkg = os.path.join(ROOT, "src", "nydus_vfs")
    for name in ("_version.py", "__init__.py"):
        path = os.path.join(pkg, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            match = re.search(r'^__version__\s*=\s*"([^"]+)"', f.read(), re.M)
        if match:
            return match.group(1)
    raise RuntimeError(f"no __version__ = \"...\" in {pkg}/_version.py or __init__.py")


def _rel(path: str) -> str:
    # setuptools wants sources relative to the project root (the cwd of a build).
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


HEADER = os.path.join(HERE, "libvhost_shim.h")


def cdef_from_header(path: str = HEADER) -> str:
    """The public header as cffi's ``cdef`` takes it: one source for both.

    Comments, ``#include`` lines and the include guard are dropped, and every
    ``#define NAME value`` becomes ``#define NAME ...`` so that cffi reads the
    value from the compiled header instead of trusting a copy.
    """
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"/\*.*?\*/", "", f.read(), flags=re.S)
    out = []
    for line in text.splitlines():
        directive = line.strip()
        if directive.startswith(("#include", "#ifndef", "#endif")):
            continue
        match = re.match(r"#define\s+(\w+)(\s+\S.*)?$", directive)
        if match is None:
            out.append(line.rstrip())
        elif match.group(2) is not None:  # a valueless #define is the include guard
            out.append(f"#define {match.group(1)} ...")
    return "\n".join(out)


#: libc calls bound beside the shim (API mode: a direct C call, no ctypes/ABI
#: overhead): ``fstat`` into a reusable buffer is PassthroughFs's "did this
#: inode change?" probe (binding.StatProbe).
LIBC_CDEF = """
struct stat { ...; };
int fstat(int fd, struct stat *buf);
"""


def make_builder(*, absolute: bool = False) -> FFI:
    """The builder; ``absolute`` source paths for builds outside the project root's cwd."""
    path = (lambda p: p) if absolute else _rel
    ffi = FFI()
    ffi.cdef(cdef_from_header())
    ffi.cdef(LIBC_CDEF)
    ffi.set_source(
        "nydus_vfs._native._vhost_shim",
        '#include <sys/stat.h>\n#include "libvhost_shim.h"\n',
        sources=[path(os.path.join(HERE, "libvhost_shim.c"))],
        include_dirs=[path(HERE)],
        define_macros=[("VHS_PACKAGE_VERSION", f'"{_package_version()}"')],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    # Quick C iteration without pip: build under build/cffi and drop the module
    # where an editable install imports it from, under the name pip gives it
    # (any other suffix would shadow, or be shadowed by, the next pip build).
    import glob
    import shutil

    built = make_builder(absolute=True).compile(tmpdir=os.path.join(ROOT, "build", "cffi"), verbose=True)
    pkg = os.path.join(ROOT, "src", "nydus_vfs", "_native")
    dest = os.path.join(pkg, "_vhost_shim.abi3.so")
    for other in glob.glob(os.path.join(pkg, "_vhost_shim.*.so")):
        if other != dest:
            os.unlink(other)
    shutil.copy2(built, dest)
    print(f"installed {dest}")
