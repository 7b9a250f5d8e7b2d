"""What a model can run: computed by the worker, checked by the gateway at submit time.

A worker advertises :class:`~ldm_serve.contract.ModelConstraints` in its heartbeat. The
largest side is ``model_max_side`` if set, else ``max_size_factor`` x the model's
default size (a 64-pixel model accepts up to 128), rounded down to the model's size
multiple and capped by ``max_width`` / ``max_height``. Besides sizes, a worker advertises
the step counts its timestep spacing refuses, its guidance range (1 only, for a model
without an unconditional branch), the job kinds it runs (an inpainting model runs only
inpainting, a worker older than img2img does not list it) and, for a class-conditional model, its number of classes.

Any live worker of a model may take its jobs, so the gateway accepts a request only if
every live worker can run it (:func:`check_request`), answering 422 naming the field and
the model's limit; a job the gateway accepts is never refused by the model later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ldm_serve.contract import GenerationPayload, JobKind, ModelConstraints
from ldm_serve.errors import InvalidInput
from ldm_serve.limits import GUIDANCE_SCALE_MAX
from ldm_serve.settings import Settings


def model_constraints(
    default_size: int,
    size_multiple: int,
    settings: Settings,
    *,
    max_steps: int | None = None,
    refused_steps: Iterable[int] = (),
    timestep_spacing: str | None = None,
    guidance_range: tuple[float, float] = (0.0, GUIDANCE_SCALE_MAX),
    kinds: Iterable[JobKind | str] = (JobKind.TXT2IMG, JobKind.INPAINT),
    prediction_type: str | None = None,
    max_prompt_tokens: int | None = None,
    n_classes: int | None = None,
) -> ModelConstraints:
    """Constraints of a model with this default size and size multiple (and the other limits
    its pipeline reports) under ``settings``."""
    m = max(1, size_multiple)
    side = settings.model_max_side or int(default_size * settings.max_size_factor)

    def bound(cap: int) -> int:
        return max(m, min(side, cap) // m * m)

    return ModelConstraints(
        size_multiple=m,
        min_side=2 * m,  # the deepest UNet level needs at least 2x2 cells (LatentDiffusionPipeline.validate_size)
        max_width=bound(settings.max_width),
        max_height=bound(settings.max_height),
        max_steps=max_steps,
        refused_steps=sorted(set(refused_steps)),
        timestep_spacing=timestep_spacing,
        min_guidance_scale=guidance_range[0],
        max_guidance_scale=guidance_range[1],
        kinds=[JobKind(k) for k in kinds],
        prediction_type=prediction_type,
        max_prompt_tokens=max_prompt_tokens,
        n_classes=n_classes,
    )


def check_request(model: str, constraints: Sequence[ModelConstraints], payload: GenerationPayload) -> None:
    """Raise :class:`InvalidInput` naming the field and the model's limit unless every worker's
    constraints allow the job. No constraints (no live worker advertising any): no check."""
    if not constraints:
        return
    check_size(model, constraints, payload.width, payload.height)
    check_kind(model, constraints, payload.kind)
    check_steps(model, constraints, payload.steps)
    check_guidance(model, constraints, payload.guidance_scale)
    check_class_prompt(model, constraints, payload.prompt)


def check_size(model: str, constraints: Sequence[ModelConstraints], width: int, height: int) -> None:
    """Raise :class:`InvalidInput` naming ``width`` or ``height`` and the model's limit unless every
    worker's constraints allow the size. No constraints (no live worker advertising any): no check."""
    if not constraints:
        return
    multiple = max(c.size_multiple for c in constraints)
    lo = max(c.min_side for c in constraints)
    for field, value, hi in (
        ("width", width, min(c.max_width for c in constraints)),
        ("height", height, min(c.max_height for c in constraints)),
    ):
        if not lo <= value <= hi or value % multiple:  # one message with every limit of the side
            raise InvalidInput(
                field, f"must be a multiple of {multiple} between {lo} and {hi} pixels for model {model!r}, got {value}"
            )


def check_kind(model: str, constraints: Sequence[ModelConstraints], kind: JobKind) -> None:
    """Inpainting or img2img on a model that cannot, or text-to-image on an inpainting-only model: 422."""
    if all(kind in c.kinds for c in constraints):
        return
    if kind is JobKind.INPAINT:
        raise InvalidInput("image", f"model {model!r} does not run inpainting; use POST /v1/txt2img")
    if kind is JobKind.IMG2IMG:
        only_inpaint = any(c.kinds == [JobKind.INPAINT] for c in constraints)
        hint = "it is an inpainting model: use POST /v1/inpaint with image and mask" if only_inpaint else (
            "use POST /v1/txt2img")
        raise InvalidInput("image", f"model {model!r} does not run image-to-image; {hint}")
    raise InvalidInput(
        "image", f"is required: model {model!r} is an inpainting model; use POST /v1/inpaint with image and mask"
    )


def check_steps(model: str, constraints: Sequence[ModelConstraints], steps: int) -> None:
    """Steps above the model's timesteps, or a count its timestep spacing cannot make: 422."""
    most = min((c.max_steps for c in constraints if c.max_steps is not None), default=None)
    if most is not None and steps > most:
        raise InvalidInput("steps", f"must be at most {most} for model {model!r}, got {steps}")
    refused = sorted({s for c in constraints for s in c.refused_steps})
    if steps in refused:
        spacing = next((c.timestep_spacing for c in constraints if steps in c.refused_steps), None)
        raise InvalidInput(
            "steps",
            f"model {model!r} cannot run {steps} steps with its {spacing or 'timestep'!r} spacing (it would index"
            f" past its noise schedule); refused step counts: {format_ranges(refused)}",
        )


def check_guidance(model: str, constraints: Sequence[ModelConstraints], scale: float) -> None:
    """A guidance scale outside the model's range (only 1 for a model without an unconditional branch): 422."""
    lo = max(c.min_guidance_scale for c in constraints)
    hi = min(c.max_guidance_scale for c in constraints)
    if lo <= scale <= hi:
        return
    if lo == hi:
        raise InvalidInput(
            "guidance_scale", f"must be {lo:g} for model {model!r} (it has no unconditional branch), got {scale:g}"
        )
    raise InvalidInput("guidance_scale", f"must be between {lo:g} and {hi:g} for model {model!r}, got {scale:g}")


def check_class_prompt(model: str, constraints: Sequence[ModelConstraints], prompt: str) -> None:
    """A class-conditional model reads the prompt as a class id in ``[0, n_classes)``."""
    n = min((c.n_classes for c in constraints if c.n_classes is not None), default=None)
    if n is None:
        return
    try:
        value = int(prompt.strip())  # as the model reads it (LatentDiffusionPipeline._class_id)
    except ValueError:
        value = -1
    if not 0 <= value < n:
        raise InvalidInput(
            "prompt", f"must be a class id in [0, {n - 1}] for the class-conditional model {model!r}, got {prompt[:32]!r}"
        )


def format_ranges(values: Sequence[int]) -> str:
    """``[3, 9, 101, 102, 103]`` -> ``"3, 9, 101-103"`` (sorted input)."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return ", ".join(parts)
