"""hf_mrp's trainers under a real DeepSpeed engine: run by tests/training/test_deepspeed.py under
`python -m torch.distributed.run --nproc_per_node 2` with DS_ACCELERATOR=cpu (gloo CPU processes).

Each case trains a tiny model for a few steps and records, on every process, what the test compares with one
process without DeepSpeed (`run_case(..., deepspeed=False)`, in the test's own process): the logged losses, every
trainable gradient of every step (gathered whole before the engine's optimizer step), the trained weights and the
audits of MRPAuditCallback. Rank 0 writes them to OUTPUT_DIR/CASE.pt. After training, rank 1 writes a NaN into its
partition of one trainable parameter, and every rank records what the weight-finiteness check reports, before and
after, in OUTPUT_DIR/CASE_finite_rankR.json.
Usage: deepspeed_worker.py OUTPUT_DIR MODEL_DIR CASE [CASE ...]

`deepspeed_worker.py --script SCRIPT ARG ...` runs SCRIPT (examples/refine.py under `accelerate launch`) as
``__main__`` with the same one-off op build skipped, then prints the ZeRO stage Accelerate ran it under.
"""

from __future__ import annotations

import importlib
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerCallback

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the shared helpers
from hf_mrp import register_objective  # noqa: E402

from helpers import VOCAB, tiny_llama  # noqa: E402

STEPS, ROWS, PER_PROCESS = 3, 4, 2  # 4 rows = one global batch of 2 processes x 2 rows: every step sees all rows
CASES = {  # case: (trainer, ZeRO stage, what trains)
    "mrp_zero3": ("mrp", 3, "lora"),
    "sft_zero3": ("sft", 3, "lora"),
    "head_zero3": ("mrp", 3, "lora+head"),  # correct_margin at the final layer, W trained (fisher + W: full_tied)
    "head_zero2": ("mrp", 2, "lora+head"),
    "full_tied_zero3": ("mrp", 3, "all"),  # no LoRA; W is also the input embedding: two gradients, one parameter
    "user_objective_zero3": ("mrp", 3, "lora+head"),  # a registered user objective (user_objective), W trained
    "depth_zero3": ("mrp", 3, "lora+head"),  # depth of correct_margin at layers 0, 1 through the final norm
}
OBJECTIVES = {  # case -> mrp_objective (else fisher) and its other settings
    "user_objective_zero3": ("user_objective", {}),
    # correct_margin at the final layer ("valid", for the reason below): its gradient at the top-2 and target
    # logits reaching the LoRA layers and W's partitioned rows
    "head_zero3": ("correct_margin", {"mrp_margin_normalization": "valid"}),
    # one case for two objectives (an engine start each costs ~15 s): correct_margin as the depth objective, its
    # gradient reaching W, the LoRA layers below and the final norm's re-gathered weight through hooks; "valid":
    # the per-micro-batch mean over the gate ("gated") differs between 2 processes of 2 rows and 1 of 4
    "depth_zero3": (
        "depth",
        {
            "mrp_target_layers": "0,1",
            "mrp_depth_lens": "logit",
            "mrp_depth_objective": "correct_margin",
            "mrp_margin_normalization": "valid",
        },
    ),
}
AUDITED = ("mrp_zero3",)  # also evaluated, and audited by MRPAuditCallback (its files and plots take seconds)
AUDIT_KEYS = ("top1_id", "margin", "entropy", "target_logprob")


def user_objective(top):
    """A user's penalty through the same fused path as the built-ins: it reads the top-3 logits, the target's logit
    and W's rows (registered with rows=True), so every gradient route (logits, target column, rows) runs."""
    margin = top.values[:, 0] - top.values[:, 1]
    unit = top.rows / top.rows.norm(dim=-1, keepdim=True)
    cosine = (unit[:, 0] * unit[:, 1]).sum(-1)
    return torch.relu(top.tau - margin) + 0.1 * cosine + 0.01 * (top.values[:, 0] - top.target_logit)


register_objective("user_objective", user_objective, top_k=3, rows=True)


def deepspeed_config(stage: int) -> dict:
    """ZeRO-`stage` as a user would pass it: batch sizes, clipping and the optimizer from TrainingArguments. ZeRO-3
    partitions every parameter (by default it keeps those under 1e5 elements whole: all of a tiny model's)."""
    zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def skip_shared_memory_op_build() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op once (~90 s); gloo does without it."""
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def common_arguments(output_dir: str, per_device: int, deepspeed: dict | None) -> dict:
    """SGD (clipped to norm 1 by both the Trainer and the engine): its steps carry float32 rounding forward as it is,
    where Adam's first steps (about lr * sign(gradient)) would blow a 1e-9 difference of a tiny entry up to lr."""
    return dict(
        output_dir=output_dir,
        report_to="none",
        disable_tqdm=True,
        max_steps=STEPS,
        logging_steps=1,
        save_strategy="no",
        per_device_train_batch_size=per_device,
        optim="sgd",
        learning_rate=0.1,
        seed=0,
        lr_scheduler_type="constant",
        deepspeed=deepspeed,
        use_cpu=deepspeed is None,
    )


