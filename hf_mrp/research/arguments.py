"""Argument dataclasses shared by `hf-mrp audit` and `examples/refine.py` (parsed by HfArgumentParser)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import PurePath

from ..errors import MRPUserError


def _optional_str(name: str, value):
    """None, or the value as a string (a pathlib.Path is accepted for names that are paths)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, PurePath):
        return str(value)
    raise MRPUserError(f"{name} must be a string (a name or a path), got {type(value).__name__} {value!r}")


def provenance(model_name: str, *argument_groups) -> dict:
    """Model name, every argument, and package versions: enough to rerun the same audit."""
    import torch
    import transformers

    from .. import __version__

    arguments = {}
    for group in argument_groups:
        arguments.update(dataclasses.asdict(group))
    return {
        "model": model_name,
        "arguments": arguments,
        "versions": {"hf_mrp": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }


LENSES = ("logit", "tuned")
MANIFOLD_HELP = {
    "manifold": "Also measure each audited layer's hidden-state manifold (participation ratio, variance "
    "dimensions, TwoNN and Levina-Bickel intrinsic dimension, local curvature) from the same pass: layers.json, "
    "manifold.png. Needs the layers.",
    "manifold_positions": "Positions sampled for the manifold statistics (all audited positions, in order, when "
    "there are no more).",
    "manifold_k": "Neighbours of the Levina-Bickel intrinsic dimension.",
    "manifold_seed": "Seed of the manifold's sample of positions.",
}


def manifold_field(name: str, default):
    """One of the manifold flags, shared by `hf-mrp audit` and examples/refine.py."""
    return field(default=default, metadata={"help": MANIFOLD_HELP[name]})


def audit_options(audit_args, prefix: str = "") -> dict:
    """The audit keywords `hf-mrp audit` (run_audit) and refine (MRPAuditCallback) take from their flags, checked:
    blocks per forward, the lens layers and the manifold options (None without --manifold; it needs the layers, or
    a tuned lens, whose layers are the default). ``prefix``: refine's flags say ``audit_`` (--audit_batch_size,
    --audit_layers); the --manifold flags are the same in both."""
    from ..audit.manifold import ManifoldOptions

    layers = getattr(audit_args, f"{prefix}layers")
    manifold = None
    if audit_args.manifold:
        manifold = ManifoldOptions(audit_args.manifold_positions, audit_args.manifold_k, audit_args.manifold_seed)
        if layers is None and getattr(audit_args, "lens", "logit") != "tuned":
            raise MRPUserError(f"--manifold measures the audited layers: pass --{prefix}layers too (e.g. 'all')")
    return {"batch_size": getattr(audit_args, f"{prefix}batch_size"), "layers": layers, "manifold": manifold}


def _check_lens(lens: str, lens_path: str | None) -> None:
    """--lens and --lens_path belong together: one line per wrong combination."""
    if lens not in LENSES:
        raise MRPUserError(f"unknown lens {lens!r} for --lens; choose one of {', '.join(LENSES)}")
    if lens == "tuned" and lens_path is None:
        raise MRPUserError("--lens tuned needs --lens_path, the folder written by `hf-mrp lens train`")
    if lens == "logit" and lens_path is not None:
        raise MRPUserError("--lens_path is read with --lens tuned only; add --lens tuned (or drop --lens_path)")


@dataclass
class ModelArguments:
    """Which model to load. Omit --model and --gguf_file for the embedded SmolLM2-135M-Instruct."""

    model: str | None = field(
        default=None, metadata={"help": "Hub id or local folder of a causal LM; default: the embedded SmolLM2."}
    )
    gguf_file: str | None = field(
        default=None, metadata={"help": "A .gguf file (a path, or a file name inside --model); de-quantized on load."}
    )
    model_dtype: str = field(
        default="float32",
        metadata={"help": "dtype the model runs in: float32, bfloat16 or float16. Margins stay float32."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow code from the model repository to run (off by default)."}
    )
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "Load the base model in 4-bit NF4 through bitsandbytes (QLoRA); works on CPU too."},
    )

    def __post_init__(self) -> None:
        from ..models.loading import MODEL_DTYPES

        self.model, self.gguf_file = _optional_str("model", self.model), _optional_str("gguf_file", self.gguf_file)
        if self.model_dtype not in MODEL_DTYPES:
            raise MRPUserError(
                f"unknown dtype {self.model_dtype!r} for --model_dtype; choose one of {', '.join(MODEL_DTYPES)}"
            )
        if self.load_in_4bit:
            from ..models import require_bitsandbytes

            require_bitsandbytes()


