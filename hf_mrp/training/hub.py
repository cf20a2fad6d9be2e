"""Pushing a finished output folder to the Hub, after everything is on disk."""

from __future__ import annotations

from pathlib import Path

from ..errors import MRPUserError


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Upload ``folder`` (adapter, card, audits, plots) to ``repo_id``; a failure loses nothing local."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".*"],
            commit_message="hf_mrp: margin-refined adapter with geometry audits",
        )
    except Exception as error:  # offline, DNS, auth, HTTP: the local files are complete either way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MRPUserError(
            f"push to the Hub repo {repo_id!r} failed ({type(error).__name__}: {reason}); nothing is lost: the adapter, "
            f"model card and audits are in {folder}. Push them later from a machine with network and a token: "
            f"`hf upload {repo_id} {folder}`"
        ) from None
    return str(getattr(commit, "commit_url", commit))
