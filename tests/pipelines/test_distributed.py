"""examples/refine.py under torchrun with 2 CPU processes (gloo) logs the same losses as 1 process."""

import json
import os
import re
from pathlib import Path

import pytest

from helpers import assert_same_flips, launched, one_torch_thread, tiny_model_bounds, tiny_refine_flags

pytestmark = pytest.mark.slow  # torchrun / accelerate launch processes

ROOT = Path(__file__).resolve().parents[2]


def refine(nproc: int, per_device: int, model_dir: Path, output_dir: Path, use_lora: str = "true") -> list[dict]:
    args = tiny_refine_flags(
        model_dir,
        output_dir,
        per_device_train_batch_size=per_device,
        learning_rate="1e-2",
        use_cpu="true",
        use_lora=use_lora,
    )
    if nproc == 1:  # what examples/refine.py runs, in this process (one interpreter start-up fewer)
        from hf_mrp.research import cli

        with one_torch_thread():
            assert cli.main(["refine", *args]) == 0
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        launched([str(ROOT / "examples" / "refine.py"), *args], processes=nproc, env=env)
    return json.loads((output_dir / "training_log.json").read_text())


@pytest.mark.parametrize("use_lora", ["true", "false"])
def test_two_processes_log_the_same_losses_as_one(tiny_model_dir, tmp_path, use_lora):
    """LoRA, and the whole model trained (the head's weight too: reached from the model's outputs only through the
    loss computed in the head, which DDP's find_unused_parameters must see; it failed 'marked as ready twice')."""
    single = refine(1, 4, tiny_model_dir, tmp_path / "one", use_lora)
    double = refine(2, 2, tiny_model_dir, tmp_path / "two", use_lora)
    steps = [row for row in single if "loss" in row]
    assert len(steps) == 2  # 4 training blocks = one global batch of 4: both runs see the same rows each step
    # 2 rows a process against 4 in one: two float32 computations of each number, each within the tiny decoder's
    # bound (V = 49,152, 4 blocks of 32); logits are under 1 (|z_i| <= ||h|| ||w_i|| = sqrt(32) x at most 0.16 for
    # rows of std 0.02: LoRA trains neither the head nor the final norm), so the bound is absolute too. Step 2
    # follows one AdamW step (lr 1e-2): lr m / (sqrt(v) + eps) moves by lr eps dg / g^2 more, visibly only for
    # weights with |g| < 1e-6, which move the loss by under |g| lr.
    bound = 2 * tiny_model_bounds(vocab=49_152, positions=124, length=32)[0]
    for a, b in zip(steps, [row for row in double if "loss" in row]):
        for key in ("loss", "loss_ce", "loss_mrp", "mean_margin"):
            assert a[key] == pytest.approx(b[key], rel=bound, abs=bound), (key, a, b)
    saved = "adapter_model.safetensors" if use_lora == "true" else "model.safetensors"
    assert (tmp_path / "two" / saved).exists()
    assert_same_flips(tmp_path / "two", tmp_path / "one", atol=bound)


def test_several_processes_without_accelerators_join_one_job(tmp_path):
    """torchrun / accelerate launch --multi_gpu on a machine without GPUs, without --use_cpu: one gloo job
    (world size 2), never two independent runs writing one folder (plain TrainingArguments gives world 1)."""
    script = tmp_path / "world.py"
    script.write_text(
        "import os, sys\n"
        "from transformers import TrainingArguments\n"
        "from hf_mrp.training import MRPConfig\n"
        "cls = MRPConfig if sys.argv[1] == 'mrp' else TrainingArguments\n"
        f"args = cls(output_dir={str(tmp_path / 'out')!r}, report_to='none')\n"
        "print(f\"rank {os.environ['RANK']} world {args.world_size}\", flush=True)\n"
        "from hf_mrp.research.cli import leave_process_group\n"
        "leave_process_group()\n"  # as hf-mrp commands do: an exit with the group alive can abort
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worlds = {}
    for kind in ("mrp", "plain"):
        run = launched([str(script), kind], processes=2, env=env, timeout=300)
        worlds[kind] = sorted(re.findall(r"world (\d)", run.stdout))
    assert worlds == {"mrp": ["2", "2"], "plain": ["1", "1"]}
