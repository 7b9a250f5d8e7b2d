"""Second stage: train the text-conditioned latent diffusion model.

The recipe of the paper's text-to-image LDM, at our scale:

* the trained KL autoencoder is frozen; a training latent is a posterior sample
  ``z = scale_factor * E(x).sample()`` (``get_first_stage_encoding``);
* ``scale_factor = 1 / std(z)`` over the first batch of unscaled latents, as the
  original ``scale_by_std`` models compute it in ``on_train_batch_start``; it is
  stored in the checkpoint as the root buffer ``scale_factor``;
* epsilon prediction on the LDM ``"linear"`` schedule (``linspace(sqrt(b_1),
  sqrt(b_T), T) ** 2``) with ``T = 1000``, ``t ~ U{0, ..., T - 1}``:
  ``x_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps``, loss ``mean (eps - eps_theta(x_t, t, c))^2``,
  optionally weighted per timestep by ``min(SNR_t, gamma) / SNR_t`` with
  ``SNR_t = abar_t / (1 - abar_t)`` (Min-SNR-gamma, Hang et al. 2023): the
  network still predicts epsilon, but the nearly-clean timesteps, whose loss is
  large and teaches little about layout, weigh less, which speeds up short runs;
* the BERT-style text encoder is trained jointly from scratch (``cond_stage_trainable``);
* for classifier-free guidance the caption is replaced by ``""`` with probability
  ``uncond_prob`` (0.1), the same empty prompt the sampler uses for the unconditional half;
* an EMA (:class:`~ldm.training.ema.ExponentialMovingAverage`) of the UNet **and**
  the text encoder is kept; the exported model holds the EMA weights as its
  released weights (see :mod:`ldm.training.export`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ldm.attention import SpatialTransformer
from ldm.autoencoder import AutoencoderKL
from ldm.config import ModelConfig
from ldm.encoders import build_cond_stage_model
from ldm.noise_schedule import alphas_cumprod, make_beta_schedule
from ldm.tokenizers import TextTokenizer
from ldm.training.data import mixed_scene_batch, scene_batch, step_generator
from ldm.training.ema import ExponentialMovingAverage
from ldm.training.optim import learning_rate, make_optimizer, set_learning_rate
from ldm.unet import ResBlock, UNetModel

__all__ = [
    "DiffusionTrainConfig",
    "LatentDiffusionTrainer",
    "diffusion_loss",
    "drop_captions",
    "zero_init_like_original",
]


@dataclass(frozen=True)
class DiffusionTrainConfig:
    """Hyper-parameters of the diffusion stage."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    uncond_prob: float = 0.1
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    min_snr_gamma: float | None = None  # None = the plain (unweighted) simple loss
    two_object_prob: float | None = None  # None = the generator's own 50/50 mix (scene_batch)


def drop_captions(captions: Sequence[str], prob: float, generator: torch.Generator) -> list[str]:
    """Replace each caption by ``""`` with probability ``prob`` (one uniform draw per caption)."""
    keep = torch.rand(len(captions), generator=generator) >= prob
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def zero_init_like_original(unet: UNetModel) -> None:
    """Zero the layers the original wraps in ``zero_module``: every ResBlock's last conv,
    every SpatialTransformer's ``proj_out`` and the UNet's output conv, so that each
    residual branch (and the initial prediction) starts at zero."""
    layers: list[nn.Module] = [unet.out[-1]]
    for module in unet.modules():
        if isinstance(module, ResBlock):
            layers.append(module.out_layers[-1])
        elif isinstance(module, SpatialTransformer):
            layers.append(module.proj_out)
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.zero_()


