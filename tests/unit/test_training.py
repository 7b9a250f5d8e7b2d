"""Training code of the bundled model: losses fall, EMA maths, caption dropout, scale
factor, export through the public loader, and resume == uninterrupted run."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ldm.data.shapes import parse_caption, vocab_tokens, write_vocab
from ldm.loading.config_yaml import model_config_from_yaml, model_config_to_yaml
from ldm.pipeline import load_pipeline
from ldm.tokenizers import BertTokenizer
from ldm.training.autoencoder import AutoencoderTrainer
from ldm.training.data import mixed_scene_batch, scene_batch, step_generator
from ldm.training.diffusion import LatentDiffusionTrainer, drop_captions
from ldm.training.ema import ExponentialMovingAverage
from ldm.training.export import export_model
from ldm.training.presets import SMOKE
from ldm.training.run import RunOptions, run_training

PROMPT = "a big red circle in the centre, on a white background"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizer:
    return BertTokenizer.from_dir(write_vocab(tmp_path_factory.mktemp("tok")).parent)


def ae_trainer(**changes: object) -> AutoencoderTrainer:
    cfg = dataclasses.replace(SMOKE.autoencoder, **changes)
    return AutoencoderTrainer(SMOKE.model.first_stage, cfg, seed=0, data_seed=3)


def ldm_trainer(tokenizer: BertTokenizer, **changes: object) -> LatentDiffusionTrainer:
    ae = AutoencoderTrainer(SMOKE.model.first_stage, SMOKE.autoencoder, seed=0, data_seed=3).model
    cfg = dataclasses.replace(SMOKE.diffusion, **changes)
    return LatentDiffusionTrainer(SMOKE.model, cfg, ae, tokenizer, seed=0, data_seed=3)


def roundtrip(state: dict[str, object]) -> dict[str, object]:
    """Through torch.save / torch.load(weights_only=True), as the run's state files go."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------ losses decrease (overfit)


def test_autoencoder_loss_falls_on_a_fixed_batch() -> None:
    trainer = ae_trainer(steps=30, lr=2e-3, warmup_steps=1, crop=8)
    x = trainer.batch(0)  # [2, 3, 8, 8] crops
    losses = [trainer.train_step(x, torch.Generator().manual_seed(0))["rec"] for _ in range(30)]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]


def test_diffusion_loss_falls_on_a_fixed_batch_and_noise(tokenizer: BertTokenizer) -> None:
    trainer = ldm_trainer(tokenizer, steps=30, lr=1e-3, warmup_steps=1)
    images, captions = scene_batch(3, 0, 1)
    # same generator seed every step: same latent sample, timesteps, noise and dropout
    losses = [trainer.train_step(images, captions, torch.Generator().manual_seed(1))["loss"] for _ in range(30)]
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]


# ------------------------------------------------------------------ pieces