def mrp_trainer(case: str, output_dir: str, per_device: int, deepspeed: dict | None):
    """MRPTrainer on a tiny Llama (and its MRPAuditCallback, for the AUDITED case; else None)."""
    from datasets import Dataset

    from hf_mrp.data import Blocks
    from hf_mrp.training import MRPConfig, MRPTrainer
    from hf_mrp.training.adapters import lora_config_from_args
    from hf_mrp.training.callbacks import MRPAuditCallback

    rng = np.random.default_rng(0)
    ids = rng.integers(0, VOCAB, size=(ROWS, 16)).tolist()
    blocks = Blocks(rng.integers(0, VOCAB, size=(5, 12)), 5 * 11, "random")
    audited = case in AUDITED
    audit = MRPAuditCallback(blocks, batch_size=2, audit_on_evaluate=False) if audited else None
    evaluation = dict(eval_strategy="steps", eval_steps=STEPS) if audited else {}  # once, after the last step
    trains = CASES[case][2]
    objective, settings = OBJECTIVES.get(case, ("fisher", {}))
    args = MRPConfig(
        mrp_objective=objective,
        **settings,
        mrp_lambda=0.6,
        use_lora=trains != "all",
        lora_r=4,
        **evaluation,
        **common_arguments(output_dir, per_device, deepspeed),
    )
    model = tiny_llama(seed=0, tie=trains == "all")
    peft_config = None
    if trains == "lora+head":
        peft_config = lora_config_from_args(args, model)
        peft_config.modules_to_save = ["lm_head"]
    held_out = blocks.input_ids[:ROWS].tolist()  # ROWS rows: as many on each process (no padded duplicates)
    evaluated = Dataset.from_dict({"input_ids": held_out, "labels": held_out}) if audited else None
    trainer = MRPTrainer(
        model=model,
        args=args,
        peft_config=peft_config,
        callbacks=[audit] if audit else None,
        train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
        eval_dataset=evaluated,
    )
    return trainer, audit


def sft_trainer(output_dir: str, per_device: int, deepspeed: dict | None, model_dir: str):
    """MRPSFTTrainer with a LoRA peft_config on the tiny model saved with a real tokenizer (prompt-completion data,
    loss on the completions only, TRL's default)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_mrp.training.sft import MRPSFTConfig, MRPSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = Dataset.from_dict(
        {
            "prompt": ["What is a list?", "Define a tuple.", "What does yield do?", "What is None?"],
            "completion": [
                " An ordered mutable sequence.",
                " An immutable sequence.",
                " It makes a generator.",
                " The null object of Python.",
            ],
        }
    )
    # "valid": the margin objective over all loss positions of the step, like CE ("gated", the paper's mean over the
    # gated positions, is per micro-batch: 2 processes x 2 rows and 1 x 4 rows differ by definition)
    args = MRPSFTConfig(
        mrp_objective="margin",
        mrp_margin_normalization="valid",
        mrp_lambda=0.5,
        bf16=False,
        gradient_checkpointing=False,
        **common_arguments(output_dir, per_device, deepspeed),
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return MRPSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=peft_config
    )


class GradientRecorder(TrainerCallback):
    """Every trainable gradient of each optimizer step, whole, before the step (and before clipping).

    Under DeepSpeed the engine's ``step`` (called by Accelerate right after its backward) is wrapped and reads the
    partitioned gradients with ``safe_get_full_grad`` (a collective: every process calls it); without DeepSpeed
    the accelerator's ``backward`` is wrapped and reads ``.grad``."""

    def __init__(self, trainer):
        self.trainer, self.steps = trainer, []
        trainer.add_callback(self)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled:
            from deepspeed.utils import safe_get_full_grad

            engine = self.trainer.model_wrapped  # the engine exists from here on
            step = engine.step

            def recorded_step(*arguments, **options):
                self._record(safe_get_full_grad)
                return step(*arguments, **options)

            engine.step = recorded_step
        else:
            backward = self.trainer.accelerator.backward

            def recorded_backward(*arguments, **options):
                backward(*arguments, **options)
                self._record(lambda p: p.grad)

            self.trainer.accelerator.backward = recorded_backward

    def _record(self, full_grad) -> None:
        self.steps.append({name: full_grad(p).detach().clone() for name, p in trainable(self.trainer.model)})


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """The trainable weights after training, whole (``safe_get_full_fp32_param`` gathers ZeRO-3's partitions)."""
    if trainer.is_deepspeed_enabled:
        from deepspeed.utils import safe_get_full_fp32_param

        return {name: safe_get_full_fp32_param(p).detach().clone() for name, p in trainable(trainer.model)}
    return {name: p.detach().clone() for name, p in trainable(trainer.model)}


