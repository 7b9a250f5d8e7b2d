"""Keeping the child processes of ``ldm-serve up`` alive: restart with capped exponential backoff.

A :class:`Supervisor` owns a few named children (the embedded Valkey, the worker, the gateway).
``poll()``, called every fraction of a second, notices a child that exited, says so (log and a
``note`` callback that ``up`` stores in Redis for ``/readyz``), and starts it again after
``backoff.delay(failures)``: 1 s, 2 s, 4 s, ... capped at ``cap_s``. A child that has run for
``healthy_after_s`` is considered healthy again and its failure count goes back to zero, so a
crash a day later waits 1 s, not the cap.

Torch-free and FastAPI-free; processes are anything with ``poll()`` and ``pid`` (``subprocess.Popen``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("ldm_serve.up")


class ChildProcess(Protocol):
    """What the supervisor needs of a process."""

    pid: int

    def poll(self) -> int | None: ...


@dataclass(frozen=True)
class Backoff:
    """Restart delays: ``base_s * 2**(failures-1)``, at most ``cap_s``; reset after ``healthy_after_s`` up."""

    base_s: float = 1.0
    cap_s: float = 30.0
    healthy_after_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before restart number ``failures`` (1-based)."""
        return min(self.cap_s, self.base_s * 2 ** max(0, failures - 1))


@dataclass
class Child:
    """One supervised process.

    Args:
        name: shown in messages (``worker``, ``gateway``, ``valkey``).
        spawn: starts the process and returns it.
        fatal_before_ready: an error exit (code > 0) before the service was first ready ends
            ``up`` instead of a restart loop (a wrong ``--model`` must not look like a hang).
    """

    name: str
    spawn: Callable[[], ChildProcess]
    fatal_before_ready: bool = True
    process: ChildProcess | None = None
    failures: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    last_exit: int | None = None
    restarts: int = field(default=0)


class FatalChildExit(RuntimeError):
    """A child failed in a way a restart will not fix (see ``Child.fatal_before_ready``)."""


class Supervisor:
    """Starts children, restarts the ones that exit, stops them in order.

    Args:
        children: in start order.
        backoff: the restart policy.
        note: called with ``(child name, text)`` when a child is down and being restarted, and
            ``(child name, None)`` when it is healthy again; must not raise.
        on_exit: called with ``(child name, pid)`` when a child has exited; must not raise.
        say: where the one-line messages go (default: the ``ldm_serve.up`` logger).
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        children: Sequence[Child],
        *,
        backoff: Backoff | None = None,
        note: Callable[[str, str | None], None] | None = None,
        on_exit: Callable[[str, int], None] | None = None,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.children = list(children)
        self.backoff = backoff or Backoff()
        self._note = note or (lambda _name, _text: None)
        self._on_exit = on_exit or (lambda _name, _pid: None)
        self._say = say or log.warning
        self._clock = clock
        self.ready_once = False  # set by the caller when the service first answered ready
        self.stopping = False

    def child(self, name: str) -> Child:
        """The child called ``name``."""
        return next(c for c in self.children if c.name == name)

    def start(self, child: Child) -> None:
        """Start ``child`` now."""
        child.process = child.spawn()
        child.started_at = self._clock()
        child.restart_at = None
        self._say(f"{child.name}: started (pid {child.process.pid})")

    def start_all(self) -> None:
        """Start every child, in order."""
        for child in self.children:
            self.start(child)

    def poll(self) -> None:
        """One supervision pass: notice exits, restart the children whose delay has passed.

        Raises:
            FatalChildExit: a ``fatal_before_ready`` child exited with an error before the service
                was first ready.
        """
        if self.stopping:
            return
        now = self._clock()
        for child in self.children:
            proc = child.process
            if proc is not None:
                code = proc.poll()
                if code is None:
                    if child.failures and now - child.started_at >= self.backoff.healthy_after_s:
                        child.failures = 0
                        self._note(child.name, None)
                    continue
                self._exited(child, code, now)
            if child.restart_at is not None and now >= child.restart_at:
                try:
                    self.start(child)
                except Exception as exc:  # noqa: BLE001 - e.g. the port is still taken: try again later
                    self._exited(child, None, now, error=f"{type(exc).__name__}: {exc}")
                    continue
                child.restarts += 1
                self._note(
                    child.name,
                    f"{child.name} restarted after exit code {child.last_exit} (attempt {child.failures}), "
                    "starting up",
                )

    def _exited(self, child: Child, code: int | None, now: float, *, error: str | None = None) -> None:
        dead, child.process = child.process, None
        if code is not None:
            child.last_exit = code
        if child.fatal_before_ready and not self.ready_once and code is not None and code > 0:
            raise FatalChildExit(f"{child.name} exited with code {code} during start-up (see the log above)")
        child.failures += 1
        delay = self.backoff.delay(child.failures)
        child.restart_at = now + delay
        why = error or f"exit code {code}"
        self._say(f"{child.name}: exited ({why}); restarting in {delay:g}s (attempt {child.failures})")
        self._note(child.name, f"{child.name} restarting after {why}, attempt {child.failures}")
        if dead is not None:  # after the note: whoever sees the consequences can read why
            self._on_exit(child.name, dead.pid)

    def alive(self, name: str) -> bool:
        """Whether the child called ``name`` runs right now."""
        proc = self.child(name).process
        return proc is not None and proc.poll() is None
