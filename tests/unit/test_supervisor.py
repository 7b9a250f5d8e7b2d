"""The restart policy of ``ldm-serve up`` (launcher.supervisor) on stand-in processes and a manual clock."""

from __future__ import annotations

import itertools

import pytest

from launcher.supervisor import Backoff, Child, FatalChildExit, Supervisor

_pids = itertools.count(1000)


class Proc:
    """A process stand-in: alive until ``exit(code)``."""

    def __init__(self) -> None:
        self.pid = next(_pids)
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code

    def exit(self, code: int) -> None:
        self.code = code


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _setup(**backoff):
    clock = Clock()
    spawned: list[Proc] = []
    notes: list[tuple[str, str | None]] = []
    exits: list[tuple[str, int]] = []

    def spawn() -> Proc:
        spawned.append(Proc())
        return spawned[-1]

    sup = Supervisor(
        [Child("worker", spawn=spawn)],
        backoff=Backoff(**backoff),
        note=lambda name, text: notes.append((name, text)),
        on_exit=lambda name, pid: exits.append((name, pid)),
        say=lambda _msg: None,
        clock=clock,
    )
    sup.start_all()
    sup.ready_once = True
    return sup, clock, spawned, notes, exits


def test_backoff_doubles_and_is_capped():
    b = Backoff(base_s=1, cap_s=30)
    assert [b.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_killed_child_is_restarted_after_a_growing_delay():
    sup, clock, spawned, notes, exits = _setup(base_s=1, cap_s=30, healthy_after_s=60)
    spawned[-1].exit(-9)
    sup.poll()
    assert exits == [("worker", spawned[0].pid)]
    assert notes[-1] == ("worker", "worker restarting after exit code -9, attempt 1")
    assert len(spawned) == 1 and not sup.alive("worker")
    clock.t = 0.9
    sup.poll()
    assert len(spawned) == 1  # not before its delay
    clock.t = 1.0
    sup.poll()
    assert len(spawned) == 2 and sup.alive("worker")
    assert "restarted after exit code -9 (attempt 1)" in notes[-1][1]

    clock.t = 2.0  # crashes again soon: the delay doubles
    spawned[-1].exit(-9)
    sup.poll()
    assert notes[-1] == ("worker", "worker restarting after exit code -9, attempt 2")
    clock.t = 3.9
    sup.poll()
    assert len(spawned) == 2
    clock.t = 4.0
    sup.poll()
    assert len(spawned) == 3


def test_failures_are_forgotten_after_a_healthy_period():
    sup, clock, spawned, notes, _ = _setup(base_s=1, cap_s=30, healthy_after_s=60)
    for _ in range(4):  # four quick crashes: the next delay would be 16 s
        spawned[-1].exit(1)
        sup.poll()
        clock.t += 30
        sup.poll()
    assert sup.child("worker").failures == 4
    clock.t += 60  # up and healthy for a minute
    sup.poll()
    assert sup.child("worker").failures == 0 and notes[-1] == ("worker", None)
    spawned[-1].exit(-9)
    sup.poll()
    before = len(spawned)
    clock.t += 1.0
    sup.poll()
    assert len(spawned) == before + 1  # back to the base delay


def test_an_error_exit_before_the_first_ready_is_fatal_but_a_kill_is_not():
    sup, clock, spawned, _, _ = _setup()
    sup.ready_once = False
    spawned[-1].exit(-9)
    sup.poll()  # killed while loading: restarted
    clock.t = 5
    sup.poll()
    assert len(spawned) == 2
    spawned[-1].exit(2)
    with pytest.raises(FatalChildExit, match="worker exited with code 2 during start-up"):
        sup.poll()


def test_a_failing_start_is_retried_later():
    clock = Clock()
    attempts: list[int] = []

    def spawn() -> Proc:
        attempts.append(1)
        if len(attempts) == 2:
            raise OSError("port still taken")
        return Proc()

    sup = Supervisor([Child("valkey", spawn=spawn)], say=lambda _m: None, clock=clock)
    sup.start_all()
    sup.child("valkey").process.exit(-9)  # type: ignore[union-attr]
    sup.poll()
    clock.t = 1
    sup.poll()  # the restart raises: scheduled again
    assert not sup.alive("valkey") and sup.child("valkey").failures == 2
    clock.t = 3
    sup.poll()
    assert sup.alive("valkey") and len(attempts) == 3


def test_nothing_restarts_while_stopping():
    sup, clock, spawned, _, _ = _setup()
    sup.stopping = True
    spawned[-1].exit(0)
    clock.t = 100
    sup.poll()
    assert len(spawned) == 1
