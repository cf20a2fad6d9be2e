"""The adapter folder of `hf-mrp downstream`, checked before anything loads: a typo, a damaged adapter_config.json or
a cut-short weights file is named in one line at once, instead of a traceback after the base model and the tasks
have loaded (~25 s), or a config error blamed on the base model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from ...errors import MRPUserError

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PeftModel.from_pretrained reads, in its order
PEFT_KEYS = ("peft_type",)  # every PEFT config holds it (LoRA adds r and target_modules)
REWRITE = "write the adapter again (rerun the refine that made it, or PeftModel.save_pretrained)"


def resolve_adapter(path: str | Path) -> Path:
    """The adapter folder, checked before the model loads so a typo or a damaged file costs nothing."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise MRPUserError(
            f"adapter folder not found: {path}; pass the folder a refine run wrote "
            "(e.g. --adapter outputs/refine, which holds adapter_config.json)"
        )
    if not (folder / CONFIG).is_file():
        raise MRPUserError(
            f"{path} has no adapter_config.json, so it is not a PEFT adapter folder; pass the "
            "output_dir of examples/refine.py or a folder written by PeftModel.save_pretrained"
        )
    _check_config(folder / CONFIG)
    weights = next((folder / name for name in WEIGHTS if (folder / name).is_file()), None)
    if weights is None:
        raise MRPUserError(f"{folder} holds no adapter weights ({' or '.join(WEIGHTS)}); {REWRITE}")
    if weights.suffix == ".safetensors":
        check_safetensors(weights)
    return folder


def _check_config(path: Path) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else type(error).__name__
        raise MRPUserError(f"the adapter's {path} is damaged (not valid JSON: {reason}); {REWRITE}") from None
    missing = [key for key in PEFT_KEYS if key not in config] if isinstance(config, dict) else list(PEFT_KEYS)
    if missing:
        raise MRPUserError(f"the adapter's {path} is no PEFT config (it lacks {', '.join(missing)}); {REWRITE}")


def check_safetensors(path: Path) -> None:
    """A safetensors file whose header reads and whose tensors end exactly where the file does (one cut short by a
    full disk or a copy that stopped would fail only once loaded)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ValueError(f"its header claims {length:,} bytes")
            header = json.loads(handle.read(length))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (OSError, struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
        raise MRPUserError(f"the adapter's {path} is damaged (its header does not read: {error}); {REWRITE}") from None
    expected = 8 + length + max(ends, default=0)
    if expected != size:
        raise MRPUserError(
            f"the adapter's {path} is damaged: it holds {size:,} bytes where its header describes {expected:,} "
            f"(cut short by a full disk or an interrupted copy?); {REWRITE}"
        )
