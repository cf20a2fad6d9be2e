"""Pushing to the Hub: during training at each save (`HubPushCallback`) and once at the end (`push_folder`).

During training, a push follows the Trainer's ``hub_strategy``:

- ``every_save``: at each checkpoint save, the adapter of that checkpoint, the audits and
  comparisons made so far (``audit_*/``, ``comparison*/``), the TensorBoard event files
  (``runs/``, which the Hub shows as the repo's training metrics) and a model card of the run so far;
- ``checkpoint``: the same, plus the checkpoint itself as ``last-checkpoint/`` (to resume from);
- ``all_checkpoints``: the same, plus each checkpoint under its own name;
- ``end``: nothing during training; the final push of the finished folder only.

As in the Trainer, a push runs in the background (one at a time; a save while one is still
running is skipped unless ``hub_always_push``) so training never waits for the network. Each push
uploads a snapshot copied to a temporary folder, so files still being written (event files) are
never read half-way, and the output folder is only read, never changed: a failed push (offline,
auth, HTTP) is logged as a warning, loses nothing, and the next save pushes everything again.
Never pushed: optimizer/scheduler/RNG states, ``trainer_state.json``, and ``training_args.bin``
(a pickle); the token only authenticates the upload.

The repo is the one ``create_repo`` answers with, as in transformers' Trainer: a bare name lands in the token's
namespace (``tiny-run`` -> ``you/tiny-run``), and every later upload goes there. The audit tables
(``audit_*/positions.parquet``) travel with the adapter on purpose: they are the per-position evidence behind the
card's numbers, and ``hf-mrp compare`` reads them. The client asks, for each ``.parquet`` committed to a model
repo, whether a dataset was meant; a push of a run answers that question for exactly those files
(``answer_audit_table_question``) instead of printing it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

from ..errors import MRPUserError

logger = logging.getLogger(__name__)

STRATEGIES = ("every_save", "checkpoint", "all_checkpoints", "end")
RUN_FOLDERS = ("audit_*", "comparison*")  # the audits and comparisons MRPAuditCallback writes
NEVER_PUSHED = {"optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin", "README.md"}
# What the final push (and `hf-mrp push`) leaves out, as upload_folder patterns (fnmatch: `*` also matches `/`):
# checkpoints (optimizer, scheduler, RNG states), dotfiles anywhere (the folder's lock, staging folders), pickles,
# and the offline downstream suite's items (third-party data under their own licences; downstream.json keeps the
# scores and the verdicts, and the suite is rebuilt from the installed packages anywhere).
FINAL_IGNORE = ["checkpoint-*", ".*", "*/.*", "training_args.bin", "*/training_args.bin", "*offline_tasks/*"]
# huggingface_hub's question for a .parquet committed to a model repo (HfApi.create_commit), for the audit tables
AUDIT_TABLE_QUESTION = (
    r"It seems that you are about to commit a data file \((audit|comparison)[^/()]*/[^/()]+\.parquet\)"
)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def _copy_tree(source: Path, target: Path, keep=lambda path: True) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts) and keep(path):
            _copy(path, target / path.relative_to(source))


def answer_audit_table_question() -> None:
    """The audit tables belong beside the adapter (module docstring); silence the client's "did you mean a dataset?"
    for those paths only (any other .parquet still asks). Idempotent: warnings.filterwarnings replaces its twin."""
    warnings.filterwarnings("ignore", message=AUDIT_TABLE_QUESTION, category=UserWarning)


def create_repo_id(repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Create the repo (or find it) and return its full id as the Hub answers it: ``name`` -> ``user/name``."""
    from huggingface_hub import HfApi

    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def retry_command(folder: str | Path, repo_id: str) -> str:
    """The command that pushes ``folder`` as the run would have (FINAL_IGNORE), for a failure line."""
    import shlex

    return shlex.join(["hf-mrp", "push", str(folder), "--repo_id", repo_id])


def model_files(checkpoint: Path) -> list[Path]:
    """The files of a checkpoint that make up the model (adapter, config, tokenizer): no trainer state."""
    return [
        p
        for p in sorted(checkpoint.iterdir())
        if p.is_file() and p.name not in NEVER_PUSHED and not p.name.startswith(("rng_state", "."))
    ]


def tensorboard_dir(output_dir: Path) -> Path:
    """Where the Trainer's TensorBoard callback writes: $TENSORBOARD_LOGGING_DIR, else <output_dir>/runs."""
    configured = os.environ.get("TENSORBOARD_LOGGING_DIR")
    return Path(os.path.expanduser(configured)) if configured else output_dir / "runs"


