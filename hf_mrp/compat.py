"""Every private third-party API hf_mrp leans on, and every match on a third-party message, in one place.

Each entry names what it reaches into and the versions it was checked against; tests/test_compat.py fails loudly
(naming the entry) when an upgrade removes or changes one, instead of a feature quietly doing nothing.

Checked against: torch 2.13, transformers 5.24, peft 0.21, trl 1.16, safetensors 0.8, trackio 0.43,
tensorboard 2.21, lm-eval 0.4.13 (wandb: its callback's attribute only, not installed here).

Overrides of private hooks stay where they act (test_compat checks the hooks still exist): ``Trainer.
_set_signature_columns_if_needed`` (training/trainer.py), ``Trainer._get_grad_norm`` (training/mrp_mixin.py: each
optimizer step's gradient norm, counted when exactly 0), ``Trainer._maybe_log_save_evaluate`` (training/mrp_mixin.py:
the divergence checks run there, before a save), ``SFTTrainer._tag_names`` (training/sft.py) and
``HfArgumentParser._parse_dataclass_field`` (research/parser.py, which calls `parse_dataclass_field` below).
"""

from __future__ import annotations

import sys
from typing import Any

# --- torch 2.13: torch.compile's wrapper and where the model inside it lives
COMPILED_MODULE = ("torch._dynamo.eval_frame", "OptimizedModule")
COMPILED_INNER = "_orig_mod"


def compiled_module_type() -> type | None:
    """torch.compile's OptimizedModule once torch._dynamo is imported (a run without it never imports it)."""
    found = getattr(sys.modules.get(COMPILED_MODULE[0]), COMPILED_MODULE[1], None)
    return found if isinstance(found, type) else None


def compiled_inner(module: Any) -> Any:
    """The module a torch.compile wrapper holds."""
    return getattr(module, COMPILED_INNER)


# --- peft 0.21: how LoraConfig(target_modules="all-linear") resolves, and which modules a family refuses
def peft_all_linear(config: Any, model: Any) -> Any:
    """``config`` with "all-linear" resolved to the model's module names, as PEFT resolves it."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return _maybe_include_all_linear_layers(config, model)


def peft_accepts_target(config: Any, model: Any, name: str) -> bool:
    """Whether PEFT accepts module ``name`` as a LoRA target of this model (it refuses Mamba's out_proj, conv1d)."""
    from peft.tuners.tuners_utils import _check_lora_target_modules_mamba

    try:
        _check_lora_target_modules_mamba(config, model, name)
    except ValueError:
        return False
    return True


# --- transformers 5.24: HfArgumentParser's per-field flag builder and argparse's action list
def parse_dataclass_field(parser: Any, field: Any) -> None:
    """HfArgumentParser's own flag for one dataclass field."""
    from transformers import HfArgumentParser

    HfArgumentParser._parse_dataclass_field(parser, field)


def set_nargs(parser: Any, dest: str, nargs: str) -> None:
    """Change the nargs of the flag already added for ``dest`` (argparse keeps its actions in ``_actions``)."""
    next(action for action in parser._actions if action.dest == dest).nargs = nargs


def set_help(parser: Any, dest: str, text: str) -> None:
    """Change the help of the flag already added for ``dest``."""
    next(action for action in parser._actions if action.dest == dest).help = text


# --- transformers 5.24: what the reporter callbacks hold once set up (TrackioCallback, WandbCallback,
# TensorBoardCallback); None until the callback has started its run
def trackio_module(callback: Any) -> Any:
    return callback._trackio if getattr(callback, "_initialized", False) else None


def wandb_module(callback: Any) -> Any:
    return getattr(callback, "_wandb", None)


def tensorboard_writer(callback: Any) -> Any:
    return getattr(callback, "tb_writer", None)


# --- lm-eval 0.4.10 .. 0.4.13: the YAML loader that resolves !function tags
def lm_eval_yaml_loader():
    """lm-eval's ``load_yaml``, or None where it lives elsewhere (older versions: task YAMLs are not rewritten)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        return None
    return load_yaml


# --- messages of third-party errors that carry no type of their own
NO_SPACE_MESSAGES = ("No space left on device", "StorageFull")  # OSError text; safetensors 0.8's write error
REMOTE_CODE_MESSAGE = "trust_remote_code"  # transformers 5.24: a model repository with its own code
BACKEND_TOKENIZER_MESSAGE = "backend tokenizer"  # transformers 5.24: no tokenizer.json and no slow tokenizer package
SIZE_MISMATCH_MESSAGE = "size mismatch"  # torch 2.13 load_state_dict, through peft 0.21's PeftModel.from_pretrained


def quotes_no_space(error: BaseException) -> bool:
    """A writer's error that quotes a full disk (safetensors raises its own type with the OS text inside)."""
    return any(message in str(error) for message in NO_SPACE_MESSAGES)


def asks_for_remote_code(error: BaseException) -> bool:
    """transformers refused a repository that ships its own code (without trust_remote_code)."""
    return REMOTE_CODE_MESSAGE in str(error)


def lacks_backend_tokenizer(first_line: str) -> bool:
    """transformers found no tokenizer it can build (no tokenizer.json, no slow tokenizer package)."""
    return BACKEND_TOKENIZER_MESSAGE in first_line


def size_mismatch_line(lines: list[str]) -> str | None:
    """The line of a state-dict error that names a shape mismatch (an adapter of another base), if any."""
    return next((line for line in lines if SIZE_MISMATCH_MESSAGE in line), None)
