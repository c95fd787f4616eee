"""ε recomputed by dp-accounting's PLD accountant (Google's, not Candor's code), for the
tests that check Candor's figures against an independent one.

The composition rule is written out here from docs/privacy.md, not taken from Candor:
when every release of only the training rows (``records: "train"``) or only the held-out
rows (``"test"``) was made under one record-by-record split (the same non-empty
``split``), a record is in one of the two and ε is the larger side (each side with the
releases of both, ``"all"``): parallel composition (McSherry 2009). Otherwise every
release is composed with every other.
"""

from __future__ import annotations

import dp_accounting


def pld_epsilon(mechanisms: list[dict], delta: float) -> float:
    """ε of the (σ, q, steps) mechanisms of a ledger or a privacy.json history."""
    splits = {m.get("split", "") for m in mechanisms if m.get("records", "all") != "all"}
    if len(splits) == 1 and "" not in splits:
        return max(pld_sequential([m for m in mechanisms if m.get("records", "all") in (side, "all")], delta)
                   for side in ("train", "test"))
    return pld_sequential(mechanisms, delta)


def pld_sequential(mechanisms: list[dict], delta: float) -> float:
    """ε of every mechanism composed with every other."""
    if not mechanisms:
        return 0.0
    events = [dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        m["sample_rate"], dp_accounting.GaussianDpEvent(m["noise_multiplier"])), m["steps"]) for m in mechanisms]
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    return accountant.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(delta)
