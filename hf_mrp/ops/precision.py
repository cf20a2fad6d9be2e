"""Float32 where hf_mrp says float32: the output head's matmuls, whatever autocast or the model's dtype.

Under ``torch.autocast`` (the Trainer's ``bf16`` / ``fp16``) a matmul runs in the low dtype, and a bf16 / fp16
model hands over bf16 / fp16 hidden states and W. Every chunk path (the fused loss, the audit, the logit lens)
therefore runs inside `autocast_off` and reads W through `HeadOperands`: hidden states are upcast per chunk of
positions, and a low-precision W is upcast one vocabulary tile at a time, so no float32 copy of a large W lives
beyond one tile (a float32 W is read as it is).

``LOGITS_PRECISIONS``: ``"float32"`` (the default, and the audit's only mode) or ``"bfloat16"`` (an opt-in for
the training loss): the operands of the head's three matmuls (logits, hidden-state and W gradients) rounded to
bfloat16, their products and sums in float32 (tensor cores on CUDA; the same numbers emulated elsewhere), the
logits and everything computed from them float32.
"""

from __future__ import annotations

import contextlib

import torch

from .transform import LogitTransform

LOGITS_PRECISIONS = ("float32", "bfloat16")
LOW_PRECISION = (torch.float16, torch.bfloat16)
TILE_ELEMENTS = 1 << 24  # elements of one float32 tile of a low-precision W: 64 MiB


def autocast_off(*tensors: torch.Tensor | None) -> contextlib.ExitStack:
    """A context with autocast disabled on the device types of ``tensors`` (where autocast exists)."""
    stack = contextlib.ExitStack()
    for device_type in sorted({t.device.type for t in tensors if t is not None}):
        if torch.amp.is_autocast_available(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def _bf16_operand(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bfloat16, held in float32: a bf16 operand whose products float32 holds exactly."""
    return _bf16_operand(x).float()


class HeadOperands:
    """W' = scale * W and b' = scale * b of an output head (the linear part of the model's logit transform), read
    by chunk math as float32 operands (or bfloat16 ones, with ``precision="bfloat16"``).

    Call its methods inside `autocast_off`. ``logits``, ``hidden_grad`` and ``add_weight_grad`` are the three
    [positions x vocab] matmuls of a chunk; ``rows`` gathers the k rows the top-k objectives and statistics read.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform, precision: str = "float32"
    ) -> None:
        if precision not in LOGITS_PRECISIONS:
            raise ValueError(f"unknown logits precision {precision!r}; choose one of {', '.join(LOGITS_PRECISIONS)}")
        self.weight, self.scale, self.precision = weight, float(transform.scale), precision
        self.vocab, self.width = int(weight.shape[0]), int(weight.shape[1])
        self.bias = None if bias is None else self._scaled(bias.float())
        self._whole = self._scaled(weight.float()) if weight.dtype not in LOW_PRECISION else None
        rows = self.vocab if self._whole is not None else max(1, TILE_ELEMENTS // max(self.width, 1))
        self.tiles = [slice(start, min(start + rows, self.vocab)) for start in range(0, self.vocab, rows)]
        self._cuda_bf16 = precision == "bfloat16" and weight.device.type == "cuda"

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale if self.scale != 1.0 else x

    def weight_tile(self, tile: slice) -> torch.Tensor:
        """W'[tile] as the matmuls' operand: float32 (a view of a float32 W), or bf16-rounded in bfloat16 mode."""
        w = self._whole[tile] if self._whole is not None else self._scaled(self.weight[tile].float())
        if self.precision == "float32":
            return w
        return _bf16_operand(w) if self._cuda_bf16 else _rounded(w)

    def _operand(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "float32":
            return x.float()
        return _bf16_operand(x) if self._cuda_bf16 else _rounded(x)

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """z = h W'^T + b' as a float32 [n x V] tensor (into ``out`` when given)."""
        out = hidden.new_empty((hidden.shape[0], self.vocab), dtype=torch.float32) if out is None else out
        h = self._operand(hidden)
        for tile in self.tiles:
            w = self.weight_tile(tile)
            if self._cuda_bf16:
                out[:, tile] = torch.mm(h, w.T, out_dtype=torch.float32)
            else:
                torch.mm(h, w.T, out=out[:, tile])
        if self.bias is not None:
            out.add_(self.bias)
        return out

    def hidden_grad(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """dL/dh = G W' (float32 [n x d]) for the logits' gradient G [n x V]."""
        result = grad_logits.new_zeros((grad_logits.shape[0], self.width), dtype=torch.float32)
        g = self._operand(grad_logits)
        for tile in self.tiles:
            self._accumulate(result, g[:, tile], self.weight_tile(tile))
        return result

    def weight_grad(self, grad_logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """G^T h as a new float32 [V x d] tensor: the first chunk's dL/dW', written by the matmul itself (beta 0: no
        zero fill and no read of an accumulator; at the paper's head that is 2.5 GB twice)."""
        out = hidden.new_empty((self.vocab, self.width), dtype=torch.float32)
        self.add_weight_grad(out, grad_logits, hidden, beta=0.0)
        return out

    def add_weight_grad(
        self, accumulator: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor, beta: float = 1.0
    ) -> None:
        """``accumulator`` (float32 [V x d]) = beta x itself + G^T h: dL/dW' of one chunk (beta 0 ignores what the
        accumulator held, NaN in fresh memory included)."""
        h = self._operand(hidden)
        g = self._operand(grad_logits)
        for tile in self.tiles:
            self._accumulate(accumulator[tile], g[:, tile].T, h, beta)

    def _accumulate(self, accumulator: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> None:
        if self._cuda_bf16:
            torch.addmm(accumulator, a, b, out_dtype=torch.float32, beta=beta, out=accumulator)
        else:
            accumulator.addmm_(a, b, beta=beta)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W'[ids] in float32 (any shape of ids; always float32: k rows cost nothing)."""
        return self._whole[ids] if self._whole is not None else self._scaled(self.weight[ids].float())

    def low_precision_weight(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') in ``dtype``: the audit's ``margin_dtype`` demonstration of low-precision margins."""
        same = self.weight.dtype == dtype and self.scale == 1.0
        weight = self.weight if same else self._scaled(self.weight.float()).to(dtype)
        return weight, None if self.bias is None else self.bias.to(dtype)
