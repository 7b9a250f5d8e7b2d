"""Text-to-image, image-to-image and inpainting over one loaded latent diffusion model.

``LatentDiffusionPipeline.generate`` is the batched primitive the worker uses:
many independent rows (prompt, seed, steps, guidance, eta, optional init image
and strength, optional inpainting mask) sampled in one DDIM run. ``txt2img``,
``img2img`` and ``inpaint`` are conveniences on top of it. A row's image depends only on the model, the row and the size, never
on its batch-mates: every random draw comes from the row's own generator.
``prepare_row`` does the same per-row work for the continuous-batching engine
(:mod:`ldm.engine`), where rows join and leave a running batch between steps.

Per-row randomness, in order (all from ``torch.Generator().manual_seed(seed)`` on
the CPU, so the same seed gives the same noise on any device):

1. ``x_T ~ N(0, I)`` of shape ``[C, H/f, W/f]``;
2. for img2img and inpainting rows whose first stage is KL: the posterior sample of
   the (masked) source image;
3. inside DDIM: mask-blend noise and eta noise per step (``ldm.sampling``).

Image-to-image (a row with ``image`` and no ``mask``) is SDEdit as the original
``scripts/img2img.py`` and diffusers' ``StableDiffusionImg2ImgPipeline``: of the row's
``n``-step schedule only the last ``k = min(int(n · strength), n)`` steps run, starting
from the source latent noised to the first of them, ``sqrt(a_t) · z0 + sqrt(1 - a_t) · x_T``
(``x_T`` being the row's first draw, so a row's noise is the same as for text-to-image).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.autoencoder import AutoencoderKL
from ldm.config import ClassEmbedderConfig, ModelConfig
from ldm.denoiser import GuidedDenoiser, UNetCallable
from ldm.execution.core_pool import (
    CorePool,
    ShardedUNet,
    coordinating,
    default_core_workers,
    run_split,
    shared_core_pool,
)
from ldm.execution.padding import PaddedUNet
from ldm.kernels import is_batch_invariant, make_batch_invariant
from ldm.loading.loader import LoadedModel, load_model
from ldm.noise_schedule import TimestepSpacing, ddim_step_count, ddim_timesteps, img2img_timesteps
from ldm.sampling import MaskBlend, StepState, latent_keep_mask, sample_ddim
from ldm.sampling.ddim import noised_latent, row_coefficients
from ldm.sampling.rows import PreparedRow
from ldm_serve.errors import ConfigError, InvalidInput
from ldm_serve.limits import ETA_MAX, GUIDANCE_SCALE_MAX, MAX_SIDE, SEED_MAX, STRENGTH_DEFAULT

__all__ = [
    "GenerationResult",
    "GenerationRow",
    "LatentDiffusionPipeline",
    "RowProgress",
    "load_pipeline",
]


@dataclass(frozen=True)
class GenerationRow:
    """One image to generate.

    Attributes:
        prompt: the text (for class-conditional models: the class id as a string).
        seed: the only source of randomness for this row.
        negative_prompt: conditioning of the unconditional half of guidance.
        steps: requested DDIM steps (see :meth:`LatentDiffusionPipeline.step_count`).
        guidance_scale: classifier-free guidance ``s``; 1 = no guidance (one UNet pass).
        eta: DDIM eta in [0, 1].
        image: img2img init image or inpainting source, any PIL mode (converted to RGB).
        mask: inpainting mask, white (>= 128 in ``L`` mode) = repaint; ``None`` with an
            ``image`` makes the row image-to-image.
        strength: img2img only, in (0, 1]: how much of the schedule runs (1 = all of it,
            from the source noised to the first step); must stay 1 for other rows.
    """

    prompt: str
    seed: int
    negative_prompt: str = ""
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 1.0

    @property
    def is_img2img(self) -> bool:
        """An init image without a mask: SDEdit from the image."""
        return self.image is not None and self.mask is None


@dataclass(frozen=True)
class RowProgress:
    """Progress of one row after a DDIM iteration."""

    row: int
    step: int
    total: int


@dataclass(frozen=True)
class GenerationResult:
    """Images and the seeds that made them (same order)."""

    images: list[Image.Image]
    seeds: list[int]


StepHook = Callable[[list[RowProgress]], Iterable[int] | None]
ImageHook = Callable[[int, Image.Image], None]


class LatentDiffusionPipeline:
    """A loaded model plus the sampling logic around it.

    Args:
        model: the components from :func:`ldm.loading.loader.load_model`.
        name: model id reported to clients.
        timestep_spacing: DDIM discretization; ``"uniform"`` is the original LDM one.
        untrained: True for random-weight models (the service says so loudly).
        batch_invariant: a row's image is bit-identical alone or batched (``None``: on
            for CPU, where oneDNN/MKL round differently per batch size; off for CUDA
            until batch-invariant kernels land there). With core workers the UNet, text
            encoder and decoder are converted to batch-invariant kernels
            (:mod:`ldm.kernels.batch_invariant`) and each worker runs its shard of rows
            as one call; without them every row is its own call.
        core_workers: CPU only: run the UNet, text encoder and decoder on this many
            threads of one core each, over rows (batch-invariant) or shards of the
            batch (see :mod:`ldm.execution.core_pool`); ``None``: torch's thread count;
            1: one call per row / batch in the calling thread with all its threads.
            A row's image depends on this setting (one-core vs multi-core kernels
            round differently) but never on its batch-mates.
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        name: str = "model",
        timestep_spacing: TimestepSpacing = "uniform",
        untrained: bool = False,
        batch_invariant: bool | None = None,
        core_workers: int | None = None,
    ) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.name = name
        self.timestep_spacing: TimestepSpacing = timestep_spacing
        self.untrained = untrained
        first_param = next(model.unet.parameters())
        self.device: torch.device = first_param.device
        self.dtype: torch.dtype = first_param.dtype
        self.downsample_factor: int = self.config.downsample_factor
        # the UNet halves the latent len(channel_mult) - 1 times and concatenates skips,
        # so latent sides must be divisible by 2^(levels - 1)
        self.size_multiple: int = self.downsample_factor * 2 ** (len(self.config.unet.channel_mult) - 1)
        self.default_size: int = self.config.default_image_size
        self.latent_channels: int = self.config.unet.out_channels
        self.max_prompt_tokens: int = model.tokenizer.max_length if model.tokenizer is not None else 0
        # False: a prompt longer than max_prompt_tokens is an InvalidInput; True: it is encoded
        # truncated (its first max_prompt_tokens - 1 tokens and the end token; prompt_warnings says so)
        self.truncate_long_prompts: bool = False
        self.inpaint_mode: Literal["concat", "blend"] = "concat" if self.config.inpaint_mode else "blend"
        self._alphas_cumprod = model.alphas_cumprod.to(torch.float32)
        self._alphas_device = self._alphas_cumprod.to(self.device)
        self.batch_invariant = self.device.type == "cpu" if batch_invariant is None else batch_invariant
        workers = default_core_workers(self.device) if core_workers is None else core_workers
        if workers < 1:
            raise ConfigError(f"core_workers must be >= 1, got {workers}")
        use_pool = workers > 1 and self.device.type == "cpu"
        self.core_pool: CorePool | None = shared_core_pool(workers) if use_pool else None
        if self.batch_invariant and self.core_pool is not None:
            # each one-core worker runs its shard of rows as one call of batch-invariant kernels
            # (ldm.kernels.batch_invariant) instead of one call per row; without a pool rows stay separate
            for part in (model.unet, model.first_stage, model.cond_stage):
                if isinstance(part, torch.nn.Module):
                    make_batch_invariant(part)

    # ------------------------------------------------------------------ validation

    @property
    def is_class_conditional(self) -> bool:
        return isinstance(self.config.cond_stage, ClassEmbedderConfig)

    @property
    def is_text_conditional(self) -> bool:
        return self.model.tokenizer is not None

    def count_prompt_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes, specials included (0 for models without text)."""
        if self.model.tokenizer is None:
            return 0
        return self.model.tokenizer.count_tokens(prompt)

    def prompt_warnings(self, row: GenerationRow) -> list[str]:
        """One line per text of ``row`` longer than the model reads, e.g.
        ``"prompt: 93 tokens, truncated to the model's 77"`` (empty when everything fits)."""
        if not self.is_text_conditional:
            return []
        out = []
        for field, text in (("prompt", row.prompt), ("negative_prompt", row.negative_prompt)):
            n = self.count_prompt_tokens(text) if isinstance(text, str) else 0
            if n > self.max_prompt_tokens:
                out.append(f"{field}: {n} tokens, truncated to the model's {self.max_prompt_tokens}")
        return out

    @property
    def guidance_range(self) -> tuple[float, float]:
        """Guidance scales :meth:`validate_row` accepts: only 1 for a model without an
        unconditional branch (unconditional, or class-conditional without a null class)."""
        if self.is_class_conditional:
            try:
                self._uncond_class_id()
            except InvalidInput:
                return (1.0, 1.0)
        elif self.config.cond_stage is None and not self.config.inpaint_mode:
            return (1.0, 1.0)
        return (0.0, GUIDANCE_SCALE_MAX)

    @property
    def job_kinds(self) -> tuple[str, ...]:
        """``"txt2img"``, ``"inpaint"`` (by mask blending) and ``"img2img"``, or only ``"inpaint"``
        for an inpainting UNet (its extra input channels need a mask and a masked image)."""
        return ("inpaint",) if self.config.inpaint_mode else ("txt2img", "inpaint", "img2img")

    @property
    def n_classes(self) -> int | None:
        """Classes of a class-conditional model (the prompt is a class id), else None."""
        cfg = self.config.cond_stage
        return cfg.n_classes if isinstance(cfg, ClassEmbedderConfig) else None

    def refused_step_counts(self, up_to: int) -> list[int]:
        """Step counts in ``1..up_to`` that this model's timestep spacing cannot make (e.g. 3 or 9
        with 'uniform' spacing over 1000 timesteps: the grid would index past the schedule)."""
        refused = []
        for steps in range(1, min(up_to, self.config.timesteps) + 1):
            try:
                self.step_count(steps)
            except InvalidInput:
                refused.append(steps)
        return refused

    def step_count(self, steps: int) -> int:
        """Real DDIM iterations for a requested step count (the original 'uniform'
        discretization runs more than ``steps`` when it does not divide 1000)."""
        return ddim_step_count(steps, self.config.timesteps, self.timestep_spacing)

    def validate_size(self, width: int, height: int) -> None:
        """Raise :class:`InvalidInput` unless both sides fit the model's geometry."""
        m = self.size_multiple
        lo = 2 * m  # the deepest UNet level needs at least 2x2 cells for its GroupNorms
        for field, value in (("width", width), ("height", height)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(field, f"must be an integer, got {value!r}")
            if value < lo or value > MAX_SIDE:
                raise InvalidInput(field, f"must be between {lo} and {MAX_SIDE} pixels, got {value}")
            if value % m:
                raise InvalidInput(
                    field,
                    f"must be a multiple of {m} for this model (latent factor {self.downsample_factor} "
                    f"x {m // self.downsample_factor} UNet downsamplings), got {value}",
                )

    def validate_row(self, row: GenerationRow, width: int, height: int) -> None:
        """Raise :class:`InvalidInput` naming the field if ``row`` cannot be generated."""
        self.validate_size(width, height)
        if not isinstance(row.seed, int) or not 0 <= row.seed <= SEED_MAX:
            raise InvalidInput("seed", f"must be an integer in [0, {SEED_MAX}], got {row.seed!r}")
        if not isinstance(row.steps, int) or row.steps < 1 or row.steps > self.config.timesteps:
            raise InvalidInput("steps", f"must be an integer in [1, {self.config.timesteps}], got {row.steps!r}")
        self.step_count(row.steps)  # raises for spacings that cannot make that many steps
        if not 0.0 <= float(row.eta) <= ETA_MAX:
            raise InvalidInput("eta", f"must be in [0, {ETA_MAX:g}], got {row.eta}")
        if not 0.0 <= float(row.guidance_scale) <= GUIDANCE_SCALE_MAX:
            raise InvalidInput("guidance_scale", f"must be in [0, {GUIDANCE_SCALE_MAX:g}], got {row.guidance_scale}")
        for field, text in (("prompt", row.prompt), ("negative_prompt", row.negative_prompt)):
            if not isinstance(text, str):
                raise InvalidInput(field, "must be a string")
            if self.is_text_conditional and not self.truncate_long_prompts:
                n = self.count_prompt_tokens(text)
                if n > self.max_prompt_tokens:
                    raise InvalidInput(
                        field, f"is {n} tokens long; the model reads at most {self.max_prompt_tokens}"
                    )
        if self.is_class_conditional:
            self._class_id(row.prompt, "prompt")
            if row.guidance_scale != 1.0:
                self._uncond_class_id()
        elif self.config.cond_stage is None and not self.config.inpaint_mode and row.guidance_scale != 1.0:
            raise InvalidInput("guidance_scale", "must be 1 for an unconditional model")
        self._validate_images(row, width, height)

    def _validate_images(self, row: GenerationRow, width: int, height: int) -> None:
        """The image / mask / strength part of :meth:`validate_row`."""
        strength = row.strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise InvalidInput("strength", f"must be in (0, 1], got {strength!r}")
        if row.mask is not None and row.image is None:
            raise InvalidInput("image", "inpainting needs both image and mask")
        if not row.is_img2img and strength != 1.0:
            raise InvalidInput("strength", "applies to image-to-image only (an image without a mask)")
        if row.image is not None and row.image.size != (width, height):
            raise InvalidInput("image", f"is {row.image.size[0]}x{row.image.size[1]}, expected {width}x{height}")
        if row.is_img2img:
            if self.config.inpaint_mode:
                raise InvalidInput(
                    "mask", "is required: this is an inpainting model, it cannot run image-to-image"
                )
            img2img_timesteps(self._timesteps(row.steps), strength)  # raises when no step would run
        elif row.image is not None and row.mask is not None:
            if row.mask.size != row.image.size:
                raise InvalidInput(
                    "mask",
                    f"is {row.mask.size[0]}x{row.mask.size[1]}, must match the image "
                    f"({row.image.size[0]}x{row.image.size[1]})",
                )
        elif self.config.inpaint_mode:
            raise InvalidInput("image", "this is an inpainting model: image and mask are required")

    def _class_id(self, text: str, field: str) -> int:
        assert isinstance(self.config.cond_stage, ClassEmbedderConfig)
        n = self.config.cond_stage.n_classes
        try:
            value = int(text.strip())
        except ValueError:
            raise InvalidInput(field, f"must be a class id in [0, {n - 1}] for this class-conditional model") from None
        if not 0 <= value < n:
            raise InvalidInput(field, f"class id must be in [0, {n - 1}], got {value}")
        return value

    def _uncond_class_id(self) -> int:
        """The null class used for guidance (cin256-v2: 1001 classes, class 1000 = unconditional)."""
        cfg = self.config.cond_stage
        assert isinstance(cfg, ClassEmbedderConfig)
        if cfg.unconditional_class is not None:
            return cfg.unconditional_class
        if cfg.n_classes == 1001:
            return 1000
        raise InvalidInput(
            "guidance_scale", "must be 1: this class-conditional model has no unconditional class"
        )

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[N, L, D]`` cross-attention context for ``prompts``."""
        assert self.model.tokenizer is not None and self.model.cond_stage is not None
        ids = self.model.tokenizer(list(prompts)).to(self.device)  # [N, L]
        return self._batched(self.model.cond_stage, ids).to(self.dtype)  # [N, L, D]

    def _batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn(x)`` over rows: per row when ``batch_invariant`` (unless ``fn`` runs batch-invariant
        kernels), on the core pool when there is one."""
        per_row = self.batch_invariant and not is_batch_invariant(fn)
        return run_split(lambda s: fn(x[s]), x.shape[0], self.core_pool, per_row=per_row)

    def _timesteps(self, steps: int) -> torch.Tensor:
        return ddim_timesteps(steps, self.config.timesteps, self.timestep_spacing)

    def row_timesteps(self, row: GenerationRow) -> torch.Tensor:
        """``[n]`` int64 descending timesteps the row runs (the tail ``strength`` selects for img2img)."""
        full = self._timesteps(row.steps)
        return img2img_timesteps(full, row.strength) if row.is_img2img else full

    def row_step_count(self, row: GenerationRow) -> int:
        """DDIM iterations the row really runs (what progress counts to)."""
        return int(self.row_timesteps(row).numel())

    @torch.no_grad()
    def start_latent(
        self, row: GenerationRow, generator: torch.Generator, latent_hw: tuple[int, int], timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The row's starting latent ``[C, h, w]`` float32 on the device: ``x_T`` (the generator's
        first draw), or for img2img the source latent noised with it to ``timesteps[0]``
        (the posterior sample of a KL first stage is the generator's second draw)."""
        x_T = self.initial_noise(generator, latent_hw).to(self.device)  # [C, h, w]
        if not row.is_img2img:
            return x_T
        assert row.image is not None
        z0 = self._encode_latent(self._image_tensor(row.image) * 2.0 - 1.0, generator)[0]  # [C, h, w]
        return noised_latent(z0, x_T, int(timesteps[0]), self._alphas_cumprod)

    def _conditioning(self, rows: Sequence[GenerationRow]) -> dict[str, torch.Tensor | None]:
        guided = [r.guidance_scale != 1.0 for r in rows]
        if self.is_text_conditional:
            context = self.encode_text([r.prompt for r in rows])
            uncond = self.encode_text([r.negative_prompt for r in rows]) if any(guided) else None
            return {"context": context, "uncond_context": uncond}
        if self.is_class_conditional:
            ids = torch.tensor([self._class_id(r.prompt, "prompt") for r in rows], device=self.device)
            context = self.model.cond_stage(ids).to(self.dtype)
            uncond = None
            if any(guided):
                null = torch.full_like(ids, self._uncond_class_id())
                uncond = self.model.cond_stage(null).to(self.dtype)
            return {"context": context, "uncond_context": uncond}
        return {"context": None, "uncond_context": None}

    # ------------------------------------------------------------------ images <-> latents

    def _image_tensor(self, image: Image.Image) -> torch.Tensor:
        """PIL -> ``[1, 3, H, W]`` float32 in [0, 1]."""
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)

    def _mask_tensor(self, mask: Image.Image) -> torch.Tensor:
        """PIL -> ``[1, 1, H, W]`` float32, 1 = repaint (binarised at 0.5 as the original)."""
        arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
        return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]

    @torch.no_grad()
    def _encode_latent(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``[1, 3, H, W]`` in [-1, 1] -> scaled latent ``[1, C, H/f, W/f]`` (a posterior sample for KL)."""
        fs = self.model.first_stage
        x = pixels.to(self.device, self.dtype)
        if isinstance(fs, AutoencoderKL):
            posterior = fs.encode(x)
            noise = torch.randn(posterior.mean.shape, generator=generator, dtype=torch.float32)
            z = posterior.mean.float() + posterior.std.float() * noise.to(self.device)
        else:
            z = fs.encode(x).float()  # VQ: the pre-quantization latent (LDM diffuses in it)
        return z * self.model.scale_factor

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> list[Image.Image]:
        """``[N, C, h, w]`` scaled latents -> PIL images (``clamp((x + 1) / 2)``, rounded to uint8)."""
        z = (z / self.model.scale_factor).to(self.dtype)
        x = self._batched(self.model.first_stage.decode, z).float()  # [N, 3, H, W]
        x = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
        arr = (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]

    def finish_images(self, rows: Sequence[GenerationRow], latents: torch.Tensor) -> list[Image.Image]:
        """Final latents ``[N, C, h, w]`` of ``rows`` -> their images (decoded, known pixels pasted back)."""
        images = self.decode_latents(latents)
        return [self._paste_known(r, img) for r, img in zip(rows, images, strict=True)]

    # ------------------------------------------------------------------ per-row preparation

    def effective_guidance(self, row: GenerationRow) -> float:
        """The guidance scale the row is sampled with (LDM inpainting models take none)."""
        return 1.0 if self.config.inpaint_mode == "ldm" else float(row.guidance_scale)

    def initial_noise(self, generator: torch.Generator, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The row's ``x_T ~ N(0, I)``, ``[C, h, w]`` float32, drawn on the CPU (its generator's first draw)."""
        return torch.randn((self.latent_channels, *latent_hw), generator=generator, dtype=torch.float32)

    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        """``(h, w)`` of the latents for an image of ``width`` x ``height`` pixels."""
        return height // self.downsample_factor, width // self.downsample_factor

    @torch.no_grad()
    def prepare_row(self, row: GenerationRow, width: int, height: int) -> PreparedRow:
        """Everything the continuous-batching engine needs to denoise ``row`` (validated by the caller).

        Exactly the per-row work of :meth:`generate_latents`, in the same order on the
        row's generator: ``x_T``, then the inpainting inputs; the conditioning is encoded
        for this row alone. A row prepared here gives the same image as the row sent
        through :meth:`generate` alone.
        """
        h, w = self.latent_size(width, height)
        generator = torch.Generator().manual_seed(row.seed)
        timesteps = self.row_timesteps(row)
        x_T = self.start_latent(row, generator, (h, w), timesteps)  # [C, h, w]
        concat, x0, keep = self._inpainting_row(row, generator, (h, w))
        cond = self._conditioning([row])

        def first(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v[0]

        eta = torch.tensor(float(row.eta), dtype=torch.float32).item()  # as generate(): eta passes through float32
        return PreparedRow(
            x_T=x_T,
            generator=generator,
            coef=row_coefficients(timesteps, self._alphas_device, eta, self.device),
            eta=eta,
            guidance_scale=self.effective_guidance(row),
            context=first(cond["context"]),
            uncond_context=first(cond["uncond_context"]),
            c_concat=first(None if concat is None else concat.to(self.dtype)),
            blend_x0=first(x0),
            blend_keep=first(keep),
        )

    def sampling_unet(self) -> UNetCallable:
        """The UNet as the sampler calls it, sharded over the core pool: one call per row when
        ``batch_invariant`` unless the UNet runs batch-invariant kernels (then one call per shard)."""
        per_row = self.batch_invariant and not is_batch_invariant(self.model.unet)
        if self.core_pool is None and not per_row:
            return self.model.unet
        return ShardedUNet(self.model.unet, self.core_pool, per_row=per_row)

    def make_denoiser(
        self,
        *,
        guidance_scale: Sequence[float],
        context: torch.Tensor | None,
        uncond_context: torch.Tensor | None,
        c_concat: torch.Tensor | None,
        pad_to: int | None = None,
    ) -> GuidedDenoiser:
        """The guided denoiser over this model for a batch of rows (see :class:`ldm.denoiser.GuidedDenoiser`).

        ``pad_to`` pads every UNet call to that many rows (a bucket size; the padded rows'
        outputs are dropped). It is ignored when ``batch_invariant`` (one row per call).
        """
        unet = self.sampling_unet()
        if pad_to is not None and not self.batch_invariant:
            unet = PaddedUNet(unet, pad_to)
        return GuidedDenoiser(
            unet,
            guidance_scale=list(guidance_scale),
            context=context,
            uncond_context=uncond_context,
            c_concat=c_concat,
            parameterization=self.config.parameterization,
            alphas_cumprod=self._alphas_device,
            model_dtype=self.dtype,
        )

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        rows: Sequence[GenerationRow],
        width: int,
        height: int,
        *,
        on_step: StepHook | None = None,
        on_image: ImageHook | None = None,
        validate: bool = True,
    ) -> list[Image.Image | None]:
        """Sample every row in one batched DDIM run; see the module docstring.

        Args:
            rows: the images to make; all share ``width`` x ``height``.
            on_step: called after every iteration with the rows still running;
                returning row indices cancels those rows (their result is ``None``).
            on_image: called with ``(row, image)`` as soon as a row is decoded
                (rows with fewer steps finish, and are decoded, earlier).
            validate: run :meth:`validate_row` on every row first; ``False`` for a caller
                that has just done so (the worker validates each job's rows once, so that a
                bad job fails alone).

        Returns:
            One image per row, ``None`` for canceled rows.

        Raises:
            InvalidInput: a row is invalid (nothing is sampled then).
        """
        results: list[Image.Image | None] = [None] * len(rows)

        def finished(indices: list[int], latents: torch.Tensor) -> None:
            for i, img in zip(indices, self.finish_images([rows[i] for i in indices], latents), strict=True):
                results[i] = img
                if on_image is not None:
                    on_image(i, img)

        self.generate_latents(rows, width, height, on_step=on_step, on_finished=finished, validate=validate)
        return results

    @torch.no_grad()
    def generate_latents(
        self,
        rows: Sequence[GenerationRow],
        width: int,
        height: int,
        *,
        on_step: StepHook | None = None,
        on_finished: Callable[[list[int], torch.Tensor], None] | None = None,
        validate: bool = True,
    ) -> tuple[torch.Tensor, set[int]]:
        """The sampling half of :meth:`generate`: final latents ``[B, C, H/f, W/f]``
        (scaled, as the UNet sees them) and the set of canceled rows.

        ``on_finished(indices, latents)`` is called as soon as rows complete their
        last step, with their final latents. ``validate`` as in :meth:`generate`.
        """
        if not rows:
            return torch.empty(0), set()
        if validate:
            for row in rows:
                self.validate_row(row, width, height)
        b = len(rows)
        h, w = self.latent_size(width, height)
        generators = [torch.Generator().manual_seed(r.seed) for r in rows]
        timesteps = [self.row_timesteps(r) for r in rows]
        # 1. x_T per row, drawn on the CPU from the row's generator (img2img: the source
        #    latent noised with it to the row's first step)   # [B, C, h, w]
        x_T = torch.stack(
            [self.start_latent(r, g, (h, w), ts) for r, g, ts in zip(rows, generators, timesteps, strict=True)]
        )

        inpaint = self._inpainting_inputs(rows, generators, (h, w))
        cond = self._conditioning(rows)
        denoiser = self.make_denoiser(
            guidance_scale=[self.effective_guidance(r) for r in rows],
            context=cond["context"],
            uncond_context=cond["uncond_context"],
            c_concat=inpaint["c_concat"],
        )
        done: set[int] = set()
        canceled: set[int] = set()

        def callback(state: StepState) -> Iterable[int] | None:
            canceled.update(state.canceled)
            newly = [
                i
                for i in range(b)
                if i not in done and i not in state.canceled and state.steps_done[i] == state.steps_total[i]
            ]
            if newly:
                done.update(newly)
                if on_finished is not None:
                    on_finished(newly, state.x[newly])
            if on_step is None:
                return None
            progress = [
                RowProgress(row=i, step=state.steps_done[i], total=state.steps_total[i])
                for i in state.active.tolist()
            ]
            cancel = on_step(progress)
            if cancel is None:
                return None
            dropped = [int(i) for i in cancel if int(i) not in done]
            canceled.update(dropped)
            return dropped

        # the sampling loop only drives the core workers (decoding included, via on_finished);
        # preparation above (text, img2img / inpainting encoders) keeps this thread's own threads
        with coordinating(self.core_pool):
            latents = sample_ddim(
                denoiser,
                x_T,
                timesteps,
                self._alphas_device,
                eta=torch.tensor([float(r.eta) for r in rows]),
                generators=generators,
                blend=inpaint["blend"],
                callback=callback,
            )
        return latents, canceled

    def _inpainting_inputs(
        self, rows: Sequence[GenerationRow], generators: list[torch.Generator], latent_hw: tuple[int, int]
    ) -> dict[str, torch.Tensor | MaskBlend | None]:
        """Concat conditioning (inpainting UNets) or a mask blend (plain UNets) for a batch."""
        with_image = [r.mask is not None for r in rows]
        if not any(with_image):
            return {"c_concat": None, "blend": None}
        concat, x0s, keeps = [], [], []
        for r, g in zip(rows, generators, strict=True):
            c, x0, keep = self._inpainting_row(r, g, latent_hw)
            if r.mask is None and not self.config.inpaint_mode:  # plain row in a blending batch: blends nothing
                x0 = torch.zeros((1, self.latent_channels, *latent_hw), device=self.device)
                keep = torch.ones((1, 1, *latent_hw), device=self.device)
            concat.append(c)
            x0s.append(x0)
            keeps.append(keep)
        if self.config.inpaint_mode:
            return {"c_concat": torch.cat(concat).to(self.dtype), "blend": None}
        rows_mask = torch.tensor(with_image)
        return {"c_concat": None, "blend": MaskBlend(x0=torch.cat(x0s), mask=torch.cat(keeps), rows=rows_mask)}

    def _inpainting_row(
        self, row: GenerationRow, generator: torch.Generator, latent_hw: tuple[int, int]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """One row's inpainting inputs: ``(c_concat [1, Cc, h, w], x0 [1, C, h, w], keep [1, 1, h, w])``.

        Inpainting UNets get ``c_concat`` (the rest ``None``); plain UNets get the blend
        source ``x0`` and mask ``keep`` (1 = keep). A row without a mask (txt2img, img2img)
        gets ``None`` for all three. Draws the posterior sample of a KL first stage from ``generator``.
        """
        if row.image is None or row.mask is None:
            return None, None, None
        mode = self.config.inpaint_mode
        image = self._image_tensor(row.image)  # [1, 3, H, W] in [0, 1]
        repaint = self._mask_tensor(row.mask)  # [1, 1, H, W], 1 = repaint
        if mode == "sd":
            # RW LatentInpaintDiffusion: masked = image * (mask < 0.5), UNet in = [x | mask | latent(masked)]
            masked = (image * 2.0 - 1.0) * (1.0 - repaint)
            masked_latent = self._encode_latent(masked, generator)
            small = F.interpolate(repaint, size=latent_hw, mode="nearest").to(self.device)
            return torch.cat([small, masked_latent], dim=1), None, None
        if mode == "ldm":
            # LDM scripts/inpaint.py: masked = (1 - mask) * image, everything mapped to [-1, 1]
            masked = ((1.0 - repaint) * image) * 2.0 - 1.0
            c = self._encode_latent(masked, generator)
            cc = F.interpolate(repaint * 2.0 - 1.0, size=latent_hw, mode="nearest").to(self.device)
            return torch.cat([c, cc], dim=1), None, None
        x0 = self._encode_latent(image * 2.0 - 1.0, generator)
        keep = latent_keep_mask(repaint, latent_hw).to(self.device)  # [1, 1, h, w], 1 = keep
        return None, x0, keep

    def _paste_known(self, row: GenerationRow, image: Image.Image) -> Image.Image:
        """Inpainting: put the source pixels back where the mask says keep (the original
        scripts composite in pixel space too)."""
        if row.image is None or row.mask is None:
            return image
        keep = Image.fromarray(((self._mask_tensor(row.mask)[0, 0].numpy() < 0.5) * 255).astype(np.uint8))
        return Image.composite(row.image.convert("RGB"), image, keep)

    # ------------------------------------------------------------------ conveniences

    def _seeded_rows(
        self,
        num_images: int,
        seeds: Sequence[int] | int | None,
        width: int,
        height: int,
        on_step: StepHook | None,
        row: Callable[[int], GenerationRow],
    ) -> GenerationResult:
        """The conveniences' body: ``row(seed)`` for each of ``num_images`` seeds, in one :meth:`generate`."""
        used = self._seeds(num_images, seeds)
        images = self.generate([row(s) for s in used], width, height, on_step=on_step)
        return GenerationResult([im for im in images if im is not None], used)

    def _seeds(self, num_images: int, seeds: Sequence[int] | int | None) -> list[int]:
        if num_images < 1:
            raise InvalidInput("num_images", f"must be at least 1, got {num_images}")
        if seeds is None:
            rng = random.SystemRandom()
            return [rng.randrange(0, SEED_MAX + 1) for _ in range(num_images)]
        if isinstance(seeds, int):
            if not 0 <= seeds <= SEED_MAX:
                raise InvalidInput("seed", f"must be an integer in [0, {SEED_MAX}], got {seeds}")
            return [(seeds + i) % (SEED_MAX + 1) for i in range(num_images)]  # wraps as the gateway does
        if len(seeds) != num_images:
            raise InvalidInput("seeds", f"got {len(seeds)} seeds for {num_images} images")
        return [int(s) for s in seeds]

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        num_images: int = 1,
        seeds: Sequence[int] | int | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        width: int | None = None,
        height: int | None = None,
        on_step: StepHook | None = None,
    ) -> GenerationResult:
        """Generate ``num_images`` images for one prompt; image ``i`` uses ``seeds[i]``
        (an int seed gives ``seed + i``; none gives random seeds, returned)."""
        width = width or self.default_size
        height = height or self.default_size
        return self._seeded_rows(
            num_images, seeds, width, height, on_step,
            lambda s: GenerationRow(prompt, s, negative_prompt, steps, guidance_scale, eta),
        )

    def img2img(
        self,
        image: Image.Image,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        strength: float = STRENGTH_DEFAULT,
        num_images: int = 1,
        seeds: Sequence[int] | int | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        on_step: StepHook | None = None,
    ) -> GenerationResult:
        """Redraw ``image`` towards ``prompt`` (SDEdit; output size = image size).

        ``strength`` in (0, 1] picks how much of the ``steps``-step schedule runs:
        ``int(steps · strength)`` steps from the source noised to that level (1 = the
        whole schedule, the image surviving only as a faint start).
        """
        width, height = image.size
        return self._seeded_rows(
            num_images, seeds, width, height, on_step,
            lambda s: GenerationRow(
                prompt, s, negative_prompt, steps, guidance_scale, eta, image=image, strength=strength
            ),
        )

    def inpaint(
        self,
        image: Image.Image,
        mask: Image.Image,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        num_images: int = 1,
        seeds: Sequence[int] | int | None = None,
        steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        on_step: StepHook | None = None,
    ) -> GenerationResult:
        """Repaint the white part of ``mask`` in ``image`` (output size = image size).

        Inpainting models (SD-inpainting, LDM ``inpainting_big``) take the masked
        image as concat conditioning; other models blend the re-noised source into
        the known region at every DDIM step. Known pixels are pasted back at the end.
        """
        width, height = image.size
        return self._seeded_rows(
            num_images, seeds, width, height, on_step,
            lambda s: GenerationRow(prompt, s, negative_prompt, steps, guidance_scale, eta, image=image, mask=mask),
        )


def _read_metadata(path: Path) -> dict[str, object]:
    """Optional ``<stem>.json`` beside a checkpoint: ``{"name": ..., "untrained": bool}``."""
    meta = path.with_suffix(".json") if path.is_file() else path / "ldm_serve.json"
    if meta.is_file():
        try:
            data = json.loads(meta.read_text())
        except json.JSONDecodeError:
            return {}
        return data if isinstance(data, dict) else {}
    return {}


def load_pipeline(
    path: str | Path,
    config: ModelConfig | str | Path | dict | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    use_ema: bool | None = None,
    tokenizer_dir: str | Path | None = None,
    name: str | None = None,
    timestep_spacing: TimestepSpacing = "uniform",
    batch_invariant: bool | None = None,
    core_workers: int | None = None,
    text_encoder: str | Path | None = None,
) -> LatentDiffusionPipeline:
    """Load a checkpoint (original single file or diffusers folder) into a pipeline.

    Args:
        path: ``.ckpt`` / ``.safetensors`` file or a diffusers-format folder.
        config: a :class:`ModelConfig`, an original YAML (path or dict), or ``None``
            to use ``<stem>.yaml`` beside the file or infer the family from shapes.
        device, dtype: where and in which precision the modules live.
        use_ema: take ``model_ema.*`` weights (``None``: when the config says so).
        tokenizer_dir: folder with ``vocab.json`` + ``merges.txt`` (CLIP) or
            ``vocab.txt`` (BERT); default ``tokenizer/`` beside the checkpoint.
        name: model id; default from ``<stem>.json`` or the file stem.
        timestep_spacing: DDIM discretization, ``"uniform"`` as in the original code.
        batch_invariant, core_workers: see :class:`LatentDiffusionPipeline`.
        text_encoder: the text encoder of a checkpoint pruned of it (a diffusers
            ``text_encoder/`` folder or a file), see :func:`ldm.loading.loader.load_model`.
    """
    path = Path(path)
    model = load_model(
        path,
        config,
        device=device,
        dtype=dtype,
        use_ema=use_ema,
        tokenizer_dir=tokenizer_dir,
        text_encoder=text_encoder,
    )
    meta = _read_metadata(path)
    model_name = name or str(meta.get("name") or (path.stem if path.is_file() else path.name))
    return LatentDiffusionPipeline(
        model,
        name=model_name,
        timestep_spacing=timestep_spacing,
        untrained=bool(meta.get("untrained", False)),
        batch_invariant=batch_invariant,
        core_workers=core_workers,
    )
