"""The API changes the process's log level (``PUT /api/v1/daemon``); tests here put it back."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_log_levels():
    loggers = [logging.getLogger(), logging.getLogger("nydus_vfs")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)
