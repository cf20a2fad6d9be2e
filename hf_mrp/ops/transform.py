"""What a model does to its head's output before emitting logits: z = softcap(scale * (h W^T + b)).

Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling`` (a scale of 1/s), Gemma 2/3/4
apply ``c * tanh(z / c)`` (``final_logit_softcapping``). Margins, CE and objectives are defined on the
logits the model really emits, so every chunked computation applies the same transform, and gradients go
through it in closed form: d softcap / dz = 1 - (softcap(z) / c)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LogitTransform:
    """``scale`` multiplies the raw logits (folded into W and b by `precision.HeadOperands`), then an optional
    soft cap ``softcap``."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def scaled_head(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale * W, scale * b) in float32, for the lens passes that read the whole W once per audit."""
        weight32, bias32 = weight.float(), None if bias is None else bias.float()
        if self.scale != 1.0:
            weight32 = weight32 * self.scale
            bias32 = None if bias32 is None else bias32 * self.scale
        return weight32, bias32

    def cap_(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the soft cap in place (no-op without one); ``logits`` are already scaled."""
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def cap_derivative(self, capped: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """d softcap(z) / dz from the capped values themselves: 1 - (capped / c)^2."""
        if self.softcap is None:
            raise ValueError("cap_derivative needs a soft cap (softcap is None)")
        c = float(self.softcap)
        out = torch.div(capped, c, out=out)
        return out.square_().neg_().add_(1.0)

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """softcap(scale * raw), out of place (references and probes)."""
        z = raw * self.scale if self.scale != 1.0 else raw
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)

    def describe(self) -> str:
        parts = ([] if self.scale == 1.0 else [f"scale {self.scale:g}"]) + (
            [] if self.softcap is None else [f"soft cap {self.softcap:g}"]
        )
        return ", ".join(parts) or "none"


IDENTITY = LogitTransform()
