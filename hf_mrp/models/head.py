"""The output head of a causal LM: its weight, the decoder layers and final norm around it, and computing in
place of the head's forward (where W is whole, also under FSDP / ZeRO-3) through the model's own logit transform."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..errors import MRPUserError
from ..ops.transform import LogitTransform


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) of the output embedding (lm_head); W is V x d."""
    get_head = getattr(model, "get_output_embeddings", None)  # a method: nn.Module stubs type attributes as tensors
    head = get_head() if get_head is not None else None
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
    problem = token_id_problem(low, high, vocab_size, what, ignore_index)
    if problem:
        raise MRPUserError(problem)


def token_id_problem(low: int, high: int, vocab_size: int, what: str, ignore_index: int | None = None) -> str | None:
    """Why ids spanning ``[low, high]`` cannot be used with a vocabulary of ``vocab_size`` (None when they can): the
    one wording of this refusal, for a batch on the device and a dataset read on the host alike."""
    if high >= vocab_size:
        return (
            f"{what} hold token id {high}, but the model's vocabulary has {vocab_size} ids (0..{vocab_size - 1}): "
            "the tokenizer does not match the model; use the tokenizer saved with the model (same folder or Hub "
            "id), or call model.resize_token_embeddings(len(tokenizer)) before training"
        )
    if low < 0:
        fix = (
            "pad input_ids with a real token id and mark ignored positions with -100 in labels"
            if ignore_index is None
            else f"use {ignore_index} for ignored positions"
        )
        return f"{what} hold the negative token id {low}; {fix}"
    return None


def _check_input_ids_hook(module: nn.Module, args: tuple) -> None:
    if args:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)  # an embedding's weight (a Parameter)
        rows = getattr(module, "num_embeddings", None) or weight.shape[0]
        check_token_ids(args[0], int(rows))


def _output_head_module(model: nn.Module) -> nn.Module:
    output_head(model)  # checks that there is one
    head = model.get_output_embeddings()  # type: ignore[operator]  # torch stubs: a Module attribute is Tensor | Module
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise MRPUserError(
            "the output head (lm_head) carries a LoRA adapter, whose delta the fused MRP loss would not see; adapt "
            "the decoder layers only, or train lm_head whole with modules_to_save=['lm_head']"
        )
    return head


class _HeadDispatch:
    """The forward installed on an output head while `head_replaced` runs: one object per head, so
    ``torch.compile`` sees the same callable every step (no recompiles), and opaque to dynamo (the chunked
    float32 loss runs eagerly; the decoder around it stays compiled)."""

    def __init__(self, head: nn.Module) -> None:
        self.head = head
        self.compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    @torch.compiler.disable
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.compute is None:  # reached outside head_replaced (a copy of the model kept the attribute)
            return type(self.head).forward(self.head, hidden)
        weight = self.head.weight
        assert isinstance(weight, torch.Tensor)
        return self.compute(hidden, weight, getattr(self.head, "bias", None))


_DISPATCHERS: weakref.WeakKeyDictionary[nn.Module, _HeadDispatch] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def head_replaced(
    model: nn.Module,
    compute: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    check_ids: bool = True,
):
    """Run ``compute(hidden, W, b)`` in place of the output head's forward, and return what it returns.

    The forward still goes through every wrapper (DDP, FSDP, PEFT, ZeRO-3, torch.compile), and the head's own
    module call, so ``W`` is whole exactly when ``compute`` reads it: FSDP2 unshards it for the module that owns
    it, DeepSpeed ZeRO-3 gathers it in the head's pre-forward hook. No [positions x vocab] logits are
    made by the model: ``compute`` works in float32 chunks. Inside the block, ids reaching the input
    embedding are checked against its size (`check_token_ids`): a tokenizer that does not match the
    model fails with a clear message, not an index error (``check_ids`` False: ids already checked on the host).
    """
    head = _output_head_module(model)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    hooked = check_ids and isinstance(embeddings, nn.Module)
    hook = embeddings.register_forward_pre_hook(_check_input_ids_hook) if hooked else None  # type: ignore[union-attr]
    dispatch = _DISPATCHERS.get(head)
    if dispatch is None:
        dispatch = _DISPATCHERS[head] = _HeadDispatch(head)
    previous = dispatch.compute
    dispatch.compute = compute
    head.forward = dispatch
    try:
        yield
    finally:
        dispatch.compute = previous
        if previous is None:
            del head.forward
        if hook is not None:
            hook.remove()


