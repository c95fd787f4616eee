"""The ClientApp: what runs at a data holder for every training and evaluation request.

Nothing leaves a private site (``dp = true``) that its ε does not cover. Under the
ledger's lock, at its first message of a run, the site releases DP counts of its
training and held-out rows (:mod:`candor.client.counts`); the sample rate, steps,
weights and δ come from them. For training it fixes the run's σ
(:meth:`candor.common.policy.RunPrivacy.plan_sigma`, which reserves the run's other
releases), checks the round against the run's target and its own lifetime budget
(:class:`candor.client.spending.Spending`), trains with DP-SGD, keeps the reply in its
outbox (:mod:`candor.client.outbox`), appends the round to its ledger, and only then does
the update leave the site. Each round's evaluation is a DP release of the same kind
(:mod:`candor.common.releases`; the site may keep it local, or knowingly send it in the
clear: ``SiteSpec.evaluation``). The training loss stays at the site (its log). A request
for a release this run has already charged (a resumed run) is answered with the kept
reply, at no new privacy cost, or sat out (``AlreadyCharged``): nothing is released twice.

The training reply carries one ArrayRecord (the model), one MetricRecord (num-examples:
the DP count, epsilon, delta, noise-multiplier, sample-rate, steps) and a ConfigRecord
``candor`` (site name, privacy unit, noise source, evaluation mode, accountant, the run's
mechanism history as JSON). ``query.explain`` (the federated explanation) is
:mod:`candor.client.explain_app`'s handler, registered here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from candor.common.data import stable_seed
from candor.common.errors import AlreadyCharged, CandorError
from candor.common.privacy import MechanismRecord
from candor.common.releases import Counts, evaluation_mechanism, evaluation_release
from candor.common.training import LocalTraining, evaluate, sample_rate, steps_for_epochs, train

from .context import REFUSED, SiteContext, refusal
from .explain_app import handle_explain
from .counts import released_counts
from .outbox import KeptReply
from .receipts import record_receipt
from .secagg import secagg_mod
from .spending import Spending

__all__ = ["REFUSED", "app"]

logging.getLogger("flwr").propagate = False  # opacus' basicConfig would print every flwr line twice
logger = logging.getLogger(__name__)

app = ClientApp()
app.query("explain")(handle_explain)


@app.train(mods=[secagg_mod])  # secure aggregation (client/secagg.py): per function, never app-wide
def handle_train(msg: Message, context: Context) -> Message:
    try:
        site = SiteContext(msg, context)
        return _train(site, msg)
    except CandorError as err:
        return refusal(msg, err)


def _train(site: SiteContext, msg: Message) -> Message:
    cfg, spec = site.cfg, site.spec
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    seed = stable_seed(cfg.seed, spec.name, site.round) if spec.public_seed else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    extra = site.identity()
    if not cfg.dp:  # a declared non-private run: exact counts and loss, nothing accounted
        n = len(site.data.train)
        settings = _settings(cfg, mu, steps=steps_for_epochs(n, cfg.batch_size, cfg.local_epochs))
        result = train(site.model, site.data.train, settings=settings,
                       num_outputs=site.schema.num_outputs, generator=generator)
        arrays = ArrayRecord(site.model.state_dict())
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n, "train-loss": result.loss}),
                              "candor": extra})
        record_receipt(spec, msg, kind="train", sent=arrays)
        return Message(content=content, reply_to=msg)
    spending, outbox, received = site.spending(), site.outbox(), site.received
    with spending.locked():
        counts = released_counts(site, spending, outbox, explain=not spec.explain_opt_out)
        run = spending.run
        if any(m.round == site.round and m.kind == "training" for m in spending.run_history):
            return _repeat(site, msg, spending, outbox.kept(site.run_id, "train"), received, counts)
        # q, steps and weights come from the DP count, never the exact n (common/releases.py)
        q = sample_rate(counts.train, cfg.batch_size)
        steps = steps_for_epochs(counts.train, cfg.batch_size, cfg.local_epochs)
        sigma = run.plan_sigma(spending.run_history, sample_rate=q, steps_per_round=steps)
        spending.check(run.labelled(MechanismRecord(round=site.round, noise_multiplier=sigma, sample_rate=q,
                                                    steps=steps, run_id=site.run_id)))
        result = train(site.model, site.data.train,
                       settings=dataclasses.replace(_settings(cfg, mu, steps=steps), noise_multiplier=sigma,
                                                    sample_rate=q),
                       num_outputs=site.schema.num_outputs, generator=generator)
        logger.info("site '%s' round %d: training loss %.4f (kept at the site: it is not a private release)",
                    spec.name, site.round, result.loss)
        arrays = ArrayRecord(site.model.state_dict())
        # kept before it is charged, charged before it is sent (client/outbox.py)
        outbox.keep(KeptReply(run_id=site.run_id, kind="train", round=site.round, received_sha256=received,
                              metrics={}, config={}, arrays=site.model.state_dict()))
        eps_run = spending.charge(run.labelled(MechanismRecord(round=site.round, noise_multiplier=sigma,
                                                               sample_rate=q, steps=result.steps, run_id=site.run_id)))
    metrics = {"num-examples": counts.train, "epsilon": eps_run, "delta": run.delta,
               "noise-multiplier": sigma, "sample-rate": q, "steps": result.steps}
    extra["accountant"] = run.accountant
    extra["history"] = json.dumps([h.to_dict() for h in spending.run_history])
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "candor": extra})
    record_receipt(spec, msg, kind="train", sent=arrays)
    return Message(content=content, reply_to=msg)


def _settings(cfg, mu: float, *, steps: int) -> LocalTraining:
    return LocalTraining(steps=steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                         optimizer=cfg.optimizer, momentum=cfg.momentum, proximal_mu=mu,
                         max_grad_norm=cfg.max_grad_norm)


def _repeat(site: SiteContext, msg: Message, spending: Spending, kept: KeptReply | None, received: str,
            counts: Counts) -> Message:
    """A request for a round this run already charged (a resumed run): the reply kept then,
    sent again at no new cost, if it is the reply to this same request; otherwise nothing."""
    if kept is None or kept.round != site.round or kept.received_sha256 != received:
        why = ("no reply for it was kept" if kept is None or kept.round != site.round else
               f"the model sent now ({received[:12]}) is not the one it trained from ({kept.received_sha256[:12]})")
        raise AlreadyCharged(
            f"site '{site.spec.name}': round {site.round} of run {site.run_id} is already in its ledger "
            f"({site.spec.ledger_path}), and {why}; training it again would release the round twice, so this "
            "site sits the round out (the round stays charged once)")
    history = spending.run_history
    mechanism = next(m for m in history if m.round == site.round and m.kind == "training")
    logger.info("site '%s': round %d of run %s was already trained and charged; sending the update kept "
                "then (no new privacy spent)", site.spec.name, site.round, site.run_id)
    metrics = {"num-examples": counts.train, **kept.metrics,
               "epsilon": spending.run.accountant_for(history).epsilon(), "delta": spending.run.delta,
               "noise-multiplier": mechanism.noise_multiplier, "sample-rate": mechanism.sample_rate,
               "steps": mechanism.steps}
    extra = site.identity()
    extra["accountant"] = spending.run.accountant
    extra["history"] = json.dumps([h.to_dict() for h in history])
    extra["resent"] = True
    arrays = kept.array_record()
    record_receipt(site.spec, msg, kind="train", sent=arrays, resent=True)
    return Message(content=RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "candor": extra}),
                   reply_to=msg)


@app.evaluate()
def handle_evaluate(msg: Message, context: Context) -> Message:
    try:
        site = SiteContext(msg, context)
        if site.cfg.dp and site.spec.evaluation == "dp":
            return _private_evaluation(site, msg)
        scores = evaluate(site.model, site.data.test, num_outputs=site.schema.num_outputs)
        if site.cfg.dp and site.spec.evaluation == "local":
            logger.info("site '%s' round %d: evaluation kept at the site: %s", site.spec.name, site.round,
                        ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            metrics = MetricRecord({})
        else:  # "clear" (privacy.json lists it as unprotected), or a declared non-private run
            metrics = MetricRecord({"num-examples": len(site.data.test), **scores})
        record_receipt(site.spec, msg, kind="evaluate")
    except CandorError as err:
        return refusal(msg, err)
    return Message(content=RecordDict({"metrics": metrics, "candor": site.identity()}), reply_to=msg)


def _private_evaluation(site: SiteContext, msg: Message) -> Message:
    """The round's evaluation as a DP release (common/releases.py), recorded before it is sent."""
    cfg, spec = site.cfg, site.spec
    spending, outbox, received = site.spending(), site.outbox(), site.received
    with spending.locked():
        counts = released_counts(site, spending, outbox, explain=not spec.explain_opt_out)
        if any(m.round == site.round and m.kind == "evaluation" for m in spending.run_history):
            kept = outbox.kept(site.run_id, "evaluation")
            if kept is None or kept.round != site.round or kept.received_sha256 != received:
                raise AlreadyCharged(f"site '{spec.name}': the evaluation of round {site.round} of run {site.run_id} "
                                     "is already in its ledger and no matching release was kept; it is not "
                                     "released twice")
            metrics = kept.metrics
            mechanism = next(m for m in spending.run_history if m.round == site.round and m.kind == "evaluation")
        else:
            mechanism = spending.run.labelled(evaluation_mechanism(
                round=site.round, noise_multiplier=spending.run.eval_noise_multiplier, run_id=site.run_id))
            spending.check(mechanism, what="the evaluation release")
            sums = evaluation_release(site.model, site.data.test, num_outputs=site.schema.num_outputs,
                                      count=counts.test, loss_clip=cfg.eval_loss_clip,
                                      noise_multiplier=mechanism.noise_multiplier, rng=site.rng("evaluation"))
            metrics = {"num-examples": sums.count, "dp-loss-sum": sums.loss_sum, "dp-correct-sum": sums.correct_sum,
                       "dp-loss-clip": sums.loss_clip}
            outbox.keep(KeptReply(run_id=site.run_id, kind="evaluation", round=site.round, received_sha256=received,
                                  metrics=metrics, config={}))
            spending.charge(mechanism)
    record_receipt(spec, msg, kind="evaluate")
    extra = site.identity()
    extra.update({"mechanism": json.dumps(mechanism.to_dict()), "accountant": spending.run.accountant,
                  "delta": spending.run.delta, "epsilon": spending.run.accountant_for(spending.run_history).epsilon()})
    return Message(content=RecordDict({"metrics": MetricRecord(metrics), "candor": extra}), reply_to=msg)