def test_ema_follows_the_litema_rule() -> None:
    layer = nn.Linear(2, 2)
    ema = ExponentialMovingAverage({"m": layer}, decay=0.9)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    w1 = layer.weight.detach().clone()
    ema.update()  # n = 1: d = min(0.9, 2 / 11)
    d1 = 2.0 / 11.0
    expected = w0 - (1 - d1) * (w0 - w1)
    torch.testing.assert_close(ema.averaged("m")["weight"], expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.weight.mul_(-2.0)
    ema.update()  # n = 2: d = min(0.9, 3 / 12)
    d2 = 3.0 / 12.0
    expected = expected - (1 - d2) * (expected - layer.weight.detach())
    torch.testing.assert_close(ema.averaged("m")["weight"], expected, rtol=0, atol=1e-6)
    ema.num_updates = 10_000
    assert ema.current_decay() == pytest.approx(0.9)  # the warm-up term no longer binds

    fresh = ExponentialMovingAverage({"m": nn.Linear(2, 2)}, decay=0.5)
    fresh.load_state_dict(roundtrip(ema.state_dict()))
    assert fresh.num_updates == 10_000 and fresh.decay == 0.9
    torch.testing.assert_close(fresh.averaged("m")["weight"], expected, rtol=0, atol=0)


def test_caption_dropout_rate_and_replacement() -> None:
    captions = [f"caption {i}" for i in range(20_000)]
    kept = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    dropped = [i for i, c in enumerate(kept) if c == ""]
    assert 0.09 < len(dropped) / len(captions) < 0.11
    assert all(kept[i] == captions[i] for i in range(len(captions)) if kept[i])
    assert drop_captions(captions[:50], 0.0, torch.Generator().manual_seed(0)) == captions[:50]
    assert drop_captions(captions[:50], 1.0, torch.Generator().manual_seed(0)) == [""] * 50


def test_step_generators_depend_only_on_seed_stage_and_step() -> None:
    draw = lambda seed, stage, step: torch.rand(4, generator=step_generator(seed, stage, step))  # noqa: E731
    assert torch.equal(draw(0, "diffusion", 5), draw(0, "diffusion", 5))
    assert not torch.equal(draw(0, "diffusion", 5), draw(0, "diffusion", 6))
    assert not torch.equal(draw(0, "diffusion", 5), draw(1, "diffusion", 5))
    assert not torch.equal(draw(0, "diffusion", 5), draw(0, "autoencoder", 5))


def test_scale_factor_is_inverse_std_of_the_first_latent_batch(tokenizer: BertTokenizer) -> None:
    trainer = ldm_trainer(tokenizer)
    images, captions = scene_batch(3, 0, 4)
    trainer.train_step(images, captions, torch.Generator().manual_seed(9))
    # the step's first draw is the posterior sample of the batch
    with torch.no_grad():
        z = trainer.autoencoder.encode(images).sample(torch.Generator().manual_seed(9))
    assert trainer.scale_factor == pytest.approx(1.0 / float(z.flatten().std()), rel=1e-5)
    assert float((z * trainer.scale_factor).std()) == pytest.approx(1.0, rel=1e-5)
    first = trainer.scale_factor
    trainer.train_step(*scene_batch(3, 4, 4), torch.Generator().manual_seed(10))
    assert trainer.scale_factor == first  # fixed after the first batch


# ------------------------------------------------------------------ resume determinism


def test_autoencoder_resume_matches_an_uninterrupted_run() -> None:
    straight = ae_trainer(steps=4)
    losses = [straight.next_step()["loss"] for _ in range(4)]
    first = ae_trainer(steps=4)
    first.next_step(), first.next_step()
    resumed = ae_trainer(steps=4)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.step == 2
    assert [resumed.next_step()["loss"] for _ in range(2)] == losses[2:]
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_diffusion_resume_matches_an_uninterrupted_run(tokenizer: BertTokenizer) -> None:
    straight = ldm_trainer(tokenizer)
    losses = [straight.next_step()["loss"] for _ in range(4)]
    first = ldm_trainer(tokenizer)
    first.next_step(), first.next_step()
    resumed = ldm_trainer(tokenizer)
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.step == 2 and resumed.scale_factor == straight.scale_factor
    assert [resumed.next_step()["loss"] for _ in range(2)] == losses[2:]
    for a, b in zip(straight.ema_weights(), resumed.ema_weights(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stage", ["ldm", "binding-1"])
def test_interrupted_run_resumes_to_the_same_export(tmp_path: Path, stage: str) -> None:
    def options(out: Path, resume: bool = False) -> RunOptions:
        return RunOptions(out=out, preset="smoke", ae_steps=3, ldm_steps=4, binding_steps=(4,), checkpoint_every=2,
                          log_every=1, resume=resume)  # fmt: skip

    straight = run_training(options(tmp_path / "a"), log=lambda line: None)

    def crash_after_step_3(line: str) -> None:
        if line.startswith(f"[{stage}] step 3/"):
            raise _Interrupt
    with pytest.raises(_Interrupt):
        run_training(options(tmp_path / "b"), log=crash_after_step_3)
    with pytest.raises(FileExistsError):
        run_training(options(tmp_path / "b"), log=lambda line: None)
    lines: list[str] = []
    resumed = run_training(options(tmp_path / "b", resume=True), log=lines.append)
    assert f"[{stage}] resumed at step 2" in lines and "[ae] resumed at step 3" in lines
    a, b = load_file(str(straight.checkpoint)), load_file(str(resumed.checkpoint))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ export


@pytest.fixture(scope="module")
def smoke_export(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("smoke")
    return run_training(RunOptions(out=out, preset="smoke", ae_steps=2, ldm_steps=2), log=lambda line: None)


def test_export_is_the_original_layout(smoke_export) -> None:
    sd = load_file(str(smoke_export.checkpoint))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
    roots = {k for k in sd if not k.startswith(prefixes)}
    assert roots == {"scale_factor", "betas", "alphas_cumprod", "global_step"}
    assert {k.split(".")[0] for k in sd if k.startswith(prefixes)} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(v.dtype == torch.float16 for k, v in sd.items() if k.startswith(prefixes) and v.is_floating_point())
    assert sd["scale_factor"].dtype == torch.float32
    assert int(sd["global_step"]) == 2 + SMOKE.binding[0].steps  # stage 2 + stage 2b
    vocab = (smoke_export.tokenizer_dir / "vocab.txt").read_text().splitlines()
    assert vocab == vocab_tokens()
    card = smoke_export.model_card.read_text()
    assert "shapes-ldm-f4" in card and "Stage 2b (binding), round 1: 2 more diffusion steps" in card


def test_exported_yaml_round_trips(smoke_export) -> None:
    text = smoke_export.config.read_text()
    cfg = model_config_from_yaml(smoke_export.config)
    assert model_config_to_yaml(cfg) == text
    scale = float(load_file(str(smoke_export.checkpoint))["scale_factor"])
    assert cfg == dataclasses.replace(SMOKE.model, scale_factor=scale, scale_by_std=True, use_ema=False)


def test_export_loads_through_the_pipeline_and_generates(smoke_export) -> None:
    import json

    pipe = load_pipeline(smoke_export.checkpoint)
    meta = json.loads(smoke_export.metadata.read_text())
    assert meta["untrained"] is False and meta["training"]["ldm_steps"] == 2 and meta["data_seed"] == 7
    assert pipe.name == "shapes-ldm-f4" and not pipe.untrained
    assert pipe.model.scale_factor == pytest.approx(meta["scale_factor"])
    result = pipe.txt2img(PROMPT, seeds=0, steps=2, guidance_scale=5.0)
    assert result.images[0].size == (64, 64)


def test_export_holds_the_ema_weights(tmp_path: Path, tokenizer: BertTokenizer) -> None:
    trainer = ldm_trainer(tokenizer, ema_decay=0.5)
    for _ in range(3):
        trainer.next_step()
    unet_ema, text_ema = trainer.ema_weights()
    exported = export_model(
        tmp_path, SMOKE.model, unet=unet_ema, first_stage=trainer.autoencoder.state_dict(),
        cond_stage=text_ema, scale_factor=trainer.scale_factor or 1.0, metadata={"name": "ema-test"}, fp16=False,
    )  # fmt: skip
    pipe = load_pipeline(exported.checkpoint)
    loaded_unet, loaded_text = pipe.model.unet.state_dict(), pipe.model.cond_stage.state_dict()
    assert all(torch.equal(loaded_unet[k], v) for k, v in unet_ema.items())
    assert all(torch.equal(loaded_text[k], v) for k, v in text_ema.items())
    raw = trainer.unet.state_dict()
    assert any(not torch.equal(raw[k], v) for k, v in unet_ema.items())  # EMA != raw weights


def test_cli_writes_the_export(tmp_path: Path) -> None:
    from tests.scripts import load_script

    cli = load_script("tools/train_bundled_model.py")
    out = tmp_path / "run"
    assert cli.main(["--out", str(out), "--preset", "smoke", "--ae-steps", "1", "--ldm-steps", "1",
                     "--threads", "1", "--name", "cli-model"]) == 0  # fmt: skip
    meta = (out / "cli-model.json").read_text()
    assert '"ldm_steps": 1' in meta and "--preset smoke" in meta
    assert (out / "cli-model.safetensors").is_file() and (out / "cli-model.yaml").is_file()
    assert (out / "train_state" / "diffusion.pt").is_file()


# ------------------------------------------------------------------ stage 2b: binding


def test_mixed_scene_batch_draws_the_asked_share_of_two_object_scenes() -> None:
    images, captions = mixed_scene_batch(11, 0, 400, 0.75)
    assert images.shape == (400, 3, 64, 64)
    two = sum(len(parse_caption(c).objects) == 2 for c in captions)
    assert 0.68 * 400 < two < 0.82 * 400
    again, captions_again = mixed_scene_batch(11, 100, 20, 0.75)  # a pure function of (stream, index)
    assert captions_again == captions[100:120] and torch.equal(again, images[100:120])
    _, only_two = mixed_scene_batch(11, 0, 30, 1.0)
    _, only_one = mixed_scene_batch(11, 0, 30, 0.0)
    assert all(len(parse_caption(c).objects) == 2 for c in only_two)
    assert all(len(parse_caption(c).objects) == 1 for c in only_one)
    with pytest.raises(ValueError, match="two_object_prob"):
        mixed_scene_batch(11, 0, 2, 1.5)


def test_binding_stage_starts_at_the_previous_ema_weights(tokenizer: BertTokenizer) -> None:
    first = ldm_trainer(tokenizer, ema_decay=0.5)
    for _ in range(3):
        first.next_step()
    unet_ema, text_ema = first.ema_weights()
    bind = ldm_trainer(tokenizer, two_object_prob=1.0)
    bind.start_from(first)
    assert bind.step == 0 and bind.scale_factor == first.scale_factor
    assert all(torch.equal(bind.unet.state_dict()[k], v) for k, v in unet_ema.items())
    assert all(torch.equal(bind.text_encoder.state_dict()[k], v) for k, v in text_ema.items())
    restarted, _ = bind.ema_weights()  # the EMA restarts at the loaded weights
    assert all(torch.equal(restarted[k], v) for k, v in unet_ema.items())
    _, captions = bind.batch(0)
    assert all(len(parse_caption(c).objects) == 2 for c in captions)
    bind.next_step()
    with pytest.raises(ValueError, match="before this stage's first step"):
        bind.start_from(first)
    with pytest.raises(ValueError, match="no scale factor"):
        ldm_trainer(tokenizer).start_from(ldm_trainer(tokenizer))


def test_binding_steps_zero_skips_stage_2b(tmp_path: Path) -> None:
    import json

    lines: list[str] = []
    exported = run_training(
        RunOptions(out=tmp_path, preset="smoke", ae_steps=1, ldm_steps=2, binding_steps=(0,), log_every=1),
        log=lines.append,
    )
    assert not any(line.startswith("[binding") for line in lines)
    meta = json.loads(exported.metadata.read_text())
    assert meta["training"]["binding_steps"] == 0 and meta["training"]["binding_rounds"] == []
    assert int(load_file(str(exported.checkpoint))["global_step"]) == 2
    assert "Stage 2b" not in exported.model_card.read_text()


def test_binding_rounds_chain_and_are_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from ldm.training import presets

    two_rounds = dataclasses.replace(SMOKE, binding=(SMOKE.binding[0], dataclasses.replace(SMOKE.binding[0], lr=5e-4)))
    monkeypatch.setitem(presets.PRESETS, "smoke", two_rounds)
    with pytest.raises(ValueError, match="2 stage-2b round"):
        run_training(RunOptions(out=tmp_path / "bad", preset="smoke", binding_steps=(3,)), log=lambda line: None)
    lines: list[str] = []
    exported = run_training(
        RunOptions(out=tmp_path / "ok", preset="smoke", ae_steps=1, ldm_steps=1, binding_steps=(2, 3), log_every=1),
        log=lines.append,
    )
    assert any(line.startswith("[binding-1] step 2/2") for line in lines)
    assert any(line.startswith("[binding-2] step 3/3") for line in lines)
    training = json.loads(exported.metadata.read_text())["training"]
    assert training["binding_steps"] == 5
    assert [(r["steps"], r["lr"], r["seed"], r["data_seed"]) for r in training["binding_rounds"]] == [
        (2, SMOKE.binding[0].lr, 100, 900),
        (3, 5e-4, 101, 901),
    ]
    assert int(load_file(str(exported.checkpoint))["global_step"]) == 1 + 5
    assert "round 2: 3 more diffusion steps" in exported.model_card.read_text()


def test_start_from_a_release_runs_only_the_binding_rounds(smoke_export, tmp_path: Path) -> None:
    import json

    lines: list[str] = []
    exported = run_training(
        RunOptions(out=tmp_path, preset="smoke", start_from=smoke_export.checkpoint, binding_steps=(3,), log_every=1),
        log=lines.append,
    )
    assert not any(line.startswith(("[ae]", "[ldm]", "[decoder]")) for line in lines)
    assert any(line.startswith("[binding-1] step 3/3") for line in lines)
    source, result = load_file(str(smoke_export.checkpoint)), load_file(str(exported.checkpoint))
    first_stage = [k for k in source if k.startswith("first_stage_model.")]
    assert first_stage and all(torch.equal(source[k], result[k]) for k in first_stage)  # autoencoder kept
    assert torch.equal(source["scale_factor"], result["scale_factor"])
    unet = [k for k in source if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(source[k], result[k]) for k in unet)  # trained further
    before, after = json.loads(smoke_export.metadata.read_text()), json.loads(exported.metadata.read_text())
    assert after["training"]["ae_steps"] == before["training"]["ae_steps"]  # stages 1-3 still described
    assert [r["steps"] for r in after["training"]["binding_rounds"]] == [SMOKE.binding[0].steps, 3]
    assert int(result["global_step"]) == before["training"]["ldm_steps"] + SMOKE.binding[0].steps + 3
    assert after["started_from"] == str(smoke_export.checkpoint)
    pipe = load_pipeline(exported.checkpoint)
    assert pipe.txt2img(PROMPT, seeds=0, steps=2, guidance_scale=5.0).images[0].size == (64, 64)


def test_start_from_a_release_begins_at_its_weights(smoke_export, tokenizer: BertTokenizer) -> None:
    sd = load_file(str(smoke_export.checkpoint))
    bind = ldm_trainer(tokenizer, two_object_prob=0.75)
    unet = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
    text = {k.removeprefix("cond_stage_model."): v for k, v in sd.items() if k.startswith("cond_stage_model.")}
    bind.start_from_weights(unet, text, float(sd["scale_factor"]))
    loaded = bind.unet.state_dict()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()) for k, v in unet.items())
    assert bind.scale_factor == pytest.approx(float(sd["scale_factor"]))


# ------------------------------------------------------------------ decoder fine-tune (stage 3)


def test_decoder_finetune_trains_only_the_decoder_and_resumes_exactly() -> None:
    from ldm.training.autoencoder import DecoderFinetuneConfig, DecoderFinetuner

    cfg = DecoderFinetuneConfig(steps=4, batch_size=2, lr=1e-3, warmup_steps=1)
    ae = ae_trainer().model
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    tuner = DecoderFinetuner(ae, cfg, seed=0, data_seed=3)
    tuner.next_step()
    tuner.next_step()
    after = ae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)  # the latent space is unchanged
    assert any(not torch.equal(before[k], after[k]) for k in trained)

    # resume from the saved state == an uninterrupted run
    saved = roundtrip(tuner.state_dict())
    tuner.next_step()
    tuner.next_step()
    straight = {k: v.clone() for k, v in ae.state_dict().items()}
    other = ae_trainer().model
    resumed = DecoderFinetuner(other, cfg, seed=0, data_seed=3)
    resumed.load_state_dict(saved)
    resumed.next_step()
    resumed.next_step()
    assert all(torch.equal(straight[k], v) for k, v in other.state_dict().items())

    with pytest.raises(ValueError, match="does not fit"):
        resumed.load_state_dict({**saved, "decoder": {"decoder.bogus": torch.zeros(1)}})
