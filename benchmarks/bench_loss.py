"""Loss forward + backward from hidden states: plain CE vs naive MRP vs hf_mrp's fused chunked loss.

python benchmarks/bench_loss.py                 # B=4, T=512, V=49,152, d=576 (SmolLM2's head)
python benchmarks/bench_loss.py --smoke         # tiny sizes, seconds (what CI runs)

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, vocab, dim = (256, 1000, 64) if args.smoke else (4 * 511, 49152, 576)
    torch.manual_seed(0)
    hidden = torch.randn(n, dim, requires_grad=True)
    weight = torch.randn(vocab, dim) * 0.05  # frozen, as under LoRA
    targets = torch.randint(0, vocab, (n,))

    def plain_ce():
        F.cross_entropy((hidden @ weight.T).float(), targets).backward()

    def naive(penalty):
        def run():
            z = (hidden @ weight.T).float()
            (F.cross_entropy(z, targets) + 0.6 * penalty(z).mean()).backward()

        return run

    def fused(objective):
        def run():
            sums = mrp_loss_sums(
                hidden, weight, targets, MRPSettings(objective=objective, lam=0.6, normalization="valid")
            )
            (sums.total / n).backward()

        return run

    naive_penalties = {
        "fisher": lambda z: naive_fisher(z, weight),
        "margin": lambda z: margin_penalty(z.topk(2).values, 1.0),
        "entropy": lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1),
    }
    cases = {"plain CE (full logits)": plain_ce}
    for objective, penalty in naive_penalties.items():
        cases[f"naive CE + {objective}"] = naive(penalty)
        cases[f"fused CE + {objective} (hf_mrp)"] = fused(objective)
    register_user_objectives()
    labels = {"correct_margin": "correct_margin", "proxy": "proxy", "user hinge": "hinge"}
    labels["user entropy (autograd)"] = "user_entropy"
    for label, objective in labels.items():
        cases[f"fused CE + {label}"] = fused(objective)
    print(f"machine: {machine()}\nloss fwd+bwd from hidden states: N={n} positions, V={vocab}, d={dim}, W frozen")
    report(f"median of {args.repeats}, interleaved", interleaved_medians(cases, args.repeats), "plain CE (full logits)")


if __name__ == "__main__":
    main()
