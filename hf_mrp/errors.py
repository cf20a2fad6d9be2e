"""The one error type for mistakes a user can fix; the CLI prints it as a single line."""


class MRPUserError(ValueError):
    """Bad input: the message names the problem and the fix."""


def one_line(text: object) -> str:
    """A message (a third-party one may span lines) as the one line a user error prints."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())
