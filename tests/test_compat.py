"""hf_mrp.compat: each private third-party API and message hf_mrp leans on still exists and still means what it
meant (torch 2.13, transformers 5.24, peft 0.21, trl 1.16, safetensors 0.8, trackio 0.43, lm-eval 0.4.13). A
failure here names the entry an upgrade broke; fix compat.py (and its "checked against" versions), not the caller."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import typing

import pytest
import torch
from torch import nn

from hf_mrp import compat


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def test_torch_compile_wrapper_holds_the_model_where_compat_reads_it():
    model = nn.Linear(3, 2)
    compiled = torch.compile(model)
    assert compat.compiled_module_type() is type(compiled), "torch.compile's wrapper moved (COMPILED_MODULE)"
    assert compat.compiled_inner(compiled) is model, "torch.compile's wrapper keeps the model elsewhere"


def test_peft_resolves_all_linear_and_refuses_mamba_targets_only():
    from peft import LoraConfig, TaskType

    model = tiny_llama()
    probe = compat.peft_all_linear(LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules="all-linear"), model)
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"}
    assert set(probe.target_modules) == linear, "peft's all-linear resolution changed"
    assert compat.peft_accepts_target(probe, model, "q_proj")


def test_peft_refuses_a_mamba_out_proj():
    from peft import LoraConfig, TaskType
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=32, hidden_size=8, state_size=4, num_hidden_layers=1))
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=["out_proj"])
    assert not compat.peft_accepts_target(config, model, "out_proj"), "peft no longer refuses Mamba's out_proj"
    assert compat.peft_accepts_target(config, model, "in_proj")
    assert compat.peft_accepts_target(config, tiny_llama(), "out_proj")  # other families: refused nowhere


def test_hf_argument_parser_field_builder_and_argparse_actions():
    @dataclasses.dataclass
    class Flags:
        names: list[str] = dataclasses.field(default_factory=list)

    parser = argparse.ArgumentParser()
    field = dataclasses.fields(Flags)[0]
    field.type = typing.get_type_hints(Flags)["names"]  # resolved, as HfArgumentParser resolves it
    compat.parse_dataclass_field(parser, field)
    compat.set_nargs(parser, "names", "*")
    assert parser.parse_args(["--names"]).names == []
    assert parser.parse_args(["--names", "a", "b"]).names == ["a", "b"]


def test_private_hooks_hf_mrp_overrides_still_exist():
    from transformers import HfArgumentParser, Trainer
    from trl import SFTTrainer

    assert callable(getattr(Trainer, "_set_signature_columns_if_needed", None)), "training/trainer.py overrides it"
    assert callable(getattr(Trainer, "_get_grad_norm", None)), "training/mrp_mixin.py overrides it (collapse check)"
    assert callable(getattr(Trainer, "_maybe_log_save_evaluate", None)), "training/mrp_mixin.py checks there"
    assert isinstance(getattr(SFTTrainer, "_tag_names", None), list), "training/sft.py extends it"
    assert callable(getattr(HfArgumentParser, "_parse_dataclass_field", None)), "parser.py overrides it"


def test_reporter_callbacks_hold_their_clients_where_compat_reads_them(tmp_path):
    from transformers import TrainingArguments
    from transformers.integrations import TensorBoardCallback, WandbCallback

    assert compat.wandb_module(WandbCallback.__new__(WandbCallback)) is None  # not set up: nothing to log to
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        callback = TensorBoardCallback()
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
        from transformers import TrainerState

        callback.on_train_begin(args, state=TrainerState(), control=None)
        writer = compat.tensorboard_writer(callback)
        assert writer is not None and callable(writer.add_text), "TensorBoardCallback no longer keeps tb_writer"
        writer.close()
    if importlib.util.find_spec("trackio") is not None:
        from transformers.integrations import TrackioCallback

        callback = TrackioCallback()
        assert compat.trackio_module(callback) is None  # not initialized yet
        callback._initialized = True
        assert compat.trackio_module(callback) is callback._trackio and hasattr(callback._trackio, "Table")


def test_lm_eval_yaml_loader_is_where_compat_looks():
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval is not installed")
    assert callable(compat.lm_eval_yaml_loader()), "lm_eval.tasks._yaml_loader.load_yaml moved"


def test_a_full_disk_quoted_by_safetensors_is_recognized(tmp_path, monkeypatch):
    assert compat.quotes_no_space(OSError(28, os.strerror(28)))
    assert compat.quotes_no_space(RuntimeError("Error while serializing: StorageFull"))
    assert not compat.quotes_no_space(RuntimeError("Error while serializing: IoError"))


def test_transformers_asks_for_trust_remote_code_in_its_words(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "config.json").write_text(
        '{"model_type": "no_such_family", "auto_map": {"AutoConfig": "custom.CustomConfig"}}'
    )
    with pytest.raises((OSError, ValueError)) as error:
        AutoConfig.from_pretrained(str(tmp_path), trust_remote_code=False)
    assert compat.asks_for_remote_code(error.value), str(error.value)


def test_a_state_dict_shape_mismatch_is_named_in_its_words():
    with pytest.raises(RuntimeError) as error:
        nn.Linear(3, 2).load_state_dict(nn.Linear(4, 2).state_dict())
    lines = str(error.value).splitlines()
    assert compat.size_mismatch_line(lines) is not None, str(error.value)
    assert compat.size_mismatch_line(["unexpected key"]) is None
