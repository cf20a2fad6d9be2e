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

from helpers import free_port, launched, nan_batch_script, one_torch_thread, tiny_refine_flags  # noqa: E402

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


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 sums in another order: 1e-5 of the tensor's largest entry."""
    assert got.shape == want.shape, what
    assert (got - want).abs().max() <= 1e-5 * want.abs().max() + 1e-8, f"{what}: {(got - want).abs().max():.3g}"


def assert_same_training(engine: dict, single: dict, lora_only: bool = True) -> None:
    """Step losses and logged metrics, every trainable gradient of every step, the trained weights, the audits."""
    assert len(engine["losses"]) == len(single["losses"]) == STEPS
    for got, want in zip(engine["losses"], single["losses"]):
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, got, want)
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
        assert_close(engine["weights"][name], weight, f"trained {name}")
    assert engine["audits"].keys() == single["audits"].keys()
    for moment, audit in single["audits"].items():
        np.testing.assert_array_equal(engine["audits"][moment]["top1_id"], audit["top1_id"])
        for key in AUDIT_KEYS:
            np.testing.assert_allclose(
                engine["audits"][moment][key], audit[key], rtol=1e-5, atol=1e-5, err_msg=f"audit {moment}: {key}"
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
        assert engine["evaluations"][0][key] == pytest.approx(single["evaluations"][0][key], rel=1e-5), key
    assert len(single["audits"]["after"]["margin"]) == 55  # every audited position, gathered from both processes


def test_mrp_sft_trainer_under_zero3_equals_one_process(engine_runs, tiny_model_dir):
    engine, single = results(engine_runs, "sft_zero3", tiny_model_dir)
    assert_same_training(engine, single)


@pytest.mark.parametrize("case", ["head_zero3", "head_zero2", "full_tied_zero3", "user_objective_zero3"])
def test_trained_output_head_under_zero3_and_zero2_equals_one_process(engine_runs, tiny_model_dir, case):
    """W's gradient, made in the fused forward, reaches the engine through autograd: ZeRO-3's gradient hooks
    reduce-scatter it like any other (and ZeRO-2's reduce it), so W trains as in one process; tied to the input
    embedding (full fine-tuning), its two gradients add up as in one process. A registered user objective (reading
    the top-3 logits, the target's logit and W's rows) goes through the same path: the same training."""
    engine, single = results(engine_runs, case, tiny_model_dir)
    assert_same_training(engine, single, lora_only=False)
    head = "embed_tokens" if case == "full_tied_zero3" else "lm_head"
    assert any(head in name for name in single["gradients"][0]), list(single["gradients"][0])


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
            assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got, want)
    adapters = [load_file(tmp_path / run / "adapter_model.safetensors") for run in ("zero3", "one")]
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[1]) > 4
    for name, weight in adapters[1].items():
        assert_close(adapters[0][name], weight, f"saved {name}")
    flips = [json.loads((tmp_path / run / "comparison" / "flip_audit.json").read_text()) for run in ("zero3", "one")]
    assert flips[0]["n_positions"] == flips[1]["n_positions"] == 62
    for key in ("median_margin_before", "median_margin_after", "w2r", "r2w"):
        assert flips[0][key] == pytest.approx(flips[1][key], abs=1e-5), key


@pytest.mark.slow  # two 2-process launches
def test_a_nan_batch_one_process_meets_is_skipped_under_zero3_as_under_ddp(tmp_path):
    """One of 4 rows has a NaN objective weight: under ZeRO-3 (whose engine steps inside backward) both processes
    skip that step with exact zero gradients, as under DDP; the next step's numbers and the weights equal DDP's."""
    runs = {}
    for name, config in (("ddp", None), ("zero3", deepspeed_config(3))):
        out = tmp_path / name
        out.mkdir()
        script = out / "nan_batch.py"
        script.write_text(nan_batch_script(out, config))
        launch([str(script)])
        logs = [[row for row in json.loads((out / f"log_rank{r}.json").read_text()) if "loss" in row] for r in (0, 1)]
        adapters = [torch.load(out / f"adapter_rank{r}.pt") for r in (0, 1)]
        assert logs[0] == logs[1], name
        for weight in adapters[1]:
            assert torch.equal(adapters[0][weight], adapters[1][weight]), (name, weight)
        runs[name] = logs[0], adapters[0]
    (zero3_log, zero3_adapter), (ddp_log, ddp_adapter) = runs["zero3"], runs["ddp"]
    assert [row["nonfinite_skipped"] for row in zero3_log] == [1, 1]
    assert zero3_log[0]["loss"] == 0.0 and zero3_log[0]["grad_norm"] == 0.0  # the skipped step: no update
    for key in ("loss", "loss_ce", "loss_mrp", "mean_margin", "grad_norm"):
        assert zero3_log[1][key] == pytest.approx(ddp_log[1][key], rel=1e-6), key
    assert zero3_adapter.keys() == ddp_adapter.keys() and zero3_adapter
    for weight, value in ddp_adapter.items():
        assert torch.isfinite(zero3_adapter[weight]).all()
        assert_close(zero3_adapter[weight], value, weight)
