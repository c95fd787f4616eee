"""Partitioners: split one table into disjoint site tables (iid or label-skewed).

Used by ``candor-sim`` to simulate sites from one table and by the embedded demo
(:mod:`candor.common.demo`). Splitting is a simulation device: a deployed site holds
its own table and is never partitioned.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .errors import ConfigError

__all__ = ["partition"]

logger = logging.getLogger(__name__)

_MAX_DRAWS = 1000


def partition(df: pd.DataFrame, *, num_sites: int, label: str, scheme: str = "iid",
              alpha: float = 0.5, seed: int, min_rows: int = 30) -> list[pd.DataFrame]:
    """Split ``df`` into ``num_sites`` disjoint site frames (original index kept, sorted).

    Args:
        num_sites: number of sites, >= 1.
        label: label column, used for stratification / label skew.
        scheme: ``"iid"``: stratified shuffle split, site sizes differ by at most one
            and every site has (up to rounding) the global class mix. ``"dirichlet"``:
            label skew after Hsu et al. 2019 ("Measuring the effects of non-identical
            data distribution", arXiv:1909.06335): for each class, site proportions are
            drawn from Dirichlet(alpha, ..., alpha); smaller alpha, more skew.
            Proportions are re-drawn until every site has at least ``min_rows`` rows.
        alpha: Dirichlet concentration, > 0 (dirichlet only).
        seed: seeds a ``numpy.random.Generator``; the same seed gives the same split.
        min_rows: rows every site needs.

    Raises:
        ConfigError: bad arguments, or no split gives every site ``min_rows`` rows.
    """
    if not isinstance(num_sites, int) or num_sites < 1:
        raise ConfigError(f"partition: 'num_sites' must be an integer >= 1 (got {num_sites!r})")
    if scheme not in ("iid", "dirichlet"):
        raise ConfigError(f"partition: 'scheme' must be 'iid' or 'dirichlet' (got {scheme!r})")
    if scheme == "dirichlet" and not alpha > 0:
        raise ConfigError(f"partition: 'alpha' must be > 0 (got {alpha!r})")
    if label not in df.columns:
        raise ConfigError(f"partition: label column '{label}' is not in the frame")
    if len(df) < num_sites * min_rows:
        raise ConfigError(
            f"partition: {len(df)} rows cannot give {num_sites} sites {min_rows} rows each "
            f"(needs {num_sites * min_rows}); use fewer sites or a smaller min_rows"
        )
    rng = np.random.default_rng(seed)
    codes, uniques = pd.factorize(df[label], use_na_sentinel=False)  # missing: own class
    classes = [np.flatnonzero(codes == c) for c in range(len(uniques))]

    if scheme == "iid":
        order = np.concatenate([rng.permutation(idx) for idx in classes])
        sites = [np.sort(order[s::num_sites]) for s in range(num_sites)]
    else:
        for _ in range(_MAX_DRAWS):
            parts: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
            for idx in classes:
                idx = rng.permutation(idx)
                cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha))) * len(idx)).astype(int)
                for s, chunk in enumerate(np.split(idx, cuts[:-1])):
                    parts[s].append(chunk)
            sites = [np.sort(np.concatenate(p)) for p in parts]
            if min(len(s) for s in sites) >= min_rows:
                break
        else:
            raise ConfigError(
                f"partition: {_MAX_DRAWS} Dirichlet(alpha={alpha}) draws never gave all "
                f"{num_sites} sites {min_rows} rows; raise alpha, use fewer sites or lower min_rows"
            )
    logger.debug("partition %s: site sizes %s", scheme, [len(s) for s in sites])
    return [df.iloc[s] for s in sites]
