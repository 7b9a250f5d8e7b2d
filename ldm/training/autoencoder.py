"""First stage: train the KL autoencoder on procedural scenes.

Loss per batch (no perceptual or adversarial term; the scenes are flat colours
and sharp edges, which a pixel loss already reproduces)::

    rec  = mean |x - D(z)|          (or mean (x - D(z))^2 with loss="l2"), z ~ q(z | x)
    kl   = mean_b  KL(q(z | x_b) || N(0, I)) / (3 H W)
    loss = rec + kl_weight * kl

Both terms are divided by the number of image elements, so ``kl_weight`` has the
same relative weight as the original ``LPIPSWithDiscriminator(kl_weight=1e-6)``,
whose reconstruction and KL terms are both sums per image.

Training may run on random crops (``crop``): the autoencoder is fully
convolutional, and a 32x32 crop costs a quarter of a 64x64 image. Crop offsets
are multiples of the downsampling factor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ldm.autoencoder import AutoencoderKL, build_first_stage
from ldm.config import AutoencoderConfig
from ldm.training.data import random_crops, scene_batch, step_generator
from ldm.training.optim import learning_rate, make_optimizer, set_learning_rate

__all__ = [
    "AutoencoderTrainConfig",
    "AutoencoderTrainer",
    "DecoderFinetuneConfig",
    "DecoderFinetuner",
    "autoencoder_loss",
    "psnr",
    "reconstruct",
]


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    """Hyper-parameters of the autoencoder stage."""

    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = 1e-6
    crop: int | None = 32  # None = full 64x64 images
    grad_clip: float = 1.0


def autoencoder_loss(
    ae: AutoencoderKL,
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    kind: Literal["l1", "l2"] = "l1",
    kl_weight: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of ``ae`` on images ``x`` ``[B, 3, H, W]`` in ``[-1, 1]``; returns ``(loss, parts)``."""
    posterior = ae.encode(x)  # q(z | x) over [B, 4, H/f, W/f]
    z = posterior.sample(generator)
    rec = ae.decode(z)  # [B, 3, H, W]
    err = rec - x
    rec_loss = err.abs().mean() if kind == "l1" else err.pow(2).mean()
    # KL(N(mu, var) || N(0, 1)) summed over latent elements, per image
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).flatten(1).sum(1)
    kl = kl.mean() / x[0].numel()
    loss = rec_loss + kl_weight * kl
    return loss, {"loss": float(loss.detach()), "rec": float(rec_loss.detach()), "kl": float(kl.detach())}


