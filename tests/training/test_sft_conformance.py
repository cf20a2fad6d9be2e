"""The SFT contract: MRPSFTTrainer at lambda 0 is TRL's `SFTTrainer`, with TRL's defaults (bf16 on).

Under bf16 the reference is SFTTrainer with TRL's own float32 head (``cast_lm_head_to_fp32``): its default head
computes the logits in bf16, and MRPSFTTrainer's loss is float32 whatever the autocast (docs/models.md). Losses and
weights agree within helpers.run_bounds (the heads' rounding, and the gradients' under SGD).

Each case trains the same model copy with the same seed through both trainers on what SFT users train
(conversations, prompt-completion pairs, assistant-only and completion-only loss, packing, PEFT adapters,
prompt tuning and p-tuning) and asserts equal loss histories, parameters, metrics and predictions. The optimizer
is SGD: AdamW's first steps turn float rounding differences of 1e-9 in a gradient into visibly different weights,
and bf16 forwards then amplify them (the Trainer matrix covers AdamW, Adafactor and SGD in float32).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from peft import LoraConfig, PromptEncoderConfig, PromptTuningConfig, TaskType  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_mrp.errors import MRPUserError  # noqa: E402
from hf_mrp.training.sft import CHATML_GENERATION_TEMPLATE, MRPSFTConfig, MRPSFTTrainer  # noqa: E402

from helpers import BF16_U, chat_dataset, run_bounds  # noqa: E402

STEPS = 3


def eval_token_accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    hits = (logits[:, :-1].argmax(-1) == labels[:, 1:])[labels[:, 1:] != -100]
    return {"token_accuracy": float(hits.mean())}


CASES = {  # name -> (dataset kind, SFTConfig options, trainer keyword arguments)
    "assistant_only": ("messages", {"assistant_only_loss": True}, {}),
    "completion_only": ("prompt_completion", {"completion_only_loss": True}, {}),
    "full_sequence": ("messages", {}, {}),
    "packing_bfd": ("messages", {"packing": True, "packing_strategy": "bfd", "max_length": 96}, {}),
    "accumulation": ("prompt_completion", {"gradient_accumulation_steps": 2}, {}),
    "lora": (
        "messages",
        {"assistant_only_loss": True},
        {
            "peft_config": LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
            )
        },
    ),
    # prompt learning on full-sequence loss: every row's first label is real, and the last virtual token predicts it
    "prompt_tuning": (
        "messages",
        {},
        {"peft_config": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)},
    ),
    "p_tuning": (
        "messages",
        {},
        {
            "peft_config": PromptEncoderConfig(
                task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, encoder_hidden_size=16
            )
        },
    ),
    "eval_with_metrics": (
        "prompt_completion",
        {"eval_strategy": "steps", "eval_steps": 2},
        {"compute_metrics": eval_token_accuracy},
    ),
    "float32": ("messages", {"bf16": False, "assistant_only_loss": True}, {}),
    "label_smoothing": ("prompt_completion", {"bf16": False, "label_smoothing_factor": 0.1}, {}),
}


def with_float32_head(trainer) -> None:
    """SFTTrainer's fused head with TRL's own ``cast_lm_head_to_fp32``: under bf16 autocast its default head forms
    the logits in bf16 (about 1e-4 relative off float32), while MRPSFTTrainer's loss is float32 by design."""
    from peft import PeftModel
    from trl.trainer.utils import add_fused_lm_head

    model = trainer.model.get_base_model() if isinstance(trainer.model, PeftModel) else trainer.model
    add_fused_lm_head(model, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy", "is_top1"))


def run(trainer_class, config_class, folder, tmp_path, name: str, kind: str, options: dict, kwargs: dict):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = CHATML_GENERATION_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder)
    extra = {"mrp_lambda": 0.0} if trainer_class is MRPSFTTrainer else {}
    args = config_class(
        output_dir=str(tmp_path / name),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        optim="sgd",
        learning_rate=0.05,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **options,
        **extra,
    )
    kwargs = copy.deepcopy(kwargs)
    evaluation = chat_dataset(kind) if "compute_metrics" in kwargs else None
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=chat_dataset(kind),
        eval_dataset=evaluation,
        processing_class=tokenizer,
        **kwargs,
    )
    if trainer_class is SFTTrainer and args.bf16:
        with_float32_head(trainer)
    trainer.train()
    history = [row for row in trainer.state.log_history if "loss" in row]
    parameters = {key: value.detach().clone() for key, value in trainer.model.named_parameters() if value.requires_grad}
    predictions = trainer.predict(trainer.eval_dataset) if evaluation is not None else None
    return history, parameters, predictions, trainer


