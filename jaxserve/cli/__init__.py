"""`jaxserve` command line: generate | perplexity | convert | serve | request, one module per
command. Bad input ends in one line on stderr and exit 1. Parsing imports nothing heavy, so
`jaxserve --help` and the client-side `jaxserve request` never import jax."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxserve.cli import convert, generate, perplexity, request, serve
from jaxserve.errors import JaxServeError

COMMANDS = (generate, perplexity, convert, serve, request)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help (skipped where the default is None or a flag's False)."""

    def _get_help_string(self, action):
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _configure_logging(explicit: str | None, command: str) -> None:
    """--log-level applies to everything; by default jaxserve's own loggers say INFO for serve (a
    server narrates its events) and libraries (jax backend probing, orbax) stay at WARNING."""
    level = (explicit or ("INFO" if command == "serve" else "WARNING")).upper()
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level if explicit else "WARNING", format=fmt)
    logging.getLogger("jaxserve").setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="jaxserve", description="JAX/XLA LLM inference runtime")
    parser.add_argument("--log-level", default=os.environ.get("JAXSERVE_LOG_LEVEL"),
                        help="DEBUG | INFO | WARNING (default: INFO for serve, WARNING otherwise)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    for command in COMMANDS:
        command.add(sub, _HelpFormatter)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level, args.command)
    try:
        args.run(args)
    except (JaxServeError, ValueError) as e:  # TokenizerError and argument errors are ValueErrors
        print(f"jaxserve: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("jaxserve: interrupted", file=sys.stderr)
        return 130
    return 0
