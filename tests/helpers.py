"""Shared test helpers (import them: ``from helpers import ...``; tests/ is on pytest's path); fixtures stay in
conftest.py. One tiny-model builder (`build`, every decoder family from its config, offline, seconds), the tiny
Llama most tests train (`tiny_llama`, a preset of `build`), and two offline tokenizers."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import TrainerCallback

if TYPE_CHECKING:
    from datasets import Dataset

    from hf_mrp.training import MRPConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository
VOCAB = 97
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefghijklmnop"  # shaped like a Hub token: must never reach a log
# Rounding bounds. Every tolerance of the suite is derived from these, with the computation it bounds written
# beside the assertion (issue 25: a tolerance is never "what one machine gave": another CPU (SIMD width, oneDNN's
# bf16 kernels), another thread count or a GPU sums in another order).
F32_U = 2.0**-24  # float32 unit roundoff: one rounding moves a value by at most u of itself
BF16_U = 2.0**-8  # bfloat16: 8 significand bits


def gamma(n: int, u: float = F32_U) -> float:
    """Higham's gamma_n = n u / (1 - n u): the worst-case relative error of a sum or dot product of n terms, in any
    order or blocking (SIMD width, threads, chunks, processes), relative to the sum of the terms' magnitudes. Two
    computations of the same sum in different orders differ by at most 2 gamma_n of that sum."""
    if n * u >= 1:
        raise ValueError(f"no bound: n u = {n * u:g} >= 1")
    return n * u / (1 - n * u)


def probable_gamma(n: int, u: float = F32_U, lam: float = 8.0) -> float:
    """Higham & Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4) for a sum or dot of n
    terms: lam sqrt(n) u of the terms' magnitudes, with rounding errors independent and of mean zero; it fails with
    probability at most 2 n exp(-lam^2 / 2) (lam = 8: 2.5e-14 n). For long reductions (a vocabulary, a whole
    gradient), where the worst case n u is no bound worth testing against."""
    return lam * np.sqrt(n) * u + n * u * u / (1 - u)


def sum_bound(n: int, u: float = F32_U) -> float:
    """The bound this suite uses for one sum or dot of n terms, relative to the terms' magnitudes: the worst case
    gamma(n) while it is the smaller (n < 64), then the probabilistic lam sqrt(n) u."""
    return min(gamma(n, u), probable_gamma(n, u))


def chain_bound(*lengths: int) -> float:
    """A float32 computation made of chained reductions of the given lengths (a logit's dot, a log-sum-exp, a sum over
    positions, a layer's projections...): to first order within the sum of their sum_bound()s of its magnitudes; 2x
    margin. Two such computations of the same number (another order, kernel, chunking) differ by at most twice
    this; a float64 reference adds nothing that shows."""
    return 2 * sum(sum_bound(n) for n in lengths)


def head_lengths(d: int, vocab: int, positions: int, k: int = 0) -> list[int]:
    """The reductions of one output head with its loss: a logit (d products + bias), the log-sum-exp over the
    vocabulary, the objective over k x k pairs (when k), the sum over positions."""
    return [d + 1, vocab, *([k * k] if k else []), positions]


def head_bounds(d: int, vocab: int, positions: int, k: int = 0) -> tuple[float, float]:
    """(loss, gradient) bounds of a float32 head and its loss; the gradient passes the same reductions backwards."""
    lengths = head_lengths(d, vocab, positions, k)
    return chain_bound(*lengths), chain_bound(*lengths, *lengths)


def tiny_model_bounds(
    layers: int = 3, vocab: int = VOCAB, positions: int = 44, length: int = 12
) -> tuple[float, float]:
    """(loss, gradient) bounds of a whole float32 forward of a SMALL-sized decoder (hidden 32, MLP 64, heads of 8,
    rows of ``length`` tokens): each layer's norm, q/k/v, scores, softmax, attention x values, o_proj, MLP up, MLP
    down, then the final norm and the head; the gradient passes them again backwards."""
    layer = [32, 32, 8, length, length, 32, 32, 64]
    lengths = [*layer * layers, 32, *head_lengths(32, vocab, positions)]
    return chain_bound(*lengths), chain_bound(*lengths, *lengths)


def llama_logit_magnitude(model) -> float:
    """A bound of sum_j |h_j w_ij| over every logit of a Llama-style model (the magnitude a logit's rounding error is
    relative to): Cauchy-Schwarz, ||h|| ||w_i||, where the final RMSNorm's output has ||h|| <= sqrt(d) max |gamma|
    (x / rms(x) has norm sqrt(d)); the same for a lens layer read through that norm."""
    norm = model.get_decoder().norm.weight.detach().double()
    head = model.get_output_embeddings().weight.detach().double()
    return float(np.sqrt(norm.numel()) * norm.abs().max() * head.norm(dim=-1).max())


def decided(margins, atol: float) -> np.ndarray:
    """Where a reference's top-1 is decided by more than two computations' logit errors can move it (margin > 2 atol):
    an argmax compared across computations (another batch shape, kernel or CPU) is compared only there; a near
    tie may go either way."""
    return np.asarray(margins, dtype=np.float64) > 2 * atol


def spearman_atol(*columns, atol: float) -> float:
    """How far Spearman's rho of n values can move when each value moves by at most ``atol``: only pairs closer than
    2 atol can swap ranks, and one swap changes sum d^2 by at most 2n, so rho by 12 / (n^2 - 1) per swap (plus
    float64 rounding)."""
    swaps = 0
    for column in columns:
        ordered = np.sort(np.asarray(column, dtype=np.float64))
        swaps += int(np.count_nonzero(np.diff(ordered) <= 2 * atol))
    n = len(columns[0])
    return 12 * swaps / (n * n - 1) + 1e-12


def assert_same_flips(got: Path, want: Path, atol: float, positions: int = 62, before: Path | None = None) -> None:
    """Two refine runs' comparisons of the same positions, their logits each within ``atol`` of the exact ones:
    the median margins within two logits' errors; W->R and R->W differ only by positions whose top-1 is a near tie
    in one of the reference run's audits (``decided``). ``before``: the audit both compared against (default the
    reference's audit_before; a sweep's runs share the sweep's baseline)."""
    import json

    from hf_mrp.storage.files import read_parquet

    flips = [json.loads((run / "comparison" / "flip_audit.json").read_text()) for run in (got, want)]
    assert flips[0]["n_positions"] == flips[1]["n_positions"] == positions
    for key in ("median_margin_before", "median_margin_after"):
        assert abs(flips[0][key] - flips[1][key]) <= 2 * atol, key
    audits = (before or want / "audit_before", want / "audit_after")
    margins = [read_parquet(audit / "positions.parquet")["margin"] for audit in audits]
    undecided = int(np.count_nonzero(~(decided(margins[0], atol) & decided(margins[1], atol))))
    for key in ("w2r", "r2w"):
        assert abs(flips[0][key] - flips[1][key]) <= undecided, (key, flips[0][key], flips[1][key], undecided)


def relative_error(got, want) -> float:
    """max |got - want| / max |want| in float64: an error relative to the reference's largest entry."""
    got, want = (
        x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
        for x in (got, want)
    )
    assert got.shape == want.shape, (got.shape, want.shape)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300)) if want.numel() else 0.0


SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _family_specs() -> dict[str, tuple[str, str, dict]]:
    """name -> (config class, model class, config kwargs), all classes from transformers."""
    return {
        "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", SMALL),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**SMALL, "head_dim": 8}),
        "qwen3_5": (
            "Qwen3_5TextConfig",
            "Qwen3_5ForCausalLM",
            {
                **SMALL,
                "head_dim": 8,
                "linear_key_head_dim": 8,
                "linear_value_head_dim": 8,
                "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "layer_types": ["linear_attention", "full_attention"],
            },
        ),
        "gemma2": (
            "Gemma2Config",
            "Gemma2ForCausalLM",
            {**SMALL, "head_dim": 8, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 50.0},
        ),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**SMALL, "head_dim": 8, "final_logit_softcapping": 4.0}),
        "cohere": ("CohereConfig", "CohereForCausalLM", {**SMALL, "logit_scale": 0.3}),
        "granite": ("GraniteConfig", "GraniteForCausalLM", {**SMALL, "logits_scaling": 4.0}),
        "gpt2": (
            "GPT2Config",
            "GPT2LMHeadModel",
            dict(
                vocab_size=VOCAB,
                n_embd=32,
                n_layer=2,
                n_head=4,
                n_positions=64,
                resid_pdrop=0.0,
                bos_token_id=1,
                eos_token_id=2,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            ),
        ),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**SMALL, "hidden_dropout": 0.0, "attention_dropout": 0.0}),
        "phi": ("PhiConfig", "PhiForCausalLM", {**SMALL, "resid_pdrop": 0.0, "embd_pdrop": 0.0}),
        "opt": (
            "OPTConfig",
            "OPTForCausalLM",
            dict(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
                word_embed_proj_dim=32,
                dropout=0.0,
                pad_token_id=1,
                bos_token_id=2,
                eos_token_id=2,
            ),
        ),
        "mixtral": (
            "MixtralConfig",
            "MixtralForCausalLM",
            {
                **SMALL,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "output_router_logits": True,
                "router_aux_loss_coef": 0.02,
            },
        ),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", SMALL),
        "mamba": (
            "MambaConfig",
            "MambaForCausalLM",
            dict(
                vocab_size=VOCAB,
                hidden_size=32,
                state_size=4,
                num_hidden_layers=2,
                expand=2,
                conv_kernel=4,
                pad_token_id=0,
                use_mambapy=True,
            ),
        ),
    }


