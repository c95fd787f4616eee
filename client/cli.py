"""``candor-client``: what a data holder runs at its institution.

Each command group lives in its own module, which exposes ``register(subparsers)``
(``common.commands``); a command's handler returns the exit code. A
:class:`~common.errors.CandorError` (a user's mistake) prints one clear message and
exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from candor.common.commands import command_parser
from candor.common.errors import run_command

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

COMMAND_MODULES = (
    "candor.client.check",        # check: the data against the schema, offline
    "candor.client.site_cmds",    # init, new-key: the site directory and its key
    "candor.client.start_cmds",   # start: validate, preflight, run the SuperNode
    "candor.client.ledger_cmds",  # ledger: what this site has spent
    "candor.client.explain_cmds",  # predict, explain: a model on local records, offline
    "candor.client.audit_cmds",   # audit: a run's signed log against this site's receipts
    "candor.client.approve_cmds",  # approve, approved: which app code this site runs
)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("candor-client", "Run Candor at a data-holding institution.", COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run_command("candor-client", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
