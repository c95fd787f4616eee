"""The progress lines of a Candor run: written by the ServerApp, shown by the commands.

The ServerApp logs each line meant for the person running the run (a round's metrics and
ε per site, a refusal, where the outputs are) with the prefix :data:`PROGRESS`; the
commands that stream Flower's log (``candor-server run``, ``candor-sim run``) show those
lines without the prefix, and every other line only when asked (``-v``) or when it
reports an error.
"""

from __future__ import annotations

__all__ = ["PROGRESS", "STOPPED", "ProgressPrinter", "progress_text", "show_line", "unconfirmed_text"]

PROGRESS = "[candor]"  # prefix of the ServerApp's log lines meant for the user
# How the ServerApp's progress line begins when it ends a run it cannot continue (and has
# said why); Flower's own report of the same exception that follows adds nothing.
STOPPED = ("the run stopped:", "cannot start the run:")


def progress_text(line: str) -> str | None:
    """The text after :data:`PROGRESS` in ``line``, stripped; ``None`` if it is no progress line."""
    at = line.find(PROGRESS)
    return None if at < 0 else line[at + len(PROGRESS):].strip()


def show_line(line: str, *, verbose: bool = False) -> None:
    """Print a streamed log line as the commands do: a progress line's text; any other line
    if ``verbose`` or it reports an error (``ERROR``, a ``Traceback``)."""
    text = progress_text(line)
    if text is not None:
        print(text, flush=True)
    elif verbose or "ERROR" in line or "Traceback" in line:
        print(line, flush=True)


class ProgressPrinter:
    """:func:`show_line` for one streamed run, which goes quiet once the ServerApp has
    said why it stopped the run: Flower's own lines about the same exception (its ERROR
    line, a bare "Traceback", the exit code) follow and would only bury the reason.
    Everything stays in the run's log file."""

    def __init__(self, *, verbose: bool = False) -> None:
        self.verbose = verbose
        self.explained = False

    def __call__(self, line: str) -> None:
        text = progress_text(line)
        if text is not None:
            self.explained = self.explained or text.startswith(STOPPED)
        elif self.explained and not self.verbose:
            return
        show_line(line, verbose=self.verbose)


def unconfirmed_text(site_privacy: dict) -> str:
    """The clause the commands' summaries add for a site with rounds whose reply never
    arrived (privacy.json's ``unconfirmed_rounds``), or ``""``."""
    rounds = site_privacy.get("unconfirmed_rounds")
    if not rounds:
        return ""
    return (f"; rounds {', '.join(map(str, rounds))} unconfirmed (no reply): up to ε = "
            f"{site_privacy['epsilon_if_unconfirmed_spent']:.3f} if the site spent them, as its ledger will show")


def site_privacy_line(site: str, p: dict) -> str:
    """One site's line in the commands' summaries, from its privacy.json entry: ε, δ, the
    training mechanism, every other release, what left in the clear."""
    history = p.get("history", [])
    training = [h for h in history if h.get("kind", "training") == "training"]
    first = training[0] if training else {}
    others = [r for r in p.get("releases", []) if r["kind"] != "training"]
    extra = "".join(f" + {r['releases']} {r['kind']} (σ = {', '.join(f'{x:.2f}' for x in r['noise_multiplier'])})"
                    if r.get("noise_multiplier") else f" + {r['kind']} IN THE CLEAR" for r in others)
    clear = p.get("unprotected") or []
    return (f"  {site:<16} ε = {p['epsilon']:.3f}  δ = {p['delta']:g}  ({p['accountant'].upper()}; "
            f"{len(training)} rounds of {sum(h['steps'] for h in training) // max(len(training), 1)} steps, "
            f"σ = {first.get('noise_multiplier', 0):.3f}, q = {first.get('sample_rate', 0):.4f}{extra})"
            + (f"; NOT covered by ε: {', '.join(clear)}" if clear else "") + unconfirmed_text(p))
