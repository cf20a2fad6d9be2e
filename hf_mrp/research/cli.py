"""`hf-mrp COMMAND [flags]`: argument parsing only; each command calls the Python API."""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys

from ..errors import MRPUserError, one_line
from ..noise import quiet_third_party_noise
from .commands import COMMANDS
from .parser import MRPArgumentParser


def run_command(command: str, argv: list[str]) -> None:
    """Import the command's module only (the training stack takes seconds to import), register its parser
    under the root one (TRL's ``make_parser(subparsers)``), parse, and hand ``main`` the whole dataclasses."""
    objectives_file = _flag_value(argv, "--objectives_module")
    if objectives_file is not None:  # before any flag is checked: its objectives are valid --mrp_objective values
        from ..ops.objectives import load_objectives_module

        load_objectives_module(objectives_file)
    module = importlib.import_module(f"hf_mrp.research.commands.{command}")
    if hasattr(module, "check_before_parsing"):  # settings that need the model's files, not only the flags
        module.check_before_parsing(argv)
    root = MRPArgumentParser(prog="hf-mrp")
    parser = module.make_parser(root.add_subparsers(dest="command", parser_class=MRPArgumentParser))
    if getattr(module, "FORWARDS_UNKNOWN_FLAGS", False):
        *groups, forwarded = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        module.main(*groups, forwarded, argv)
    else:
        module.main(*parser.parse_args_into_dataclasses(args=argv))


def _usage() -> str:
    lines = ["usage: hf-mrp COMMAND [--help] [flags]", "", "commands:"]
    lines += [f"  {name:10s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _flag_value(argv: list[str], flag: str) -> str | None:
    """A flag's value (``--flag VALUE`` or ``--flag=VALUE``), read before any flag parsing (which needs the heavy
    imports, and for --objectives_module the user's objectives)."""
    for index, word in enumerate(argv):
        if word == flag and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def _output_dir_owned(command: str, argv: list[str]):
    """Lock a given --output_dir at once, before the imports and model loading that take seconds, so a second
    run into the folder stops at once (the commands lock it again, reentrantly, and lock a default folder)."""
    import shlex

    folder = _flag_value(argv, "--output_dir")
    if folder is None or command == "downstream" or "-h" in argv or "--help" in argv:
        return contextlib.nullcontext()
    from ..storage.locks import is_main_process, owned_folder

    return owned_folder(folder, "hf-mrp " + shlex.join([command, *argv]), active=is_main_process())


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # Ctrl-C, `kill` / schedulers / torchrun, a closed terminal


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, like Ctrl-C: every ``finally`` runs (staging folders and
    temporary files are removed, each file on disk stays whole)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_stop_like_ctrl_c():
    """SIGTERM and SIGHUP raise `Stopped` in the main thread; a second signal ends the process at once (the default
    action is back once the first arrived). The previous handlers return when the block ends."""
    import signal

    numbers = [getattr(signal, name) for name in STOP_SIGNALS[1:] if hasattr(signal, name)]

    def stop(signum, frame):
        for number in numbers:
            signal.signal(number, signal.SIG_DFL)
        raise Stopped(signum)

    try:
        previous = {number: signal.signal(number, stop) for number in numbers}
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def leave_process_group() -> None:
    """End a torchrun / accelerate launch job as ``Trainer.end()`` does, once every process got here: a gloo
    process that exits with its process group alive while a peer still runs can abort at exit (SIGABRT,
    "terminate called without an active exception"), turning a finished job into a failed one."""
    if "torch.distributed" not in sys.modules:  # nothing joined a group: no need to import torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Run one command. User errors (MRPUserError, bad flags) print ONE line on stderr,
    ``hf-mrp COMMAND: error: ...``, and return 2; Ctrl-C, SIGTERM and SIGHUP print one line, without a traceback,
    and return 128 + the signal's number (130 for Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party_noise()  # before the imports that print it (the parser's transformers, peft, deepspeed)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"hf-mrp: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)} "
            "(`hf-mrp --help` describes them)",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with signals_stop_like_ctrl_c(), _output_dir_owned(command, rest):
            run_command(command, rest)
        leave_process_group()
    except MRPUserError as error:
        print(f"hf-mrp {command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        print(
            f"hf-mrp {command}: interrupted (report files on disk are whole: each is written atomically)",
            file=sys.stderr,
        )
        return 128 + (stop.signum if isinstance(stop, Stopped) else 2)
    except SystemExit as stop:  # --help of a command, or a handler's sys.exit
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(f"hf-mrp {command}: error: {one_line(stop.code)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
