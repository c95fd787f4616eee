"""Domain exceptions.

Every exception a user can cause derives from :class:`CandorError`, through the type
that names its domain (a bad run-config value is a :class:`ConfigError`, an unreadable
ledger a :class:`LedgerError`, ...). Commands catch ``CandorError`` at the boundary and
print ``str(err)`` without a traceback; anything else is a bug and keeps its traceback.
Programmer misuse (a wrong argument type in code) raises ``ValueError``/``TypeError``.

One message form, as scikit-learn's parameter validation: the parameter or file, the
rule, the value it got, what to do (:func:`message` builds it)::

    --budget-epsilon must be a number > 0 (the lifetime ε this site allows); got -1.
    Set it again with a positive number.
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
    """A release (a training round, an explanation) would take a site past the run's
    target or its lifetime privacy budget; nothing was trained, sent or recorded."""


# The Flower Error code of a site's refusal (its budget, limits, schema, data): the site
# refused before it trained or recorded anything.
REFUSAL_CODE = 4001
# The Flower Error code of a site that will not release a round again: its ledger already
# holds the round for this run (it was spent), and the reply it kept for a repeat
# (client/outbox.py) does not fit the request. Unlike a refusal, the round may have cost
# privacy: the coordinator counts it as unconfirmed (privacy.json).
CHARGED_CODE = 4002


class AlreadyCharged(CandorError):
    """A site's ledger already holds the requested round of this run; it is not trained
    or released a second time (reply code :data:`CHARGED_CODE`)."""


class RunRefused(CandorError):
    """A site refuses a run whose settings are outside the site's own limits (its
    setting, never the coordinator's), or that tries to select code or paths at the site."""


class RunFailed(CandorError):
    """A run cannot make progress (e.g. every site refused a round); it ends non-zero
    with the reason."""


class LedgerError(CandorError):
    """A site's privacy ledger is unreadable, or a write would change its history."""


class SiteError(CandorError):
    """A site directory, its files (site.toml, budget.toml, receipts) or an invite is
    missing or breaks its format."""


class FederationError(CandorError):
    """The coordinator's federation directory, its registry of sites or its server."""


class KeyFileError(CandorError):
    """A key or certificate file is missing, unreadable, of the wrong kind or exposed."""


class ConnectionFailed(CandorError):
    """A site could not reach the server, or TLS with it failed."""


class ModelFileError(CandorError):
    """A model file is missing, unreadable or not a Candor model."""


def message(where: str, rule: str, *, got: object = None, fix: str = "") -> str:
    """``"{where}: {rule}; got {got!r}. {fix}"``: the one form of a user-facing error.

    Args:
        where: the parameter, option or file (and column, entry) concerned.
        rule: what it must be, in words.
        got: the value it had (omitted when ``None``).
        fix: what the user should do.
    """
    text = f"{where}: {rule}"
    if got is not None:
        text += f"; got {got!r}"
    if fix:
        text += f". {fix}"
    return text


class Terminated(BaseException):
    """SIGTERM arrived (what ``kill``, ``timeout``, CI runners and container runtimes
    send): raised like Ctrl-C's KeyboardInterrupt, so that every ``finally`` stops the
    processes it started and removes its temporary files."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run_command(prog: str, args, *, stopped: str = "") -> int:
    """Run a parsed command's ``args.func(args)``: a CandorError (a user's mistake) is one
    line on stderr and exit code 1, never a traceback; Ctrl-C is 130 and SIGTERM 143,
    after the command's own clean-up has run (``stopped`` is then printed, if given)."""
    import signal
    import sys

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args.func(args) or 0)
    except CandorError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as err:
        if stopped:
            print(f"{prog}: {stopped}", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
