"""The site's lifetime privacy budget: ``SITE_DIR/budget.toml``, the site's own setting.

The file holds at most two numbers, written by ``candor-client start --budget-epsilon E
--budget-delta D`` and kept across restarts::

    # This site's lifetime privacy budget (its own setting).
    epsilon = 8.0   # lifetime ε over all runs (> 0)
    delta = 1e-05   # δ of that budget, in (0, 1); absent = the smallest δ of the site's runs

No file (or no ``epsilon``) means no lifetime budget: each run's target applies.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from candor.common.atomic import write_atomic
from candor.common.errors import ConfigError, SiteError
from candor.common.policy import LifetimeBudget

__all__ = ["SiteBudget"]

_HEADER = "# This site's lifetime privacy budget (its own setting).\n"


class SiteBudget(LifetimeBudget):
    """The site's :class:`~candor.common.policy.LifetimeBudget` as ``budget.toml`` holds it:
    the same rule (the policy's), read from and written to the site's own file."""

    @classmethod
    def read(cls, path: Path) -> SiteBudget:
        """The budget in ``path``; no budget if the file does not exist.

        Raises:
            SiteError: the file is unreadable, holds another entry, or a value outside its rule.
        """
        if not path.exists():
            return cls()
        try:
            doc = tomllib.loads(path.read_text())
            unknown = sorted(set(doc) - {"epsilon", "delta"})
            if unknown:
                raise ValueError(f"unknown entries {', '.join(unknown)}; it holds only epsilon and delta")
            return cls(**{key: float(value) for key, value in doc.items()})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, TypeError, ValueError, ConfigError) as err:
            raise SiteError(f"{path} is unreadable ({err}); it holds this site's privacy budget: "
                            "fix it or set the budget again with --budget-epsilon") from None

    def write(self, path: Path) -> None:
        """Write the budget atomically to ``path``."""
        write_atomic(path, _HEADER + tomli_w.dumps(self.as_dict()), mode=0o600)  # the site's own: owner only