def run_case(case: str, output_dir: str, model_dir: str, deepspeed: bool) -> dict:
    """Train ``case`` for STEPS steps (with ``deepspeed``: under its ZeRO stage, PER_PROCESS rows per process; else
    one process, all ROWS at once) and return losses, gradients, weights, evaluation and audits (and, under
    DeepSpeed, what the weight-finiteness check reports of a NaN in one process's partition)."""
    kind, stage, _ = CASES[case]
    config = deepspeed_config(stage) if deepspeed else None
    per_device = PER_PROCESS if deepspeed else ROWS
    folder = str(Path(output_dir) / case / ("deepspeed" if deepspeed else "single"))
    if kind == "sft":
        trainer, audit = sft_trainer(folder, per_device, config, model_dir), None
    else:  # mrp
        trainer, audit = mrp_trainer(case, folder, per_device, config)
    recorder = GradientRecorder(trainer)
    trainer.train()
    head = trainer.model.get_output_embeddings().weight
    steps = [row for row in trainer.state.log_history if "loss" in row]
    audits = (
        {}
        if audit is None
        else {
            name: {key: result.positions[key] for key in AUDIT_KEYS}
            for name, result in (("before", audit.baseline), ("after", audit.latest))
        }
    )
    return {
        "losses": [
            {key: row[key] for key in ("loss", "loss_ce", "loss_mrp", "mean_margin", "grad_norm")} for row in steps
        ],
        "gradients": recorder.steps,
        "weights": trained_weights(trainer),
        "audits": audits,
        "evaluations": [row for row in trainer.state.log_history if "eval_loss" in row],
        "deepspeed_stage": trainer.accelerator.deepspeed_plugin.zero_stage if deepspeed else None,
        "head_partitioned": hasattr(head, "ds_id") and head.numel() == 0,  # ZeRO-3 keeps W only in its forward
        "finite_check": nan_in_one_partition(trainer) if deepspeed else None,  # after the weights are read
    }


def nan_in_one_partition(trainer) -> dict:
    """Rank 1 writes a NaN into its partition of the first trainable parameter (ZeRO-3: ``param.ds_tensor``; the
    parameter itself is an empty placeholder outside its forward. ZeRO-2: the whole parameter, which each process
    holds) and puts the value back afterwards; weights_are_finite runs on every rank before and with the NaN."""
    import torch.distributed as dist

    from hf_mrp.training.divergence import weights_are_finite

    name, parameter = trainable(trainer.model)[0]
    part = parameter.ds_tensor if hasattr(parameter, "ds_tensor") else parameter.data
    finite_before = weights_are_finite(trainer)
    kept = part.view(-1)[0].item()
    with torch.no_grad():
        if dist.get_rank() == 1:
            part.view(-1)[0] = float("nan")
        finite_with_nan = weights_are_finite(trainer)
        part.view(-1)[0] = kept
    return {
        "parameter": name,
        "placeholder": parameter.numel() == 0,
        "finite_before": finite_before,
        "finite_with_nan_on_rank_1": finite_with_nan,
    }


def main(output_dir: str, model_dir: str, cases: list[str]) -> int:
    import deepspeed
    import torch.distributed as dist

    from hf_mrp.research.cli import leave_process_group

    skip_shared_memory_op_build()
    for case in cases:
        result = run_case(case, output_dir, model_dir, deepspeed=True)
        finite = Path(output_dir) / f"{case}_finite_rank{dist.get_rank()}.json"
        finite.write_text(json.dumps(result["finite_check"]))
        result["deepspeed_version"] = deepspeed.__version__
        if dist.get_rank() == 0:
            torch.save(result, Path(output_dir) / f"{case}.pt")
        print(f"rank {dist.get_rank()} {case}: trained", flush=True)
    leave_process_group()  # as hf-mrp commands do: an exit with the group alive can abort (SIGABRT)
    return 0


def run_script(script: str, arguments: list[str]) -> int:
    """Run ``script`` as ``__main__`` (as `accelerate launch` would), then print the ZeRO stage it ran under."""
    from accelerate.state import AcceleratorState

    skip_shared_memory_op_build()
    sys.argv = [script, *arguments]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as done:
        if done.code:
            return int(done.code) if isinstance(done.code, int) else 1
    plugin = AcceleratorState().deepspeed_plugin
    print(f"zero stage {None if plugin is None else plugin.zero_stage}", flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--script":
        sys.exit(run_script(sys.argv[2], sys.argv[3:]))
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
