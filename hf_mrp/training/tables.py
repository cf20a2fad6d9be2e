"""The flip tables of one audit, sent to the reporters that can show a table.

`trainer.log` carries numbers only (TensorBoard drops anything else, and `log_history` must stay
JSON), so the tables go straight to each active reporter callback of the trainer:
trackio (`trackio.Table`), Weights & Biases (`wandb.Table`) and TensorBoard (a Markdown table in
its Text tab). Each table is logged under ``train/audit/table/<name>``, next to the scalars,
which the Trainer's reporters show as ``train/audit/...``. docs/logging.md lists the tables.
"""

from __future__ import annotations

import logging

from ..compat import tensorboard_writer, trackio_module, wandb_module
from ..reporting.markdown import escape_cell, escape_token
from ..reporting.markdown import table as markdown_table

logger = logging.getLogger(__name__)

TABLE_PREFIX = "train/audit/table/"
GROUP_COLUMNS = ("n", "w2r", "r2w", "net", "accuracy_before", "accuracy_after")
TOKEN_COLUMNS = ("token", "token_id", "w2r", "r2w", "net")
GROUP_TABLES = (("class", "by_class"), ("bucket", "by_bucket"), ("band", "accuracy_by_margin_band"))
TOKEN_TABLES = (("top_gain", "top_gain"), ("top_loss", "top_loss"))

Table = tuple[list[str], list[list]]


def flip_tables(comparison: dict) -> dict[str, Table]:
    """{name: (columns, rows)}: flips by token class, frequency bucket and margin band, and the
    target tokens with the largest per-token net gains and losses."""
    tables: dict[str, Table] = {}
    for name, key in GROUP_TABLES:
        groups = comparison.get(key)
        if groups:
            rows = [[str(label), *(group.get(column) for column in GROUP_COLUMNS)] for label, group in groups.items()]
            tables[name] = ([name, *GROUP_COLUMNS], rows)
    for name, key in TOKEN_TABLES:
        rows = [[entry.get(column) for column in TOKEN_COLUMNS] for entry in comparison.get(key) or []]
        tables[name] = (list(TOKEN_COLUMNS), rows)
    return tables


def markdown(columns: list[str], rows: list[list]) -> str:
    """A table as Markdown (TensorBoard's Text tab renders it)."""

    def cell(column: str, value) -> str:
        if column == "token":
            return escape_token(value)
        if value is None:
            return "n/a"
        return f"{value:.4f}" if isinstance(value, float) else escape_cell(str(value))

    body = [[cell(column, value) for column, value in zip(columns, row)] for row in rows]
    return markdown_table(columns, body) if rows else "(none)"


def _log_trackio(callback, tables: dict[str, Table], step: int) -> bool:
    trackio = trackio_module(callback)
    if trackio is None:
        return False
    record = {
        TABLE_PREFIX + name: trackio.Table(columns=columns, data=rows) for name, (columns, rows) in tables.items()
    }
    trackio.log({**record, "train/global_step": step})
    return True


def _log_wandb(callback, tables: dict[str, Table], step: int) -> bool:
    wandb = wandb_module(callback)
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    record = {TABLE_PREFIX + name: wandb.Table(columns=columns, data=rows) for name, (columns, rows) in tables.items()}
    wandb.log({**record, "train/global_step": step})
    return True


def _log_tensorboard(callback, tables: dict[str, Table], step: int) -> bool:
    writer = tensorboard_writer(callback)
    if writer is None:
        return False
    for name, (columns, rows) in tables.items():
        writer.add_text(TABLE_PREFIX + name, markdown(columns, rows), step)
    writer.flush()
    return True


REPORTERS = {"TrackioCallback": _log_trackio, "WandbCallback": _log_wandb, "TensorBoardCallback": _log_tensorboard}


def log_tables(callbacks, tables: dict[str, Table], step: int) -> list[str]:
    """Send ``tables`` to every table-capable reporter among ``callbacks``; returns the ones reached."""
    return send_to_reporters(callbacks, REPORTERS, tables, step, "the flip tables")


def send_to_reporters(callbacks, senders: dict, payload, step: int, what: str) -> list[str]:
    """Call ``senders[type(callback).__name__](callback, payload, step)`` for each reporter callback that has one;
    returns the ones reached. A reporter that fails is skipped with a warning: a dashboard must never stop training.
    """
    reached = []
    for callback in callbacks:
        send = senders.get(type(callback).__name__)
        if send is None:
            continue
        try:
            if send(callback, payload, step):
                reached.append(type(callback).__name__)
        except Exception as error:  # a reporter's own failure (network, schema): log it, train on
            logger.warning("could not log %s to %s: %s", what, type(callback).__name__, error)
    return reached
