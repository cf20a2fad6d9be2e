"""The one error type for mistakes a user can fix; the CLI prints it as a single line."""


class MRPUserError(ValueError):
    """Bad input: the message names the problem and the fix."""
