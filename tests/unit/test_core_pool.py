"""Core-sharded CPU execution (``ldm.execution.core_pool``): splits, invariance, parity, errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ldm.execution.core_pool import (
    CorePool,
    ShardedUNet,
    coordinating,
    default_core_workers,
    shared_core_pool,
)
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm.random_model import write_random_model
from ldm_serve.errors import ConfigError

SIZE = 32


@pytest.fixture(scope="module")
def pool() -> CorePool:
    pool = CorePool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory):
    return write_random_model(tmp_path_factory.mktemp("random"))


def unet_inputs(pipe: LatentDiffusionPipeline, rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h = SIZE // pipe.downsample_factor
    x = torch.randn((rows, pipe.latent_channels, h, h), generator=g)  # [B, C, h, w]
    t = torch.randint(0, 1000, (rows,), generator=g)
    context = torch.randn((rows, pipe.max_prompt_tokens, pipe.config.unet.context_dim), generator=g)
    return x, t, context


@pytest.mark.parametrize(("n", "workers"), [(1, 2), (2, 2), (5, 2), (7, 3), (16, 4)])
def test_shards_cover_the_batch_in_order_and_near_equal(n: int, workers: int) -> None:
    pool = CorePool(workers)
    try:
        parts = pool.shards(n, per_row=False)
        assert [i for s in parts for i in range(s.start, s.stop)] == list(range(n))
        sizes = [s.stop - s.start for s in parts]
        assert len(parts) == min(workers, n) and max(sizes) - min(sizes) <= 1
        assert pool.shards(n, per_row=True) == [slice(i, i + 1) for i in range(n)]
    finally:
        pool.close()


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _on_pool_thread(_: object) -> torch.Tensor:
    return torch.tensor(threading.current_thread().name.startswith("ldm-core"))


def test_pool_threads_use_one_core_and_leave_the_caller_alone(pool: CorePool, two_threads) -> None:
    seen = pool.map(lambda _: torch.tensor(torch.get_num_threads()), range(6))
    assert [int(v) for v in seen] == [1] * 6
    assert all(bool(v) for v in pool.map(_on_pool_thread, range(2)))  # a multi-thread caller only waits
    assert torch.get_num_threads() == 2


def test_a_coordinating_caller_computes_the_first_item_on_one_thread(pool: CorePool, two_threads) -> None:
    with coordinating(pool):
        assert torch.get_num_threads() == 1
        where = [bool(v) for v in pool.map(_on_pool_thread, range(3))]
        threads = [int(v) for v in pool.map(lambda _: torch.tensor(torch.get_num_threads()), range(3))]
    assert where == [False, True, True]  # item 0 in the caller, the rest on the pool
    assert threads == [1, 1, 1]
    assert torch.get_num_threads() == 2  # restored
    with coordinating(None):  # no pool: nothing changes
        assert torch.get_num_threads() == 2


def test_a_coordinating_caller_waits_for_the_pool_when_its_item_fails(pool: CorePool, two_threads) -> None:
    finished = threading.Event()

    def task(k: int) -> torch.Tensor:
        if k == 0:
            raise RuntimeError("item 0 failed")
        finished.wait(0.2)  # still running when item 0 fails
        finished.set()
        return torch.zeros(1)

    with coordinating(pool), pytest.raises(RuntimeError, match="item 0 failed"):
        pool.map(task, [0, 1])
    assert finished.is_set()  # map returned only after the pool's item ended


def test_pool_runs_without_autograd_and_raises_task_errors(pool: CorePool) -> None:
    w = torch.ones(3, requires_grad=True)
    out = pool.map(lambda k: w * k, [1.0, 2.0])
    assert not any(o.requires_grad for o in out)

    def boom(k: int) -> torch.Tensor:
        if k == 1:
            raise RuntimeError("row 1 failed")
        return torch.zeros(1)

    with pytest.raises(RuntimeError, match="row 1 failed"):
        pool.map(boom, [0, 1, 2])


def test_pool_needs_two_workers() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        CorePool(1)


def test_per_row_output_does_not_depend_on_batch_mates(model_path, pool: CorePool) -> None:
    pipe = load_pipeline(model_path, core_workers=1)
    unet = ShardedUNet(pipe.model.unet, pool, per_row=True)
    x, t, c = unet_inputs(pipe, 5)
    a = unet(x, t, context=c)  # [5, C, h, w]
    x2, t2, c2 = unet_inputs(pipe, 3, seed=1)
    mixed = unet(torch.cat([x2[:2], x[3:4], x2[2:]]), torch.cat([t2[:2], t[3:4], t2[2:]]),
                 context=torch.cat([c2[:2], c[3:4], c2[2:]]))
    assert torch.equal(mixed[2], a[3])  # bit-identical among other rows
    alone = unet(x[3:4], t[3:4], context=c[3:4])
    assert torch.equal(alone[0], a[3])


def test_sharded_unet_matches_one_batched_call(model_path, pool: CorePool) -> None:
    pipe = load_pipeline(model_path, core_workers=1, batch_invariant=False)
    x, t, c = unet_inputs(pipe, 5)
    with torch.no_grad():
        want = pipe.model.unet(x, t, context=c)
    for per_row in (True, False):
        got = ShardedUNet(pipe.model.unet, pool, per_row=per_row)(x, t, context=c)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_pipeline_core_workers_setting(model_path) -> None:
    assert load_pipeline(model_path, core_workers=1).core_pool is None
    two = load_pipeline(model_path, core_workers=2)
    assert two.core_pool is not None and two.core_pool.workers == 2
    assert load_pipeline(model_path, core_workers=2).core_pool is two.core_pool is shared_core_pool(2)
    assert isinstance(two.sampling_unet(), ShardedUNet) and not two.sampling_unet().per_row  # invariant kernels
    assert not load_pipeline(model_path, core_workers=2, batch_invariant=False).sampling_unet().per_row
    with pytest.raises(ConfigError, match="core_workers"):
        load_pipeline(model_path, core_workers=0)
    assert default_core_workers(torch.device("cpu")) == max(1, torch.get_num_threads())
    assert default_core_workers(torch.device("cuda")) == 1


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_pooled_pipeline_images_match_the_single_thread_path(model_path, batch_invariant: bool) -> None:
    """Text encoding, UNet and decoding on the pool give the images of the inline path (to rounding)."""
    rows = [GenerationRow(f"a red cat {i}", seed=i, steps=4, guidance_scale=4.0) for i in range(3)]
    pooled = load_pipeline(model_path, core_workers=2, batch_invariant=batch_invariant)
    inline = load_pipeline(model_path, core_workers=1, batch_invariant=batch_invariant)
    a = [np.asarray(im, dtype=np.int16) for im in pooled.generate(rows, SIZE, SIZE)]
    b = [np.asarray(im, dtype=np.int16) for im in inline.generate(rows, SIZE, SIZE)]
    for x, y in zip(a, b, strict=True):
        assert np.abs(x - y).max() <= 2
    if batch_invariant:  # each pooled row equals that row generated alone
        alone = np.asarray(pooled.generate(rows[1:2], SIZE, SIZE)[0], dtype=np.int16)
        assert np.array_equal(alone, a[1])
