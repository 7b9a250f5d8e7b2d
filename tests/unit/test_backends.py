"""Execution backends against eager: parity, caching, bucketing, errors (tiny configs, CPU)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.autoencoder import AutoencoderKL, build_first_stage
from ldm.backends import (
    PaddedRowCounter,
    UNetShapes,
    apply_backend,
    compile_decoder,
    compile_unet,
    example_unet_inputs,
)
from ldm.backends.base import CompiledUNet, UNetCall
from ldm.backends.cudagraphs import BucketedRunner, PaddingRunner
from ldm.pipeline import GenerationRow, LatentDiffusionPipeline, load_pipeline
from ldm.random_model import write_random_model
from ldm.tiny import randomize_weights_
from ldm.unet import UNetModel
from ldm_serve.errors import ConfigError
from tests import tiny

UNETS = {
    "sd1": tiny.UNET_SD1,
    "sd2": tiny.UNET_SD2,
    "ldm-inpaint": tiny.UNET_LDM_INPAINT,  # no context
    "class-labels": dataclasses.replace(tiny.UNET_LDM_INPAINT, num_classes=5),  # y instead of context
}
FP32 = {"rtol": 1e-5, "atol": 1e-5}


def make_unet(cfg=tiny.UNET_SD1, seed: int = 0) -> UNetModel:
    return randomize_weights_(UNetModel(cfg), seed=seed).eval().requires_grad_(False)


def eager_out(unet: UNetModel, inputs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return UNetCall(unet)(*inputs)


def call(compiled: CompiledUNet, inputs: list[torch.Tensor]) -> torch.Tensor:
    x, t, *extra = inputs
    with torch.no_grad():
        return compiled(x, t, **dict(zip(compiled.input_names[2:], extra, strict=True)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_model(tmp_path_factory.mktemp("random"))


# --- torchscript ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(UNETS))
def test_torchscript_unet_matches_eager(name: str) -> None:
    unet = make_unet(UNETS[name])
    compiled = compile_unet(unet, "torchscript", shapes=UNetShapes(batch=1, height=8, width=8, context_len=7))
    assert compiled.backend == "torchscript" and not compiled.artifacts[0].loaded_from_cache
    inputs = example_unet_inputs(unet, UNetShapes(3, 8, 8, 11), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(call(compiled, inputs), eager_out(unet, inputs), **FP32)
    # the wrapper still looks like the UNet to code that inspects it
    assert next(compiled.parameters()) is next(unet.parameters())
    assert compiled.config == unet.config and compiled.dtype == torch.float32


def test_torchscript_trace_is_not_tied_to_the_example_size() -> None:
    unet = make_unet()
    compiled = compile_unet(unet, "torchscript", shapes=UNetShapes(batch=1, height=8, width=8, context_len=7))
    inputs = example_unet_inputs(unet, UNetShapes(2, 16, 8, 7), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(call(compiled, inputs), eager_out(unet, inputs), **FP32)


@pytest.mark.parametrize("cfg", [tiny.AE_KL_F8, tiny.AE_VQ_F4], ids=["kl", "vq"])
def test_torchscript_decoder_matches_eager(cfg) -> None:
    fs = randomize_weights_(build_first_stage(cfg), seed=1).eval().requires_grad_(False)
    compiled = compile_decoder(fs, "torchscript", latent_shape=(1, cfg.embed_dim, 8, 8))
    for shape in ((1, cfg.embed_dim, 8, 8), (2, cfg.embed_dim, 8, 16)):
        z = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(compiled(z), fs.decode(z), **FP32)


def test_torchscript_file_is_loaded_not_traced_on_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = make_unet()
    first = compile_unet(unet, "torchscript", cache_dir=tmp_path, weights_id="weights-a")
    art = first.artifacts[0]
    assert not art.loaded_from_cache and art.path is not None and art.path.is_file()

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced although a cached file exists")

    with monkeypatch.context() as m:
        m.setattr(torch.jit, "trace", no_tracing)
        again = compile_unet(make_unet(), "torchscript", cache_dir=tmp_path, weights_id="weights-a")
    assert again.artifacts[0].loaded_from_cache and again.artifacts[0].path == art.path
    inputs = example_unet_inputs(unet, UNetShapes(2, 8, 8, 5), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(call(again, inputs), eager_out(unet, inputs), **FP32)

    # other weights, shapes or dtype: another key, traced again
    other = compile_unet(make_unet(seed=1), "torchscript", cache_dir=tmp_path, weights_id="weights-b")
    assert not other.artifacts[0].loaded_from_cache and other.artifacts[0].path != art.path
    resized = compile_unet(
        unet, "torchscript", cache_dir=tmp_path, weights_id="weights-a", shapes=UNetShapes(1, 16, 16)
    )
    assert not resized.artifacts[0].loaded_from_cache
    assert len(list((tmp_path / "torchscript").glob("unet-*.pt"))) == 3


def test_weights_are_hashed_when_no_file_identity_is_given(tmp_path: Path) -> None:
    a = compile_unet(make_unet(seed=0), "torchscript", cache_dir=tmp_path)
    b = compile_unet(make_unet(seed=0), "torchscript", cache_dir=tmp_path)
    c = compile_unet(make_unet(seed=5), "torchscript", cache_dir=tmp_path)
    assert b.artifacts[0].loaded_from_cache and b.artifacts[0].path == a.artifacts[0].path
    assert not c.artifacts[0].loaded_from_cache  # different weights never reuse a frozen graph


def test_damaged_cache_file_is_rebuilt(tmp_path: Path) -> None:
    unet = make_unet()
    path = compile_unet(unet, "torchscript", cache_dir=tmp_path, weights_id="w").artifacts[0].path
    path.write_bytes(b"not a torchscript archive")
    again = compile_unet(unet, "torchscript", cache_dir=tmp_path, weights_id="w")
    assert not again.artifacts[0].loaded_from_cache
    inputs = example_unet_inputs(unet, UNetShapes(1, 8, 8, 5), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(call(again, inputs), eager_out(unet, inputs), **FP32)


# --- inductor -------------------------------------------------------------------------

# one level, no downsampling: the smallest UNet inductor can compile in reasonable CPU time
UNET_MINI = dataclasses.replace(tiny.UNET_SD1, channel_mult=(1,), attention_resolutions=(1,))


@pytest.mark.slow
def test_inductor_unet_matches_eager(tmp_path: Path) -> None:
    unet = make_unet(UNET_MINI)
    compiled = compile_unet(unet, "inductor", shapes=UNetShapes(1, 8, 8, 7), cache_dir=tmp_path)
    art = compiled.artifacts[0]
    assert art.path == (tmp_path / "inductor").resolve() and art.path.is_dir()
    inputs = example_unet_inputs(unet, UNetShapes(1, 8, 8, 7), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(call(compiled, inputs), eager_out(unet, inputs), rtol=1e-4, atol=1e-4)


# --- bucketed execution (the logic behind CUDA graphs, run eagerly on the CPU) ---------


def test_buckets_pad_mask_and_count_rows() -> None:
    unet = make_unet()
    fn = UNetCall(unet)
    seen: list[int] = []

    def make(size: int, example: list[torch.Tensor]) -> PaddingRunner:
        seen.append(size)
        return PaddingRunner(fn, size)

    counter = PaddedRowCounter()
    runner = BucketedRunner(make, buckets=(4, 1, 2), counter=counter)
    for rows, padded, bucket in ((3, 1, 4), (1, 0, 1), (2, 0, 2)):
        inputs = example_unet_inputs(unet, UNetShapes(rows, 8, 8, 5), torch.device("cpu"), torch.float32)
        before = counter.value
        with torch.no_grad():
            out = runner(*inputs)
        assert out.shape[0] == rows
        assert counter.value - before == padded
        assert runner.bucket_for(rows) == bucket
        # padded rows are masked out: each real row equals that row run alone
        for i in range(rows):
            alone = eager_out(unet, [t[i : i + 1] for t in inputs])
            torch.testing.assert_close(out[i : i + 1], alone, **FP32)
    # more rows than the biggest bucket: chunks of 4, then the rest in the smallest bucket that fits
    inputs = example_unet_inputs(unet, UNetShapes(7, 8, 8, 5), torch.device("cpu"), torch.float32)
    before = counter.value
    with torch.no_grad():
        out = runner(*inputs)
    assert out.shape[0] == 7 and counter.value - before == 1
    torch.testing.assert_close(out, eager_out(unet, inputs), **FP32)
    assert sorted(seen) == [1, 2, 4]  # one runner per bucket and shape, reused
    with torch.no_grad():
        runner(*example_unet_inputs(unet, UNetShapes(3, 16, 16, 5), torch.device("cpu"), torch.float32))
    assert sorted(seen) == [1, 2, 4, 4]  # a new latent size gets its own runner


def test_bad_buckets_are_refused() -> None:
    with pytest.raises(ConfigError, match="bucket"):
        BucketedRunner(lambda size, ex: PaddingRunner(lambda *a: a[0], size), buckets=())


# --- errors ---------------------------------------------------------------------------


def test_cudagraphs_on_cpu_says_it_needs_cuda() -> None:
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        compile_unet(make_unet(), "cudagraphs")
    with pytest.raises(ConfigError, match="CUDA"):
        compile_unet(make_unet(), "torchscript", cuda_graphs=True)


def test_tensorrt_without_torch_tensorrt_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match="torch_tensorrt"):
        compile_unet(make_unet(), "tensorrt")
    fs = build_first_stage(tiny.AE_KL_F8).eval()
    with pytest.raises(ConfigError, match="torch_tensorrt"):
        compile_decoder(fs, "tensorrt")


def test_unknown_backend_and_wrong_dtype_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown execution backend 'tvm'"):
        compile_unet(make_unet(), "tvm")
    with pytest.raises(ConfigError, match="float16"):
        compile_unet(make_unet(), "torchscript", dtype=torch.float16)


# --- on a pipeline --------------------------------------------------------------------


def images(pipe: LatentDiffusionPipeline, size: int = 32) -> np.ndarray:
    rows = [GenerationRow("a red circle", seed=s, steps=2, guidance_scale=5.0) for s in (1, 2)]
    return np.stack([np.asarray(im) for im in pipe.generate(rows, size, size)]).astype(np.int16)


def test_apply_torchscript_to_a_pipeline_and_reload_from_cache(random_ckpt: Path, tmp_path: Path) -> None:
    pipe = load_pipeline(random_ckpt)
    original = pipe.model
    eager = images(pipe)
    report = apply_backend(pipe, "torchscript", cache_dir=tmp_path, warmup_sizes=[(32, 32)])
    assert report.backend == "torchscript" and not report.loaded_from_cache
    assert [a.part for a in report.artifacts] == ["unet", "decoder"]
    assert report.warmed_up == [(64, 64), (32, 32)]
    assert isinstance(pipe.model.unet, CompiledUNet)
    assert isinstance(pipe.model.first_stage, AutoencoderKL)  # encode and isinstance checks keep working
    assert original.unet is not pipe.model.unet and not isinstance(original.unet, CompiledUNet)
    compiled = images(pipe)
    assert np.abs(compiled - eager).max() <= 1  # the uint8 rounding of fp32-identical outputs at most

    with pytest.raises(ConfigError, match="already runs on the 'torchscript' backend"):
        apply_backend(pipe, "torchscript")

    report.restore()
    assert pipe.model is original and np.array_equal(images(pipe), eager)

    restarted = load_pipeline(random_ckpt)
    again = apply_backend(restarted, "torchscript", cache_dir=tmp_path)
    assert again.loaded_from_cache and all(a.loaded_from_cache for a in again.artifacts)
    assert np.array_equal(images(restarted), compiled)


def test_eager_backend_changes_nothing(random_ckpt: Path) -> None:
    pipe = load_pipeline(random_ckpt)
    model = pipe.model
    report = apply_backend(pipe, "eager")
    assert pipe.model is model and report.artifacts == [] and report.padded_rows.value == 0


# --- ONNX -----------------------------------------------------------------------------

onnx_exporters = [
    "torchscript",
    pytest.param("dynamo", marks=pytest.mark.slow),  # torch.export + onnxscript: ~15 s per model here
]


@pytest.mark.parametrize("exporter", onnx_exporters)
def test_onnx_unet_and_decoder_match_eager_with_dynamic_batch(exporter: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from ldm.backends.onnx_export import export_decoder_onnx, export_unet_onnx, run_onnx

    unet = make_unet()
    path = export_unet_onnx(unet, tmp_path / "unet.onnx", shapes=UNetShapes(2, 8, 8, 7), exporter=exporter)
    for batch in (1, 3):
        inputs = example_unet_inputs(unet, UNetShapes(batch, 8, 8, 7), torch.device("cpu"), torch.float32)
        assert rel_err(run_onnx(path, inputs), eager_out(unet, inputs)) <= 1e-4

    fs = randomize_weights_(build_first_stage(tiny.AE_KL_F8), seed=1).eval().requires_grad_(False)
    path = export_decoder_onnx(fs, tmp_path / "decoder.onnx", exporter=exporter)
    for batch in (1, 3):
        z = torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert rel_err(run_onnx(path, [z]), fs.decode(z)) <= 1e-4


def test_pipeline_onnx_export_is_cached_and_checked(random_ckpt: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from ldm.backends.onnx_export import check_pipeline_onnx, export_pipeline_onnx

    pipe = load_pipeline(random_ckpt)
    first = export_pipeline_onnx(pipe, tmp_path, width=32, height=32, exporter="torchscript")
    assert not first.loaded_from_cache and first.unet.is_file() and first.decoder.is_file()
    meta = json.loads(first.meta.read_text())
    assert list(meta["unet"]["inputs"]) == ["x", "timesteps", "context"]
    assert meta["unet"]["inputs"]["x"] == ["batch", 4, 8, 8] and meta["image_size"] == [32, 32]
    again = export_pipeline_onnx(pipe, tmp_path, width=32, height=32, exporter="torchscript")
    assert again.loaded_from_cache and again.unet == first.unet
    other = export_pipeline_onnx(pipe, tmp_path, width=64, height=32, exporter="torchscript")
    assert not other.loaded_from_cache and other.unet.parent != first.unet.parent
    errors = check_pipeline_onnx(pipe, first)
    assert set(errors) == {"unet", "decoder"} and max(errors.values()) <= 1e-4


def test_cli_export_onnx_writes_the_files(
    random_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("onnxruntime")
    from launcher.main import main

    out = tmp_path / "onnx"
    rc = main(["export-onnx", "--model", str(random_ckpt), "--out", str(out), "--width", "32", "--height", "32",
               "--exporter", "torchscript", "--check"])  # fmt: skip
    assert rc == 0
    assert {p.name for p in out.iterdir()} >= {"unet.onnx", "decoder.onnx", "model.json"}
    printed = capsys.readouterr().out
    assert "unet: onnxruntime vs eager" in printed and "decoder: onnxruntime vs eager" in printed


def test_worker_load_model_compiles_the_backend_from_settings(tmp_path: Path) -> None:
    """``LDM_BACKEND=torchscript``: the worker compiles before it is ready, and images stay those of eager."""
    from ldm.pipeline import GenerationRow
    from ldm.random_model import write_random_model
    from ldm_serve.settings import Settings
    from worker.main import load_model

    ckpt = write_random_model(tmp_path / "model")
    eager = load_model(Settings(model_path=ckpt, backend="eager"))
    assert not isinstance(eager.model.unet, CompiledUNet)
    compiled = load_model(Settings(model_path=ckpt, backend="torchscript", compile_cache_dir=tmp_path / "cache"))
    assert any((tmp_path / "cache").rglob("*")), "no compiled artifact was cached"
    row = GenerationRow("a red circle", 3, "", 4, 5.0, 0.0)
    (a,) = eager.generate([row], eager.default_size, eager.default_size)
    (b,) = compiled.generate([row], compiled.default_size, compiled.default_size)
    assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


def test_worker_exports_rows_padded_inside_a_bucketed_backend() -> None:
    """Rows a bucketed backend pads below the engine reach ``ldm_engine_padded_rows_total``."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from worker.metrics import WorkerMetrics

    unet = make_unet()
    counter = PaddedRowCounter()
    runner = BucketedRunner(lambda size, example: PaddingRunner(UNetCall(unet), size), buckets=(4,), counter=counter)
    compiled = CompiledUNet(unet, runner, backend="cudagraphs", padded_rows=counter)
    pipeline = SimpleNamespace(name="m", model=SimpleNamespace(unet=compiled))
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    assert metrics.export_backend_padding(pipeline)
    with torch.no_grad():
        for rows in (3, 1, 4):
            x, t, c = example_unet_inputs(unet, UNetShapes(rows, 8, 8, 5), torch.device("cpu"), torch.float32)
            assert compiled(x, t, context=c).shape[0] == rows
    assert registry.get_sample_value("ldm_engine_padded_rows_total", {"model": "m"}) == 1 + 3 + 0
    eager = SimpleNamespace(name="m", model=SimpleNamespace(unet=unet))
    assert not WorkerMetrics(CollectorRegistry()).export_backend_padding(eager)


