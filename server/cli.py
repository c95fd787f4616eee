"""``candor-server``: what the coordinator of a federation runs.

    candor-server init DIR --name FEDERATION --host NAME_OR_IP [--host ...] --schema FILE [--port P] [-c k=v ...]
    candor-server add-site DIR SITE_NAME PUBLIC_KEY_FILE
    candor-server remove-site DIR SITE_NAME
    candor-server sites DIR
    candor-server invite DIR SITE_NAME [-o FILE]
    candor-server start DIR [--host H] [--port P]
    candor-server stop DIR
    candor-server status DIR
    candor-server rotate-certs DIR [--host H ...] [--cert-days N] [--new-ca [--overlap-days D] | --switch] [--no-restart]
    candor-server run DIR [-c key=value ...] [--wait-sites SECONDS]
    candor-server audit verify RUN_DIR
    candor-server publish RUN_DIR OUT_DIR

Underneath is Flower's deployment engine (a SuperLink with TLS and SuperNode
authentication); ``FLWR_HOME=DIR/flwr flwr ls candor`` and ``flwr log`` keep working.
Each command group lives in its own module with ``register(subparsers)``
(``common.commands``). A user's mistake (a :class:`~common.errors.CandorError`) prints
one clear message and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from candor.common.commands import command_parser
from candor.common.errors import run_command

__all__ = ["COMMAND_MODULES", "build_parser", "main"]

COMMAND_MODULES = (
    "candor.server.federation_cmds",  # init, add-site, remove-site, sites, invite
    "candor.server.superlink_cmds",   # start, stop, status
    "candor.server.rotate_cmds",      # rotate-certs
    "candor.server.run_cmds",         # run
    "candor.server.trust_cmds",       # audit verify, publish
)


def build_parser() -> argparse.ArgumentParser:
    return command_parser("candor-server", "Operate a Candor federation's server.", COMMAND_MODULES)


def main(argv: list[str] | None = None) -> int:
    return run_command("candor-server", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
