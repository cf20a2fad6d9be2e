"""`hf-mrp push FOLDER [--repo_id ID]`: push a run folder to the Hub as the run itself would have.

A run whose final push failed (no network, a Hub error) prints this command. It goes through the run's own push
(hf_mrp.training.hub.push_folder: the same excludes, so never the folder's lock, `checkpoint-*/` with optimizer,
scheduler and RNG states, or `training_args.bin`), which a plain `hf upload` would send. The token comes from
`hf auth login` or HF_TOKEN, never from a flag (a flag's value stays in the shell's history).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ...errors import MRPUserError
from ...storage.files import read_json
from ...storage.locks import owned_folder
from . import COMMANDS

MODEL_FILES = ("adapter_config.json", "config.json")  # what makes a folder worth pushing: an adapter or a model


@dataclass
class PushArguments:
    """The run folder to push and where to."""

    folder: str = field(metadata={"positional": True, "help": "output folder of a finished `hf-mrp refine` run"})
    repo_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub repo, `user/name` or a bare `name` (created in the token's namespace); default: the "
            "run's --hub_model_id (mrp_config.json), else the folder's name"
        },
    )
    private: bool | None = field(default=None, metadata={"help": "create the repo private (a new repo only)"})


def make_parser(subparsers):
    return subparsers.add_parser(
        "push", help=COMMANDS["push"], description=COMMANDS["push"], dataclass_types=(PushArguments,)
    )


def run_repo_id(folder: Path) -> str:
    """The repo the run named (mrp_config.json's hub_model_id, create_repo's answer once it pushed), else the
    folder's name, which the Hub puts in the token's namespace as the run would have."""
    settings = folder / "mrp_config.json"
    named = read_json(settings).get("hub_model_id") if settings.is_file() else None
    return named or folder.resolve().name


def main(args: PushArguments) -> None:
    from ...training.hub import push_folder

    folder = Path(args.folder)
    if not folder.is_dir() or not any((folder / name).is_file() for name in MODEL_FILES):
        raise MRPUserError(
            f"{folder} holds no adapter or model to push (no {' or '.join(MODEL_FILES)}); pass the output folder "
            "of a finished `hf-mrp refine` run"
        )
    with owned_folder(folder, "hf-mrp push"):  # a run cannot start writing into the folder while it is read
        repo_id = args.repo_id or run_repo_id(folder)
        commit_url = push_folder(folder, repo_id, private=args.private)
    print(f"pushed {folder} -> {commit_url}")
