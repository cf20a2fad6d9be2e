"""The tuned lens (Belrose et al. 2023): one affine translator per layer, trained so that layer l's distribution
through it, the final norm and W matches the final layer's (KL(final || layer)), on positions disjoint from the
audited ones. `hf-mrp lens train` runs ``train_tuned_lens``; `hf-mrp audit --lens tuned` reads it back.

A lens folder holds ``lens.safetensors`` (the translators), ``optimizer.safetensors`` (Adam's state, so training
resumes where it stopped) and ``lens_config.json`` (model, layers, the training positions' fingerprint and
per-block hashes, the settings, the step reached, the loss log), written in that order at each save, each
atomically; the step is recorded in all three, so a save cut short is recognized.

Under several processes every rank reads the hidden states of all training positions (one forward pass), takes
every world_size-th position of each step's batch, and the translators' gradients are summed over ranks: the
steps are those of one process on the whole batch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import Blocks
from ..errors import MRPUserError, require_number
from ..models import carrier, decoder_layers, final_norm, head_replaced, logit_transform, output_head
from ..ops.lens import AffineTranslators, final_distribution, kl_from_final
from ..storage import files

logger = logging.getLogger(__name__)

LENS_FILE, OPTIMIZER_FILE, CONFIG_FILE = "lens.safetensors", "optimizer.safetensors", "lens_config.json"
FORMAT = "hf_mrp tuned lens"


@dataclass
class LensTrainingSettings:
    """How the translators are fitted: Adam at a constant rate (so a run extended to more steps equals one run)."""

    max_steps: int = 60
    batch_positions: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    save_steps: int = 25
    chunk_size: int = 256


@dataclass
class TunedLens:
    """Translators and their config (``lens_config.json``), as saved by ``train_tuned_lens``."""

    translators: AffineTranslators
    config: dict

    @property
    def layers(self) -> list[int]:
        return list(self.translators.layers)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a lens trained for another architecture; warn when the model's name differs."""
        n_layers = len(decoder_layers(model))
        weight = output_head(model)[0]
        mine = {"num_hidden_layers": n_layers, "hidden_size": int(weight.shape[1]), "vocab_size": int(weight.shape[0])}
        theirs = {key: self.config.get(key) for key in mine}
        if mine != theirs:
            raise MRPUserError(
                f"the tuned lens at {self.config.get('path')} was trained for a model with {theirs}, "
                f"this one has {mine}; train a lens for this model with `hf-mrp lens train`"
            )

    def check_disjoint(self, blocks: Blocks) -> None:
        """Refuse an audit of positions the lens was trained on (a block identical to a training block)."""
        trained = set(self.config["training"]["block_hashes"])
        shared = [i for i, digest in enumerate(block_hashes(blocks.input_ids)) if digest in trained]
        if shared:
            raise MRPUserError(
                f"{len(shared)} of the audited blocks (the first: block {shared[0]}) are among the tuned lens' "
                "training blocks; audit other positions, or train the lens with a larger --holdout_positions "
                "(at least the audit's --max_positions) so that its training positions follow the audited ones"
            )

    def check_layers(self, layers: list[int], n_layers: int) -> None:
        missing = [layer for layer in layers if layer != n_layers - 1 and layer not in self.layers]
        if missing:
            raise MRPUserError(
                f"the tuned lens has no translator for layer {missing[0]} (it has layers "
                f"{_spans(self.layers)}); audit those layers or retrain with --layers covering them"
            )


def _spans(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def block_hashes(input_ids: np.ndarray) -> list[str]:
    """A short sha256 of each block's token ids (int64): how training and audited blocks are told apart."""
    rows = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in rows]


def translated_layers(n_layers: int, layers: list[int] | None) -> list[int]:
    """The layers that get a translator: the chosen ones (default all) but the last, which is the model's output."""
    chosen = list(range(n_layers)) if layers is None else layers
    return [layer for layer in chosen if layer != n_layers - 1]


