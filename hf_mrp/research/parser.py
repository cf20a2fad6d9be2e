"""The one argument parser of every command: flag errors become `MRPUserError` (one line, exit code 2).

argparse prints its usage and exits on a bad flag; HfArgumentParser raises ValueError for unknown flags
and for TrainingArguments' own checks. Both become one line that names the fix, through this subclass
(no global patching).
"""

from __future__ import annotations

from transformers import HfArgumentParser

from ..compat import parse_dataclass_field, set_nargs
from ..errors import MRPUserError, one_line

_UNUSED = "Some specified arguments are not used by the HfArgumentParser: "


class MRPArgumentParser(HfArgumentParser):
    """`HfArgumentParser` (also usable with no dataclasses, as a plain argparse parser) whose errors are
    `MRPUserError`s ending with a pointer to ``PROG --help``."""

    def __init__(self, dataclass_types=(), prog: str | None = None, **kwargs):
        super().__init__(list(dataclass_types), prog=prog, **kwargs)

    @staticmethod
    def _parse_dataclass_field(parser, field) -> None:
        """A field with ``metadata={"positional": True}`` is a positional argument (``hf-mrp compare BEFORE AFTER``);
        every other field is a ``--flag`` as HfArgumentParser makes it, where a list field may set ``"nargs": "*"``
        (HfArgumentParser always asks for one value or more)."""
        if field.metadata.get("positional"):
            parser.add_argument(field.name, metavar=field.name.upper(), help=field.metadata.get("help"))
            return
        parse_dataclass_field(parser, field)
        if "nargs" in field.metadata:
            set_nargs(parser, field.name, field.metadata["nargs"])

    def _hint(self) -> str:
        return f"`{self.prog} --help` lists the flags"

    def error(self, message: str):
        raise MRPUserError(f"{one_line(message).rstrip('.')}; {self._hint()}")

    def parse_args_into_dataclasses(self, *args, **kwargs):
        try:
            return super().parse_args_into_dataclasses(*args, **kwargs)
        except MRPUserError:
            raise
        except ValueError as failure:  # raised while turning flags into arguments: a flag is wrong
            message = one_line(failure)
            if message.startswith(_UNUSED):
                message = "unrecognized arguments: " + message[len(_UNUSED) :]
            raise MRPUserError(f"{message}; {self._hint()}") from failure
