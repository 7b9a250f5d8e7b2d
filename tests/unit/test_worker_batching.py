"""The pure batch-selection rule."""

from __future__ import annotations

from worker.batching import Candidate, select_compatible


def c(job: str, key: str = "m|64x64", rows: int = 1) -> Candidate:
    return Candidate(job, key, rows)


def test_only_same_model_and_size_join() -> None:
    chosen = select_compatible("m|64x64", 8, [c("a"), c("b", "m|128x128"), c("d", "other|64x64"), c("e")])
    assert [x.job_id for x in chosen] == ["a", "e"]


def test_rows_are_capped_and_jobs_never_split() -> None:
    chosen = select_compatible("m|64x64", 4, [c("a", rows=2), c("b", rows=3), c("c", rows=2), c("d")])
    assert [x.job_id for x in chosen] == ["a", "c"]  # b does not fit in the 2 rows left; d has no room


def test_no_room_means_no_jobs() -> None:
    assert select_compatible("m|64x64", 0, [c("a")]) == []
