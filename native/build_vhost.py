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


CDEF = """
#define VHS_ABI_VERSION ...
#define VHS_MAX_QUEUES ...
#define VHS_MAX_QUEUE_SIZE ...
#define VHS_MAX_MEM_SLOTS ...
#define VHS_F_INDIRECT_DESC ...
#define VHS_F_EVENT_IDX ...
#define VHS_F_PROTOCOL_FEATURES ...
#define VHS_F_VERSION_1 ...
#define VHS_PF_MQ ...
#define VHS_PF_REPLY_ACK ...
#define VHS_PF_CONFIGURE_MEM_SLOTS ...
#define VHS_EV_QUEUES ...
#define VHS_EV_DEFERRED ...
#define VHS_EV_LOG ...
#define VHS_EV_MEMTABLE ...
#define VHS_POP_MORE ...
#define VHS_POP_BROKEN ...
#define VHS_POP_THROTTLED ...
#define VHS_REQ_OVERSIZE ...
#define VHS_OVERSIZE_PREFIX ...

struct vhs_config {
    uint64_t features;
    uint64_t protocol_features;
    uint32_t queue_num;
    uint32_t max_queues;
    uint32_t max_queue_size;
    uint32_t max_mem_slots;
    uint32_t max_in_bytes;
    uint32_t max_out_bytes;
    uint64_t max_inflight_bytes;
};

struct vhs_req {
    const char *data;
    uint32_t in_len;
    uint32_t in_total;
    uint32_t out_cap;
    uint16_t head;
    uint16_t flags;
};

struct vhs_queue_info {
    int kick_fd;
    int call_fd;
    uint32_t num;
    uint32_t inflight;
    uint16_t last_avail;
    uint16_t used_idx;
    uint8_t started;
    uint8_t enabled;
    uint8_t ready;
    uint8_t broken;
    uint8_t running;
    uint8_t stopping;
};

typedef struct vhs_dev vhs_dev;

const char *vhs_version(void);
int vhs_abi_version(void);
void vhs_default_config(struct vhs_config *cfg);
vhs_dev *vhs_dev_new(int sock_fd, const struct vhs_config *cfg);
void vhs_dev_free(vhs_dev *dev);
int vhs_dev_dispatch(vhs_dev *dev);
int vhs_dev_finish_deferred(vhs_dev *dev);
const char *vhs_dev_error(const vhs_dev *dev);
void vhs_dev_close_retired(vhs_dev *dev);
size_t vhs_dev_take_log(vhs_dev *dev, char *buf, size_t cap);
uint64_t vhs_dev_features(const vhs_dev *dev);
uint64_t vhs_dev_protocol_features(const vhs_dev *dev);
uint32_t vhs_dev_num_queues(const vhs_dev *dev);
uint32_t vhs_dev_num_regions(const vhs_dev *dev);
int vhs_queue_info(vhs_dev *dev, uint32_t q, struct vhs_queue_info *out);
const char *vhs_queue_error(const vhs_dev *dev, uint32_t q);
int vhs_queue_drain_kick(vhs_dev *dev, uint32_t q);
int vhs_queue_pop(vhs_dev *dev, uint32_t q, struct vhs_req *reqs, int max, int *status);
int vhs_queue_notify(vhs_dev *dev, uint32_t q);
int vhs_req_write(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t off,
                  const char *buf, uint32_t len);
int64_t vhs_req_pread(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t off,
                      int fd, int64_t file_off, uint32_t len);
int vhs_req_push(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t used_len);
int vhs_req_complete(vhs_dev *dev, uint32_t q, uint16_t head, const char *buf, uint32_t len);
int64_t vhs_req_complete_file(vhs_dev *dev, uint32_t q, uint16_t head, const char *hdr,
                              uint32_t hdr_len, int fd, int64_t file_off, uint32_t len);
"""

def make_builder(*, absolute: bool = False) -> FFI:
    """The builder; ``absolute`` source paths for builds outside the project root's cwd."""
    path = (lambda p: p) if absolute else _rel
    ffi = FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "nydus_vfs._native._vhost_shim",
        '#include "libvhost_shim.h"\n',
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