FAMILIES = sorted(_family_specs())


def build(
    family: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    head_scale: float = 10.0,
    scale_tied_head: bool = False,
    **config_overrides,
):
    """A tiny random model of ``family`` in eval mode, its output head scaled by ``head_scale`` so margins spread
    out (a tied head only with ``scale_tied_head``: that scales the input embeddings too). ``config_overrides``
    replace the family's config keywords (``vocab_size``, ``num_hidden_layers``, ``tie_word_embeddings`` ...)."""
    import transformers

    config_name, model_name, kwargs = _family_specs()[family]
    config = getattr(transformers, config_name)(**{**kwargs, **config_overrides})
    if family == "mixtral":
        config._experts_implementation = "eager"  # grouped_mm has no float64 kernel (the float64 references)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    head = model.get_output_embeddings()
    if scale_tied_head or head.weight is not model.get_input_embeddings().weight:
        with torch.no_grad():
            head.weight.mul_(head_scale)
    return model


def tiny_llama(seed: int = 0, tie: bool = False, layers: int = 3, vocab: int = VOCAB):
    """The tiny Llama most tests train: 3 layers, 128 positions, head weights x20 (tied or not)."""
    return build(
        "llama",
        seed,
        head_scale=20.0,
        scale_tied_head=True,
        vocab_size=vocab,
        num_hidden_layers=layers,
        tie_word_embeddings=tie,
        max_position_embeddings=128,
    )


# ---------------------------------------------------------------- shared references and data


def naive_penalty(z, weight, objective, tau, k):
    """Spec formulas written out with loops, in float64."""
    values = []
    for t in range(z.shape[0]):
        top, ids = z[t].topk(k if objective == "fisher" else 2)
        if objective == "margin":
            m = top[0] - top[1]
            values.append(-m if m < tau else z.new_zeros(()))
        elif objective == "entropy":
            p = torch.softmax(z[t], -1)
            values.append(-(p * torch.log(p)).sum())
        else:
            p = torch.softmax(top, -1)
            w = weight[ids] / weight[ids].norm(dim=-1, keepdim=True)
            sigma = torch.diag(p) - torch.outer(p, p)
            total = z.new_zeros(())
            for i, j in itertools.permutations(range(k), 2):
                u = torch.stack([(w[i] - w[j]) @ w[m] for m in range(k)])
                total = total + p[i] * p[j] * torch.sqrt(torch.clamp(u @ sigma @ u, min=1e-8))
            values.append(total)
    return torch.stack(values)


