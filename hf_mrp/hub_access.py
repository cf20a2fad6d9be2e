"""Is the Hub reachable? One quick probe instead of a minute of retries, and the Hub's offline mode while it is not.

A Hub request that cannot connect is retried with back-off for about a minute (huggingface_hub), and a missing
dataset behind an unreachable Hub costs as much. `hub_problem` asks the endpoint once, with a short timeout;
`offline_when_unreachable` turns the Hub's offline mode on while it does not answer, so what is cached still
loads and what is not fails at once. Torch-free, so a command can fail before the training stack imports.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 3.0


def is_hub_id(source: str) -> bool:
    return not Path(source).exists() and not source.startswith((".", "/", "~"))


@functools.lru_cache(maxsize=8)
def _endpoint_problem(endpoint: str) -> str | None:
    """Why one quick request to the Hub endpoint fails (no retries), or None when it answers."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=HUB_PROBE_SECONDS, follow_redirects=False)
    except Exception as error:  # noqa: BLE001 - any failure to get an answer means: unreachable
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
    return None


_FORCED_OFFLINE: list[str] = []  # why offline_when_unreachable turned offline mode on (while it holds it)


def hub_problem() -> str | None:
    """Why the Hub cannot be used now (offline mode, or an endpoint that does not answer), or None. A Hub request
    that cannot connect is retried with back-off for about a minute; this probe takes at most a few seconds."""
    from huggingface_hub import constants

    if _FORCED_OFFLINE:
        return _FORCED_OFFLINE[-1]
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    problem = _endpoint_problem(constants.ENDPOINT)
    return f"{constants.ENDPOINT} does not answer ({problem})" if problem else None


@contextlib.contextmanager
def offline_when_unreachable(source: str | None = None) -> Iterator[None]:
    """While the block runs, use the Hub's offline mode (local cache only) when the Hub endpoint does not answer, so
    what is cached still loads and what is not fails at once, instead of after a minute of retries. ``source``: only
    for a Hub id (a local folder needs no Hub)."""
    import sys

    from huggingface_hub import constants

    local = (source is not None and not is_hub_id(source)) or constants.HF_HUB_OFFLINE
    problem = None if local else hub_problem()
    if problem is None:
        yield
        return
    logger.warning("the Hub cannot be reached (%s): reading from the local cache only", problem)
    datasets_config: Any = sys.modules.get("datasets.config")  # a module whose flag is set below, when imported
    saved = constants.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None)
    _FORCED_OFFLINE.append(problem)
    constants.HF_HUB_OFFLINE = True
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        _FORCED_OFFLINE.pop()
        constants.HF_HUB_OFFLINE = saved[0]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved[1]


__all__ = ["HUB_PROBE_SECONDS", "hub_problem", "is_hub_id", "offline_when_unreachable"]
