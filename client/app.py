"""The ClientApp: what runs at a data holder for every training and evaluation request.

Private training (``dp = true``): before the round the site checks the planned
mechanism against its lifetime budget (its own setting); it trains with DP-SGD; it
appends the round to its ledger; only then does the update leave the site. The reply
carries one ArrayRecord (the model), one MetricRecord (num-examples, train-loss,
epsilon, delta, noise-multiplier, sample-rate, steps) and a ConfigRecord ``candor``
(site name, accountant, privacy unit, the run's mechanism history as JSON).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from candor.common.config import RunConfig
from candor.common.data import SiteData, load_plugin_site, load_site, stable_seed
from candor.common.errors import BudgetExceeded, CandorError
from candor.common.explain import release_mechanism
from candor.common.models import build_model
from candor.common.privacy import PRIVACY_UNIT, MechanismRecord, calibrate_noise_multiplier, default_delta, epsilon
from candor.common.schema import Schema
from candor.common.training import LocalTraining, evaluate, sample_rate, steps_for_epochs, train

from . import secagg
from .ledger import Ledger, new_entry
from .receipts import record_receipt
from .site import SiteSpec, resolve_site

logging.getLogger("flwr").propagate = False  # opacus' basicConfig would print every flwr line twice
logger = logging.getLogger(__name__)

REFUSED = 4001  # Error code of a site's refusal (budget, schema, data)

app = ClientApp()


class _Site:
    """Everything a handler needs, built once per message from the context."""

    def __init__(self, msg: Message, context: Context) -> None:
        torch.set_num_threads(1)
        self.cfg = RunConfig.from_run_config(context.run_config)
        self.spec: SiteSpec = resolve_site(context.node_config, self.cfg)
        self.schema = Schema.load(self.spec.schema_path)
        expected = msg.content["config"].get("schema-sha256")
        if expected and expected != self.schema.sha256():
            raise CandorError(
                f"site '{self.spec.name}': its schema {self.spec.schema_path} (sha256 "
                f"{self.schema.sha256()[:12]}) differs from the federation's ({str(expected)[:12]}); "
                "fetch the federation's schema from the coordinator"
            )
        split_seed = stable_seed(self.cfg.seed, self.spec.name, "split")
        if self.cfg.data_loader:
            self.data: SiteData = load_plugin_site(
                self.cfg.data_loader, self.spec.data_path, test_path=self.spec.test_path,
                test_fraction=self.cfg.test_fraction, seed=split_seed)
        else:
            self.data = load_site(
                self.schema, self.spec.data_path, test_path=self.spec.test_path,
                test_fraction=self.cfg.test_fraction, seed=split_seed, min_rows=self.cfg.min_rows)
        self.model = build_model(self.cfg.model, num_features=len(self.data.feature_names),
                                 num_outputs=self.schema.num_outputs, hidden=self.cfg.hidden_sizes)
        self.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        self.round = int(msg.content["config"]["server-round"])
        self.run_id = str(msg.metadata.run_id)

    def identity(self) -> ConfigRecord:
        return ConfigRecord({"site": self.spec.name, "privacy-unit": PRIVACY_UNIT})


def _refusal(msg: Message, err: Exception) -> Message:
    logger.warning("%s", err)
    return Message(Error(code=REFUSED, reason=str(err)), reply_to=msg)


@app.train()
def handle_train(msg: Message, context: Context) -> Message:
    if secagg.is_stage(msg):  # secure aggregation (client/secagg.py): the update leaves only masked
        return secagg.handle(msg, context, train=_handle_plain_train)
    refusal = secagg.plain_training_refused(context)
    if refusal is not None:
        return _refusal(msg, refusal)
    return _handle_plain_train(msg, context)


def _handle_plain_train(msg: Message, context: Context) -> Message:
    try:
        site = _Site(msg, context)
        return _train(site, msg)
    except CandorError as err:
        return _refusal(msg, err)


def _train(site: _Site, msg: Message) -> Message:
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
    else:
        delta = cfg.target_delta or default_delta(n)
        ledger = Ledger(spec.ledger_path, site=spec.name)
        with ledger.locked():
            run_history = ledger.history(run_id=site.run_id)
            if run_history:
                sigma = run_history[0].noise_multiplier  # fixed for the whole run at round 1
            elif cfg.target_epsilon > 0:
                # Calibrated once, before the site's first round, for the whole run: every
                # round uses the same σ, so the
                # planned rounds x steps, plus the explanation release that follows
                # training (client/explain_app.py), together meet the target.
                reserved = ([release_mechanism(round=cfg.num_server_rounds + 1,
                                               noise_multiplier=cfg.explain_noise_multiplier)]
                            if cfg.explain and not spec.explain_opt_out else [])
                if reserved and epsilon(reserved, delta=delta, accountant=cfg.accountant) >= cfg.target_epsilon:
                    # The release alone would exceed the target: train with the whole target;
                    # the explanation is then refused by its own budget check, not training.
                    logger.warning("site '%s': the explanation release alone exceeds target ε %s; "
                                   "training uses the whole target and the release will be refused",
                                   spec.name, cfg.target_epsilon)
                    reserved = []
                sigma = calibrate_noise_multiplier(
                    target_epsilon=cfg.target_epsilon, delta=delta, sample_rate=q,
                    steps=steps * cfg.num_server_rounds, prior=reserved, accountant=cfg.accountant)
            else:
                sigma = cfg.noise_multiplier
            planned = MechanismRecord(round=site.round, noise_multiplier=sigma, sample_rate=q,
                                      steps=steps, run_id=site.run_id)
            _check_budgets(site, ledger, run_history, planned, delta)
            result = train(site.model, site.data.train,
                           settings=dataclasses.replace(settings, noise_multiplier=sigma),
                           num_outputs=site.schema.num_outputs, generator=generator)
            record = MechanismRecord(round=site.round, noise_multiplier=sigma, sample_rate=q,
                                     steps=result.steps, run_id=site.run_id)
            history = run_history + [record]
            eps_run = epsilon(history, delta=delta, accountant=cfg.accountant)
            ledger.append(new_entry(record, accountant=cfg.accountant, delta=delta, epsilon_run=eps_run))
        metrics.update({"train-loss": result.loss, "epsilon": eps_run, "delta": delta,
                        "noise-multiplier": sigma, "sample-rate": q, "steps": result.steps})
        extra["accountant"] = cfg.accountant
        extra["history"] = json.dumps([h.to_dict() for h in history])
    content = RecordDict({
        "arrays": ArrayRecord(site.model.state_dict()),
        "metrics": MetricRecord(metrics),
        "candor": extra,
    })
    record_receipt(spec, msg, kind="train", sent=content["arrays"])
    return Message(content=content, reply_to=msg)


def _check_budgets(site: _Site, ledger: Ledger, run_history: list[MechanismRecord],
                   planned: MechanismRecord, delta: float) -> None:
    """Refuse a round that would exceed the run's target or the site's lifetime budget."""
    cfg, spec = site.cfg, site.spec
    if cfg.target_epsilon > 0:
        eps = epsilon(run_history + [planned], delta=delta, accountant=cfg.accountant)
        if eps > cfg.target_epsilon:
            raise BudgetExceeded(
                f"site '{spec.name}' refuses round {site.round}: it would bring this run's ε to "
                f"{eps:.3f} > target {cfg.target_epsilon} (δ = {delta:g})")
    if spec.budget_epsilon is not None:
        life_delta = spec.budget_delta or delta
        lifetime = ledger.history() + [planned]
        eps = epsilon(lifetime, delta=life_delta, accountant=cfg.accountant)
        if eps > spec.budget_epsilon:
            spent = epsilon(lifetime[:-1], delta=life_delta, accountant=cfg.accountant)
            raise BudgetExceeded(
                f"site '{spec.name}' refuses round {site.round}: its lifetime ε would reach "
                f"{eps:.3f} > its budget {spec.budget_epsilon} (δ = {life_delta:g}; spent so far "
                f"{spent:.3f}). Nothing was trained or recorded.")


@app.evaluate()
def handle_evaluate(msg: Message, context: Context) -> Message:
    try:
        site = _Site(msg, context)
    except CandorError as err:
        return _refusal(msg, err)
    scores = evaluate(site.model, site.data.test, num_outputs=site.schema.num_outputs)
    metrics = MetricRecord({"num-examples": len(site.data.test), **scores})
    try:
        record_receipt(site.spec, msg, kind="evaluate")
    except CandorError as err:
        return _refusal(msg, err)
    return Message(content=RecordDict({"metrics": metrics, "candor": site.identity()}), reply_to=msg)


from candor.client import explain_app  # noqa: E402,F401  (registers the "query.explain" handler on app)
