"""`hf-mrp COMMAND [flags]`: argument parsing only; each command calls the Python API."""

from __future__ import annotations

import contextlib
import logging
import sys

from .errors import MRPUserError
from .parser import one_line

COMMANDS = {
    "audit": "float32 geometry audit of a model on fixed positions",
    "refine": "audit, refine with MRPTrainer (LoRA), audit again, compare (same flags as examples/refine.py)",
    "compare": "flip audit of two audit folders: hf-mrp compare BEFORE_DIR AFTER_DIR --output_dir D",
    "sweep": "dose-response sweep: objectives x lambdas x seeds, with a lambda = 0 control",
    "benchmark": "downstream invariance through lm-evaluation-harness: base vs base + adapter",
}


def _audit(argv: list[str]) -> None:
    from .arguments import AuditArguments, DataArguments, ModelArguments
    from .audit.run import audit_from_arguments
    from .parser import MRPArgumentParser

    parser = MRPArgumentParser((ModelArguments, DataArguments, AuditArguments), prog="hf-mrp audit")
    model_args, data_args, audit_args = parser.parse_args_into_dataclasses(args=argv)
    result = audit_from_arguments(model_args, data_args, audit_args)
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    s = result.summary
    fit = s["gap_fit"]
    print(
        f"audited {s['n_positions']} positions in {result.seconds:.1f}s -> {audit_args.output_dir}\n"
        f"accuracy {s['accuracy']:.4f}  median margin {s['margin_percentiles']['p50']:.4f}  "
        f"Pr(m<0.5) {s['fraction_margin_lt_0_5']:.4f}  entropy-margin Spearman {s['entropy_margin_spearman']:.4f}\n"
        f"gap fit: beta {fit['beta']:.4f}  R^2 {fit['r_squared']:.4f}  alpha {fit['alpha']:.4f}  "
        f"({fit['fit_points']} points)  unique margins {s['n_unique_margins']}"
    )
    if "layers" in s:
        print(f"layers with negative Fisher-penalty vs CE correlation: {s['layers']['negative_fisher_correlation']}")


def _refine(argv: list[str]) -> None:
    from .refine import main as refine_main

    refine_main(argv)


def _compare(argv: list[str]) -> None:
    from .audit.compare import compare_dirs
    from .parser import MRPArgumentParser
    from .refine import summary_line
    from .reporting.ownership import owned_folder

    parser = MRPArgumentParser(prog="hf-mrp compare", description=COMMANDS["compare"])
    parser.add_argument("before_dir")
    parser.add_argument("after_dir")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--tokenizer", default=None,
                        help="model id or folder whose tokenizer decodes tokens for the class breakdown; "
                             "default: the model named in the audits' provenance when it is a local folder")
    args = parser.parse_args(argv)
    with owned_folder(args.output_dir):
        tokenizer = _compare_tokenizer(args.tokenizer, args.before_dir)
        result = compare_dirs(args.before_dir, args.after_dir, args.output_dir, tokenizer=tokenizer)
    print(f"compared -> {args.output_dir}\n{summary_line(result)}")


def _compare_tokenizer(name: str | None, before_dir: str):
    """The tokenizer to decode target tokens: given, or the embedded model's when the audit used it."""
    from pathlib import Path

    from .models import EMBEDDED_NAME, embedded_model_dir, load_tokenizer
    from .reporting.files import read_json

    if name is None:
        audit = Path(before_dir) / "audit.json"
        model = read_json(audit).get("provenance", {}).get("model") if audit.is_file() else None
        if model == EMBEDDED_NAME:
            name = str(embedded_model_dir())
        elif model and Path(model).is_dir():
            name = model
    return load_tokenizer(name) if name else None


def _sweep(argv: list[str]) -> None:
    from .sweep import main as sweep_main

    sweep_main(argv)


def _benchmark(argv: list[str]) -> None:
    from .downstream import main as benchmark_main

    benchmark_main(argv)


HANDLERS = {"audit": _audit, "refine": _refine, "compare": _compare, "sweep": _sweep, "benchmark": _benchmark}


def _usage() -> str:
    lines = ["usage: hf-mrp COMMAND [--help] [flags]", "", "commands:"]
    lines += [f"  {name:10s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def _given_output_dir(argv: list[str]) -> str | None:
    """The --output_dir flag's value, read before any flag parsing (which needs the heavy imports)."""
    for index, word in enumerate(argv):
        if word == "--output_dir" and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith("--output_dir="):
            return word.split("=", 1)[1]
    return None


def _output_dir_owned(command: str, argv: list[str]):
    """Lock a given --output_dir at once, before the imports and model loading that take seconds, so a second
    run into the folder stops at once (the commands lock it again, reentrantly, and lock a default folder)."""
    import shlex

    folder = _given_output_dir(argv)
    if folder is None or command == "benchmark" or "-h" in argv or "--help" in argv:
        return contextlib.nullcontext()
    from .reporting.ownership import is_main_process, owned_folder

    return owned_folder(folder, "hf-mrp " + shlex.join([command, *argv]), active=is_main_process())


def main(argv: list[str] | None = None) -> int:
    """Run one command. User errors (MRPUserError, bad flags) print ONE line on stderr,
    ``hf-mrp COMMAND: error: ...``, and return 2; Ctrl-C returns 130 without a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"hf-mrp: error: unknown command {command!r}; choose one of {', '.join(HANDLERS)} "
              "(`hf-mrp --help` describes them)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _output_dir_owned(command, rest):
            HANDLERS[command](rest)
    except MRPUserError as error:
        print(f"hf-mrp {command}: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hf-mrp {command}: interrupted (report files on disk are whole: each is written atomically)",
              file=sys.stderr)
        return 130
    except SystemExit as stop:  # --help of a command, or a handler's sys.exit
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(f"hf-mrp {command}: error: {one_line(stop.code)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
