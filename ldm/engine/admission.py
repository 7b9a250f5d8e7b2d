"""Admission and fairness for the continuous-batching engine, as a torch-free state machine.

The engine calls :meth:`AdmissionPolicy.schedule` once at every step boundary. The
policy decides which waiting entries (an entry is one job: a group of rows
that join and leave together) enter the running batch before the next UNet
forward, and the shape of that forward (padding to a bucket). It knows nothing
about tensors: it counts rows, UNet rows and bytes, and reads time from an
injected clock, so its whole policy is unit-tested with a fake clock.

Policy (after TGI's router, adapted to diffusion where one iteration is one DDIM step):

* **Budgets.** The running batch holds at most ``max_rows`` rows and, when
  ``max_bytes`` is set, at most that many bytes (the entries' estimates plus the
  padded rows). An entry that could never fit is refused at :meth:`submit`.
* **Order.** Waiting entries are considered first-in first-out. One that does not
  fit is skipped and a smaller one behind it may start (first fit), but once an
  entry has waited ``max_waiting_steps`` steps it is *due*: nothing behind it may
  start before it. Running rows always finish, so a due entry starts as soon as
  enough of them have left: no entry waits forever.
* **Waiting/served ratio.** While rows are running, a new admission happens only
  when the rows it would admit are at least ``waiting_served_ratio`` times the
  running rows, or some entry is due (TGI's ``waiting_served_ratio`` /
  ``max_waiting_tokens``). In TGI an admission (prefill) pauses every running
  request for a long forward, so batching admissions pays; here an admission costs
  one text-encoder pass per row, so the default ratio is 0: a new entry starts at
  the next step boundary whenever there is room. ``max_admit_rows`` bounds the
  preparation work done at one boundary, so a flood of arrivals cannot hold the
  running rows back for more than that much work per step.
* **Buckets.** With ``buckets`` set, each step's UNet batch is padded to the next
  bucket size (static shapes for CUDA graphs / compiled engines); padded rows count
  against the memory budget and in :attr:`AdmissionPolicy.padded_rows_total`.
* **Cancellation** removes an entry at once, waiting or running, and frees its budget.

One owner (the worker's loop thread) calls every method; nothing here is thread-safe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ldm_serve.errors import ConfigError, InvalidInput

__all__ = ["Admission", "Plan", "AdmissionPolicy", "AdmissionConfig", "bucket_for"]


@dataclass(frozen=True)
class AdmissionConfig:
    """Budgets and knobs of the admission policy (see the module docstring).

    Attributes:
        max_rows: rows (images) in the running batch at once.
        max_bytes: memory budget of the running batch, padded rows included; ``None`` = none.
        buckets: ascending UNet batch sizes to pad each step to; empty = no padding.
        waiting_served_ratio: admit while rows run only if the admitted rows are at least
            this times the running rows (0 = admit whenever there is room).
        max_waiting_steps: after this many steps an entry is due: it forces admission
            and nothing queued behind it overtakes it.
        max_admit_rows: rows admitted at one step boundary at most; ``None`` = no limit.
    """

    max_rows: int = 8
    max_bytes: int | None = None
    buckets: tuple[int, ...] = ()
    waiting_served_ratio: float = 0.0
    max_waiting_steps: int = 20
    max_admit_rows: int | None = None

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ConfigError(f"max_rows must be at least 1, got {self.max_rows}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be positive or None, got {self.max_bytes}")
        if any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ConfigError(f"buckets must be strictly ascending positive sizes, got {self.buckets}")
        if not self.waiting_served_ratio >= 0:  # also rejects NaN
            raise ConfigError(f"waiting_served_ratio must be >= 0, got {self.waiting_served_ratio}")
        if self.max_waiting_steps < 1:
            raise ConfigError(f"max_waiting_steps must be at least 1, got {self.max_waiting_steps}")
        if self.max_admit_rows is not None and self.max_admit_rows < 1:
            raise ConfigError(f"max_admit_rows must be at least 1 or None, got {self.max_admit_rows}")


def bucket_for(unet_rows: int, buckets: tuple[int, ...]) -> int:
    """The UNet batch size a step of ``unet_rows`` rows is padded to (itself past the largest bucket)."""
    for b in buckets:
        if b >= unet_rows:
            return b
    return unet_rows


@dataclass
class _Entry:
    id: str
    rows: int
    unet_rows: int
    bytes: int
    enqueued_at: float
    waited_steps: int = 0

    @property
    def bytes_per_unet_row(self) -> int:
        return math.ceil(self.bytes / self.unet_rows)


@dataclass(frozen=True)
class Admission:
    """An entry that entered the running batch at this step boundary."""

    id: str
    rows: int
    unet_rows: int
    waited_s: float
    waited_steps: int


@dataclass(frozen=True)
class Plan:
    """The outcome of one :meth:`AdmissionPolicy.schedule` call: who joins, and the next step's shape.

    Attributes:
        step: 1-based index of the step this plan is for.
        admitted: entries that join the running batch now, in admission order.
        running_rows: rows in the running batch (admitted ones included).
        unet_rows: rows of the next UNet forward before padding.
        bucket: the UNet batch size after padding (``unet_rows`` without buckets).
        padded: ``bucket - unet_rows``.
        waiting_rows: rows still waiting.
        forced: an admission was forced by a due entry (``max_waiting_steps``).
    """

    step: int
    admitted: tuple[Admission, ...]
    running_rows: int
    unet_rows: int
    bucket: int
    padded: int
    waiting_rows: int
    forced: bool


class AdmissionPolicy:
    """The waiting queue, the running set and their budgets; see the module docstring.

    Args:
        config: budgets and knobs.
        clock: monotonic seconds (``time.monotonic``; tests pass a fake clock).
    """

    def __init__(self, config: AdmissionConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._waiting: list[_Entry] = []
        self._running: dict[str, _Entry] = {}
        self.steps = 0
        self.admitted_rows_total = 0
        self.padded_rows_total = 0

    # ------------------------------------------------------------------ inspection
    @property
    def waiting(self) -> list[str]:
        """Ids of waiting entries, in admission order."""
        return [e.id for e in self._waiting]

    @property
    def running(self) -> list[str]:
        """Ids of running entries, in admission order."""
        return list(self._running)

    @property
    def running_rows(self) -> int:
        return sum(e.rows for e in self._running.values())

    @property
    def running_bytes(self) -> int:
        return sum(e.bytes for e in self._running.values())

    @property
    def waiting_rows(self) -> int:
        return sum(e.rows for e in self._waiting)

    def room(self) -> int:
        """Rows that newly submitted entries could take: the row budget minus running and waiting rows."""
        return max(0, self.config.max_rows - self.running_rows - self.waiting_rows)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._running or any(e.id == entry_id for e in self._waiting)

    def __len__(self) -> int:
        return len(self._running) + len(self._waiting)

    # ------------------------------------------------------------------ transitions
    def submit(self, entry_id: str, rows: int, unet_rows: int | None = None, nbytes: int = 0) -> None:
        """Queue an entry of ``rows`` rows (``unet_rows`` UNet rows per step, ``nbytes`` of memory).

        Raises:
            ValueError: the id is already known, or a count is not positive.
            InvalidInput: the entry could never fit the row or memory budget (field ``n``).
        """
        unet_rows = rows if unet_rows is None else unet_rows
        if entry_id in self:
            raise ValueError(f"entry {entry_id!r} is already scheduled")
        if rows < 1 or unet_rows < 1 or nbytes < 0:
            raise ValueError(f"entry {entry_id!r}: rows and unet_rows must be >= 1 and bytes >= 0")
        cfg = self.config
        if rows > cfg.max_rows:
            raise InvalidInput("n", f"needs {rows} rows at once; this worker runs at most {cfg.max_rows}")
        entry = _Entry(entry_id, rows, unet_rows, nbytes, self.clock())
        if cfg.max_bytes is not None:
            alone = nbytes + (bucket_for(unet_rows, cfg.buckets) - unet_rows) * entry.bytes_per_unet_row
            if alone > cfg.max_bytes:
                raise InvalidInput(
                    "n", f"needs about {alone / 2**20:.1f} MiB; the worker's memory budget is "
                    f"{cfg.max_bytes / 2**20:.1f} MiB"
                )
        self._waiting.append(entry)

    def cancel(self, entry_id: str) -> Literal["waiting", "running"] | None:
        """Drop an entry wherever it is; returns where it was (``None``: unknown)."""
        if self._running.pop(entry_id, None) is not None:
            return "running"
        for i, e in enumerate(self._waiting):
            if e.id == entry_id:
                del self._waiting[i]
                return "waiting"
        return None

    def finish(self, entry_id: str) -> None:
        """A running entry's last row left the batch (finished or failed)."""
        if self._running.pop(entry_id, None) is None:
            raise KeyError(f"entry {entry_id!r} is not running")

    def schedule(self) -> Plan:
        """Admit waiting entries for the next step and return that step's plan (see the module docstring)."""
        cfg = self.config
        self.steps += 1
        forced = any(e.waited_steps >= cfg.max_waiting_steps for e in self._waiting)
        chosen = self._first_fit()
        running_rows = self.running_rows
        if self._running and not forced and cfg.waiting_served_ratio > 0:
            if sum(e.rows for e in chosen) < math.floor(running_rows * cfg.waiting_served_ratio):
                chosen = []  # not worth an admission yet: wait for more company (or a due entry)
        now = self.clock()
        admitted = []
        for e in chosen:
            self._waiting.remove(e)
            self._running[e.id] = e
            admitted.append(Admission(e.id, e.rows, e.unet_rows, now - e.enqueued_at, e.waited_steps))
            self.admitted_rows_total += e.rows
        for e in self._waiting:
            e.waited_steps += 1
        unet_rows = sum(e.unet_rows for e in self._running.values())
        bucket = bucket_for(unet_rows, cfg.buckets) if unet_rows else 0
        self.padded_rows_total += bucket - unet_rows
        return Plan(
            step=self.steps,
            admitted=tuple(admitted),
            running_rows=self.running_rows,
            unet_rows=unet_rows,
            bucket=bucket,
            padded=bucket - unet_rows,
            waiting_rows=self.waiting_rows,
            forced=forced and bool(admitted),
        )

    # ------------------------------------------------------------------ policy
    def _first_fit(self) -> list[_Entry]:
        """Waiting entries that fit the budgets, in order, never overtaking a due entry."""
        cfg = self.config
        rows = self.running_rows
        unet_rows = sum(e.unet_rows for e in self._running.values())
        nbytes = self.running_bytes
        per_row = max((e.bytes_per_unet_row for e in self._running.values()), default=0)
        admit_left: float = cfg.max_admit_rows if cfg.max_admit_rows is not None else math.inf
        chosen: list[_Entry] = []
        for e in self._waiting:
            if chosen and e.rows > admit_left:
                break  # this step's admission work is spent; the rest keep their order
            row_ok = rows + e.rows <= cfg.max_rows
            pad_per_row = max(per_row, e.bytes_per_unet_row)
            total_unet = unet_rows + e.unet_rows
            padding = (bucket_for(total_unet, cfg.buckets) - total_unet) * pad_per_row
            bytes_ok = cfg.max_bytes is None or nbytes + e.bytes + padding <= cfg.max_bytes
            if row_ok and bytes_ok:
                chosen.append(e)
                rows, unet_rows, nbytes, per_row = rows + e.rows, total_unet, nbytes + e.bytes, pad_per_row
                admit_left -= e.rows
            elif e.waited_steps >= cfg.max_waiting_steps:
                break  # due: nobody behind it may start first
        return chosen