@pytest.mark.parametrize("name", list(CASES))
def test_mrp_sft_trainer_at_lambda_zero_is_sft_trainer(tiny_model_dir, tmp_path, name):
    kind, options, kwargs = CASES[name]
    sft = run(SFTTrainer, SFTConfig, tiny_model_dir, tmp_path, "sft", kind, options, kwargs)
    mrp = run(MRPSFTTrainer, MRPSFTConfig, tiny_model_dir, tmp_path, "mrp", kind, options, kwargs)
    (sft_history, sft_parameters, sft_predictions, trainer), (mrp_history, mrp_parameters, mrp_predictions, _) = (
        sft,
        mrp,
    )
    assert len(sft_history) == len(mrp_history) == STEPS
    assert all(math.isfinite(row["loss"]) for row in mrp_history)
    bf16 = options.get("bf16", True)  # TRL's default
    # Both heads are float32 (`with_float32_head`) on the same hidden states; under bf16 the decoder's backward
    # rounds the gradient to bf16, where a last-bit difference from the head flips a rounding: rho = BF16_U of the
    # gradient then (float32: `tiny_model_bounds`). SGD: the weights within lr sum 2 rho G, the losses within the
    # head's rounding + G x that (`run_bounds`).
    longest = max(len(ids) for ids in trainer.train_dataset["input_ids"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bounds = run_bounds((trainer, [row["loss"] for row in sft_history]), model, longest, rho=BF16_U if bf16 else None)
    for step, (got, want, bound) in enumerate(zip(mrp_history, sft_history, bounds.losses)):
        assert abs(got["loss"] - want["loss"]) <= bound, (step, got["loss"], want["loss"], bound)
    # bf16 rounds each weight to 8 bits in every matmul, so once the first update has made 1e-9 differences
    # some roundings differ: the first step is exact (1e-5), later ones agree as closely as bf16 can (2e-3)
    later = 2e-3 if bf16 else 1e-5
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        mrp_values, sft_values = [row[key] for row in mrp_history], [row[key] for row in sft_history]
        np.testing.assert_allclose(mrp_values[0], sft_values[0], rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_allclose(mrp_values, sft_values, rtol=later, atol=later, err_msg=key)
    assert sft_parameters.keys() == mrp_parameters.keys() and sft_parameters
    for key, value in sft_parameters.items():
        torch.testing.assert_close(mrp_parameters[key], value, rtol=0, atol=bounds.parameter, msg=key)
    if sft_predictions is not None:
        # The eval logits are formed in the model's own bf16 head (both trainers keep real logits the same way):
        # 8 significant bits, one rounding step 2^-7 relative. The two models' weights differ after training (by
        # the bound above), so the eval forward can round each bf16 activation to a neighbouring value: a logit can
        # move by a few steps of its own size, or of the largest term's size when it cancels to near 0. 8 steps:
        # rtol = atol = 8 x 2^-7 = 2^-4 (the float32 cases keep later * 10 = 1e-4).
        tolerance = 2.0**-4 if bf16 else 1e-4  # (no float32 case keeps predictions)
        np.testing.assert_allclose(
            mrp_predictions.predictions, sft_predictions.predictions, rtol=tolerance, atol=tolerance
        )
        for key in ("test_loss", "test_token_accuracy"):
            np.testing.assert_allclose(
                mrp_predictions.metrics[key], sft_predictions.metrics[key], rtol=later, err_msg=key
            )


@pytest.mark.parametrize("config_class", [TrainingArguments, SFTConfig])
def test_plain_and_sft_arguments_are_converted_as_sft_trainer_converts_them(tiny_model_dir, tmp_path, config_class):
    """Their own values kept (tokens included, which ``to_dict`` masks), the MRP fields at their defaults."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    options = {"eos_token": tokenizer.eos_token} if config_class is SFTConfig else {}
    args = config_class(
        output_dir=str(tmp_path / "plain"),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        learning_rate=3e-4,
        seed=7,
        hub_token="hf_secret",
        **options,
    )
    trainer = MRPSFTTrainer(
        model=model, args=args, train_dataset=chat_dataset("prompt_completion"), processing_class=tokenizer
    )
    assert isinstance(trainer.args, MRPSFTConfig)
    assert (trainer.args.learning_rate, trainer.args.seed, trainer.args.max_steps) == (3e-4, 7, 1)
    assert (trainer.args.hub_token, trainer.args.bf16) == ("hf_secret", args.bf16)
    fields = MRPSFTConfig.__dataclass_fields__
    assert (trainer.args.mrp_objective, trainer.args.mrp_lambda) == (
        fields["mrp_objective"].default,
        fields["mrp_lambda"].default,
    )
    if config_class is SFTConfig:
        assert trainer.args.eos_token == tokenizer.eos_token
    trainer.train()
    assert trainer.state.global_step == 1


def test_mrp_config_is_refused_by_the_sft_trainer_with_the_fix(tiny_model_dir, tmp_path):
    from hf_mrp.training import MRPConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(MRPUserError, match="MRPSFTConfig"):
        MRPSFTTrainer(
            model=model,
            args=MRPConfig(output_dir=str(tmp_path / "x"), use_cpu=True, report_to="none"),
            train_dataset=chat_dataset("messages"),
        )


def test_compute_loss_func_is_refused_by_the_sft_trainer_before_any_work(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = MRPSFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to=[], bf16=False)
    with pytest.raises(MRPUserError, match="MRPSFTTrainer computes its own loss.*drop compute_loss_func") as error:
        MRPSFTTrainer(
            model=model,
            args=args,
            train_dataset=chat_dataset("messages"),
            compute_loss_func=lambda outputs, labels, **kw: 0,
        )
    assert "\n" not in str(error.value) and not (tmp_path / "sft").exists()