def diffusion_loss(
    unet: UNetModel,
    text_encoder: nn.Module,
    z0: torch.Tensor,
    input_ids: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Simple epsilon loss ``mean (eps - eps_theta(x_t, t, tau(y)))^2``, Min-SNR weighted if asked.

    Args:
        z0: scaled latents ``[B, C, h, w]``.
        input_ids: token ids ``[B, L]``.
        t: ``[B]`` int64 timesteps in ``[0, T)``.
        noise: ``eps`` ``[B, C, h, w]``.
        alphas_cumprod: ``[T]`` float32 ``abar``.
        min_snr_gamma: weight row ``b`` by ``min(SNR_t, gamma) / SNR_t``; ``None`` = weight 1.
    """
    abar = alphas_cumprod[t].view(-1, 1, 1, 1)  # [B, 1, 1, 1]
    x_t = abar.sqrt() * z0 + (1.0 - abar).sqrt() * noise  # q(x_t | x_0)
    context = text_encoder(input_ids)  # [B, L, D]
    eps = unet(x_t, t, context)
    per_row = (eps - noise).pow(2).flatten(1).mean(1)  # [B]
    if min_snr_gamma is not None:
        snr = abar.flatten() / (1.0 - abar.flatten())  # [B]
        per_row = per_row * snr.clamp(max=min_snr_gamma) / snr
    return per_row.mean()


class LatentDiffusionTrainer:
    """UNet + text encoder (trained), frozen autoencoder, optimizer, EMA and step counter.

    Args:
        model_config: the full model (UNet, BERTEmbedder, schedule); ``first_stage``
            must describe ``autoencoder``.
        train_config: hyper-parameters.
        autoencoder: the trained first stage (frozen here).
        tokenizer: the BERT tokenizer of ``vocab.txt``.
        seed: seeds initial weights and every step's noise, timesteps and caption dropout.
        data_seed: scene stream of the training data.
        device: where UNet, text encoder and autoencoder run; every random draw
            happens on the CPU, so a run draws the same data and noise on any device.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: DiffusionTrainConfig,
        autoencoder: AutoencoderKL,
        tokenizer: TextTokenizer,
        *,
        seed: int,
        data_seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        if model_config.cond_stage is None:
            raise ValueError("the diffusion trainer needs a text encoder (cond_stage)")
        self.model_config = model_config
        self.config = train_config
        self.seed = seed
        self.data_seed = data_seed
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.autoencoder = autoencoder.to(self.device).eval().requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.unet = UNetModel(model_config.unet)
            zero_init_like_original(self.unet)
            self.text_encoder = build_cond_stage_model(model_config.cond_stage)
        self.unet.to(self.device)
        self.text_encoder.to(self.device)
        params = [*self.unet.parameters(), *self.text_encoder.parameters()]
        self.optimizer = make_optimizer(params, train_config.lr, train_config.weight_decay)
        self.ema = ExponentialMovingAverage(
            {"unet": self.unet, "text_encoder": self.text_encoder}, train_config.ema_decay
        )
        betas = make_beta_schedule(
            model_config.beta_schedule, model_config.timesteps, model_config.linear_start, model_config.linear_end
        )
        self.alphas_cumprod = alphas_cumprod(betas).to(self.device)  # [T] float32
        self.scale_factor: float | None = None
        self.step = 0

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Unscaled posterior samples ``E(x).sample()`` ``[B, C, h, w]``."""
        return self.autoencoder.encode(images.to(self.device)).sample(generator)

    def set_scale_factor(self, latents: torch.Tensor) -> float:
        """``scale_factor = 1 / std(latents)`` (all elements); stored and returned."""
        self.scale_factor = float(1.0 / latents.flatten().std())
        return self.scale_factor

    def batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """Images ``[B, 3, 64, 64]`` and captions of ``step``."""
        start, count = step * self.config.batch_size, self.config.batch_size
        if self.config.two_object_prob is None:
            return scene_batch(self.data_seed, start, count)
        return mixed_scene_batch(self.data_seed, start, count, self.config.two_object_prob)

    def start_from(self, previous: LatentDiffusionTrainer) -> None:
        """Begin a further stage at ``previous``'s EMA weights (UNet and text encoder) and scale factor."""
        if previous.scale_factor is None:
            raise ValueError("the previous stage has no scale factor yet (it ran no step)")
        unet_sd, text_sd = previous.ema_weights()
        self.start_from_weights(unet_sd, text_sd, previous.scale_factor)

    def start_from_weights(
        self, unet: Mapping[str, torch.Tensor], text_encoder: Mapping[str, torch.Tensor], scale_factor: float
    ) -> None:
        """Begin this stage at the given UNet and text-encoder weights (e.g. a released checkpoint's).

        The optimizer starts fresh (this stage has its own learning-rate schedule) and
        the EMA restarts at the loaded weights, so it averages this stage's steps only.
        Weights are cast to float32 (an fp16 release trains in full precision).
        """
        if self.step:
            raise ValueError(f"start_from must come before this stage's first step (it is at step {self.step})")
        self.unet.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in unet.items()})
        self.text_encoder.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in text_encoder.items()}
        )
        self.ema = ExponentialMovingAverage(
            {"unet": self.unet, "text_encoder": self.text_encoder}, self.config.ema_decay
        )
        self.scale_factor = float(scale_factor)

    def train_step(
        self, images: torch.Tensor, captions: Sequence[str], generator: torch.Generator
    ) -> dict[str, float]:
        """One optimizer step + EMA update; all noise from ``generator``. Advances :attr:`step`.

        The first call sets :attr:`scale_factor` from this batch's latents if it is unset.
        """
        self.unet.train()
        self.text_encoder.train()
        latents = self.encode(images, generator)  # [B, C, h, w]
        if self.scale_factor is None:
            self.set_scale_factor(latents)
        assert self.scale_factor is not None
        z0 = latents * self.scale_factor
        kept = drop_captions(captions, self.config.uncond_prob, generator)
        ids = self.tokenizer(kept).to(self.device)  # [B, L]
        t = torch.randint(0, self.model_config.timesteps, (z0.shape[0],), generator=generator).to(self.device)
        noise = torch.randn(z0.shape, generator=generator).to(self.device)

        lr = learning_rate(self.step, self.config.steps, self.config.lr, self.config.warmup_steps)
        set_learning_rate(self.optimizer, lr)
        loss = diffusion_loss(
            self.unet, self.text_encoder, z0, ids, t, noise, self.alphas_cumprod, self.config.min_snr_gamma
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        self.ema.update()
        self.step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"diffusion loss is {value} at step {self.step}")
        dropped = sum(1 for c in kept if not c) / len(kept)
        return {"loss": value, "lr": lr, "grad_norm": float(grad_norm), "uncond": dropped}

    def next_step(self) -> dict[str, float]:
        """Train on the data and noise of the current step (deterministic per seed and step)."""
        images, captions = self.batch(self.step)
        return self.train_step(images, captions, step_generator(self.seed, "diffusion", self.step))

    def ema_weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """EMA state dicts of the UNet and the text encoder (what gets exported)."""
        return self.ema.averaged("unet"), self.ema.averaged("text_encoder")

    def state_dict(self) -> dict[str, object]:
        """Weights, optimizer, EMA, scale factor and step, for resuming."""
        return {
            "step": self.step,
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict(),
            "scale_factor": self.scale_factor,
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict` output."""
        self.unet.load_state_dict(state["unet"])  # type: ignore[arg-type]
        self.text_encoder.load_state_dict(state["text_encoder"])  # type: ignore[arg-type]
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.ema.load_state_dict(state["ema"])  # type: ignore[arg-type]
        scale = state["scale_factor"]
        self.scale_factor = None if scale is None else float(scale)  # type: ignore[arg-type]
        self.step = int(state["step"])  # type: ignore[call-overload]