def head_input_bound(model, entry: float = 0.0, row: float = 0.0) -> float:
    """A bound A >= sum_k |h_k W_jk| over every position and token j, for a model whose last hidden states come out
    of an RMSNorm (Llama): h = g * x / rms(x) with ||x / rms(x)||_2 <= sqrt(d), so by Cauchy-Schwarz
    sum_k |h_k W_jk| <= max|g| sqrt(d) ||W_j||_2. It holds for every input and every step while g and W stay
    fixed, as under prompt learning (PEFT trains only the prompt); after training moved each gain entry by at most
    ``entry`` and each head row by at most ``row`` (2-norm), with max|g| + entry and ||W_j|| + row."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = base.lm_head.weight.detach()
    gain = float(base.model.norm.weight.detach().abs().max()) + entry
    return gain * weight.shape[1] ** 0.5 * (float(weight.norm(dim=1).max()) + row)


def mean_ce_rounding_bound(vocab: int, width: int, head_bound: float, positions: int, loss: float) -> float:
    """|loss_a - loss_b| for two float32 evaluations of one mean cross-entropy over the same hidden states, first
    order in the unit roundoff u (the decoder is the same code on the same inputs; only the heads differ).

    Per position the logits are width-term dot products: |dz| <= width u A (A: ``head_input_bound``); the
    log-sum-exp sums V positive terms <= 1 (relative error <= (V + 1) u, so <= (V + 2) u after the log); the row's
    CE moves by <= 2 width u A with z. The mean adds N positive terms (relative error <= (N + 1) u). Each side
    rounds on its own: the factor 2."""
    return 2 * F32_U * (2 * width * head_bound + vocab + 2 + (positions + 1) * loss)


# ---------------------------------------------------------------- two runs of one training, apart by rounding


ADAPTIVE = ("adamw_torch", "adamw_torch_fused", "adafactor")  # sign-like updates where a gradient is ~0


def adam_update_bound(steps: int, beta1: float = 0.9, beta2: float = 0.999) -> float:
    """The largest |m_hat / (sqrt(v_hat) + eps)| of AdamW's first ``steps`` steps, whatever the gradients: by
    Cauchy-Schwarz, sqrt(sum_s a_s^2 / b_s) with a, b the bias-corrected averaging weights of the gradients and of
    their squares (1 at step 1, 1.004 by step 3 with the default betas)."""
    worst = 0.0
    for t in range(1, steps + 1):
        a = [(1 - beta1) * beta1 ** (t - s) / (1 - beta1**t) for s in range(1, t + 1)]
        b = [(1 - beta2) * beta2 ** (t - s) / (1 - beta2**t) for s in range(1, t + 1)]
        worst = max(worst, sum(x * x / y for x, y in zip(a, b)) ** 0.5)
    return worst


def entry_step_bound(args, model) -> float:
    """How far one adaptive step can move one weight, whatever its gradient: AdamW lr x `adam_update_bound` (plus
    the decoupled decay's lr wd |theta|); Adafactor (no momentum, update RMS clipped to 1 per tensor) lr x
    sqrt(largest tensor). A last-bit difference in a gradient that is ~0 can flip that whole step's sign."""
    if args.optim == "adafactor":
        return args.learning_rate * max(p.numel() for p in model.parameters()) ** 0.5
    decay = args.weight_decay * max(float(p.detach().abs().max()) for p in model.parameters())
    return args.learning_rate * (adam_update_bound(args.max_steps, args.adam_beta1, args.adam_beta2) + decay)


@dataclass
class RunBounds:
    """What two runs of the same training (plain Trainer, MRPTrainer at lambda 0) may differ by, from rounding:
    the two differ only in the output head and its loss (the fused float32 chunked head vs the model's head and
    the Trainer's CE); the decoder is the same code on the same inputs.

    ``losses[t]``: step t's logged loss; ``parameter``: any trained weight at the end (absolute)."""

    losses: list[float]
    parameter: float


def run_bounds(plain, model, length: int, bf16_head: bool = False, rho: float | None = None) -> RunBounds:
    """The bounds of ``plain`` = (trainer, logged losses L_s, ...), a finished run of a copy of ``model`` (a
    SMALL-sized Llama, rows of at most ``length`` tokens), from its logged gradient norms G_s.

    A step's gradients differ by <= 2 rho G_s (rho: `tiny_model_bounds`' gradient bound, relative to the gradient,
    unless given; ``bf16_head``: the plain head rounds its inputs and logits to bf16, rho = 3 BF16_U). SGD's update
    is linear in the gradient: the weights drift apart by D_t <= lr sum_{s<=t} 2 rho G_s (first order in the
    roundoff; the schedule only lowers lr).
    AdamW / Adafactor: every entry may differ by 2 x `entry_step_bound` per step (a flipped step), so
    D_t <= 2 t x that x sqrt(#weights) in norm. Step t's loss differs by the head's rounding,
    `mean_ce_rounding_bound` with the head input bound A of the weights moved so far (or, bf16: each logit off by
    3 BF16_U A, the CE by twice that), plus G_t D_{t-1} (first order in the weights' difference)."""
    trainer, losses = plain[0], plain[1]
    args, trained = trainer.args, [p for p in trainer.model.parameters() if p.requires_grad]
    norms = [row["grad_norm"] for row in trainer.state.log_history if "loss" in row]
    vocab = model.get_output_embeddings().weight.shape[0]
    positions = args.per_device_train_batch_size * args.gradient_accumulation_steps * length
    if rho is None:
        rho = 3 * BF16_U if bf16_head else tiny_model_bounds(vocab=vocab, positions=positions, length=length)[1]
    if args.optim in ADAPTIVE:
        entry = entry_step_bound(args, trainer.model)
        drift = [2 * entry * t * sum(p.numel() for p in trained) ** 0.5 for t in range(len(norms) + 1)]
        moved = [(entry * t, entry * t * SMALL["hidden_size"] ** 0.5) for t in range(len(norms) + 1)]
        parameter = 2 * entry * len(norms)
    else:
        drift = [args.learning_rate * 2 * rho * sum(norms[:t]) for t in range(len(norms) + 1)]
        moved = [(args.learning_rate * sum(norms[:t]),) * 2 for t in range(len(norms) + 1)]  # |step| <= lr G
        parameter = drift[-1]
    bounds = []
    for t, (loss, norm) in enumerate(zip(losses, norms)):
        head = head_input_bound(model, *moved[t])  # the gain entries and head rows as far as t steps moved them
        width = SMALL["hidden_size"]
        rounding = 6 * BF16_U * head if bf16_head else mean_ce_rounding_bound(vocab, width, head, positions, loss)
        bounds.append(rounding + norm * drift[t])
    return RunBounds(bounds, parameter)


def cpu_arguments(output_dir, /, **overrides) -> dict:
    """Keywords of a quiet one-step CPU run into ``output_dir`` (no reporters, no saves, a log every step, seed 0),
    ``overrides`` added or overriding: for TrainingArguments, MRPConfig and their subclasses alike."""
    values = dict(
        output_dir=str(output_dir),
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        max_steps=1,
        logging_steps=1,
        per_device_train_batch_size=4,
        seed=0,
        disable_tqdm=True,
    )
    return {**values, **overrides}


def config(tmp_path, **overrides) -> MRPConfig:
    """A one-step CPU MRPConfig writing nothing but its output folder under ``tmp_path``."""
    from hf_mrp.training import MRPConfig

    return MRPConfig(**cpu_arguments(tmp_path / "out", **overrides))


def batch(rows=4, length=12, seed=0):
    """Random ids with a different number of ignored (-100) labels in each row."""
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(0, VOCAB, size=(rows, length)))
    labels = ids.clone()
    for row in range(rows):  # a different number of ignored labels in each row
        labels[row, : 1 + 2 * row] = -100
    return {"input_ids": ids, "labels": labels}


