"""LogLimiter: one line per key per window, a global budget, and a count of what was dropped."""

from __future__ import annotations

import logging

from nydus_vfs.utils.ratelog import LogLimiter

log = logging.getLogger("nydus_vfs.test_ratelog")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_logged_once_per_key_window(caplog):
    clock = Clock()
    limiter = LogLimiter(log, key_window=60, window=10, burst=100, clock=clock)
    with caplog.at_level(logging.INFO, logger=log.name):
        assert limiter.log(logging.ERROR, "k", "failed %d", 1)
        assert not limiter.log(logging.ERROR, "k", "failed %d", 2)
        assert limiter.log(logging.ERROR, "other", "failed %d", 3)
        clock.now = 61
        assert limiter.log(logging.ERROR, "k", "failed %d", 4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["failed 1", "failed 3", "1 similar messages suppressed in the last 61s", "failed 4"]


def test_the_budget_caps_distinct_keys_and_reports_the_count(caplog):
    clock = Clock()
    limiter = LogLimiter(log, burst=3, window=10, clock=clock)
    with caplog.at_level(logging.INFO, logger=log.name):
        for i in range(50):
            limiter.log(logging.WARNING, i, "chunk %d", i)
        assert limiter.suppressed == 47
        clock.now = 10
        limiter.log(logging.WARNING, "late", "late one")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["chunk 0", "chunk 1", "chunk 2", "47 similar messages suppressed in the last 10s", "late one"]


def test_disabled_levels_cost_nothing_and_keys_are_bounded():
    limiter = LogLimiter(log, max_keys=4, burst=1000)
    log.setLevel(logging.ERROR)
    try:
        assert not limiter.log(logging.INFO, "x", "quiet")
        for i in range(10):
            limiter.log(logging.ERROR, i, "e")
        assert len(limiter._keys) == 4
    finally:
        log.setLevel(logging.NOTSET)
