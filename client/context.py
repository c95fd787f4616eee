"""What a ClientApp handler needs at a site for one message, and how it refuses.

:class:`SiteContext` is built once per message from Flower's ``Context``: the run config
(parsed once into :class:`~candor.common.config.RunConfig`), where the site's files are
(:mod:`candor.client.site`), its schema (checked against the federation's fingerprint),
its validated and encoded data, and the model the coordinator sent. :func:`refusal` is
the one way a handler says no: an ``Error`` reply with :data:`REFUSED` and the reason.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message

from candor.common.config import RunConfig
from candor.common.data import SiteData, load_plugin_site, load_site, stable_seed
from candor.common.errors import CHARGED_CODE, REFUSAL_CODE, AlreadyCharged, SchemaError
from candor.common.hashing import hash_arrays
from candor.common.models import build_model
from candor.common.names import run_id_of
from candor.common.privacy import PRIVACY_UNIT
from candor.common.schema import Schema

from .ledger import Ledger
from .outbox import Outbox
from .site import SiteSpec, resolve_site
from .spending import Spending

__all__ = ["REFUSED", "SiteContext", "refusal"]

logger = logging.getLogger(__name__)

REFUSED = REFUSAL_CODE  # Error code of a site's refusal (budget, schema, data)


class SiteContext:
    """Everything a handler needs, built once per message from the context."""

    def __init__(self, msg: Message, context: Context) -> None:
        torch.set_num_threads(1)
        self.cfg = RunConfig.from_run_config(context.run_config)
        self.spec: SiteSpec = resolve_site(context.node_config, self.cfg)
        self.spec.check_run(self.cfg)  # before any data is read or any plug-in imported
        self.schema = Schema.load(self.spec.schema_path)
        if self.spec.schema_sha256 and self.schema.sha256() != self.spec.schema_sha256:
            raise SchemaError(
                f"site '{self.spec.name}': its schema file {self.spec.schema_path} (sha256 "
                f"{self.schema.sha256()[:12]}) is not the schema it accepted ({self.spec.schema_sha256[:12]}); "
                "it was changed on disk: restore it with `candor-client start SITE_DIR --invite FILE`")
        expected = msg.content["config"].get("schema-sha256")
        if expected and expected != self.schema.sha256():
            raise SchemaError(
                f"site '{self.spec.name}': its schema {self.spec.schema_path} (sha256 "
                f"{self.schema.sha256()[:12]}) differs from the federation's ({str(expected)[:12]}); "
                "fetch the federation's schema from the coordinator"
            )
        split_seed = stable_seed(self.cfg.seed, self.spec.name, "split")
        if self.spec.data_loader:
            self.data: SiteData = load_plugin_site(
                self.spec.data_loader, self.spec.data_path, test_path=self.spec.test_path,
                test_fraction=self.cfg.test_fraction, seed=split_seed)
        else:
            self.data = load_site(
                self.schema, self.spec.data_path, test_path=self.spec.test_path,
                test_fraction=self.cfg.test_fraction, seed=split_seed, min_rows=self.cfg.min_rows)
        self.model = build_model(self.cfg.model, num_features=len(self.data.feature_names),
                                 num_outputs=self.schema.num_outputs, hidden=self.cfg.hidden_sizes)
        self.model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        self.round = int(msg.content["config"]["server-round"])
        self.received = hash_arrays(msg.content["arrays"])  # the model this message carries
        self.run_id = run_id_of(msg)  # the Candor run id: the same across a resumed run's Flower runs

    def spending(self) -> Spending:
        """The site's spending in this run (its ledger; the run's settings are set once its
        DP counts are known: client/counts.py)."""
        return Spending(Ledger(self.spec.ledger_path, site=self.spec.name), run=None, budget=self.spec.budget,
                        run_id=self.run_id, site=self.spec.name)

    def outbox(self) -> Outbox:
        return Outbox(self.spec.ledger_path)

    def rng(self, purpose: str) -> np.random.Generator:
        """The noise source of one release: seeded from the run's public seed only at a
        simulated site whose manifest asks for it (reproducible research runs), otherwise
        from the operating system's entropy."""
        if self.spec.public_seed:
            return np.random.default_rng(stable_seed(self.cfg.seed, self.spec.name, self.round, purpose))
        return np.random.default_rng()

    def identity(self) -> ConfigRecord:
        """The ``candor`` ConfigRecord every reply carries: site, privacy unit, noise source."""
        return identity(self.spec, self.cfg)


def identity(spec: SiteSpec, cfg: RunConfig | None = None) -> ConfigRecord:
    """Site name, privacy unit, noise source, and what it releases of its evaluation
    (``dp``, ``local`` or ``clear``; a run without DP releases it in the clear)."""
    evaluation = spec.evaluation if cfg is None or cfg.dp or spec.evaluation == "local" else "clear"
    return ConfigRecord({"site": spec.name, "privacy-unit": PRIVACY_UNIT, "noise-seed": spec.noise_seed,
                         "evaluation": evaluation})


def refusal(msg: Message, err: Exception) -> Message:
    """The site's refusal of ``msg``: logged here, and sent as an Error with the reason
    (code :data:`REFUSED`, or ``CHARGED_CODE`` for a round the ledger already holds)."""
    logger.warning("%s", err)
    code = CHARGED_CODE if isinstance(err, AlreadyCharged) else REFUSED
    return Message(Error(code=code, reason=str(err)), reply_to=msg)
