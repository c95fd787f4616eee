"""The site's part of the federated explanation: ``query.explain`` on the ClientApp.

After training, the coordinator sends the final global model to every site. The site
explains it on its held-out split (:mod:`common.explain`: Integrated Gradients, mean
|contribution| per original feature) and replies with a MetricRecord (num-examples and
one value per original feature) and a ConfigRecord ``candor`` (site, privacy unit,
``release``, and for a private release: mechanism JSON, clip, accountant, δ, and ε of
this run including the release).

The statistic is divided by the site's DP count of its held-out rows
(:mod:`candor.client.counts`), never the exact count. ``release`` says what was sent:

* ``"dp"`` (run with ``dp = true``): the Gaussian-mechanism release of
  :func:`common.explain.release_importance` with ``explain-clip`` C and
  ``explain-noise-multiplier`` σ. Under the ledger lock the site checks its lifetime
  budget, computes the release, appends it to its ledger, and only then replies;
* ``"exact"`` (``dp = false``, a declared non-private run): the exact means;
* ``"opted-out"`` (node config ``explain-opt-out = true`` / manifest
  ``explain_opt_out``): no statistic at all, and nothing is charged.

The release is part of the run: with ``target-epsilon`` set, training is calibrated so
that its rounds plus this release meet the target (``RunPrivacy.plan_sigma`` reserves
it), and the release is checked like a training round (:class:`candor.client.spending.Spending`:
the run's target and the site's lifetime budget); one that would exceed either is
refused, nothing sent. :mod:`candor.client.app` registers :func:`handle_explain`.
"""

from __future__ import annotations

import json
import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from candor.common.config import RunConfig
from candor.common.encoding import Encoder
from candor.common.errors import AlreadyCharged, CandorError
from candor.common.explain import attribute, release_importance, release_mechanism

from .context import SiteContext, identity, refusal
from .counts import released_counts
from .outbox import KeptReply
from .site import resolve_site

__all__ = ["handle_explain"]

logger = logging.getLogger(__name__)


def handle_explain(msg: Message, context: Context) -> Message:
    """``query.explain``: the site's part of the federated explanation of the final model."""
    try:
        spec = resolve_site(context.node_config, RunConfig.from_run_config(context.run_config))
        if spec.explain_opt_out:
            logger.info("site '%s' opted out of the federated explanation; nothing sent", spec.name)
            ident = identity(spec)
            ident["release"] = "opted-out"
            return Message(content=RecordDict({"candor": ident}), reply_to=msg)
        return _explain(SiteContext(msg, context), msg)
    except CandorError as err:
        return refusal(msg, err)


def _explain(site: SiteContext, msg: Message) -> Message:
    cfg, spec = site.cfg, site.spec
    explanation = attribute(site.model, Encoder(site.schema), site.data.test.x)
    extra = site.identity()
    if not cfg.dp:
        release = release_importance(explanation, clip=None, noise_multiplier=None)
        extra["release"] = "exact"
    else:
        spending, outbox, received = site.spending(), site.outbox(), site.received
        with spending.locked():
            # the δ of the site's training: the release composes with it in one run
            counts = released_counts(site, spending, outbox, explain=True)
            run = spending.run
            record = run.labelled(release_mechanism(round=site.round, noise_multiplier=cfg.explain_noise_multiplier,
                                                    run_id=site.run_id))
            if any(m.kind == "explanation" for m in spending.run_history):
                return _repeat(site, msg, outbox.kept(site.run_id, "explain"), received)
            spending.check(record, what="the explanation release")
            release = release_importance(explanation, clip=cfg.explain_clip,
                                         noise_multiplier=cfg.explain_noise_multiplier, count=counts.test)
            extra.update({"release": "dp", "mechanism": json.dumps(record.to_dict()), "clip": cfg.explain_clip,
                          "accountant": run.accountant, "delta": run.delta,
                          "epsilon": run.accountant_for([*spending.run_history, record]).epsilon()})
            content = _content(release, extra)
            # kept before it is charged, charged before it is sent (client/outbox.py)
            outbox.keep(KeptReply(run_id=site.run_id, kind="explain", round=site.round, received_sha256=received,
                                  metrics=dict(content["metrics"]), config=dict(extra)))
            spending.charge(record)
        return Message(content=content, reply_to=msg)
    return Message(content=_content(release, extra), reply_to=msg)


def _content(release, extra) -> RecordDict:
    metrics = {"num-examples": release.num_examples}
    metrics.update({name: float(v) for name, v in zip(release.features, release.mean)})
    return RecordDict({"metrics": MetricRecord(metrics), "candor": extra})


def _repeat(site: SiteContext, msg: Message, kept: KeptReply | None, received: str) -> Message:
    """The explanation release of this run is already charged (a resumed run): the release
    kept then, sent again at no new cost, if it answers this same request; else nothing."""
    if kept is None or kept.round != site.round or kept.received_sha256 != received:
        raise AlreadyCharged(
            f"site '{site.spec.name}': the explanation release of run {site.run_id} is already in its ledger "
            f"({site.spec.ledger_path}) and no matching release was kept; releasing it again would spend its "
            "privacy twice, so this site sends nothing")
    logger.info("site '%s': the explanation release of run %s was already charged; sending it again (no new "
                "privacy spent)", site.spec.name, site.run_id)
    return Message(content=RecordDict({"metrics": MetricRecord(kept.metrics), "candor": ConfigRecord(kept.config)}),
                   reply_to=msg)