def dataset(rows=4, length=12, seed=0, weights=None) -> Dataset:
    """`batch` as a `datasets.Dataset`, with optional per-position MRP weights."""
    from datasets import Dataset

    data = {key: value.tolist() for key, value in batch(rows, length, seed).items()}
    if weights is not None:
        data["mrp_weights"] = weights
    return Dataset.from_dict(data)


QUESTIONS = [
    "What is a list?",
    "Define a tuple.",
    "What does yield do?",
    "Explain import.",
    "What is None?",
    "What is a dict?",
]


ANSWERS = [
    "An ordered mutable sequence.",
    "An immutable sequence of items.",
    "It makes a generator function.",
    "It loads a module by name.",
    "The null object of Python.",
    "A mapping from keys to values.",
]


MODES = {
    "assistant_only": ("messages", {"assistant_only_loss": True}),
    "completion_only": ("prompt_completion", {"completion_only_loss": True}),
    "packed_padding_free": (
        "messages",
        {"assistant_only_loss": True, "packing": True, "packing_strategy": "bfd", "max_length": 96},
    ),
}


def chat_dataset(kind: str):
    """Six short Python Q&As as conversations (``messages``) or prompt-completion rows."""
    from datasets import Dataset

    if kind == "messages":  # two-turn conversations: the first assistant turn is context, both carry loss
        rows = [
            [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
                {"role": "user", "content": "Shorter?"},
                {"role": "assistant", "content": a.split()[0]},
            ]
            for q, a in zip(QUESTIONS, ANSWERS)
        ]
        return Dataset.from_dict({"messages": rows})
    return Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": q}] for q in QUESTIONS],
            "completion": [[{"role": "assistant", "content": a}] for a in ANSWERS],
        }
    )


