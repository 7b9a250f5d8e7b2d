"""The continuous-batching admission policy (``ldm.engine.admission``), driven by a fake clock."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from ldm.engine.admission import AdmissionConfig, AdmissionPolicy, bucket_for
from ldm_serve.errors import ConfigError, InvalidInput


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**kw) -> tuple[AdmissionPolicy, FakeClock]:
    clock = FakeClock()
    return AdmissionPolicy(AdmissionConfig(**kw), clock=clock), clock


def admitted(plan) -> list[str]:
    return [a.id for a in plan.admitted]


def test_admission_never_imports_torch() -> None:
    code = "import sys, ldm.engine.admission; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_first_step_admits_in_order_up_to_the_row_budget() -> None:
    s, _ = make(max_rows=4)
    for name, rows in (("a", 2), ("b", 1), ("c", 2), ("d", 1)):
        s.submit(name, rows)
    plan = s.schedule()
    assert admitted(plan) == ["a", "b", "d"]  # c (2 rows) does not fit the 1 row left; d does
    assert plan.running_rows == 4 and plan.waiting_rows == 2
    assert s.room() == 0


def test_a_new_entry_joins_at_the_next_step_when_there_is_room() -> None:
    s, clock = make(max_rows=8)
    s.submit("long", 2)
    s.schedule()
    for _ in range(5):
        s.schedule()  # "long" keeps running
    clock.advance(0.3)
    s.submit("late", 1)
    assert s.room() == 5
    clock.advance(0.2)
    plan = s.schedule()
    assert admitted(plan) == ["late"]
    assert plan.admitted[0].waited_steps == 0
    assert plan.admitted[0].waited_s == pytest.approx(0.2)  # from the injected clock
    assert plan.running_rows == 3 and s.running == ["long", "late"]


def test_waiting_served_ratio_batches_admissions_until_an_entry_is_due() -> None:
    s, _ = make(max_rows=16, waiting_served_ratio=1.0, max_waiting_steps=3)
    for i in range(4):
        s.submit(f"r{i}", 1)
    assert len(s.schedule().admitted) == 4  # nothing running: no ratio applies
    s.submit("w0", 1)
    plans = [s.schedule() for _ in range(3)]
    assert [admitted(p) for p in plans] == [[], [], []]  # 1 waiting row < 1.0 x 4 running rows
    plan = s.schedule()  # w0 has now waited max_waiting_steps steps
    assert admitted(plan) == ["w0"] and plan.forced and plan.admitted[0].waited_steps == 3
    # enough company admits at once
    for i in range(5):
        s.submit(f"x{i}", 1)
    assert len(s.schedule().admitted) == 5


def test_small_entries_overtake_a_big_one_only_until_it_is_due() -> None:
    s, _ = make(max_rows=4, max_waiting_steps=2)
    s.submit("r1", 3)
    s.schedule()
    s.submit("big", 4)
    s.submit("small1", 1)
    assert admitted(s.schedule()) == ["small1"]  # big does not fit; small1 overtakes it
    s.finish("small1")
    s.submit("small2", 1)
    assert admitted(s.schedule()) == ["small2"]  # big has waited 1 step: still not due
    s.finish("small2")
    s.submit("small3", 1)
    assert admitted(s.schedule()) == []  # big is due: small3 may not overtake it any more
    s.finish("r1")
    assert admitted(s.schedule()) == ["big"]  # room freed: the due entry goes first
    assert s.waiting == ["small3"]


def test_memory_budget_limits_admission() -> None:
    s, _ = make(max_rows=16, max_bytes=1000)
    s.submit("a", 2, unet_rows=4, nbytes=400)  # guided: two UNet rows per row
    s.submit("b", 2, unet_rows=4, nbytes=400)
    s.submit("c", 1, unet_rows=2, nbytes=200)  # 1000 would be exactly the budget
    s.submit("d", 1, unet_rows=1, nbytes=100)
    plan = s.schedule()
    assert admitted(plan) == ["a", "b", "c"] and s.running_bytes == 1000
    s.cancel("b")
    assert admitted(s.schedule()) == ["d"]


def test_bucket_padding_is_counted_and_paid_from_the_memory_budget() -> None:
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    s, _ = make(max_rows=8, buckets=(1, 2, 4, 8))
    s.submit("a", 3)
    plan = s.schedule()
    assert (plan.unet_rows, plan.bucket, plan.padded) == (3, 4, 1)
    s.submit("b", 2)
    plan = s.schedule()
    assert (plan.unet_rows, plan.bucket, plan.padded) == (5, 8, 3)
    assert s.padded_rows_total == 4
    # padded rows cost memory: 3 rows of 100 bytes pad to 4 rows = 400 > 350
    s2, _ = make(max_rows=8, buckets=(1, 2, 4, 8), max_bytes=350)
    s2.submit("x", 2, nbytes=200)
    s2.submit("y", 1, nbytes=100)
    assert admitted(s2.schedule()) == ["x"]


def test_cancel_frees_room_at_once_wherever_the_entry_is() -> None:
    s, _ = make(max_rows=2)
    s.submit("run", 2)
    s.schedule()
    s.submit("wait", 2)
    assert s.cancel("wait") == "waiting" and s.waiting == []
    s.submit("next", 2)
    assert admitted(s.schedule()) == []
    assert s.cancel("run") == "running"
    assert admitted(s.schedule()) == ["next"]
    assert s.cancel("nobody") is None
    with pytest.raises(KeyError):
        s.finish("run")


def test_admission_work_per_step_is_bounded() -> None:
    s, _ = make(max_rows=8, max_admit_rows=2)
    for i in range(4):
        s.submit(f"j{i}", 1)
    assert [admitted(s.schedule()) for _ in range(3)] == [["j0", "j1"], ["j2", "j3"], []]
    s2, _ = make(max_rows=8, max_admit_rows=2)
    s2.submit("wide", 4)  # wider than the per-step limit: still admitted, alone
    assert admitted(s2.schedule()) == ["wide"]


def test_entries_that_can_never_fit_are_refused() -> None:
    s, _ = make(max_rows=4, max_bytes=1000, buckets=(8,))
    with pytest.raises(InvalidInput) as info:
        s.submit("wide", 5)
    assert info.value.field == "n"
    with pytest.raises(InvalidInput, match="memory budget"):
        s.submit("heavy", 2, nbytes=400)  # pads to 8 UNet rows of 200 bytes
    s.submit("ok", 1, nbytes=100)
    with pytest.raises(ValueError, match="already"):
        s.submit("ok", 1)


@pytest.mark.parametrize(
    "kwargs",
    [{"max_rows": 0}, {"buckets": (4, 2)}, {"buckets": (0, 1)}, {"waiting_served_ratio": -1.0},
     {"waiting_served_ratio": float("nan")}, {"max_waiting_steps": 0}, {"max_admit_rows": 0}, {"max_bytes": 0}],
)
def test_bad_configs_are_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        AdmissionConfig(**kwargs)


@pytest.mark.parametrize("seed", range(5))
def test_random_traffic_keeps_budgets_and_starves_nobody(seed: int) -> None:
    """Random arrivals, sizes, step counts and cancels: the budgets always hold, and every
    entry that is not canceled is admitted once arrivals stop."""
    rng = random.Random(seed)
    cfg = AdmissionConfig(max_rows=6, max_bytes=900, buckets=(1, 2, 4, 8), waiting_served_ratio=rng.choice([0, 1.2]),
                          max_waiting_steps=4)
    s, clock = make(**cfg.__dict__)
    steps_left: dict[str, int] = {}
    submitted: set[str] = set()
    started: set[str] = set()
    canceled: set[str] = set()
    for step in range(1000):
        clock.advance(0.05)
        if step < 300 and rng.random() < 0.4:
            name = f"e{step}"
            rows = rng.choice([1, 1, 2, 4])
            s.submit(name, rows, unet_rows=rows * rng.choice([1, 2]), nbytes=rows * 50)
            submitted.add(name)
        if step < 300 and rng.random() < 0.05 and len(s):
            victim = rng.choice(s.running + s.waiting)
            s.cancel(victim)
            canceled.add(victim)
            steps_left.pop(victim, None)
        plan = s.schedule()
        for a in plan.admitted:
            steps_left[a.id] = rng.randint(2, 10)
            started.add(a.id)
        assert s.running_rows <= cfg.max_rows
        assert s.running_bytes + plan.padded * 50 <= cfg.max_bytes  # at most 50 bytes per UNet row here
        for name in list(steps_left):
            steps_left[name] -= 1
            if steps_left[name] == 0:
                s.finish(name)
                del steps_left[name]
        if step >= 300 and not len(s):
            break
    assert not len(s), "entries left waiting after arrivals stopped"
    assert submitted - canceled <= started
    assert s.admitted_rows_total > 0
