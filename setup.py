"""Build glue: the only reason this file exists is cffi's ``cffi_modules`` hook.

The vhost-user shim (``native/libvhost_shim.c``) is compiled by cffi in API
out-of-line mode into ``nydus_vfs._native._vhost_shim``.  Everything else is
declared in pyproject.toml.
"""
import os

from setuptools import setup

_BUILD = os.path.join("native", "build_vhost.py")
setup(cffi_modules=[_BUILD + ":ffibuilder"] if os.path.exists(_BUILD) else [])