def stage_push(output_dir: Path, checkpoint: Path | None, strategy: str, staging: Path, card: str | None) -> Path:
    """Copy what a push at this save uploads into ``staging`` (see the module docstring)."""
    for pattern in RUN_FOLDERS:
        for folder in sorted(output_dir.glob(pattern)):
            if folder.is_dir():
                _copy_tree(folder, staging / folder.name)
    events = tensorboard_dir(output_dir)
    if events.is_dir():
        _copy_tree(events, staging / "runs", keep=lambda path: "tfevents" in path.name)
    if checkpoint is not None and checkpoint.is_dir():
        for path in model_files(checkpoint):
            _copy(path, staging / path.name)
        if strategy in ("checkpoint", "all_checkpoints"):
            name = "last-checkpoint" if strategy == "checkpoint" else checkpoint.name
            _copy_tree(checkpoint, staging / name, keep=lambda path: path.name != "training_args.bin")
    if card is not None:
        (staging / "README.md").write_text(card, encoding="utf-8")
    return staging


class HubPushCallback(TrainerCallback):
    """Push the run to ``repo_id`` at each save, following ``hub_strategy`` (see the module docstring).

    ``card``: a function (output_dir, step) -> model card Markdown or None, for the pushed README.md.
    """

    def __init__(
        self,
        repo_id: str,
        output_dir: str | Path | None = None,
        token: str | None = None,
        private: bool | None = None,
        hub_strategy: str = "every_save",
        revision: str | None = None,
        always_push: bool = False,
        card=None,
    ):
        strategy = str(getattr(hub_strategy, "value", hub_strategy))
        if strategy not in STRATEGIES:
            raise MRPUserError(f"unknown hub_strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        self.repo_id, self.strategy, self.revision = repo_id, strategy, revision
        self.repo_resolved = False  # repo_id is create_repo's answer (namespace included) once a push made the repo
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.token, self.private, self.always_push, self.card = token, private, always_push, card
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf_mrp-push")
        self.jobs: list[Future] = []
        self.failures: list[str] = []
        self.pushed: list[int] = []

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.strategy == "end":
            return
        if not self.always_push and self.jobs and not self.jobs[-1].done():
            logger.info("step %d: the previous Hub push is still running; skipping this one", state.global_step)
            return
        output_dir = self.output_dir or Path(args.output_dir)
        checkpoint = output_dir / f"checkpoint-{state.global_step}"
        staging = Path(tempfile.mkdtemp(prefix="hf_mrp-push-"))
        try:
            card = self.card(output_dir, state.global_step) if self.card is not None else None
            stage_push(output_dir, checkpoint, self.strategy, staging, card)
        except Exception as error:  # a file vanished under us (rotation): skip this push, train on
            shutil.rmtree(staging, ignore_errors=True)
            self._record_failure(state.global_step, error)
            return
        message = f"hf_mrp: training in progress, step {state.global_step}"
        self.jobs.append(self._executor.submit(self._push, staging, message, state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()

    def resolved_repo_id(self) -> str | None:
        """The repo's full id, creating the repo when no push has yet (strategy ``end``); None when the Hub cannot
        be asked now (the final push then fails with its own line)."""
        if not self.repo_resolved:
            try:
                self.repo_id, self.repo_resolved = create_repo_id(self.repo_id, self.token, self.private), True
            except Exception as error:  # offline, DNS, auth, HTTP: reported by the final push
                logger.info("the Hub repo %r could not be created now (%s)", self.repo_id, _first_line(error))
                return None
        return self.repo_id

    def wait(self) -> list[str]:
        """Block until every push started so far has finished; returns the failures (one line each)."""
        for job in list(self.jobs):
            job.result()  # _push never raises: failures are recorded
        return self.failures

    def _push(self, staging: Path, message: str, step: int) -> None:
        from huggingface_hub import HfApi

        try:
            if not self.repo_resolved:
                self.repo_id, self.repo_resolved = create_repo_id(self.repo_id, self.token, self.private), True
            answer_audit_table_question()
            HfApi(token=self.token).upload_folder(
                folder_path=str(staging), repo_id=self.repo_id, commit_message=message, revision=self.revision
            )
            self.pushed.append(step)
        except Exception as error:  # offline, DNS, auth, HTTP: training goes on, local files are untouched
            self._record_failure(step, error)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _record_failure(self, step: int, error: Exception) -> None:
        line = f"step {step}: push to {self.repo_id!r} failed ({_first_line(error)})"
        self.failures.append(line)
        logger.warning("%s; training goes on, nothing local is lost, the next save pushes everything again", line)


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Upload ``folder`` (adapter, card, audits, plots, runs/; not FINAL_IGNORE) to the repo ``create_repo`` answers
    for ``repo_id``; returns the commit's url. A failure loses nothing local and names the command that retries."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    try:
        repo_id = create_repo_id(repo_id, token, private)
        answer_audit_table_question()
        commit = HfApi(token=token).upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            ignore_patterns=list(FINAL_IGNORE),
            commit_message="hf_mrp: margin-refined adapter with geometry audits",
        )
    except Exception as error:  # offline, DNS, auth, HTTP: the local files are complete either way
        raise MRPUserError(
            f"push to the Hub repo {repo_id!r} failed ({_first_line(error)}); nothing is lost: the adapter, model "
            f"card and audits are in {folder}. Push them later, with network and a token (HF_TOKEN or `hf auth "
            f"login`), leaving out checkpoints and the lock as the run does: `{retry_command(folder, repo_id)}`"
        ) from None
    return str(getattr(commit, "commit_url", commit))
