"""``candor-client check``: does this site's data file satisfy the federation's schema?

Run it before joining a federation. It reads nothing but the two files, writes
nothing, and prints every finding, then one summary line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from candor.common.commands import add_command
from candor.common.errors import DataValidationError, SchemaError, SiteError
from candor.common.schema import Schema
from candor.common.validation import read_table, validate

__all__ = ["check", "register"]

_INVITE_TABLE = "[candor-invite]"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _schema_of(path: Path) -> Schema:
    """The schema in ``path``: a schema file, or the coordinator's invite (which holds it,
    checked against its own fingerprint)."""
    if path.suffix.lower() == ".toml" and path.is_file() and _INVITE_TABLE in path.read_text(errors="replace"):
        from candor.common.invite import Invite

        return Invite.read(path).schema
    return Schema.load(path)


def check(schema_path: str | os.PathLike, data_path: str | os.PathLike, *, min_rows: int) -> int:
    """Validate ``data_path`` against ``schema_path`` and print the findings.

    Args:
        min_rows: usable rows the site needs (e.g. for DP training).

    Returns:
        Exit code: 0 if the data is usable (warnings allowed), 1 if any error,
        2 if the schema file itself is unreadable or invalid.
    """
    try:
        schema = _schema_of(Path(schema_path))
    except (SchemaError, SiteError) as err:
        print(f"schema error: {err}", file=sys.stderr)
        return 2
    print(f"schema {schema_path}: sha256 {schema.sha256()}")
    usable = 0
    try:
        table = read_table(data_path)
    except DataValidationError as err:
        problems = err.problems
    else:
        clean, problems = validate(table, schema, source=str(data_path), min_rows=min_rows)
        usable = len(clean)
    for problem in problems:
        print(problem)
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    if errors:
        print(f"FAILED: {_count(errors, 'error')}, {_count(warnings, 'warning')}")
        return 1
    print(f"OK: {_count(usable, 'usable row')}, {_count(len(schema.features), 'feature')}, "
          f"{_count(warnings, 'warning')}")
    return 0


def register(subparsers) -> None:
    """``candor-client check --schema S --data D``: validate local data; no network."""
    p = add_command(subparsers, "check", lambda args: check(args.schema, args.data, min_rows=args.min_rows),
                    help="validate a data file against the federation's schema (offline)", positionals=())
    p.add_argument("--schema", required=True,
                   help="the federation's schema file, or the invite the coordinator sent (it holds the schema)")
    p.add_argument("--data", required=True, help="the site's CSV or Parquet file")
    p.add_argument("--min-rows", type=int, default=20,
                   help="fewest usable rows DP training needs (default 20, as run config 'min-rows')")
