"""hf_mrp under a real DeepSpeed engine (ZeRO-3 and ZeRO-2 on 2 gloo CPU processes, DS_ACCELERATOR=cpu) against one
process without DeepSpeed: MRPTrainer and MRPSFTTrainer with LoRA, a trained output head, and examples/refine.py
launched with examples/accelerate/zero3_cpu.yaml. Workers: tests/training/deepspeed_worker.py."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

deepspeed = pytest.importorskip("deepspeed")

from deepspeed_worker import AUDIT_KEYS, CASES, STEPS, deepspeed_config, run_case  # noqa: E402

from helpers import (  # noqa: E402
    assert_same_flips,
    decided,
    free_port,
    launched,
    nan_batch_script,
    one_torch_thread,
    relative_error,
    tiny_model_bounds,
    tiny_refine_flags,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(arguments: list[str], processes: int = 2) -> str:
    """The stdout of ``arguments`` run in ``processes`` DeepSpeed CPU processes (a failure shows why)."""
    return launched(arguments, processes, env=ENV, timeout=300).stdout


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory, tiny_model_dir) -> Path:
    """Every case of the worker, trained under DeepSpeed in one 2-process launch (one start-up for all)."""
    folder = tmp_path_factory.mktemp("deepspeed")
    stdout = launch([str(HERE / "deepspeed_worker.py"), str(folder), str(tiny_model_dir), *CASES])
    for rank in (0, 1):
        assert all(f"rank {rank} {case}: trained" in stdout for case in CASES), stdout[-3000:]
    return folder


# Two processes of 2 rows against one of 4 (other batch shapes; gradients reduced over the processes in another
# order): every number is two float32 computations of one value, each within the tiny decoder's bounds (the larger
# vocabulary, 49,152, of the SFT case's model bounds both models), relative to the magnitudes. Logits stay under
# Z = 4 in size: |z_i| <= ||h|| ||w_i||, ||h|| <= sqrt(32) x 1.3 after the final norm (weights 1 at init, moved by
# at most 3 x 0.1 by three SGD steps of clipped gradients), ||w_i|| <= 0.15 at init (std 0.02) + 0.3 the same way.
# So a logit is within Z x LOSS_BOUND, a margin or log-probability within 2 Z LOSS_BOUND, the entropy 2 Z^2 LOSS_BOUND.
LOSS_BOUND, GRAD_BOUND = (2 * bound for bound in tiny_model_bounds(vocab=49_152, positions=64, length=32))
Z = 4.0
NAN_BATCH_LR = 1e-2  # helpers.NAN_BATCH_SCRIPT's learning rate (SGD)


def weight_atol(steps: int, lr: float = 0.1) -> float:
    """SGD with gradients clipped to norm 1 (entries <= 1): each step moves a weight by lr x (its gradient's error
    plus the clip factor's, each within GRAD_BOUND), so ``steps`` steps by at most 2 x steps x lr x GRAD_BOUND."""
    return 2 * steps * lr * GRAD_BOUND


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float | None = None) -> None:
    """A gradient within GRAD_BOUND of its largest entry (default), or a weight within ``atol``."""
    assert got.shape == want.shape, what
    if atol is None:
        assert relative_error(got, want) <= GRAD_BOUND, f"{what}: {relative_error(got, want):.3g}"
    else:
        assert (got - want).abs().max() <= atol, f"{what}: {(got - want).abs().max():.3g}"


def assert_same_training(engine: dict, single: dict, lora_only: bool = True) -> None:
    """Step losses and logged metrics, every trainable gradient of every step, the trained weights, the audits."""
    assert len(engine["losses"]) == len(single["losses"]) == STEPS
    for got, want in zip(engine["losses"], single["losses"]):
        for key, value in want.items():  # grad_norm: a gradient's bound; mean_margin: absolute
            bound = GRAD_BOUND if key == "grad_norm" else LOSS_BOUND
            assert got[key] == pytest.approx(value, rel=bound, abs=2 * Z * LOSS_BOUND), (key, got, want)
    assert len(engine["gradients"]) == len(single["gradients"]) == STEPS
    for step, (got, want) in enumerate(zip(engine["gradients"], single["gradients"])):
        assert got.keys() == want.keys() and want, step
        if lora_only:
            assert all("lora_" in name for name in want) and any("lora_A" in name for name in want)
        for name, grad in want.items():
            assert_close(got[name], grad, f"step {step + 1} gradient of {name}")
        assert any(grad.abs().max() > 0 for grad in want.values())
    assert engine["weights"].keys() == single["weights"].keys()
    for name, weight in single["weights"].items():
        assert_close(engine["weights"][name], weight, f"trained {name}", atol=weight_atol(STEPS))
    assert engine["audits"].keys() == single["audits"].keys()
    for moment, audit in single["audits"].items():
        sure = decided(audit["margin"], Z * LOSS_BOUND)  # a top-1 compared where no rounding can swap it
        assert sure.mean() > 0.8
        np.testing.assert_array_equal(engine["audits"][moment]["top1_id"][sure], audit["top1_id"][sure])
        for key in AUDIT_KEYS:  # margins, log-probabilities: 2 logits' errors; the entropy 2 max(1, |z|) of them
            atol = 2 * Z * Z * LOSS_BOUND if key == "entropy" else 2 * Z * LOSS_BOUND
            np.testing.assert_allclose(
                engine["audits"][moment][key], audit[key], rtol=0, atol=atol, err_msg=f"audit {moment}: {key}"
            )