@dataclass
class DataArguments:
    """Which text to evaluate or train on. Omit --dataset for the embedded pydoc corpus."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "datasets name or folder, or a local .txt/.jsonl/.json/.parquet/.csv file; "
            "default: pydoc_data.topics (ships with CPython)."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "datasets configuration name."})
    split: str = field(default="train", metadata={"help": "datasets split."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (jsonl/parquet/datasets)."})
    block_size: int = field(default=512, metadata={"help": "Tokens per block; a block holds block_size - 1 positions."})
    max_positions: int = field(default=16384, metadata={"help": "Number of positions (predicted tokens) to evaluate."})
    encoding: str = field(
        default="utf-8", metadata={"help": "Text encoding of a .txt --dataset (a Python codec name)."}
    )
    encoding_errors: str = field(
        default="strict",
        metadata={
            "help": "Bytes a .txt --dataset cannot decode: 'strict' (stop, naming the byte offset), "
            "'replace' (U+FFFD) or 'ignore' (drop them)."
        },
    )

    def __post_init__(self) -> None:
        from ..data.blocks import check_block_settings
        from ..data.sources import check_encoding

        check_encoding(self.encoding, self.encoding_errors)
        self.dataset = _optional_str("dataset", self.dataset)
        self.dataset_config = _optional_str("dataset_config", self.dataset_config)
        check_block_settings(self.block_size, self.max_positions)


@dataclass
class AuditArguments:
    """How to audit."""

    output_dir: str = field(
        default="outputs/audit", metadata={"help": "Folder for audit.json, positions.parquet, plots."}
    )
    chunk_size: int = field(default=1024, metadata={"help": "Positions per float32 [chunk x vocab] logits chunk."})
    batch_size: int = field(default=8, metadata={"help": "Blocks per forward pass."})
    layers: str | None = field(
        default=None, metadata={"help": "Logit lens over these 0-based layers: 'all', '20-29' or '3,5,7'."}
    )
    margin_dtype: str = field(
        default="float32",
        metadata={"help": "'float32' (spec) or 'model' (margins in the model dtype, to show the bf16 artifact)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a finished audit in --output_dir. Without it a folder holding one is refused."},
    )
    lens: str = field(
        default="logit",
        metadata={
            "help": "Layer-wise lens: 'logit' (each layer through the final norm and W) or 'tuned' (through "
            "the affine translators of `hf-mrp lens train` first; needs --lens_path; --layers "
            "defaults to the lens' layers)."
        },
    )
    lens_path: str | None = field(
        default=None, metadata={"help": "Folder of a tuned lens written by `hf-mrp lens train` (with --lens tuned)."}
    )
    lens_bootstrap: int = field(
        default=0,
        metadata={
            "help": "Block-bootstrap resamples for 95 percent intervals of each layer's correlations and KL (0: none)."
        },
    )
    manifold: bool = manifold_field("manifold", False)
    manifold_positions: int = manifold_field("manifold_positions", 4096)
    manifold_k: int = manifold_field("manifold_k", 20)
    manifold_seed: int = manifold_field("manifold_seed", 0)

    def __post_init__(self) -> None:
        from ..audit.geometry import check_audit_settings

        self.layers = _optional_str("layers", self.layers)
        self.lens_path = _optional_str("lens_path", self.lens_path)
        check_audit_settings(self.margin_dtype, self.chunk_size, self.batch_size, self.lens_bootstrap)
        _check_lens(self.lens, self.lens_path)
        audit_options(self)
