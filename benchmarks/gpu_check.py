"""One prepared GPU check (issue 27): run it by hand, or when a GPU machine is lent; under 8 minutes on one H100.

    python benchmarks/gpu_check.py            # CUDA: bf16 ~0.5B model from a config (no download)
    python benchmarks/gpu_check.py --smoke    # CPU, tiny config, seconds (CI); CUDA-only rows say why they skip

Prints one table: the loss from the model's final hidden states (W frozen, as under LoRA; forward + backward to the
hidden states) through hf_mrp's fused loss, Liger's fused linear cross-entropy (when importable), TRL's chunked
log-probs and torch's ``linear_cross_entropy`` (time, peak memory beyond the inputs), ``mrp_logits_precision``
float32 vs bfloat16 (the loss difference), a QLoRA step, and MRPTrainer's training step run under
``torch.cuda.set_sync_debug_mode("error")`` (any host-device synchronization raises).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from hf_mrp.ops import MRPSettings, mrp_loss_sums

HALF_B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24)  # Qwen2-0.5B's shape
HALF_B.update(num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
TINY.update(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
ROWS: list[tuple[str, str, str, str]] = []


def row(check: str, seconds: float | None = None, peak: float | None = None, note: str = "") -> None:
    timing = "" if seconds is None else f"{seconds * 1000:,.1f}"
    ROWS.append((check, timing, "" if peak is None else f"{peak:,.0f}", note))


def measure(run: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of ``run`` (after one warm-up) and its peak CUDA memory beyond what was allocated before
    (MiB; None on CPU)."""
    run()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
    return statistics.median(times), peak


