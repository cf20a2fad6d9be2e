"""Checks of a training dataset made before anything trains: columns of streamed datasets, mrp_weights, and the
token ids of a map-style dataset against the model's vocabulary (on the host, once: the training steps then read no
device value to check them).

A streamed ``datasets.IterableDataset`` often knows no column names until it is read, so its first
row is read to find them. ``mrp_weights`` weight the objective per token: a negative weight flips
the objective's sign there, and a row whose weights do not line up with its labels has no meaning.
"""

from __future__ import annotations

import numpy as np

from ..errors import MRPUserError
from ..models import token_id_problem
from ..ops import IGNORE_INDEX

WEIGHTS_COLUMN = "mrp_weights"


def streamed_columns(dataset, name: str) -> list[str] | None:
    """The columns of the first row of an iterable dataset without known column names (None otherwise)."""
    if getattr(dataset, "column_names", None) is not None or hasattr(dataset, "__len__"):
        return None
    if not hasattr(dataset, "__iter__"):
        return None
    first = next(iter(dataset), None)
    if first is None:
        raise MRPUserError(f"{name} yields no rows; pass at least one block of token ids")
    return list(first) if isinstance(first, dict) else None


def weight_problem(row: int, weights, labels) -> str | None:
    """Why one row's mrp_weights cannot be used (None when they can)."""
    values = np.asarray(weights, dtype=np.float64) if weights is not None else None
    if values is None or values.ndim != 1:
        return f"row {row} holds {weights!r:.40} instead of a list of numbers"
    if labels is not None and len(values) != len(labels):
        return f"row {row} has {len(values)} weights for {len(labels)} labels"
    if (values < 0).any():  # NaN/inf are left to the trainer's non-finite guard, which skips such batches
        return f"row {row} holds the negative weight {values.min():g} (it would flip the objective's sign)"
    return None


def check_weights(dataset, name: str, batch: int = 256) -> None:
    """Every row's mrp_weights: one non-negative number per label."""
    if WEIGHTS_COLUMN not in (getattr(dataset, "column_names", None) or []) or not hasattr(dataset, "iter"):
        return
    has_labels = "labels" in dataset.column_names
    row = 0
    for rows in dataset.select_columns([WEIGHTS_COLUMN] + (["labels"] if has_labels else [])).iter(batch_size=batch):
        for offset, weights in enumerate(rows[WEIGHTS_COLUMN]):
            labels = rows["labels"][offset] if has_labels else None
            problem = weight_problem(row + offset, weights, labels)
            if problem:
                raise MRPUserError(
                    f"{name} column {WEIGHTS_COLUMN}: {problem}; give each row one weight >= 0 per label "
                    f"(0 leaves a position out of the objective)"
                )
        row += len(rows[WEIGHTS_COLUMN])


TOKEN_COLUMNS = ("input_ids", "labels")


def check_token_range(dataset, vocab: int, name: str, batch: int = 1024) -> bool:
    """Refuse token ids of a map-style dataset outside ``[0, vocab)`` (labels: -100 allowed) in one line, reading
    the columns on the host; returns whether the whole dataset was checked (False: a streamed or custom dataset,
    whose batches are checked as they come)."""
    columns = [c for c in TOKEN_COLUMNS if c in (getattr(dataset, "column_names", None) or [])]
    if not columns or not hasattr(dataset, "iter"):
        return False
    for rows in dataset.select_columns(columns).iter(batch_size=batch):
        for column in columns:
            values = [np.asarray(row, dtype=np.int64).ravel() for row in rows[column] if row is not None]
            flat = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
            ignore = IGNORE_INDEX if column == "labels" else None
            if ignore is not None:
                flat = np.where(flat == ignore, 0, flat)
            problem = token_id_problem(int(flat.min()), int(flat.max()), vocab, column, ignore) if flat.size else None
            if problem:
                raise MRPUserError(f"{name}: {problem}")
    return True
