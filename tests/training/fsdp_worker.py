"""Run under `torchrun --nproc_per_node 2`: FSDP2 (fully_shard on a gloo CPU mesh, applied as Accelerate
does: each decoder layer, then the root) against the same model unsharded, in the same process.

Checks MRPTrainer.compute_loss' loss and every trainable gradient, and the audit; then writes a NaN into rank 1's
local shard of one trainable parameter and checks that the weight-finiteness check reports it on every rank. Exits
non-zero on a mismatch; prints one line per rank and mode. Usage: fsdp_worker.py OUTPUT_DIR MODE[,MODE] (lora, full:
several modes in one launch, one process group)
"""

import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, __file__.rsplit("/", 2)[0])  # tests/: the shared helpers
from hf_mrp.audit.collect import collect_statistics  # noqa: E402
from hf_mrp.data import Blocks  # noqa: E402
from hf_mrp.models import decoder_layers  # noqa: E402
from hf_mrp.research.cli import leave_process_group  # noqa: E402
from hf_mrp.training import MRPConfig, MRPTrainer  # noqa: E402
from hf_mrp.training.divergence import weights_are_finite  # noqa: E402

from helpers import VOCAB, decided, llama_logit_magnitude, relative_error, tiny_llama, tiny_model_bounds  # noqa: E402


def trainer_for(output_dir: str, mode: str, shard: bool) -> MRPTrainer:
    args = MRPConfig(
        output_dir=output_dir,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        mrp_objective="fisher",
        mrp_lambda=0.6,
        use_lora=mode == "lora",
        lora_r=4,
        seed=0,
    )
    trainer = MRPTrainer(model=tiny_llama(seed=0), args=args)
    if shard:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in decoder_layers(trainer.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(trainer.model, mesh=mesh)
    return trainer


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def nan_in_one_shard(trainer: MRPTrainer, rank: int) -> list[str]:
    """Rank 1 writes a NaN into its local shard (DTensor.to_local()) of one trainable parameter; every rank's
    weights_are_finite must report it (one all-reduced flag), and report finite weights before."""
    failures = [] if weights_are_finite(trainer) else ["finite weights reported non-finite"]
    shards = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad and isinstance(p, DTensor)]
    if not shards:
        return [*failures, "no trainable DTensor parameter"]
    if rank == 1:
        name, parameter = next((n, p) for n, p in shards if p.to_local().numel())
        with torch.no_grad():
            parameter.to_local().view(-1)[0] = float("nan")
        if not torch.isnan(parameter.to_local()).any():
            failures.append(f"the NaN did not reach {name}'s local shard")
    if weights_are_finite(trainer):
        failures.append("a NaN in rank 1's shard went unseen")
    return failures


def check(output_dir: str, mode: str, rank: int) -> list[str]:
    """The sharded run of ``mode`` against the unsharded one; prints this rank's line, returns its failures."""
    rng = np.random.default_rng(0)  # every rank: the same batch, so FSDP's gradient average is that batch's gradient
    ids = torch.as_tensor(rng.integers(0, VOCAB, size=(2, 16)))
    labels = ids.clone()
    labels[0, :5] = -100
    results = {}
    for shard in (False, True):
        trainer = trainer_for(output_dir, mode, shard)
        loss = trainer.compute_loss(trainer.model, {"input_ids": ids, "labels": labels})
        loss.backward()
        grads = {name: full(p.grad).detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        blocks = Blocks(rng.integers(0, VOCAB, size=(5, 12)), 5 * 11, "random")
        rng = np.random.default_rng(0)  # same blocks next round
        ids = torch.as_tensor(rng.integers(0, VOCAB, size=(2, 16)))
        positions, _ = collect_statistics(trainer.model, blocks, batch_size=2, progress=False, layers=[0, 1])
        if not shard:  # the magnitudes a logit's rounding error is relative to (LoRA trains neither head nor norm)
            z_scale = llama_logit_magnitude(trainer.model)
        results[shard] = (loss.item(), grads, positions)
    (loss0, grads0, pos0), (loss1, grads1, pos1) = results[False], results[True]
    failures = []
    # Two float32 computations of the same numbers (FSDP gathers the same weights; the audit splits the blocks over
    # the ranks, so other batch shapes): each within the tiny decoder's bound (helpers.tiny_model_bounds) of the
    # exact one. Gradients relative to the model's largest (LoRA's A gradients are 0 while B is)
    loss_bound, grad_bound = (2 * bound for bound in tiny_model_bounds(positions=26, length=16))
    if abs(loss0 - loss1) > loss_bound * abs(loss0):
        failures.append(f"loss {loss0} vs {loss1}")
    assert grads0.keys() == grads1.keys() and grads0
    largest = max(grad.abs().max().item() for grad in grads0.values())
    for name in grads0:
        if not torch.allclose(grads0[name], grads1[name], rtol=grad_bound, atol=grad_bound * largest):
            failures.append(f"grad {name}: relative error {relative_error(grads1[name], grads0[name]):.3g}")
    # a logit within 2 x the bound of the largest; a margin or log-probability moves by twice that, the entropy by
    # 2 max(1, |z|) times it; a top-1 compared where no such error can swap it
    atol = 2 * tiny_model_bounds(positions=55, length=12)[0] * z_scale
    sure = decided(pos0["margin"], atol)
    if not (sure.mean() > 0.9 and np.array_equal(pos0["top1_id"][sure], pos1["top1_id"][sure])):
        failures.append("audit top1_id")
    for key, lipschitz in (("margin", 2), ("entropy", 2 * max(1.0, z_scale)), ("target_logprob", 2)):
        if not np.allclose(pos0[key], pos1[key], rtol=0, atol=lipschitz * atol):
            failures.append(f"audit {key}")
    failures += nan_in_one_shard(trainer, rank)  # the sharded trainer of the last round
    print(
        f"rank {rank} mode {mode}: loss {loss0:.6f} vs {loss1:.6f}, {len(grads0)} gradients, "
        f"{len(pos0['margin'])} audited positions; failures: {failures or 'none'}",
        flush=True,
    )
    return failures


def main(output_dir: str, modes: str) -> int:
    dist.init_process_group("gloo")
    failures = [failure for mode in modes.split(",") for failure in check(output_dir, mode, dist.get_rank())]
    leave_process_group()  # as hf-mrp commands do: an exit with the group alive can abort (SIGABRT)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