def carrier(hidden: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor:
    """What the replaced head hands back to the model: zeros [batch, seq, 1] tied to the hidden states (and to
    ``loss``, the loss computed in the head, when given).

    Whatever the model does after its head (soft cap, scaling: all map 0 to 0) keeps them zero, so
    ``loss + outputs.logits.sum()`` equals the loss exactly while the backward pass goes through the
    model's output, where FSDP registers its pre-backward hooks (unshard for the norm's and layers'
    backward). ``outputs.logits.sum() * 0`` is an exact zero loss over the same graph: what the non-finite
    guard backpropagates. Through ``loss`` it reaches the fused loss' backward with an incoming gradient of exactly
    0, which hands back exact zeros whatever the loss' own (possibly non-finite) gradients hold.

    Tied to ``loss`` (through a ``where`` that always picks 0, so a non-finite loss leaves the zeros exact), the
    output's graph reaches every parameter the loss reads: DDP's ``find_unused_parameters`` (the Trainer's default
    without gradient checkpointing) walks the graph from the model's outputs at the end of the forward, and a
    trained head reachable only through the loss would be marked unused there and then ready again by its own
    gradient ("marked as ready twice").
    """
    zeros = hidden[..., :1].float() * 0.0
    if loss is None:
        return zeros
    return zeros + torch.where(torch.zeros((), dtype=torch.bool, device=loss.device), loss.float(), 0.0)


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


def probe_logit_transform(model: nn.Module) -> None:
    """Verify (and cache) the model's logit transform now, before training starts, where the probe forward cannot
    interleave with a training step. Skipped while DeepSpeed ZeRO-3 has the weights partitioned outside its
    engine (the first loss computes it then, under the same random-state fork)."""
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        return
    logit_transform(model)


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
    """One probe forward whose head returns known values; the model's own code transforms them. It runs in eval
    mode under `torch.random.fork_rng`, so dropout, NEFTune or any other random consumer of the model leaves the
    random streams exactly as the plain Trainer's run sees them."""
    vocab = vocab_size(model)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    probe = torch.linspace(-40.0, 40.0, vocab, device=device).expand(1, 2, vocab)
    seen = {}

    def compute(hidden, weight, bias):
        seen["called"] = True
        return probe.to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32)

    on_accelerator = device.type not in ("cpu", "meta")
    devices, device_type = ([device], device.type) if on_accelerator else ([], None)
    with (
        torch.random.fork_rng(devices=devices, device_type=device_type),
        _eval_mode(model),
        head_replaced(model, compute),
    ):
        emitted = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False).logits
    name = type(model).__name__
    if not seen:
        raise MRPUserError(f"{name} never called its output head (lm_head) in its forward; hf_mrp cannot measure it")
    expected = transform.apply(probe.double())
    if (
        emitted is None
        or emitted.shape != expected.shape
        or not torch.allclose(emitted.double(), expected, rtol=1e-4, atol=1e-3)
    ):
        raise MRPUserError(
            f"{name} transforms its head's output in a way hf_mrp cannot reproduce (expected {transform.describe()}); "
            "its margins would be wrong, so it is refused: please report the model family"
        )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """The model in eval mode for the block, each module's own mode restored after. Models quantized by
    bitsandbytes run in train mode instead: its CPU kernels repack the weights in an eval-mode forward."""
    modes = [(module, module.training) for module in model.modules()]
    quantized = any(type(module).__module__.startswith("bitsandbytes") for module in model.modules())
    model.train(quantized)
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def vocab_size(model: nn.Module) -> int:
    """Rows of the output head: its weight's first dimension, or, where the weight is partitioned away outside the
    head's forward (DeepSpeed ZeRO-3 leaves a tensor with no elements), its full shape ``ds_shape`` or the
    config's vocab_size."""
    weight = output_head(model)[0]
    if weight.dim() == 2 and weight.shape[0]:
        return int(weight.shape[0])
    ds_shape: tuple[int, ...] = getattr(weight, "ds_shape", ())  # set by DeepSpeed ZeRO-3 on partitioned params
    if len(ds_shape) == 2:
        return int(ds_shape[0])
    return int(_text_config(model).vocab_size)


def _text_config(model: nn.Module):
    """The config that holds the language model's settings (a multimodal config's text part)."""
    config = getattr(model, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (the ModuleList that holds num_hidden_layers modules)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise MRPUserError(f"could not find the {n} decoder layers of {type(model).__name__}")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (needed by the logit lens)."""
    get_decoder = getattr(model, "get_decoder", None)
    backbone = get_decoder() if get_decoder is not None else model.base_model
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f"):
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module):
            return module
    raise MRPUserError(f"could not find the final norm of {type(model).__name__}; the logit lens needs it")
