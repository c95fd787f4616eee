"""The naming rule for federations and sites, checked where a name enters.

A name is 1-63 letters, digits, ``.``, ``_`` or ``-``, starting with a letter or digit
(e.g. ``st-marys-hospital``): it stands in file names (``invites/NAME.toml``), in the
``flwr`` CLI (``--name``) and in every log line, so it has no spaces, slashes or quotes.
"""

from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["check_name"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


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
