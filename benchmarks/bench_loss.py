"""Loss forward + backward from hidden states: plain CE vs naive MRP vs hf_mrp's fused chunked loss, each beside
the chunked two-matmul floor (per chunk of 1,024 positions z = h W^T and dh = z W, plus dW += z^T h when W trains:
the matmuls any loss through the head does, and nothing else). Ratios to the floor measured in the same run hold
on a shared machine where absolute times do not.

python benchmarks/bench_loss.py                 # B=4, T=511, V=49,152, d=576 (SmolLM2's head), W frozen
python benchmarks/bench_loss.py --head paper    # 512 positions, V=248,320, d=2,560 (Qwen3.5's head), fused only
python benchmarks/bench_loss.py --head paper --train_weight   # the same with W trained
python benchmarks/bench_loss.py --smoke         # tiny sizes, seconds (what CI runs)
python benchmarks/bench_loss.py --head paper --train_weight --profile   # where each case's time goes, op by op

Beside the paper's objectives: the released code's correct_margin and proxy, and two objectives registered as a
user registers them (a top-2 hinge; the entropy through the generic full-logits autograd path).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import interleaved_medians, machine, report

from hf_mrp.ops import MRPSettings, margin_penalty, mrp_loss_sums, register_objective


def naive_fisher(z: torch.Tensor, weight: torch.Tensor, k: int = 5) -> torch.Tensor:
    """The paper's style: full float32 logits, top-k, einsums over [N, k, k, d]."""
    values, ids = z.topk(k, dim=-1)
    p = torch.softmax(values, -1)
    w = F.normalize(weight[ids], dim=-1)  # [N, k, d]
    diff = w[:, :, None, :] - w[:, None, :, :]  # [N, k, k, d]
    u = torch.einsum("nijd,nmd->nijm", diff, w)  # [N, k, k, k]
    sigma = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    d2 = torch.einsum("nijm,nml,nijl->nij", u, sigma, u)
    d = d2.clamp_min(1e-8).sqrt()
    mask = 1 - torch.eye(k)
    return (p[:, :, None] * p[:, None, :] * d * mask).sum((1, 2))


def register_user_objectives() -> None:
    """Two objectives as a user registers them (docs/objectives.md): a top-2 hinge, and the entropy through the
    generic full-logits path (autograd over the chunk's [chunk x V] logits, beside the built-in's closed form)."""

    def hinge(top):
        return torch.relu(top.tau - (top.values[:, 0] - top.values[:, 1]))

    def entropy(top):
        return -(torch.softmax(top.logits, -1) * torch.log_softmax(top.logits, -1)).sum(-1)

    register_objective("hinge", hinge, top_k=2)
    register_objective("user_entropy", entropy, top_k=2, full_logits=True)


FLOOR = "chunked two-matmul floor"
SIZES = {"smollm2": (4 * 511, 49152, 576), "paper": (512, 248320, 2560), "smoke": (256, 1000, 64)}


def chunked_floor(hidden: torch.Tensor, weight: torch.Tensor, chunk: int = 1024):
    """The head's matmuls alone, chunk by chunk (what the fused loss cannot do without)."""

    @torch.no_grad()
    def run():
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            z = h @ weight.T
            grad_h[start : start + chunk] = z @ weight
            if grad_w is not None:
                grad_w.addmm_(z.T, h)

    return run


def profiled(cases: dict, top: int = 8) -> None:
    """One call of each case under torch.profiler (after one unprofiled warm-up call): its ops' total and the ``top``
    ops by their own time, to see what separates a fused path from the floor beyond the matmuls."""
    from torch.profiler import ProfilerActivity, profile

    for name, run in cases.items():
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        events = sorted(prof.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
        total = sum(event.self_cpu_time_total for event in events) / 1e3
        ops = ", ".join(f"{event.key} {event.self_cpu_time_total / 1e3:.0f}" for event in events[:top])
        print(f"  {name}: {total:.0f} ms in ops; by own time (ms): {ops}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--head", choices=("smollm2", "paper"), default="smollm2")
    parser.add_argument("--train_weight", action="store_true", help="W trains (its gradient is formed)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="one profiled call of each case instead of timing")
    args = parser.parse_args()
    n, vocab, dim = SIZES["smoke" if args.smoke else args.head]
    torch.manual_seed(0)
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.05).requires_grad_(args.train_weight)  # frozen by default, as under LoRA
    targets = torch.randint(0, vocab, (n,))

    def cleared(run):
        def timed():
            run()
            hidden.grad = weight.grad = None

        return timed

    def plain_ce():
        F.cross_entropy((hidden @ weight.T).float(), targets).backward()

    def naive(penalty):
        def run():
            z = (hidden @ weight.T).float()
            (F.cross_entropy(z, targets) + 0.6 * penalty(z).mean()).backward()

        return run

    def fused(objective, lam=0.6):
        def run():
            sums = mrp_loss_sums(
                hidden, weight, targets, MRPSettings(objective=objective, lam=lam, normalization="valid")
            )
            (sums.total / n).backward()

        return run

    naive_penalties = {
        "fisher": lambda z: naive_fisher(z, weight),
        "margin": lambda z: margin_penalty(z.topk(2).values, 1.0),
        "entropy": lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1),
    }
    cases = {FLOOR: chunked_floor(hidden, weight), "fused CE (hf_mrp)": fused("fisher", lam=0.0)}
    full_size = args.head == "smollm2" or args.smoke  # the naive paths' [N x V] logits and the variants
    if full_size:
        cases["plain CE (full logits)"] = plain_ce
    for objective, penalty in naive_penalties.items():
        if full_size:
            cases[f"naive CE + {objective}"] = naive(penalty)
        cases[f"fused CE + {objective} (hf_mrp)"] = fused(objective)
    register_user_objectives()
    labels = {"correct_margin": "correct_margin", "proxy": "proxy", "user hinge": "hinge"}
    labels["user entropy (autograd)"] = "user_entropy"
    for label, objective in labels.items() if full_size else ():
        cases[f"fused CE + {label}"] = fused(objective)
    trained = "W trained" if args.train_weight else "W frozen"
    print(f"machine: {machine()}\nloss fwd+bwd from hidden states: N={n} positions, V={vocab}, d={dim}, {trained}")
    if args.profile:
        profiled({name: cleared(run) for name, run in cases.items()})
        return
    medians = interleaved_medians({name: cleared(run) for name, run in cases.items()}, args.repeats)
    report(f"median of {args.repeats}, interleaved", medians, FLOOR)


if __name__ == "__main__":
    main()