def setup(folder, tmp_path, mode: str):
    """Tokenizer (ChatML template), model, data and common SFT settings for one of the `MODES`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_mrp.training.sft import CHATML_GENERATION_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder).train()
    kind, options = MODES[mode]
    common = dict(
        per_device_train_batch_size=3,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        **options,
    )
    return tokenizer, model, chat_dataset(kind), common


def sft_pair(model, tokenizer, dataset, common: dict, tmp_path: Path):
    """TRL's SFTTrainer (the reference) and MRPSFTTrainer at lambda 0 (under test) on one model, data and settings."""
    from trl import SFTConfig, SFTTrainer

    from hf_mrp.training.sft import MRPSFTConfig, MRPSFTTrainer

    shared = dict(model=model, train_dataset=dataset, processing_class=tokenizer)
    sft = SFTTrainer(args=SFTConfig(output_dir=str(tmp_path / "sft"), **common), **shared)
    mrp = MRPSFTTrainer(args=MRPSFTConfig(output_dir=str(tmp_path / "mrp"), mrp_lambda=0.0, **common), **shared)
    return sft, mrp


def first_batch(trainer):
    """The first training batch and its number of loss positions."""
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, batch["labels"][:, 1:].ne(-100).sum()


def loss_and_grads(trainer, model, batch, items):
    """One compute_loss and backward: the loss and every parameter's gradient."""
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=items)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


class CharTokenizer:
    """A deterministic stand-in tokenizer: one id per character (enough for the data pipeline)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) if ord(c) < 128 else 63 for c in text]}

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


def tiny_tokenizer(vocab: int = VOCAB):
    """A real `PreTrainedTokenizerFast` over ``vocab`` word-level tokens (pad 0, bos 1, eos 2): what collators and
    TRL need from a tokenizer, built offline in milliseconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


