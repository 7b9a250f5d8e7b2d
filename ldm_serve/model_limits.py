"""The sizes a model can run: computed by the worker, checked by the gateway at submit time.

A worker advertises :class:`~ldm_serve.contract.ModelConstraints` in its heartbeat. The
largest side is ``model_max_side`` if set, else ``max_size_factor`` x the model's
default size (a 64-pixel model accepts up to 128), rounded down to the model's size
multiple and capped by ``max_width`` / ``max_height``. Any live worker of a model may
take its jobs, so the gateway accepts a size only if every live worker can run it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldm_serve.contract import ModelConstraints
from ldm_serve.errors import InvalidInput
from ldm_serve.settings import Settings


def model_constraints(default_size: int, size_multiple: int, settings: Settings) -> ModelConstraints:
    """Constraints of a model with this default size and size multiple under ``settings``."""
    m = max(1, size_multiple)
    side = settings.model_max_side or int(default_size * settings.max_size_factor)

    def bound(cap: int) -> int:
        return max(m, min(side, cap) // m * m)

    return ModelConstraints(
        size_multiple=m,
        min_side=2 * m,  # the deepest UNet level needs at least 2x2 cells (LatentDiffusionPipeline.validate_size)
        max_width=bound(settings.max_width),
        max_height=bound(settings.max_height),
    )


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
        if not lo <= value <= hi:
            raise InvalidInput(field, f"must be between {lo} and {hi} pixels for model {model!r}, got {value}")
        if value % multiple:
            raise InvalidInput(field, f"must be a multiple of {multiple} for model {model!r}, got {value}")