@torch.no_grad()
def reconstruct(ae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """``D(mean of q(z | x))`` clamped to ``[-1, 1]``, on ``x``'s device."""
    rec = ae.decode(ae.encode(x.to(ae.quant_conv.weight.device)).mode()).clamp(-1.0, 1.0)
    return rec.to(x.device)


@torch.no_grad()
def psnr(ae: AutoencoderKL, x: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1] after clamping) of reconstructions from the posterior mean."""
    rec = reconstruct(ae, x)
    mse = ((rec - x) / 2.0).pow(2).flatten(1).mean(1).clamp_min(1e-10)  # per image, [0, 1] scale
    return float((10.0 * torch.log10(1.0 / mse)).mean())


class AutoencoderTrainer:
    """The autoencoder, its optimizer and the step counter.

    Args:
        model_config: architecture (``kind="kl"``).
        train_config: hyper-parameters.
        seed: seeds the initial weights and every step's crops / posterior samples.
        data_seed: scene stream of the training data.
        device: where the model trains; every random draw still happens on the CPU,
            so a run draws the same data and noise on any device.
    """

    def __init__(
        self,
        model_config: AutoencoderConfig,
        train_config: AutoencoderTrainConfig,
        *,
        seed: int,
        data_seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.model_config = model_config
        self.config = train_config
        self.seed = seed
        self.data_seed = data_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae = build_first_stage(model_config)
        if not isinstance(ae, AutoencoderKL):
            raise ValueError("only KL autoencoders are trained here")
        self.device = torch.device(device)
        self.model: AutoencoderKL = ae.to(self.device)
        self.optimizer = make_optimizer(ae.parameters(), train_config.lr, train_config.weight_decay)
        self.step = 0

    def batch(self, step: int) -> torch.Tensor:
        """The (cropped) training images of ``step``: ``[B, 3, crop, crop]``."""
        images, _ = scene_batch(self.data_seed, step * self.config.batch_size, self.config.batch_size)
        if self.config.crop is None:
            return images
        gen = step_generator(self.seed, "autoencoder", step)
        return random_crops(images, self.config.crop, gen, self.model_config.downsample_factor)

    def train_step(self, x: torch.Tensor, generator: torch.Generator) -> dict[str, float]:
        """One optimizer step on images ``x``; advances :attr:`step`. Returns the loss parts and the rate."""
        self.model.train()
        lr = learning_rate(self.step, self.config.steps, self.config.lr, self.config.warmup_steps)
        set_learning_rate(self.optimizer, lr)
        loss, parts = autoencoder_loss(
            self.model, x.to(self.device), generator, kind=self.config.loss, kl_weight=self.config.kl_weight
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        if not math.isfinite(parts["loss"]):
            raise FloatingPointError(f"autoencoder loss is {parts['loss']} at step {self.step}")
        return {**parts, "lr": lr, "grad_norm": float(grad_norm)}

    def next_step(self) -> dict[str, float]:
        """Train on the batch and noise of the current step (deterministic per seed and step)."""
        x = self.batch(self.step)
        # the crop above used draws from its own generator; the posterior noise gets a fresh one
        gen = step_generator(self.seed + 1, "autoencoder", self.step)
        return self.train_step(x, gen)

    def state_dict(self) -> dict[str, object]:
        """Weights, optimizer state and step, for resuming."""
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output."""
        self.model.load_state_dict(state["model"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[call-overload]


@dataclass(frozen=True)
class DecoderFinetuneConfig:
    """Hyper-parameters of the decoder fine-tune (stage 3).

    Like Stability's ``sd-vae-ft-mse``: the encoder (and so every latent the
    diffusion model was trained on) stays fixed; only ``post_quant_conv`` and the
    decoder are trained further, on full images with an L2 (+ L1) pixel loss,
    which sharpens colours and edges without touching the latent space.

    ``latent_noise`` also makes the decoder robust to what a sampler delivers:
    latents a little off the encoder's manifold. Row ``b`` is decoded from
    ``z_b + u_b * latent_noise * latent_std * e`` (``u_b ~ U(0, 1)``, ``e ~ N(0, I)``)
    and must still give the clean image. Without it, latent noise of 0.2 standard
    deviations (smaller than a 25-step sampler's residual error on a short-trained
    model) decodes to coloured speckles all over the background.
    """

    steps: int = 0  # 0 = no fine-tune
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 50
    l1_weight: float = 0.5  # loss = mse + l1_weight * l1
    scene_offset: int = 50_000_000  # scenes of the stream the first two stages never reach
    grad_clip: float = 1.0
    latent_noise: float = 0.0  # max noise, in latent standard deviations (0 = plain fine-tune)


class DecoderFinetuner:
    """Fine-tunes the decoder of a trained autoencoder in place; the encoder is frozen.

    Args:
        autoencoder: the trained first stage (modified in place).
        config: hyper-parameters.
        seed: seeds every step's posterior samples and latent noise.
        data_seed: scene stream (scenes ``scene_offset + step * B ...``).
        latent_std: standard deviation of the unscaled latents (``1 / scale_factor``),
            the unit of ``config.latent_noise``.
    """

    def __init__(
        self,
        autoencoder: AutoencoderKL,
        config: DecoderFinetuneConfig,
        *,
        seed: int,
        data_seed: int,
        latent_std: float = 1.0,
    ) -> None:
        self.model = autoencoder
        self.latent_std = latent_std
        self.config = config
        self.seed = seed
        self.data_seed = data_seed
        autoencoder.requires_grad_(False)
        self.trained = [*autoencoder.post_quant_conv.parameters(), *autoencoder.decoder.parameters()]
        for p in self.trained:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(self.trained, config.lr, 0.0)
        self.step = 0

    def next_step(self) -> dict[str, float]:
        """One optimizer step on the batch and noise of the current step."""
        cfg = self.config
        images, _ = scene_batch(self.data_seed, cfg.scene_offset + self.step * cfg.batch_size, cfg.batch_size)
        x = images.to(self.model.quant_conv.weight.device)
        gen = step_generator(self.seed, "decoder", self.step)
        lr = learning_rate(self.step, cfg.steps, cfg.lr, cfg.warmup_steps)
        set_learning_rate(self.optimizer, lr)
        self.model.eval()  # no dropout / norm statistics to update; the encoder is only evaluated
        with torch.no_grad():
            z = self.model.encode(x).sample(gen)  # [B, 4, H/f, W/f], as the diffusion stage saw them
            if cfg.latent_noise > 0:
                u = torch.rand(z.shape[0], 1, 1, 1, generator=gen)  # [B, 1, 1, 1]
                noise = torch.randn(z.shape, generator=gen)
                z = z + (u * cfg.latent_noise * self.latent_std * noise).to(z.device)
        err = self.model.decode(z) - x
        mse, l1 = err.pow(2).mean(), err.abs().mean()
        loss = mse + cfg.l1_weight * l1
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"decoder fine-tune loss is {value} at step {self.step}")
        return {"loss": value, "mse": float(mse.detach()), "l1": float(l1.detach()), "lr": lr, "grad_norm": float(grad_norm)}

    def state_dict(self) -> dict[str, object]:
        """Decoder weights, optimizer state and step, for resuming."""
        decoder = {k: v for k, v in self.model.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
        return {"step": self.step, "decoder": decoder, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output."""
        result = self.model.load_state_dict(state["decoder"], strict=False)  # type: ignore[arg-type]
        stray = [k for k in result.missing_keys if not k.startswith(("encoder.", "quant_conv."))]
        if stray or result.unexpected_keys:
            raise ValueError(f"decoder state does not fit: missing {stray}, unexpected {result.unexpected_keys}")
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[call-overload]