def results(engine_runs: Path, case: str, model_dir: Path) -> tuple[dict, dict]:
    """(the 2-process DeepSpeed run, the same training in this process without DeepSpeed)."""
    engine = torch.load(engine_runs / f"{case}.pt", weights_only=False)
    assert engine["deepspeed_stage"] == CASES[case][1] and engine["deepspeed_version"] == deepspeed.__version__
    assert engine["head_partitioned"] == (CASES[case][1] == 3)  # ZeRO-3 really partitions W outside its forward
    with one_torch_thread():
        return engine, run_case(case, str(engine_runs / "reference"), str(model_dir), deepspeed=False)


def test_mrp_trainer_under_zero3_equals_one_process(engine_runs, tiny_model_dir):
    engine, single = results(engine_runs, "mrp_zero3", tiny_model_dir)
    assert_same_training(engine, single)
    assert engine["audits"].keys() == {"before", "after"} and len(single["evaluations"]) == 1
    for key in ("eval_loss", "eval_loss_ce", "eval_loss_mrp", "eval_mean_margin"):  # Trainer.evaluate on the engine
        want = single["evaluations"][0][key]
        assert engine["evaluations"][0][key] == pytest.approx(want, rel=LOSS_BOUND, abs=2 * Z * LOSS_BOUND), key
    assert len(single["audits"]["after"]["margin"]) == 55  # every audited position, gathered from both processes


def test_mrp_sft_trainer_under_zero3_equals_one_process(engine_runs, tiny_model_dir):
    engine, single = results(engine_runs, "sft_zero3", tiny_model_dir)
    assert_same_training(engine, single)


@pytest.mark.parametrize("case", ["head_zero3", "head_zero2", "full_tied_zero3", "user_objective_zero3", "depth_zero3"])
def test_trained_output_head_under_zero3_and_zero2_equals_one_process(engine_runs, tiny_model_dir, case):
    """W's gradient, made in the fused forward, reaches the engine through autograd: ZeRO-3's gradient hooks
    reduce-scatter it like any other (and ZeRO-2's reduce it), so W trains as in one process; tied to the input
    embedding (full fine-tuning), its two gradients add up as in one process. correct_margin at the final layer
    (head_zero3), a registered user objective (reading
    the top-3 logits, the target's logit and W's rows) and depth of correct_margin (the target layers' outputs kept
    by hooks, through the final norm, whose weight ZeRO-3 gathers again inside the head's forward) go through the
    same path: the same training."""
    engine, single = results(engine_runs, case, tiny_model_dir)
    assert_same_training(engine, single, lora_only=False)
    head = "embed_tokens" if case == "full_tied_zero3" else "lm_head"
    assert any(head in name for name in single["gradients"][0]), list(single["gradients"][0])


def test_a_nan_in_one_process_partition_is_seen_by_every_process(engine_runs):
    """weights_are_finite reads each process's own partition (ZeRO-3's ``ds_tensor``: the parameter itself is an empty
    placeholder outside its forward, where a NaN cannot be seen) and agrees one flag over the processes: a NaN that
    rank 1 writes into its partition stops rank 0 too. ZeRO-2 holds whole parameters: the same flag."""
    for case, (_, stage, _) in CASES.items():
        for rank in (0, 1):
            check = json.loads((engine_runs / f"{case}_finite_rank{rank}.json").read_text())
            assert check["placeholder"] == (stage == 3), (case, rank, check)
            assert check["finite_before"] and not check["finite_with_nan_on_rank_1"], (case, rank, check)


