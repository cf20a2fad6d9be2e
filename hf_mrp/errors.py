"""The one error type for mistakes a user can fix; the CLI prints it as a single line."""


class MRPUserError(ValueError):
    """Bad input: the message names the problem and the fix."""


def require_number(name: str, value: object, *, integer: bool = False) -> None:
    """The one number check: a finite real number (an integer with ``integer=True``), never a bool or a string.

    Command lines convert their strings before this runs; Python callers get no conversion, so '0.5', 2.5 for a
    count, True or inf are refused here by name, before any work."""
    import math
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
        kind = "an integer" if integer else "a finite number"
        raise MRPUserError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not integer and not math.isfinite(value):
        raise MRPUserError(f"{name} must be a finite number, got {type(value).__name__} {value!r}")


def one_line(text: object) -> str:
    """A message (a third-party one may span lines) as the one line a user error prints."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())
