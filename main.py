"""gpt2-pruning-kit command line: parse, check, turn into a RunConfig, dispatch.

The options are declared once, in runner.options; nothing here loads torch,
so `python main.py --help` and every argument error answer at once.
"""

from __future__ import annotations

import sys

from runner.options import UsageError, build_parser, check, to_config
from utils.errors import KitError


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(words)
        warnings = check(args)
    except UsageError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    for warning in warnings:
        sys.stderr.write(f"warning: {warning}\n")
    config = to_config(args, ["python", "main.py", *words])

    from runner import run
    from utils.log import setup_logging

    setup_logging(config.output.quiet)
    try:
        return run(config)
    except KitError as exc:
        sys.stderr.write(f"{'interrupted' if exc.exit_status == 130 else 'error'}: {exc}\n")
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
