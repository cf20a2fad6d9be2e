"""The lens pictures of one audit (layers.png, lens_heatmap.png, lens_curves.png), sent to the reporters that show
images: TensorBoard (its Images tab), trackio (`trackio.Image`) and Weights & Biases (`wandb.Image`), each under
``train/audit/picture/<name>`` at the audit's step. The PNG files in the audit folder are the originals."""

from __future__ import annotations

from pathlib import Path

from ..audit.audit_files import LENS_PICTURES
from ..compat import tensorboard_writer, trackio_module, wandb_module
from .tables import send_to_reporters

PICTURE_PREFIX = "train/audit/picture/"


def lens_pictures(folder: Path) -> dict[str, Path]:
    """{name: PNG path} of the lens pictures in an audit folder (an audit folder is written whole, so they are the
    audit's own); none for an audit without layers."""
    return {name[: -len(".png")]: folder / name for name in LENS_PICTURES if (folder / name).is_file()}


def _rgb(path: Path):
    """A PNG as an H x W x 3 uint8 array (TensorBoard takes RGB; matplotlib's PNGs are RGBA on white)."""
    import numpy as np
    from matplotlib import image

    pixels = image.imread(str(path))[..., :3]
    return (np.clip(pixels, 0.0, 1.0) * 255).round().astype(np.uint8)


def _log_tensorboard(callback, pictures: dict[str, Path], step: int) -> bool:
    writer = tensorboard_writer(callback)
    if writer is None:
        return False
    for name, path in pictures.items():
        writer.add_image(PICTURE_PREFIX + name, _rgb(path), step, dataformats="HWC")
    writer.flush()
    return True


def _log_trackio(callback, pictures: dict[str, Path], step: int) -> bool:
    trackio = trackio_module(callback)
    if trackio is None:
        return False
    trackio.log({**{PICTURE_PREFIX + n: trackio.Image(str(p)) for n, p in pictures.items()}, "train/global_step": step})
    return True


def _log_wandb(callback, pictures: dict[str, Path], step: int) -> bool:
    wandb = wandb_module(callback)
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    wandb.log({**{PICTURE_PREFIX + n: wandb.Image(str(p)) for n, p in pictures.items()}, "train/global_step": step})
    return True


REPORTERS = {"TensorBoardCallback": _log_tensorboard, "TrackioCallback": _log_trackio, "WandbCallback": _log_wandb}


def log_pictures(callbacks, pictures: dict[str, Path], step: int) -> list[str]:
    """Send ``pictures`` to every image-capable reporter among ``callbacks``; returns the ones reached."""
    if not pictures:
        return []
    return send_to_reporters(callbacks, REPORTERS, pictures, step, "the lens pictures")


__all__ = ["PICTURE_PREFIX", "lens_pictures", "log_pictures"]
