"""The tuned lens (Belrose et al. 2023) as a folder and as the object read back from it: one affine translator
per layer, trained (`lens_training.train_tuned_lens`, `hf-mrp lens train`) so that layer l's distribution through
it, the final norm and W matches the final layer's; `hf-mrp audit --lens tuned` reads it back.

A lens folder holds ``lens.safetensors`` (the translators), ``optimizer.safetensors`` (Adam's state, so training
resumes where it stopped) and ``lens_config.json`` (model, layers, the training positions' fingerprint and
per-block hashes, the settings, the step reached, the loss log), written in that order at each save, each
atomically; the step is recorded in all three, so a save cut short is recognized.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import Blocks
from ..errors import MRPUserError
from ..models import decoder_layers, output_head
from ..ops.lens import AffineTranslators
from ..storage import files

LENS_FILE, OPTIMIZER_FILE, CONFIG_FILE = "lens.safetensors", "optimizer.safetensors", "lens_config.json"
FORMAT = "hf_mrp tuned lens"


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
        """Refuse an audit of text the lens was trained on: a block identical to a training block, or, for blocks
        read from the start of the lens' own data source with its tokenizer, audited tokens that reach its first
        training token, whatever the audit's block size (a content check would refuse repeated boilerplate)."""
        trained = set(self.config["training"]["block_hashes"])
        shared = [i for i, digest in enumerate(block_hashes(blocks.input_ids)) if digest in trained]
        if shared:
            raise MRPUserError(
                f"{len(shared)} of the audited blocks (the first: block {shared[0]}) are among the tuned lens' "
                "training blocks; audit other positions, or train the lens with a larger --holdout_positions "
                "(at least the audit's --max_positions) so that its training positions follow the audited ones"
            )
        self._check_audit_ends_before_training_text(blocks)

    def _check_audit_ends_before_training_text(self, blocks: Blocks) -> None:
        training = self.config["training"]
        first_trained = training.get("stream_start_token")  # None: the lens' blocks were not cut from a stream
        lens_stream = (training["data_source"], training["tokenizer_sha256"])
        if first_trained is None or blocks.mask is not None or (blocks.source, blocks.tokenizer) != lens_stream:
            return  # not both read from the start of one stream: only identical blocks can be told
        last_audited = last_target_token(blocks.n_positions, blocks.block_size)
        if blocks.n_positions and last_audited >= first_trained:
            needed = (last_audited // training["block_size"]) * (training["block_size"] - 1) + 1
            raise MRPUserError(
                f"the audit reads tokens 0-{last_audited} of {blocks.source}, and the tuned lens was trained on it "
                f"from token {first_trained} on (--holdout_positions {training['holdout_positions']} at --block_size "
                f"{training['block_size']}); audit at most {positions_before(first_trained, blocks.block_size)} "
                f"positions at --block_size {blocks.block_size}, or train the lens with --holdout_positions {needed}"
            )

    def check_layers(self, layers: list[int], n_layers: int) -> None:
        missing = [layer for layer in layers if layer != n_layers - 1 and layer not in self.layers]
        if missing:
            raise MRPUserError(
                f"the tuned lens has no translator for layer {missing[0]} (it has layers "
                f"{layer_spans(self.layers)}); audit those layers or retrain with --layers covering them"
            )


def layer_spans(layers: list[int]) -> str:
    """Consecutive layers as "3-7", others as a list: how messages name a set of layers."""
    if len(layers) == 1:
        return str(layers[0])
    return f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)


def training_start_token(holdout_positions: int, block_size: int) -> int:
    """The stream offset of `hf-mrp lens train`'s first training token: it skips the blocks an audit of
    ``holdout_positions`` positions at ``block_size`` reads."""
    return -(-holdout_positions // (block_size - 1)) * block_size


def last_target_token(n_positions: int, block_size: int) -> int:
    """The stream offset of the last token an audit of the first ``n_positions`` positions reads (its target)."""
    row, column = divmod(n_positions - 1, block_size - 1)
    return row * block_size + column + 1


def positions_before(offset: int, block_size: int) -> int:
    """How many of the first positions, at ``block_size``, read only tokens before stream offset ``offset``."""
    rows, rest = divmod(offset, block_size)
    return rows * (block_size - 1) + max(0, rest - 1)


def block_hashes(input_ids: np.ndarray) -> list[str]:
    """A short sha256 of each block's token ids (int64): how training and audited blocks are told apart."""
    rows = np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64))
    return [hashlib.sha256(row.tobytes()).hexdigest()[:16] for row in rows]


def save_lens(
    output_dir: Path, translators: AffineTranslators, optimizer: torch.optim.Optimizer, config: dict, writer: bool
) -> None:
    """The three files of a lens folder, in the order the module docstring gives (on the writing process only)."""
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
    """A safetensors file of a lens folder, refused when missing or saved at another step than ``step``."""
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


def load_translators(folder: Path, translators: AffineTranslators, step: int | None) -> None:
    """The translators' tensors of ``folder`` copied into ``translators`` (whose layers and sizes they must fit)."""
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


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Adam's saved state loaded into ``optimizer``, to resume training at ``step``."""
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
    load_translators(folder, translators, int(config["step"]))
    return TunedLens(translators.to(device), {**config, "path": str(folder)})


__all__ = ["CONFIG_FILE", "LENS_FILE", "OPTIMIZER_FILE", "TunedLens", "block_hashes", "load_tuned_lens"]
