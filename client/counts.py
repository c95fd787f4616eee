"""The site's DP row counts for a run: released once, at its first message of the run.

Everything that would otherwise disclose how many rows the site holds (the sample rate,
the steps per round, the aggregation weights, δ, the explanation's denominator) is
computed from these noisy counts (:mod:`candor.common.releases`). Under the ledger's
lock: if the run's ledger history already holds the ``row-count`` release, the counts
kept in the outbox are read back (the same release, no new cost); otherwise they are
drawn, checked against the run's target and the site's budget, kept, and charged, in
that order (``client/outbox.py``).
"""

from __future__ import annotations

import dataclasses

from candor.common.errors import AlreadyCharged
from candor.common.policy import RunPrivacy
from candor.common.releases import Counts, count_mechanism, count_release

from .context import SiteContext
from .outbox import KeptReply, Outbox
from .spending import Spending

__all__ = ["released_counts"]


def released_counts(site: SiteContext, spending: Spending, outbox: Outbox, *, explain: bool) -> Counts:
    """The run's DP counts of ``site`` (call under ``spending.locked()``). Sets
    ``spending.run`` to the run's privacy settings at the site, whose δ is computed from
    the noisy training count."""
    cfg, spec = site.cfg, site.spec

    def settings(counts: Counts, eval_sigma: float | None = None) -> RunPrivacy:
        run = RunPrivacy.from_config(cfg, num_records=counts.train, explain=explain, limits=spec.limits,
                                     evaluation=spec.evaluation, split=site.data.split)
        # σ of the run's evaluations: fixed here, once, and kept with the counts
        return dataclasses.replace(run, eval_noise_multiplier=eval_sigma if eval_sigma else run.eval_sigma())

    if any(m.kind == "row-count" for m in spending.run_history):
        kept = outbox.kept(site.run_id, "row-count")
        if kept is None:
            raise AlreadyCharged(f"site '{spec.name}': its row counts for run {site.run_id} are in its ledger "
                                 f"({spec.ledger_path}) but were not kept; releasing them again would spend their "
                                 "privacy twice, so this site sits the run out")
        counts = Counts(train=int(kept.metrics["train"]), test=int(kept.metrics["test"]))
        spending.run = settings(counts, float(kept.metrics.get("eval-sigma", 0.0)) or None)
        return counts
    counts = count_release(len(site.data.train), len(site.data.test), noise_multiplier=cfg.count_noise_multiplier,
                           rng=site.rng("row-count"))
    spending.run = settings(counts)
    mechanism = spending.run.labelled(count_mechanism(round=site.round, noise_multiplier=cfg.count_noise_multiplier,
                                                      run_id=site.run_id))
    spending.check(mechanism, what="the row counts")
    outbox.keep(KeptReply(run_id=site.run_id, kind="row-count", round=site.round, received_sha256="",
                          metrics={"train": counts.train, "test": counts.test,
                                   "eval-sigma": spending.run.eval_noise_multiplier or 0.0}, config={}))
    spending.charge(mechanism)
    return counts
