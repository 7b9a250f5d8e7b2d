"""Exponential moving average of model weights (the ``LitEma`` rule of the original code).

After update ``n`` (counting from 1) every floating-point parameter's shadow moves
towards the live value::

    d_n = min(decay, (1 + n) / (10 + n))
    shadow <- shadow - (1 - d_n) * (shadow - param)

The warm-up term makes the average follow the weights closely early on, which
matters for short runs: after 1000 updates ``d_n`` is at most 0.991. Buffers
(none in our modules, but e.g. position ids elsewhere) are copied as they are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["ExponentialMovingAverage"]


class ExponentialMovingAverage:
    """Shadow copies of the parameters of several named modules.

    Args:
        modules: name -> module; the shadow keys are ``<name>.<state-dict key>``.
        decay: the upper bound of ``d_n`` (0.9999 in the original LDM configs).
    """

    def __init__(self, modules: Mapping[str, nn.Module], decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.modules = dict(modules)
        self.decay = decay
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            f"{name}.{key}": value.detach().clone()
            for name, module in self.modules.items()
            for key, value in module.state_dict().items()
        }

    def current_decay(self) -> float:
        """``d_n`` of the next update."""
        n = self.num_updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Move every shadow towards the modules' current weights (call after each optimizer step)."""
        d = self.current_decay()
        self.num_updates += 1
        for name, module in self.modules.items():
            for key, value in module.state_dict().items():
                shadow = self.shadow[f"{name}.{key}"]
                if value.is_floating_point():
                    shadow.sub_((1.0 - d) * (shadow - value))
                else:
                    shadow.copy_(value)

    def averaged(self, name: str) -> dict[str, torch.Tensor]:
        """The averaged state dict of module ``name`` (keys as in its ``state_dict()``)."""
        prefix = f"{name}."
        return {k[len(prefix) :]: v.clone() for k, v in self.shadow.items() if k.startswith(prefix)}

    def state_dict(self) -> dict[str, object]:
        """Everything needed to resume: decay, update count, shadows."""
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict` output (shadow keys must match)."""
        shadow = state["shadow"]
        assert isinstance(shadow, Mapping)
        if set(shadow) != set(self.shadow):
            raise ValueError("EMA state does not match the modules (different parameter names)")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.num_updates = int(state["num_updates"])  # type: ignore[call-overload]
        for key, value in shadow.items():
            self.shadow[key].copy_(value)