@torch.no_grad()
def collect_lens_inputs(
    model: torch.nn.Module,
    blocks: Blocks,
    layers: list[int],
    batch_size: int = 8,
) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor]:
    """(final normed hidden states [N, d], each layer's raw hidden states {l: [N, d]}, targets [N]) at the
    evaluated positions of ``blocks``, in block order, from forwards whose head is replaced (no logits formed)."""
    device = next(model.parameters()).device
    mask = blocks.position_mask()
    blocks_out = decoder_layers(model)
    finals, targets, per_layer = [], [], {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(blocks.input_ids), batch_size):
            ids = torch.as_tensor(blocks.input_ids[start : start + batch_size], device=device)
            batch_mask = torch.as_tensor(mask[start : start + batch_size], device=device)
            captured: dict[int, torch.Tensor] = {}
            hooks = [blocks_out[layer].register_forward_hook(_capture(captured, layer)) for layer in layers]

            def compute(hidden, weight, bias, batch_mask=batch_mask):  # bound now: called within this iteration
                finals.append(hidden[:, :-1][batch_mask])
                return carrier(hidden)

            try:
                with head_replaced(model, compute):
                    model(input_ids=ids, use_cache=False)
            finally:
                for hook in hooks:
                    hook.remove()
            for layer in layers:
                per_layer[layer].append(captured[layer][:, :-1][batch_mask])
            targets.append(ids[:, 1:][batch_mask])
    finally:
        model.train(was_training)
    return torch.cat(finals), {layer: torch.cat(parts) for layer, parts in per_layer.items()}, torch.cat(targets)


def _capture(captured: dict, layer: int):
    def hook(module, args, output):
        captured[layer] = output[0] if isinstance(output, (tuple, list)) else output

    return hook


