"""nydus_vfs.service.state: the lifecycle table (nydus-surface.md §1.7) and the machine around it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nydus_vfs.errors import NydusError
from nydus_vfs.service.state import (
    ACTIONS,
    TRANSITIONS,
    DaemonAction,
    DaemonEvent,
    DaemonState,
    DaemonStateMachine,
    UnexpectedEventError,
)

S, E, A = DaemonState, DaemonEvent, DaemonAction


def test_table_is_exactly_the_reference():
    assert TRANSITIONS == {
        (S.INIT, E.MOUNT): S.READY,
        (S.INIT, E.TAKEOVER): S.READY,
        (S.INIT, E.STOP): S.STOPPED,
        (S.READY, E.START): S.RUNNING,
        (S.READY, E.STOP): S.STOPPED,
        (S.READY, E.EXIT): S.STOPPED,
        (S.RUNNING, E.STOP): S.READY,
    }
    assert set(ACTIONS) == set(TRANSITIONS) - {(S.INIT, E.MOUNT)}
    assert ACTIONS[(S.READY, E.STOP)] is A.UMOUNT and ACTIONS[(S.READY, E.EXIT)] is A.STOP_STATE_MACHINE


def test_api_strings():
    assert [s.value for s in DaemonState] == ["INIT", "READY", "RUNNING", "STOPPED"]
    assert [e.value for e in DaemonEvent] == ["Mount", "Takeover", "Start", "Stop", "Exit"]


def test_normal_start_and_signal_shutdown():
    sm = DaemonStateMachine()
    assert sm.state is S.INIT
    assert sm.fire(E.MOUNT) is None and sm.state is S.READY
    assert sm.fire(E.START) is A.START_SERVICE and sm.state is S.RUNNING
    assert sm.fire(E.STOP) is A.TERMINATE_SERVICE and sm.state is S.READY
    assert sm.fire(E.STOP) is A.UMOUNT and sm.state is S.STOPPED


def test_hot_upgrade_paths():
    new = DaemonStateMachine()
    assert new.fire(E.TAKEOVER) is A.RESTORE and new.state is S.READY
    old = DaemonStateMachine(S.RUNNING)
    old.fire(E.STOP)
    assert old.fire(E.EXIT) is A.STOP_STATE_MACHINE and old.state is S.STOPPED


def test_virtiofs_takeover_when_running_is_refused_with_debug_text():
    sm = DaemonStateMachine(S.RUNNING)
    with pytest.raises(UnexpectedEventError) as info:
        sm.fire(E.TAKEOVER)
    err = info.value
    assert (err.state, err.event) == (S.RUNNING, E.TAKEOVER) and sm.state is S.RUNNING
    assert err.debug_text == 'UnexpectedEvent("Takeover")'
    assert str(err) == "unexpected event Takeover in state RUNNING"
    assert isinstance(err, NydusError)


def test_next_state_does_not_move():
    sm = DaemonStateMachine(S.READY)
    assert sm.next_state(E.START) is S.RUNNING and sm.state is S.READY
    with pytest.raises(UnexpectedEventError):
        sm.next_state(E.MOUNT)


def test_stopped_is_terminal():
    sm = DaemonStateMachine(S.STOPPED)
    for event in DaemonEvent:
        with pytest.raises(UnexpectedEventError):
            sm.fire(event)


@given(st.sampled_from(list(DaemonState)), st.lists(st.sampled_from(list(DaemonEvent)), max_size=20))
def test_every_event_moves_by_the_table_or_raises(start, events):
    sm = DaemonStateMachine(start)
    for event in events:
        before = sm.state
        if (before, event) in TRANSITIONS:
            action = sm.fire(event)
            assert sm.state is TRANSITIONS[(before, event)]
            assert action is ACTIONS.get((before, event))
        else:
            with pytest.raises(UnexpectedEventError):
                sm.fire(event)
            assert sm.state is before
        assert sm.state in DaemonState


def test_stopped_reachable_from_every_live_state():
    # Every non-terminal state has a path to STOPPED, so the process can always exit.
    for start in (S.INIT, S.READY, S.RUNNING):
        seen, frontier = {start}, [start]
        while frontier:
            state = frontier.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is state and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert S.STOPPED in seen
