"""``native/build_vhost.py``: the cffi ``cdef`` is derived from the public header, not copied."""

from __future__ import annotations

import importlib.util
import re

import pytest

from nydus_vfs._native import binding
from tests.conftest import PROJECT_ROOT

BUILD_SCRIPT = PROJECT_ROOT / "native" / "build_vhost.py"
HEADER = PROJECT_ROOT / "native" / "libvhost_shim.h"


@pytest.fixture(scope="module")
def build_vhost():
    pytest.importorskip("cffi", reason="cffi builds the shim")
    spec = importlib.util.spec_from_file_location("build_vhost", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _header_names() -> tuple[set[str], set[str]]:
    """(functions, valued #defines) the header declares."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    functions = set(re.findall(r"\b(vhs_\w+)\s*\(", text))
    defines = set(re.findall(r"^#define[ \t]+(\w+)[ \t]+\S", text, flags=re.M))
    return functions, defines


def test_cdef_declares_exactly_what_the_header_declares(build_vhost):
    cdef = build_vhost.cdef_from_header()
    functions, defines = _header_names()
    assert len(functions) >= 20 and "VHS_OVERSIZE_PREFIX" in defines
    assert set(re.findall(r"\b(vhs_\w+)\s*\(", cdef)) == functions
    # Values come from the compiled header, never from a copy.
    assert set(re.findall(r"^#define (\w+) \.\.\.$", cdef, flags=re.M)) == defines
    assert not re.search(r"#define \w+ [^.]", cdef)
    for dropped in ("/*", "#include", "#ifndef", "#endif", "NYDUS_VFS_LIBVHOST_SHIM_H"):
        assert dropped not in cdef


def test_cdef_is_accepted_by_cffi(build_vhost):
    from cffi import FFI

    ffi = FFI()
    ffi.cdef(build_vhost.cdef_from_header())
    assert ffi.sizeof("struct vhs_req") == 24
    assert [name for name, _ in ffi.typeof("struct vhs_config").fields][-1] == "max_inflight_bytes"


@pytest.mark.skipif(not binding.available(), reason=f"{binding.unavailable_reason()}")
def test_the_built_module_exports_every_header_name():
    from nydus_vfs._native import _vhost_shim

    functions, defines = _header_names()
    missing = sorted(n for n in functions | defines if not hasattr(_vhost_shim.lib, n))
    assert missing == []
    assert _vhost_shim.lib.VHS_OVERSIZE_PREFIX == 64
