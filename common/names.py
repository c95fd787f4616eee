"""The naming rule for federations and sites, checked where a name enters.

A name is 1-63 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit
(e.g. ``st-marys-hospital``): it stands in file names (``invites/NAME.toml``), in the
``flwr`` CLI (``--name``) and in every log line, so it has no spaces, slashes or quotes.
"""

from __future__ import annotations

import re
import secrets

from flwr.app import Message

from .errors import ConfigError

__all__ = ["RUN_ID_KEY", "check_name", "new_run_id", "run_id_of"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")

#: The key, in every train/evaluate/query config the ServerApp sends, of the Candor run id:
#: one id for the run from its first round to its last, across resumptions (each of which
#: is a new Flower run with a new Flower run id). A site's ledger, outbox and receipts key
#: the run by it, so that a resumed run is recognised as the same run.
RUN_ID_KEY = "candor-run-id"


def new_run_id() -> str:
    """A fresh Candor run id: ``run-`` and 24 random hex digits."""
    return "run-" + secrets.token_hex(12)


def run_id_of(msg: Message) -> str:
    """The Candor run id ``msg`` belongs to, or its Flower run id if it carries none (an app
    that is not Candor's ServerApp)."""
    config = msg.content.config_records.get("config", {})
    run_id = str(config.get(RUN_ID_KEY) or msg.metadata.run_id)
    if not _NAME.fullmatch(run_id):  # it names files at the site (its outbox)
        raise ConfigError(f"the coordinator's message carries the run id {run_id[:80]!r}, which is not 1-63 letters, "
                          "digits, '.', '_' or '-'; the site refuses it (report it to the coordinator)")
    return run_id


def check_name(name: str, *, where: str) -> str:
    """``name`` if it follows the rule above.

    Args:
        name: the name given.
        where: how the message names it: the option (``"--site-name"``) or the kind of
            name (``"the site name"``).

    Raises:
        ConfigError: the name breaks the rule; the message gives the rule, the name and an example.
    """
    if not isinstance(name, str):
        raise TypeError(f"check_name: name must be a str; got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{where} {name!r} must be 1-63 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (e.g. st-marys-hospital); choose a name that follows this rule")
    return name
