"""Layer specs: which decoder layers a flag names ('all', '20-29', '3,5,7', '-1'), checked against the model.

Read by the audit's lens (--layers) and by the LoRA scope (lora_layers) alike."""

from __future__ import annotations

import re

from ..errors import MRPUserError

_RANGE = re.compile(r"^(-?\d+)(?:\s*-\s*(-?\d+))?$")


def parse_layer_spec(spec: str | list[int] | None, n_layers: int) -> list[int]:
    """'all', '20-29', '3,5,7', '-1' or a list -> sorted 0-based layer indices, checked against the model."""
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(n_layers))
        items: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            match = _RANGE.match(part)
            if match is None:
                raise MRPUserError(f"bad layer spec {spec!r}; use 'all', a range like '20-29' or a list like '3,5,7'")
            low, high = match.group(1), match.group(2) or match.group(1)
            items.extend(range(int(low), int(high) + 1))
    else:
        items = [int(i) for i in spec]
    if not items:
        raise MRPUserError(f"layer spec {spec!r} selects no layer; use 'all', '20-29' or '3,5,7'")
    resolved = sorted({i + n_layers if i < 0 else i for i in items})
    bad = [i for i in resolved if not 0 <= i < n_layers]
    if bad:
        raise MRPUserError(
            f"layer index {bad[0]} is out of range: the model has {n_layers} layers (0..{n_layers - 1}); "
            "fix the layer spec"
        )
    return resolved


def check_layer_flag(flag: str, spec: str | None, n_layers: int, model: str) -> list[int]:
    """``parse_layer_spec`` for a command-line flag, refused in words that name the flag and the model."""
    try:
        return parse_layer_spec(spec, n_layers)
    except MRPUserError as error:
        raise MRPUserError(f"{flag} {spec} does not fit {model}: {error}") from None
