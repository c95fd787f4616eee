"""Domain exceptions.

Every exception a user can cause derives from :class:`CandorError`. Commands catch
``CandorError`` at the boundary and print ``str(err)`` without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class CandorError(Exception):
    """A problem the user can fix; its message says what, where and what to do."""


class ConfigError(CandorError):
    """A run-config value is outside its rule."""


class SchemaError(CandorError):
    """A schema file is unreadable or breaks the schema format."""


@dataclass(frozen=True)
class Problem:
    """One finding of the data validator.

    Attributes:
        file: the data file the problem is in.
        column: the column concerned, or ``None`` for whole-file problems.
        rule: the rule that was broken, in words.
        rows: number of rows affected (0 for whole-file problems).
        examples: a few offending values, as they appear in the file.
        action: what the data holder should do about it.
        severity: ``"error"`` stops training; ``"warning"`` is reported only.
    """

    file: str
    column: str | None
    rule: str
    rows: int = 0
    examples: tuple[str, ...] = ()
    action: str = ""
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}" + (f", column '{self.column}'" if self.column else "")
        text = f"{self.severity}: {where}: {self.rule}"
        if self.rows:
            text += f" ({self.rows} row{'s' if self.rows != 1 else ''})"
        if self.examples:
            text += f"; e.g. {', '.join(repr(e) for e in self.examples)}"
        if self.action:
            text += f". {self.action}"
        return text


@dataclass
class DataValidationError(CandorError):
    """The data file breaks the federation's schema; ``problems`` lists every finding."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        errors = [p for p in self.problems if p.severity == "error"]
        head = f"{len(errors)} problem{'s' if len(errors) != 1 else ''} in the data:"
        return "\n".join([head] + [f"  {p}" for p in self.problems])


class BudgetExceeded(CandorError):
    """Training a round would take a site past its privacy budget."""


def run_command(prog: str, args) -> int:
    """Run a parsed command's ``args.func(args)``: a CandorError (a user's mistake) is one
    line on stderr and exit code 1, never a traceback; Ctrl-C is 130."""
    import sys

    try:
        return int(args.func(args) or 0)
    except CandorError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
