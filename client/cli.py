"""``candor-client``: what a data holder runs at its institution.

Each command lives in its own module, which exposes ``register(subparsers)``; a
command's handler returns the exit code. A :class:`~common.errors.CandorError` (a user's
mistake) prints one clear message and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from candor.common.errors import run_command

COMMAND_MODULES = ("candor.client.check", "candor.client.deploy", "candor.client.explain_cmds", "candor.client.audit_cmds")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="candor-client", description="Run Candor at a data-holding institution.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command("candor-client", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
