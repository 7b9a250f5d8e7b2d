"""Request schemas of the gateway, built from the settings so OpenAPI shows the real limits.

``build_schemas(settings)`` returns the request classes; every numeric field
carries its bounds (``ge`` / ``le``) and every string its ``max_length``, so
``/openapi.json`` documents each limit and violations come back as 422 errors
naming the field and the bound.

Numbers and booleans are strict: ``"n": true`` or ``"width": "64"`` is refused, not
converted (multipart form values are converted explicitly by the upload routes), and
floats must be finite (JSON ``NaN`` / ``Infinity`` are refused).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ldm_serve.contract import OutputFormat, Priority, WebhookEventType
from ldm_serve.limits import ETA_MAX, SEED_MAX, STRENGTH_DEFAULT, img2img_steps
from ldm_serve.settings import Settings
from service.bodies import json_depth


@dataclass(frozen=True)
class Schemas:
    """The request classes for one settings object."""

    Txt2ImgRequest: type[BaseModel]
    InpaintRequest: type[BaseModel]
    InpaintForm: type[BaseModel]
    Img2ImgRequest: type[BaseModel]
    Img2ImgForm: type[BaseModel]


def build_schemas(settings: Settings) -> Schemas:
    """Request models whose bounds come from ``settings``."""
    s = settings

    class GenerationBase(BaseModel):
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field(max_length=s.max_prompt_chars, description="What to draw.")
        negative_prompt: str = Field(default="", max_length=s.max_prompt_chars, description="What to avoid.")
        n: int = Field(default=1, ge=1, le=s.max_images, strict=True, description="Number of images.")
        width: int | None = Field(
            default=None, ge=8, le=s.max_width, strict=True,
            description="Pixels, a multiple of 8 and of the model's size_multiple (/v1/models); default: the model's size.",
        )
        height: int | None = Field(
            default=None, ge=8, le=s.max_height, strict=True,
            description="Pixels, a multiple of 8 and of the model's size_multiple (/v1/models); default: the model's size.",
        )
        steps: int = Field(default=50, ge=1, le=s.max_steps, strict=True, description="DDIM steps.")
        guidance_scale: float = Field(
            default=7.5, ge=0.0, le=s.max_guidance_scale, strict=True, allow_inf_nan=False,
            description="Classifier-free guidance.",
        )
        eta: float = Field(
            default=0.0, ge=0.0, le=ETA_MAX, strict=True, allow_inf_nan=False, description="DDIM eta (0 = deterministic)."
        )
        seed: int | None = Field(
            default=None, ge=0, le=SEED_MAX, strict=True, description="Seed of image 0; image i uses seed+i. Absent: random."
        )
        model: str | None = Field(default=None, max_length=128, description="Model id from /v1/models.")
        output_format: OutputFormat = OutputFormat.PNG
        quality: int = Field(default=90, ge=1, le=100, strict=True, description="JPEG / WebP quality.")
        priority: Priority = Priority.NORMAL
        webhook: str | None = Field(default=None, max_length=2048, description="URL to POST signed job events to.")
        webhook_events_filter: list[WebhookEventType] | None = Field(
            default=None, description="Events to send; default start and completed."
        )
        metadata: dict[str, Any] = Field(
            default_factory=dict,
            description=f"Client data echoed back; at most {s.max_metadata_bytes} bytes as JSON,"
            f" nested at most {s.max_metadata_depth} deep.",
        )

        @field_validator("width", "height")
        @classmethod
        def _multiple_of_8(cls, value: int | None) -> int | None:
            if value is not None and value % 8:
                raise ValueError(f"must be a multiple of 8, got {value}")
            return value

        @field_validator("metadata")
        @classmethod
        def _metadata_size(cls, value: dict[str, Any]) -> dict[str, Any]:
            depth = json_depth(value)
            if depth > s.max_metadata_depth:
                raise ValueError(f"nests {depth} deep, the limit is max_metadata_depth={s.max_metadata_depth}")
            size = len(json.dumps(value))
            if size > s.max_metadata_bytes:
                raise ValueError(f"is {size} bytes as JSON, the limit is max_metadata_bytes={s.max_metadata_bytes}")
            return value

    class Txt2ImgRequest(GenerationBase):
        """``POST /v1/txt2img`` body."""

    class InpaintFields(GenerationBase):
        mask_resize: bool = Field(
            default=False, strict=True, description="Resize the mask to the image size instead of refusing a mismatch."
        )

    class InpaintRequest(InpaintFields):
        """``POST /v1/inpaint`` JSON body; ``image`` and ``mask`` are base64 or data URLs.

        White (>= 128) in the mask marks the pixels to repaint.
        """

        image: str = Field(description="Base64 or data URL of a PNG / JPEG / WebP image.")
        mask: str = Field(description="Base64 or data URL; white = repaint.")

    class InpaintForm(InpaintFields):
        """The non-file fields of a multipart ``POST /v1/inpaint``."""

    class Img2ImgFields(GenerationBase):
        strength: float = Field(
            default=STRENGTH_DEFAULT, gt=0.0, le=1.0, strict=True, allow_inf_nan=False,
            description="How far to move from the init image, in (0, 1]: int(steps * strength) of the"
            " DDIM steps run, from the image's latent noised to that level (1 = the whole schedule).",
        )

        @field_validator("strength")
        @classmethod
        def _runs_a_step(cls, value: float, info: ValidationInfo) -> float:
            steps = info.data.get("steps")
            if isinstance(steps, int) and img2img_steps(steps, value) < 1:
                raise ValueError(f"{value:g} of {steps} steps runs no step; needs strength >= 1/steps = {1 / steps:.4g}")
            return value

    class Img2ImgRequest(Img2ImgFields):
        """``POST /v1/img2img`` JSON body; ``image`` (the init image) is base64 or a data URL.

        Output size: ``width`` / ``height``, each defaulting to the image's side; an image of
        another size is scaled to cover that size and centre-cropped.
        """

        image: str = Field(description="Base64 or data URL of a PNG / JPEG / WebP init image.")

    class Img2ImgForm(Img2ImgFields):
        """The non-file fields of a multipart ``POST /v1/img2img``."""

    return Schemas(Txt2ImgRequest, InpaintRequest, InpaintForm, Img2ImgRequest, Img2ImgForm)
