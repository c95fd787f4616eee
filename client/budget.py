"""The site's lifetime privacy budget: ``SITE_DIR/budget.toml``, the site's own setting.

The file holds at most two numbers, written by ``candor-client start --budget-epsilon E
--budget-delta D`` and kept across restarts::

    # This site's lifetime privacy budget (its own setting).
    epsilon = 8.0   # lifetime ε over all runs (> 0)
    delta = 1e-05   # δ of that budget, in (0, 1); absent = each run's δ

No file (or no ``epsilon``) means no lifetime budget: each run's target applies.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from candor.common.atomic import write_atomic
from candor.common.errors import ConfigError, SiteError

__all__ = ["SiteBudget"]

_HEADER = "# This site's lifetime privacy budget (its own setting).\n"


@dataclass(frozen=True)
class SiteBudget:
    """A site's lifetime privacy budget.

    Attributes:
        epsilon: lifetime ε over all runs, > 0; ``None`` = no lifetime budget.
        delta: δ of the lifetime budget, in (0, 1); ``None`` = each run's δ.
    """

    epsilon: float | None = None
    delta: float | None = None

    def __post_init__(self) -> None:
        if self.epsilon is not None and not self.epsilon > 0:
            raise ConfigError(f"--budget-epsilon must be a number > 0 (the lifetime ε this site allows); "
                              f"got {self.epsilon}. Give a positive number")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"--budget-delta must be in (0, 1); got {self.delta}. Give a δ such as 1e-5, "
                              "or leave it out to use each run's δ")

    def updated(self, *, epsilon: float | None = None, delta: float | None = None) -> SiteBudget:
        """This budget with the values given (``None`` keeps the current one)."""
        return SiteBudget(self.epsilon if epsilon is None else float(epsilon),
                          self.delta if delta is None else float(delta))

    def as_dict(self) -> dict[str, float]:
        """The values set, as budget.toml holds them: ``{"epsilon": ..., "delta": ...}``."""
        return {key: value for key, value in (("epsilon", self.epsilon), ("delta", self.delta)) if value is not None}

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
        write_atomic(path, _HEADER + tomli_w.dumps(self.as_dict()))