def refine_arguments(model_dir: Path, output_dir: Path, per_device: int) -> list[str]:
    # SGD: see deepspeed_worker.common_arguments
    return tiny_refine_flags(
        model_dir, output_dir, per_device_train_batch_size=per_device, optim="sgd", learning_rate="0.1"
    )


def test_refine_example_under_accelerate_zero3_config_equals_one_process(tiny_model_dir, tmp_path):
    """examples/refine.py launched as a user would (accelerate launch with the ZeRO-3 CPU config) logs the losses,
    saves the adapter and audits as one process without DeepSpeed does."""
    from safetensors.torch import load_file

    from hf_mrp.research import cli

    accelerate = [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples" / "accelerate" / "zero3_cpu.yaml"),
        "--main_process_port",
        str(free_port()),
        str(HERE / "deepspeed_worker.py"),
        "--script",
        str(ROOT / "examples" / "refine.py"),
    ]
    stdout = launch([*accelerate, *refine_arguments(tiny_model_dir, tmp_path / "zero3", per_device=2)], processes=1)
    assert stdout.count("zero stage 3") == 2, stdout[-2000:]
    with one_torch_thread():  # what examples/refine.py runs, in this process
        assert cli.main(["refine", *refine_arguments(tiny_model_dir, tmp_path / "one", per_device=4)]) == 0
    logs = [
        [row for row in json.loads((tmp_path / run / "training_log.json").read_text()) if "loss" in row]
        for run in ("zero3", "one")
    ]
    assert len(logs[0]) == len(logs[1]) == 2
    for got, want in zip(*logs):
        for key in ("loss", "loss_ce", "loss_mrp", "mean_margin", "grad_norm"):
            bound = GRAD_BOUND if key == "grad_norm" else LOSS_BOUND
            assert got[key] == pytest.approx(want[key], rel=bound, abs=2 * Z * LOSS_BOUND), (key, got, want)
    adapters = [load_file(tmp_path / run / "adapter_model.safetensors") for run in ("zero3", "one")]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[1]) > 4
    for name, weight in adapters[1].items():
        assert_close(adapters[0][name], weight, f"saved {name}", atol=weight_atol(2))
    assert_same_flips(tmp_path / "zero3", tmp_path / "one", atol=Z * LOSS_BOUND)


@pytest.mark.slow  # two 2-process launches (the DDP one shared with test_reliability: conftest.ddp_nan_batch)
def test_a_nan_batch_one_process_meets_is_skipped_under_zero3_as_under_ddp(tmp_path, ddp_nan_batch):
    """One of 4 rows has a NaN objective weight: under ZeRO-3 (whose engine steps inside backward) both processes
    skip that step with exact zero gradients, as under DDP; the next step's numbers and the weights equal DDP's."""
    script = tmp_path / "nan_batch.py"
    script.write_text(nan_batch_script(tmp_path, deepspeed_config(3)))
    launch([str(script)])
    runs = {}
    for name, out in (("ddp", ddp_nan_batch[0]), ("zero3", tmp_path)):
        logs = [[row for row in json.loads((out / f"log_rank{r}.json").read_text()) if "loss" in row] for r in (0, 1)]
        adapters = [torch.load(out / f"adapter_rank{r}.pt") for r in (0, 1)]
        assert logs[0] == logs[1], name
        for weight in adapters[1]:
            assert torch.equal(adapters[0][weight], adapters[1][weight]), (name, weight)
        runs[name] = logs[0], adapters[0]
    (zero3_log, zero3_adapter), (ddp_log, ddp_adapter) = runs["zero3"], runs["ddp"]
    assert [row["nonfinite_skipped"] for row in zero3_log] == [1, 1]
    assert zero3_log[0]["loss"] == 0.0 and zero3_log[0]["grad_norm"] == 0.0  # the skipped step: no update
    for key in ("loss", "loss_ce", "loss_mrp", "mean_margin", "grad_norm"):  # 2 processes each, other engines
        bound = GRAD_BOUND if key == "grad_norm" else LOSS_BOUND
        assert zero3_log[1][key] == pytest.approx(ddp_log[1][key], rel=bound, abs=2 * Z * LOSS_BOUND), key
    assert zero3_adapter.keys() == ddp_adapter.keys() and zero3_adapter
    for weight, value in ddp_adapter.items():
        assert torch.isfinite(zero3_adapter[weight]).all()
        assert_close(zero3_adapter[weight], value, weight, atol=weight_atol(2, lr=NAN_BATCH_LR))
