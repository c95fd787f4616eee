"""The ClientApp: what runs at a data holder for every training and evaluation request.

Private training (``dp = true``): under the ledger's lock the site fixes the run's σ
(:meth:`candor.common.policy.RunPrivacy.plan_sigma`), checks the planned round against
the run's target and its own lifetime budget (:class:`candor.client.spending.Spending`),
trains with DP-SGD, keeps the reply in its outbox (:mod:`candor.client.outbox`), appends
the round to its ledger, and only then does the update leave the site. A request for a
round this run has already charged (a resumed run) is answered with the kept reply, at
no new privacy cost, or sat out (``AlreadyCharged``): a round is never trained twice. The reply carries one ArrayRecord (the model), one MetricRecord
(num-examples, train-loss, epsilon, delta, noise-multiplier, sample-rate, steps) and a
ConfigRecord ``candor`` (site name, privacy unit, noise source, accountant, the run's
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
from candor.common.hashing import hash_arrays
from candor.common.policy import RunPrivacy
from candor.common.privacy import MechanismRecord
from candor.common.training import LocalTraining, evaluate, sample_rate, steps_for_epochs, train

from .context import REFUSED, SiteContext, refusal
from .explain_app import handle_explain
from .ledger import Ledger
from .outbox import KeptReply, Outbox
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
    n = len(site.data.train)
    q = sample_rate(n, cfg.batch_size)
    steps = steps_for_epochs(n, cfg.batch_size, cfg.local_epochs)
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    seed = stable_seed(cfg.seed, spec.name, site.round) if spec.public_seed else secrets.randbits(63)
    generator = torch.Generator().manual_seed(seed)
    settings = LocalTraining(steps=steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                             optimizer=cfg.optimizer, momentum=cfg.momentum, proximal_mu=mu,
                             max_grad_norm=cfg.max_grad_norm)
    metrics = {"num-examples": n}
    extra = site.identity()
    if not cfg.dp:
        result = train(site.model, site.data.train, settings=settings,
                       num_outputs=site.schema.num_outputs, generator=generator)
        metrics["train-loss"] = result.loss
        arrays = ArrayRecord(site.model.state_dict())
    else:
        run = RunPrivacy.from_config(cfg, num_records=n, explain=not spec.explain_opt_out, limits=spec.limits)
        spending = Spending(Ledger(spec.ledger_path, site=spec.name), run=run, budget=spec.budget,
                            run_id=site.run_id, site=spec.name)
        outbox = Outbox(spec.ledger_path)
        received = hash_arrays(msg.content["arrays"])
        with spending.locked():
            if any(m.round == site.round for m in spending.run_history):
                return _repeat(site, msg, spending, outbox.kept(site.run_id, "train"), received)
            sigma = run.plan_sigma(spending.run_history, sample_rate=q, steps_per_round=steps)
            spending.check(MechanismRecord(round=site.round, noise_multiplier=sigma, sample_rate=q,
                                           steps=steps, run_id=site.run_id))
            result = train(site.model, site.data.train,
                           settings=dataclasses.replace(settings, noise_multiplier=sigma),
                           num_outputs=site.schema.num_outputs, generator=generator)
            arrays = ArrayRecord(site.model.state_dict())
            # kept before it is charged, charged before it is sent (client/outbox.py)
            outbox.keep(KeptReply(run_id=site.run_id, kind="train", round=site.round, received_sha256=received,
                                  metrics={"train-loss": result.loss}, config={}, arrays=site.model.state_dict()))
            eps_run = spending.charge(MechanismRecord(round=site.round, noise_multiplier=sigma, sample_rate=q,
                                                      steps=result.steps, run_id=site.run_id))
        metrics.update({"train-loss": result.loss, "epsilon": eps_run, "delta": run.delta,
                        "noise-multiplier": sigma, "sample-rate": q, "steps": result.steps})
        extra["accountant"] = run.accountant
        extra["history"] = json.dumps([h.to_dict() for h in spending.run_history])
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "candor": extra})
    record_receipt(spec, msg, kind="train", sent=arrays)
    return Message(content=content, reply_to=msg)


def _repeat(site: SiteContext, msg: Message, spending: Spending, kept: KeptReply | None, received: str) -> Message:
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
    mechanism = next(m for m in history if m.round == site.round)
    logger.info("site '%s': round %d of run %s was already trained and charged; sending the update kept "
                "then (no new privacy spent)", site.spec.name, site.round, site.run_id)
    metrics = {"num-examples": len(site.data.train), **kept.metrics,
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
    except CandorError as err:
        return refusal(msg, err)
    scores = evaluate(site.model, site.data.test, num_outputs=site.schema.num_outputs)
    metrics = MetricRecord({"num-examples": len(site.data.test), **scores})
    try:
        record_receipt(site.spec, msg, kind="evaluate")
    except CandorError as err:
        return refusal(msg, err)
    return Message(content=RecordDict({"metrics": metrics, "candor": site.identity()}), reply_to=msg)