def test_resolve_backend_auto_by_device() -> None:
    from ldm.backends import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torchscript"
    assert resolve_backend("auto", torch.device("cuda")) == "eager"
    assert resolve_backend("inductor", torch.device("cpu")) == "inductor"
    with pytest.raises(ConfigError, match="unknown execution backend"):
        resolve_backend("fast", torch.device("cpu"))


def test_worker_default_backend_is_torchscript_on_cpu_and_falls_back_to_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``LDM_BACKEND`` unset (auto): the CPU worker traces; if tracing fails it runs eager and says so."""
    import ldm.backends
    from ldm.random_model import write_random_model
    from ldm_serve.settings import Settings
    from worker.main import load_model

    ckpt = write_random_model(tmp_path / "model")
    assert Settings().backend == "auto"
    pipe = load_model(Settings(model_path=ckpt, compile_cache_dir=tmp_path / "cache"))
    assert isinstance(pipe.model.unet, CompiledUNet) and pipe.model.unet.backend == "torchscript"

    def broken(*args, **kwargs):
        raise RuntimeError("tracing failed")

    monkeypatch.setattr(ldm.backends, "apply_backend", broken)
    with caplog.at_level("WARNING", logger="ldm_serve.worker"):
        fallback = load_model(Settings(model_path=ckpt, compile_cache_dir=tmp_path / "cache"))
    assert not isinstance(fallback.model.unet, CompiledUNet)
    assert "backend auto: torchscript failed (RuntimeError: tracing failed); running eager" in caplog.text
    with pytest.raises(RuntimeError, match="tracing failed"):  # a backend asked for by name never falls back
        load_model(Settings(model_path=ckpt, backend="torchscript", compile_cache_dir=tmp_path / "cache"))
