"""The daemon lifecycle: one transition table, one small machine around it.

States, as reported by ``GET /api/v1/daemon`` (``state``):

* ``INIT``     started, maybe configured, but no FUSE session / vhost-user
               listener yet.  A daemon started with ``--upgrade``, or one that
               found a crashed predecessor, waits here for ``Takeover``.
* ``READY``    the session exists (FUSE mounted, or state restored from the
               supervisor); nothing is being served yet.
* ``RUNNING``  workers are serving requests.  virtiofs enters it as soon as its
               listener is up, before any VM connects (Kata polls for it).
* ``STOPPED``  terminal: the process is about to exit.

Events, and who sends them: ``Mount`` (internal, at start-up), ``Takeover``
(``PUT /daemon/fuse/takeover``), ``Start`` (``PUT /daemon/start``, or internal
at start-up), ``Stop`` (SIGTERM/SIGINT; unmounts), ``Exit``
(``PUT /daemon/exit``: stop *without* unmounting, for hot upgrade).

Rule, as in upstream ``service/src/daemon.rs``: every transition is in
:data:`TRANSITIONS`; any pair not in it is refused with
:class:`UnexpectedEventError`, which the HTTP API answers with 400.  The
machine knows nothing about what the actions do; :data:`ACTIONS` only names
the side effect the daemon must carry out for a transition.
"""

from __future__ import annotations

import enum

from ..errors import NydusError

__all__ = [
    "DaemonState",
    "DaemonEvent",
    "DaemonAction",
    "TRANSITIONS",
    "ACTIONS",
    "UnexpectedEventError",
    "DaemonStateMachine",
]


class DaemonState(enum.Enum):
    """Lifecycle states; ``.value`` is the string the API reports."""

    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"


class DaemonEvent(enum.Enum):
    """Lifecycle inputs; ``.value`` is upstream's debug name (used in error bodies)."""

    MOUNT = "Mount"
    TAKEOVER = "Takeover"
    START = "Start"
    STOP = "Stop"
    EXIT = "Exit"


class DaemonAction(enum.Enum):
    """Side effect the daemon performs for a transition (upstream's state machine outputs)."""

    RESTORE = "Restore"                     # load state handed over by the supervisor
    START_SERVICE = "StartService"          # start the worker threads / tasks
    UMOUNT = "Umount"                       # unmount FUSE, then stop the workers
    TERMINATE_SERVICE = "TerminateService"  # stop the workers, keep the session
    STOP_STATE_MACHINE = "StopStateMachine"  # nothing to undo: just become STOPPED


S, E, A = DaemonState, DaemonEvent, DaemonAction

#: The whole lifecycle (nydus-surface.md §1.7): ``(state, event) -> (next state, action)``,
#: the action being None where the transition has no side effect.  Note
#: ``RUNNING --Stop--> READY``: a signal or ``exit`` takes two events to reach
#: STOPPED, the first stopping the workers, the second unmounting (Stop) or not (Exit).
_LIFECYCLE: dict[tuple[DaemonState, DaemonEvent], tuple[DaemonState, DaemonAction | None]] = {
    (S.INIT, E.MOUNT): (S.READY, None),
    (S.INIT, E.TAKEOVER): (S.READY, A.RESTORE),
    (S.INIT, E.STOP): (S.STOPPED, A.STOP_STATE_MACHINE),
    (S.READY, E.START): (S.RUNNING, A.START_SERVICE),
    (S.READY, E.STOP): (S.STOPPED, A.UMOUNT),
    (S.READY, E.EXIT): (S.STOPPED, A.STOP_STATE_MACHINE),
    (S.RUNNING, E.STOP): (S.READY, A.TERMINATE_SERVICE),
}

del S, E, A

#: Every allowed transition; a pair missing here is refused.
TRANSITIONS: dict[tuple[DaemonState, DaemonEvent], DaemonState] = {
    key: target for key, (target, _) in _LIFECYCLE.items()
}

#: The side effect of each transition that has one (``Init --Mount-->`` has none).
ACTIONS: dict[tuple[DaemonState, DaemonEvent], DaemonAction] = {
    key: action for key, (_, action) in _LIFECYCLE.items() if action is not None
}


class UnexpectedEventError(NydusError):
    """``event`` is not allowed in ``state``; the API maps this to 400.

    ``debug_text`` is upstream's rendering of the error kind,
    ``UnexpectedEvent("Start")``, for the API error body.
    """

    def __init__(self, state: DaemonState, event: DaemonEvent) -> None:
        self.state = state
        self.event = event
        super().__init__(f"unexpected event {event.value} in state {state.value}")

    @property
    def debug_text(self) -> str:
        return f'UnexpectedEvent("{self.event.value}")'


class DaemonStateMachine:
    """The current lifecycle state, moved only through :data:`TRANSITIONS`.

    Not thread-safe by itself: the daemon drives it from one place (its event
    loop), as upstream drives its machine from a single thread.
    """

    def __init__(self, state: DaemonState = DaemonState.INIT) -> None:
        self._state = state

    @property
    def state(self) -> DaemonState:
        return self._state

    def next_state(self, event: DaemonEvent) -> DaemonState:
        """Where ``event`` would lead, without moving; raises UnexpectedEventError."""
        try:
            return TRANSITIONS[(self._state, event)]
        except KeyError:
            raise UnexpectedEventError(self._state, event) from None

    def fire(self, event: DaemonEvent) -> DaemonAction | None:
        """Apply ``event``: move to the next state and return the action to perform.

        Raises UnexpectedEventError, leaving the state unchanged, when the table has
        no entry for (current state, event).
        """
        target = self.next_state(event)
        action = ACTIONS.get((self._state, event))
        self._state = target
        return action

    def __repr__(self) -> str:
        return f"DaemonStateMachine(state={self._state.value})"