def step_positions(step: int, n_positions: int, batch_positions: int, seed: int) -> np.ndarray:
    """The positions of training step ``step``: drawn without replacement from a generator seeded by (seed, step),
    so a resumed run draws what an uninterrupted one would."""
    rng = np.random.default_rng([seed, step])
    return np.sort(rng.choice(n_positions, size=min(batch_positions, n_positions), replace=False))


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _LensObjective:
    """KL(final || layer) through the translators, the final norm, W and the model's logit transform, summed over
    a step's positions (those of this rank) and divided by the step's batch size; backpropagated chunk by chunk
    and layer by layer, so at most a few [chunk x V] float32 tensors exist at once."""

    def __init__(self, model, translators: AffineTranslators, final_hidden, layer_hidden, chunk_size: int):
        self.norm = final_norm(model)
        self.transform = logit_transform(model)
        weight, bias = output_head(model)
        self.weight32, self.bias32 = (
            t.detach() if t is not None else None for t in self.transform.scaled_head(weight, bias)
        )
        self.translators, self.final_hidden, self.layer_hidden = translators, final_hidden, layer_hidden
        self.chunk_size = chunk_size

    def _logits(self, states: torch.Tensor) -> torch.Tensor:
        raw = torch.nn.functional.linear(states.float(), self.weight32, self.bias32)
        cap = self.transform.softcap
        return raw if cap is None else cap * torch.tanh(raw / cap)

    def backward(self, index: np.ndarray, batch_positions: int) -> dict[int, float]:
        """Accumulate the gradients of this rank's share of a step; returns each layer's summed KL."""
        sums = {layer: 0.0 for layer in self.translators.layers}
        index_t = torch.as_tensor(index, device=self.final_hidden.device)
        for start in range(0, len(index), self.chunk_size):
            chunk = index_t[start : start + self.chunk_size]
            with torch.no_grad():
                probs, neg_entropy = final_distribution(self._logits(self.final_hidden[chunk]))
            for layer in self.translators.layers:
                states = self.norm(self.translators.translate(layer, self.layer_hidden[layer][chunk]))
                kl = kl_from_final(probs, neg_entropy, self._logits(states)).sum()
                (kl / batch_positions).backward()
                sums[layer] += float(kl.detach())
        return sums


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def train_tuned_lens(
    model: torch.nn.Module,
    blocks: Blocks,
    output_dir: str | Path,
    *,
    model_name: str,
    layers: list[int] | None = None,
    settings: LensTrainingSettings | None = None,
    holdout_positions: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> TunedLens:
    """Fit one identity-initialized affine translator per layer on ``blocks`` (the training positions) and save
    the lens into ``output_dir``; a folder holding a lens of the same training set-up resumes from its step."""
    settings = settings or LensTrainingSettings()
    _check_settings(settings)
    output_dir = files.ensure_output_dir(output_dir)
    n_layers = len(decoder_layers(model))
    chosen = translated_layers(n_layers, layers)
    if not chosen:
        raise MRPUserError("no layer to translate: the last layer is the model's own output; choose earlier layers")
    weight = output_head(model)[0]
    config = _new_config(model_name, n_layers, weight, chosen, blocks, settings, holdout_positions)
    device = weight.device
    translators = AffineTranslators(chosen, int(weight.shape[1])).to(device)
    for parameter in translators.parameters():  # every rank all-reduces a gradient, even with no position in a step
        parameter.grad = torch.zeros_like(parameter)
    optimizer = torch.optim.Adam(translators.parameters(), lr=settings.learning_rate)
    start_step, log = _resume(output_dir, config, translators, optimizer)
    if start_step >= settings.max_steps:
        logger.warning(
            "the tuned lens in %s is trained to step %d already (--max_steps %d)",
            output_dir,
            start_step,
            settings.max_steps,
        )
        return TunedLens(translators, {**config, "step": start_step, "log": log, "path": str(output_dir)})
    rank, world = _rank_and_world()
    began = time.perf_counter()
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # only the translators learn; no gradient of W or the norm is ever formed
    try:
        final_hidden, layer_hidden, _ = collect_lens_inputs(model, blocks, chosen, batch_size)
        objective = _LensObjective(model, translators, final_hidden, layer_hidden, settings.chunk_size)
        from tqdm.auto import tqdm

        for step in tqdm(range(start_step, settings.max_steps), desc="lens", disable=not progress or rank != 0):
            index = step_positions(step, len(final_hidden), settings.batch_positions, settings.seed)
            sums = objective.backward(index[rank::world], len(index))
            totals = torch.tensor([sums[layer] for layer in chosen], dtype=torch.float64)
            if world > 1:
                _all_reduce_sum([p.grad for p in translators.parameters()] + [totals])
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            log.append(
                {
                    "step": step + 1,
                    "mean_kl": float(totals.mean()) / len(index),
                    "kl_by_layer": [float(v) / len(index) for v in totals],
                }
            )
            done = step + 1
            if done == settings.max_steps or (settings.save_steps and done % settings.save_steps == 0):
                seconds = time.perf_counter() - began
                _save(
                    output_dir,
                    translators,
                    optimizer,
                    {**config, "step": done, "log": log, "seconds": seconds},
                    rank == 0,
                )
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    return TunedLens(translators, {**config, "step": settings.max_steps, "log": log, "path": str(output_dir)})


def _check_settings(settings: LensTrainingSettings) -> None:
    for name in ("max_steps", "batch_positions", "chunk_size", "save_steps"):
        require_number(name, getattr(settings, name), integer=True)
    for name in ("max_steps", "batch_positions", "chunk_size"):
        if getattr(settings, name) < 1:
            raise MRPUserError(f"{name} must be a positive integer, got {getattr(settings, name)!r}")
    if settings.save_steps < 0:
        raise MRPUserError(f"save_steps must be >= 0 (0: save at the end only), got {settings.save_steps!r}")
    require_number("learning_rate", settings.learning_rate)
    if not settings.learning_rate > 0:
        raise MRPUserError(f"learning_rate must be a finite number > 0, got {settings.learning_rate!r}")


def _new_config(
    model_name: str,
    n_layers: int,
    weight: torch.Tensor,
    layers: list[int],
    blocks: Blocks,
    settings: LensTrainingSettings,
    holdout_positions: int,
) -> dict:
    return {
        "format": FORMAT,
        "model": model_name,
        "num_hidden_layers": n_layers,
        "hidden_size": int(weight.shape[1]),
        "vocab_size": int(weight.shape[0]),
        "layers": layers,
        "training": {
            "data_source": blocks.source,
            "block_size": blocks.block_size,
            "n_positions": int(blocks.n_positions),
            "holdout_positions": int(holdout_positions),
            "blocks_sha256": blocks.fingerprint(),
            "tokenizer_sha256": blocks.tokenizer,
            "block_hashes": block_hashes(blocks.input_ids),
        },
        "settings": asdict(settings),
    }


SAME_SETUP = ("model", "num_hidden_layers", "hidden_size", "vocab_size", "layers", "training")
SAME_SETTINGS = ("batch_positions", "learning_rate", "seed", "chunk_size")


def _resume(output_dir: Path, config: dict, translators: AffineTranslators, optimizer) -> tuple[int, list]:
    """(step to start from, log so far): 0 and [] for an empty folder; a lens of the same set-up is resumed."""
    if not (output_dir / CONFIG_FILE).is_file():
        return 0, []
    saved = files.read_json(output_dir / CONFIG_FILE)
    differs = [key for key in SAME_SETUP if saved.get(key) != config[key]]
    differs += [
        f"settings.{key}" for key in SAME_SETTINGS if saved.get("settings", {}).get(key) != config["settings"][key]
    ]
    if differs:
        raise MRPUserError(
            f"{output_dir} holds a tuned lens trained with other settings ({', '.join(differs)} "
            "differ); choose another --output_dir, or pass --overwrite_output_dir true to start afresh"
        )
    step = int(saved["step"])
    _load_translators(output_dir, translators, step)
    _load_optimizer(output_dir, optimizer, step)
    logger.warning("resuming the tuned lens in %s from step %d", output_dir, step)
    return step, list(saved.get("log", []))


def _save(output_dir: Path, translators: AffineTranslators, optimizer, config: dict, writer: bool) -> None:
    if not writer:
        return
    from safetensors.torch import save_file

    metadata = {"step": str(config["step"]), "format": FORMAT}
    state = optimizer.state_dict()["state"]
    tensors = {
        f"state.{i}.{name}": value.detach().cpu().contiguous().reshape(-1)
        if value.dim() == 0
        else value.detach().cpu().contiguous()
        for i, entry in state.items()
        for name, value in entry.items()
    }
    files.write_with(output_dir / OPTIMIZER_FILE, lambda path: save_file(tensors, str(path), metadata=metadata))
    weights = {
        f"{kind}.{layer}": tensor.detach().cpu().contiguous()
        for kind, group in (("weight", translators.weights), ("bias", translators.biases))
        for layer, tensor in zip(translators.layers, group)
    }
    files.write_with(output_dir / LENS_FILE, lambda path: save_file(weights, str(path), metadata=metadata))
    files.write_json(output_dir / CONFIG_FILE, {key: value for key, value in config.items() if key != "path"})


def _read_tensors(path: Path, step: int | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise MRPUserError(
            f"{path} is missing: the tuned lens folder {path.parent} is incomplete; train it again "
            "with `hf-mrp lens train --output_dir` that folder"
        )
    with safe_open(str(path), framework="pt") as handle:
        saved_step = (handle.metadata() or {}).get("step")
        if step is not None and saved_step != str(step):
            raise MRPUserError(
                f"{path} is from step {saved_step}, {CONFIG_FILE} from step {step}: a save was cut "
                "short; rerun `hf-mrp lens train` into the folder with --overwrite_output_dir true"
            )
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _load_translators(folder: Path, translators: AffineTranslators, step: int | None) -> None:
    tensors = _read_tensors(folder / LENS_FILE, step)
    with torch.no_grad():
        for kind, group in (("weight", translators.weights), ("bias", translators.biases)):
            for layer, parameter in zip(translators.layers, group):
                key = f"{kind}.{layer}"
                if key not in tensors or tensors[key].shape != parameter.shape:
                    raise MRPUserError(
                        f"{folder / LENS_FILE} has no {tuple(parameter.shape)} tensor {key!r}: it does "
                        f"not match {CONFIG_FILE}; train the lens again"
                    )
                parameter.copy_(tensors[key])


def _load_optimizer(folder: Path, optimizer, step: int) -> None:
    tensors = _read_tensors(folder / OPTIMIZER_FILE, step)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value.reshape(()) if name == "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def load_tuned_lens(path: str | Path, device: torch.device | str = "cpu") -> TunedLens:
    """A lens folder written by `hf-mrp lens train` (or ``train_tuned_lens``), checked to be whole."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise MRPUserError(
            f"{folder} holds no tuned lens ({CONFIG_FILE} missing); train one with "
            f"`hf-mrp lens train --output_dir {folder}`"
        )
    config = files.read_json(folder / CONFIG_FILE)
    if config.get("format") != FORMAT or not config.get("layers"):
        raise MRPUserError(f"{folder / CONFIG_FILE} is not a tuned lens config written by hf_mrp")
    translators = AffineTranslators(config["layers"], int(config["hidden_size"]))
    _load_translators(folder, translators, int(config["step"]))
    return TunedLens(translators.to(device), {**config, "path": str(folder)})


__all__ = ["LensTrainingSettings", "TunedLens", "block_hashes", "load_tuned_lens", "train_tuned_lens"]