# ---------------------------------------------------------------- audits killed at a file boundary


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` but the lock file, by relative path."""
    from hf_mrp.storage.locks import LOCK_FILE

    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


TINY_AUDIT = ["--block_size", "32", "--max_positions", "62"]
# A two-step LoRA refine of a tiny model (layers 1-2), audited on 62 held-out positions.
TINY_REFINE = {
    "block_size": 32,
    "max_positions": 124,
    "audit_positions": 62,
    "max_steps": 2,
    "logging_steps": 1,
    "lora_layers": "1-2",
    "disable_tqdm": "true",
}


def flags(**values) -> list[str]:
    """``--name value`` pairs in order: the argv a command line carries for these settings."""
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]


def tiny_refine_flags(model_dir, output_dir, **overrides) -> list[str]:
    """`hf-mrp refine` / examples/refine.py flags for TINY_REFINE into ``output_dir``, ``overrides`` added or
    overriding."""
    return flags(model=model_dir, output_dir=output_dir, **{**TINY_REFINE, **overrides})


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread while a whole pipeline runs in this process, like the subprocesses (OMP_NUM_THREADS=1):
    the suite's parallel runs then share the cores instead of fighting over them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


HOLD_FOLDER = (
    "import sys, time\nfrom hf_mrp.storage.locks import owned_folder\n"
    "with owned_folder(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    time.sleep(600)\n"
)


@contextlib.contextmanager
def folder_held_elsewhere(folder: Path, command: str = "holder"):
    """``folder`` owned (storage.locks) by another live process that says it runs ``command``, until the block
    ends: what a second run into that folder meets."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_FOLDER, str(folder), command],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# Runs `hf-mrp ARGS` in this interpreter, SIGKILLing itself (or pausing, with $PAUSE_MARKER) at the $KILL_AT-th file
# boundary of the audit's write: after each file lands in the staging folder, before and after the exchange.
BOUNDARY_WRAPPER = """
import os, signal, sys, time
from pathlib import Path
from hf_mrp.storage import files

# Ctrl-C as in a terminal: a suite started in the background (`cmd &` in a script, nohup) hands its children SIGINT
# ignored, which Python then keeps ignoring (as it should), and the signal tests would wait for nothing
signal.signal(signal.SIGINT, signal.default_int_handler)

count = [0]

def boundary(what):
    count[0] += 1
    if count[0] == int(os.environ["KILL_AT"]):
        if os.environ.get("PAUSE_MARKER"):
            Path(os.environ["PAUSE_MARKER"]).write_text(what)
            time.sleep(600)
        os.kill(os.getpid(), signal.SIGKILL)

real_replace, real_exchange = os.replace, files.exchange_paths

def replace(source, target, *args, **kwargs):
    real_replace(source, target, *args, **kwargs)
    if ".staging-" in str(target):
        boundary("wrote " + Path(target).name)

def exchange(first, second):
    boundary("before the exchange")
    done = real_exchange(first, second)
    boundary("after the exchange")
    return done

os.replace, files.exchange_paths = replace, exchange
from hf_mrp.research.cli import main
sys.exit(main(sys.argv[1:]))
"""


def boundary_process(tmp_path: Path, model_dir: Path, out: Path, kill_at: int, *extra: str, marker: Path | None = None):
    """`hf-mrp audit` of ``model_dir`` into ``out`` in a process that SIGKILLs itself (or pauses, with ``marker``)
    at the ``kill_at``-th file boundary of the audit's write."""
    wrapper = tmp_path / "boundary.py"
    if not wrapper.exists():  # written once: rewriting it under a process still starting gives that one an empty script
        staged = tmp_path / "boundary.py.tmp"
        staged.write_text(BOUNDARY_WRAPPER)
        staged.replace(wrapper)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "KILL_AT": str(kill_at),
        **({"PAUSE_MARKER": str(marker)} if marker else {}),
    }
    return subprocess.Popen(
        [
            sys.executable,
            str(wrapper),
            "audit",
            "--model",
            str(model_dir),
            "--output_dir",
            str(out),
            *TINY_AUDIT,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def staging_beside(folder: Path) -> list[str]:
    """The staging folders left beside ``folder`` (a killed write leaves one; the next run sweeps it)."""
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.staging-*"))


# 2 processes train a tiny Llama for 2 steps on 4 rows, one of which has a NaN objective weight: only one process
# meets it. Each writes its LoRA weights and its log history to OUT (under DeepSpeed when DEEPSPEED is a config).
NAN_BATCH_SCRIPT = """
import importlib, json, os, sys
import numpy as np, torch
from datasets import Dataset
sys.path.insert(0, {tests!r})
from helpers import VOCAB, tiny_llama
from hf_mrp.training import MRPConfig, MRPTrainer

deepspeed = {deepspeed!r}
if deepspeed:
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # gloo does without it (~90 s)
ids = np.random.default_rng(0).integers(0, VOCAB, size=(4, 12))
weights = [[1.0] * 12 for _ in range(4)]
weights[1][3] = float("nan")  # one row, so one process of the two meets it
data = Dataset.from_dict({{"input_ids": ids.tolist(), "labels": ids.tolist(), "mrp_weights": weights}})
args = MRPConfig(output_dir={out!r}, report_to="none", save_strategy="no", use_cpu=not deepspeed, max_steps=2,
                 logging_steps=1, per_device_train_batch_size=1, seed=0, disable_tqdm=True, mrp_objective="margin",
                 mrp_lambda=0.5, learning_rate=1e-2, optim="sgd", ddp_timeout=120, deepspeed=deepspeed)
trainer = MRPTrainer(model=tiny_llama(), args=args, train_dataset=data)
trainer.train()
sys.path.insert(0, os.path.join({tests!r}, "training"))
from deepspeed_worker import trained_weights  # whole, under ZeRO-3 too
adapter = {{name: weight for name, weight in trained_weights(trainer).items() if "lora_" in name}}
rank = int(os.environ["RANK"])
torch.save(adapter, os.path.join({out!r}, f"adapter_rank{{rank}}.pt"))
with open(os.path.join({out!r}, f"log_rank{{rank}}.json"), "w") as handle:
    json.dump(trainer.state.log_history, handle)
trainer.end()  # destroys the process group: a process that exits with it alive can abort (SIGABRT)
"""


def nan_batch_script(out: Path, deepspeed: dict | None = None) -> str:
    """NAN_BATCH_SCRIPT writing to ``out``, under DeepSpeed with ``deepspeed`` (a config dict)."""
    return NAN_BATCH_SCRIPT.format(tests=str(ROOT / "tests"), out=str(out), deepspeed=deepspeed)


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node")  # --standalone: a free port


def launched(arguments: list[str], processes: int = 1, env: dict | None = None, timeout: int = 600, cwd=ROOT):
    """Run ``arguments`` (a script or ``-m module``, then its flags) in a new interpreter, under torchrun when
    ``processes`` > 1, and return the finished process. A failure shows the ends of stdout and stderr whole, as
    text: pytest cuts a tuple in an assert to one line, which hid why a worker aborted."""
    launcher = [sys.executable, *TORCHRUN, str(processes)] if processes > 1 else [sys.executable]
    run = subprocess.run(
        [*launcher, *arguments], capture_output=True, text=True, env=env or os.environ, timeout=timeout, cwd=cwd
    )
    if run.returncode != 0:
        raise AssertionError(
            f"exit code {run.returncode} of {' '.join(arguments[:3])} ... ({processes} process(es))\n"
            f"--- end of stdout ---\n{run.stdout[-3000:]}\n--- end of stderr ---\n{run.stderr[-6000:]}"
        )
    return run


def free_port() -> int:
    """A port no process listens on now: the OS picks it (for `accelerate launch --main_process_port`, and as a
    refused address once the probe closes). torchrun takes `--standalone` instead (its own free port)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_refuses_bad_checkpoints(trainer, output_dir) -> None:
    """A trainer refuses, with the fix, a missing checkpoint folder, a half-written one, and `True` with none."""
    import pytest

    from hf_mrp.errors import MRPUserError

    with pytest.raises(MRPUserError, match="is not a folder"):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-9"))
    (output_dir / "checkpoint-4").mkdir()
    (output_dir / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hi')  # cut short
    with pytest.raises(MRPUserError, match="checkpoint .*checkpoint-4 is incomplete.*no complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-4"))
    with pytest.raises(MRPUserError, match="holds no complete checkpoint"):
        trainer.train(resume_from_checkpoint=True)


class WriteAfterUpdate(TrainerCallback):
    """After optimizer step ``update`` (1-based), ``write(model)`` changes a weight in place, so what the next steps
    see is exactly that weight on any machine (a failure made to happen, not hoped for)."""

    def __init__(self, update: int, write):
        self.update, self.write = update, write

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.update:  # global_step counts the updates before this one
            with torch.no_grad():
                self.write(model)


def nan_into_lora(model) -> None:
    """One entry of the first LoRA B matrix set to NaN."""
    next(p for n, p in model.named_parameters() if "lora_B" in n).view(-1)[0] = float("nan")


def zero_final_norm(model) -> None:
    """The final RMSNorm's weight (frozen under LoRA) set to 0: every hidden state reaching the head is 0, every
    logit is 0, and no trainable weight upstream gets any gradient (the norm's weight multiplies them all)."""
    next(p for n, p in model.named_parameters() if n.endswith("model.norm.weight")).zero_()


def with_callback(monkeypatch, callback) -> None:
    """The refine pipeline's MRPTrainer, with ``callback`` added to the callbacks it is given."""
    from hf_mrp.research import refine

    base = refine.MRPTrainer

    class WithCallback(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), callback], **kwargs)

    monkeypatch.setattr(refine, "MRPTrainer", WithCallback)


# ---------------------------------------------------------------- host reads of device values (GPU synchronizations)

PACKAGE_DIR = str(ROOT / "hf_mrp")
HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")  # each waits for the device on a GPU


def _boolean_index(index) -> bool:
    """A boolean mask among the indices: its result's size is data-dependent, so the host must read the mask."""
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)


@contextlib.contextmanager
def counted_host_reads():
    """Count the calls made from hf_mrp's own code that read a device value on the host (``Tensor.item``,
    ``tolist``, ``bool`` / ``int`` / ``float`` of a tensor, ``nonzero``, boolean-mask indexing): on a GPU each one
    waits for the stream. Yields the list of (method, file, line), filled while the block runs."""
    calls: list[tuple[str, str, int]] = []
    originals = {name: getattr(torch.Tensor, name) for name in (*HOST_READS, "__getitem__")}

    def counting(name, original):
        def method(self, *args, **kwargs):
            frame = sys._getframe(1)
            if frame.f_code.co_filename.startswith(PACKAGE_DIR) and (name != "__getitem__" or _boolean_index(args[0])):
                calls.append((name, frame.f_code.co_filename, frame.f_lineno))
            return original(self, *args, **kwargs)

        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
