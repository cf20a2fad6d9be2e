"""`hf-mrp COMMAND [flags]`: argument parsing only; each command calls the Python API."""

from __future__ import annotations

import logging
import sys

from .errors import MRPUserError

COMMANDS = {"audit": "float32 geometry audit of a model on fixed positions"}


def _audit(argv: list[str]) -> None:
    from transformers import HfArgumentParser

    from .arguments import AuditArguments, DataArguments, ModelArguments
    from .audit.run import audit_from_arguments

    parser = HfArgumentParser((ModelArguments, DataArguments, AuditArguments), prog="hf-mrp audit")
    model_args, data_args, audit_args = parser.parse_args_into_dataclasses(args=argv)
    result = audit_from_arguments(model_args, data_args, audit_args)
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


HANDLERS = {"audit": _audit}


def _usage() -> str:
    lines = ["usage: hf-mrp COMMAND [--help] [flags]", "", "commands:"]
    lines += [f"  {name:10s} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"hf-mrp: error: unknown command {command!r}\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        HANDLERS[command](rest)
    except MRPUserError as error:
        print(f"hf-mrp {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