def loss_rows(model, device: torch.device, positions: int, repeats: int) -> None:
    """Each path's loss forward + backward from bf16 hidden states through the model's (tied) bf16 head."""
    weight = model.get_output_embeddings().weight.detach()
    dim, vocab = weight.shape[1], weight.shape[0]
    torch.manual_seed(0)
    hidden = torch.randn(positions, dim, device=device, dtype=weight.dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (positions,), device=device)
    targets[::8] = -100  # some ignored positions, as in chat data

    def backward(loss_of: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def run():
            loss = loss_of()
            loss.backward()
            hidden.grad = None
            return loss.detach()

        return run

    def fused(objective: str = "fisher", lam: float = 0.0, precision: str = "float32"):
        settings = MRPSettings(objective=objective, lam=lam, precision=precision, normalization="valid")
        return backward(
            lambda: (lambda s: s.total / s.n_positions.clamp(min=1))(
                mrp_loss_sums(hidden, weight, targets, settings, defer_checks=True)
            )
        )

    cases: dict[str, Callable[[], torch.Tensor] | str] = {
        "model-style CE (full float32 logits)": backward(lambda: F.cross_entropy((hidden @ weight.T).float(), targets)),
        "hf_mrp fused CE (float32 logits)": fused(),
        "hf_mrp fused CE + margin": fused("margin", 0.6),
        "hf_mrp fused CE + fisher": fused("fisher", 0.6),
        "hf_mrp fused CE, mrp_logits_precision bfloat16": fused(precision="bfloat16"),
        "torch linear_cross_entropy": backward(
            lambda: F.linear_cross_entropy(hidden, weight, targets, ignore_index=-100)
        ),
        "TRL chunked log-probs": trl_case(hidden, weight, targets, backward),
        "Liger fused linear CE": liger_case(hidden, weight, targets, backward, device),
    }
    for name, case in cases.items():
        if isinstance(case, str):
            row(name, note=f"skipped: {case}")
            continue
        seconds, peak = measure(case, device, repeats)
        row(name, seconds, peak)
    f32, bf16 = fused()(), fused(precision="bfloat16")()
    row("mrp_logits_precision bfloat16 - float32", note=f"|loss difference| {abs(float(bf16 - f32)):.2e}")


def trl_case(hidden, weight, targets, backward):
    if importlib.util.find_spec("trl") is None:
        return "trl not installed"
    from trl.kernels import ChunkedLogProbFunction

    mask = targets != -100

    def loss():
        logps = ChunkedLogProbFunction.apply(hidden, weight, None, targets.clamp(min=0), 1.0, 4096, None, 1.0, ())[0]
        return -(logps * mask).sum() / mask.sum().clamp(min=1)

    return backward(loss)


def liger_case(hidden, weight, targets, backward, device: torch.device):
    if device.type != "cuda":
        return "CUDA-only (Triton kernels)"
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel not importable"
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return backward(lambda: loss(weight, hidden, targets))


def step_rows(model, device: torch.device, batch: tuple[int, int], repeats: int, output_dir: str) -> None:
    """MRPTrainer's training step (forward + backward, LoRA) beside the model's own CE step, then the step under
    the CUDA sync debug mode; a QLoRA step."""
    from hf_mrp.training import MRPConfig, MRPTrainer

    config = MRPConfig(
        output_dir=output_dir, report_to="none", use_cpu=device.type != "cuda", lora_layers="all", disable_tqdm=True
    )
    trainer = MRPTrainer(model=model, args=config)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its first training_step
    peft_model = trainer.model.train()
    ids = torch.randint(0, model.config.vocab_size, batch, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {"input_ids": ids, "labels": ids}

    def own_ce():
        peft_model(**inputs, use_cache=False).loss.backward()
        peft_model.zero_grad(set_to_none=True)

    def mrp_step():  # the Trainer's training step: after the first one, no host checks (the step under test)
        trainer.training_step(peft_model, inputs)
        peft_model.zero_grad(set_to_none=True)

    for name, run in (("model's own CE step (LoRA)", own_ce), ("MRPTrainer step, fisher (LoRA)", mrp_step)):
        seconds, peak = measure(run, device, repeats)
        row(name, seconds, peak)
    if device.type != "cuda":
        row("MRPTrainer step under set_sync_debug_mode('error')", note="skipped: CUDA-only")
        return
    torch.cuda.set_sync_debug_mode("error")  # the first batch's checks ran in the warm-up above
    try:
        mrp_step()
        torch.cuda.set_sync_debug_mode(0)
        row("MRPTrainer step under set_sync_debug_mode('error')", note="no host-device synchronization")
    except RuntimeError as error:
        torch.cuda.set_sync_debug_mode(0)
        row("MRPTrainer step under set_sync_debug_mode('error')", note=f"FAILED: {str(error).splitlines()[0]}")


def qlora_row(model, device: torch.device, batch: tuple[int, int], repeats: int) -> None:
    if device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        row("QLoRA step (4-bit NF4 base, LoRA)", note="skipped: bitsandbytes has no GPU here")
        return
    from hf_mrp.models.loading import four_bit_config
    from hf_mrp.training import MRPConfig, MRPTrainer

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        quantized = Qwen2ForCausalLM.from_pretrained(folder, quantization_config=four_bit_config(torch.bfloat16))
        config = MRPConfig(output_dir=folder, report_to="none", lora_layers="all", disable_tqdm=True, bf16=True)
        trainer = MRPTrainer(model=quantized, args=config)
        trainer.current_gradient_accumulation_steps = 1
        peft_model = trainer.model.train()
        ids = torch.randint(0, model.config.vocab_size, batch, generator=torch.Generator().manual_seed(1)).to(device)

        def step():
            trainer.training_step(peft_model, {"input_ids": ids, "labels": ids})
            peft_model.zero_grad(set_to_none=True)

        seconds, peak = measure(step, device, repeats)
        row("QLoRA step (4-bit NF4 base, LoRA)", seconds, peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config, seconds")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**(HALF_B if cuda else TINY))).to(device=device, dtype=dtype)
    positions, batch = (8 * 1024, (4, 1024)) if cuda else (2 * 32, (2, 32))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke)"
    print(f"{name}, torch {torch.__version__}, {params:,.0f}M parameters ({dtype}), {positions} loss positions")
    repeats = 1 if args.smoke else args.repeats
    loss_rows(model, device, positions, repeats)
    with tempfile.TemporaryDirectory() as output_dir:
        step_rows(model, device, batch, repeats, output_dir)
    qlora_row(model, device, batch, repeats)
    width = max(len(check) for check, *_ in ROWS)
    print(f"\n{'check':{width}s} | {'ms (median)':>11s} | {'peak MiB':>8s} | note")
    for check, timing, peak, note in ROWS:
        print(f"{check:{width}s} | {timing:>11s} | {peak:>8s} | {note}")


if __name__ == "__main__":
    main()
