"""``candor-server audit verify RUN_DIR`` and ``candor-server publish RUN_DIR OUT_DIR``."""

from __future__ import annotations

import argparse

from candor.common.commands import add_command

from .audit import PUBLIC_KEY, verify_run
from .export import publish

__all__ = ["register"]


def cmd_verify(args: argparse.Namespace) -> int:
    report = verify_run(args.run_dir, public_key=args.public_key)
    print(f"OK: {report['entries']} entries of run {report['run_id']} ({report['rounds']} rounds; sites "
          f"{', '.join(report['sites']) or 'none'}): every line, link and Ed25519 signature holds "
          f"(key {report['key_sha256'][:16]}).")
    if report["resumes"]:
        print(f"The run was interrupted and resumed {report['resumes']} time(s); each time it continued from the "
              "global model of the last round it had checkpointed (rounds it abandoned stay in the log).")
    print(f"The model (sha256 {report['model_sha256'][:16]}) is the last round's global model, and these files "
          f"are the ones the log records: {', '.join(report['files'])}.")
    if report["ephemeral"]:
        print(f"The key was ephemeral (made for this run only): this proves nothing was changed after the run "
              f"to whoever trusts the {args.public_key or PUBLIC_KEY} they were given.")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    names = publish(args.run_dir, args.out_dir)
    print(f"Verified {args.run_dir} and wrote the bundle {args.out_dir}: {', '.join(names)}.")
    print("Nothing private is in it (no ledgers, site data, logs or keys but the public one). "
          f"Anyone can check it with `candor-server audit verify {args.out_dir}`.")
    return 0


def register(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="check a run's signed audit trail")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    p = add_command(sub, "verify", cmd_verify,
                    help="check every signature and link of a run's audit.jsonl, and the model files",
                    positionals=[("run_dir", "a run directory or a published bundle")])
    p.add_argument("--public-key", help=f"the coordinator's audit public key (default RUN_DIR/{PUBLIC_KEY})")
    add_command(subparsers, "publish", cmd_publish,
                help="copy a finished run's shareable files (model, card, audit log) to a new folder",
                positionals=["run_dir", ("out_dir", "a new or empty folder")])
