"""Where a site's data, schema, ledger and budget are: from the SuperNode's node config
(deployment) or from the simulation manifest (simulation).

A node is a **deployed site** when its node config has ``data-path`` (``candor-client
start`` sets it); it is a **simulated site** only when Flower's simulation engine says so:
its node config then has ``partition-id`` and ``num-partitions`` and no ``data-path``.

Deployment node config keys (set by ``candor-client start``): ``site-name``,
``data-path``, ``schema-path``, ``site-dir`` and optionally ``test-path``,
``budget-epsilon``, ``budget-delta``, ``explain-opt-out``.

Simulation: ``run_config["sim-manifest"]`` is a JSON file ``{"noise_seed"?, "sites":
[{"name", "data", "test"?, "ledger", "budget_epsilon"?, "budget_delta"?,
"explain_opt_out"?}, ...]}`` written by ``candor-sim``; simulated node ``partition-id`` i
is ``sites[i]``. Without a manifest (a bare ``flwr run .``) a simulated node holds its
share of the embedded demo data (:mod:`candor.common.demo`).

The noise source is explicit: a deployed site always seeds sampling and noise from the
OS's entropy. Only a ``candor-sim`` manifest with ``"noise_seed": "public-seed"`` makes a
simulated site seed them from the run's public ``seed`` (reproducible runs); noise that
anyone can regenerate from public values gives no privacy, so this is never a deployed
site's choice, and ``privacy.json`` says which source each site used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from candor.common.config import RunConfig
from candor.common.demo import DEMO_SCHEMA_PATH
from candor.common.errors import ConfigError
from candor.common.policy import LifetimeBudget

NOISE_OS_ENTROPY = "os-entropy"
NOISE_PUBLIC_SEED = "public-seed (simulation only)"
MANIFEST_PUBLIC_SEED = "public-seed"  # the manifest's "noise_seed" value that candor-sim writes


@dataclass(frozen=True)
class SiteSpec:
    name: str
    data_path: str
    schema_path: str
    ledger_path: str
    test_path: str | None = None
    budget_epsilon: float | None = None  # lifetime ε this site allows; None = no limit
    budget_delta: float | None = None  # δ of the lifetime budget; None = the run's δ
    explain_opt_out: bool = False  # True: send nothing for the federated explanation
    simulated: bool = False  # a node of Flower's simulation engine
    # Sampling and noise seeded from the run's public `seed` (reproducible runs). Only a
    # simulated site whose candor-sim manifest asks for it; never a deployed site.
    public_seed: bool = False

    @property
    def budget(self) -> LifetimeBudget:
        """The site's own lifetime budget (its setting, never the coordinator's)."""
        return LifetimeBudget(epsilon=self.budget_epsilon, delta=self.budget_delta)

    @property
    def noise_seed(self) -> str:
        """Where this site's sampling and noise seeds come from, as privacy.json states it."""
        return NOISE_PUBLIC_SEED if self.public_seed else NOISE_OS_ENTROPY


def resolve_site(node_config: Mapping[str, Any], cfg: RunConfig) -> SiteSpec:
    if "data-path" in node_config:
        site_dir = Path(str(node_config.get("site-dir", ".")))
        return SiteSpec(
            name=str(node_config.get("site-name", site_dir.name)),
            data_path=str(node_config["data-path"]),
            schema_path=str(node_config.get("schema-path") or cfg.schema),
            ledger_path=str(site_dir / "ledger.json"),
            test_path=str(node_config["test-path"]) if node_config.get("test-path") else None,
            budget_epsilon=_opt_float(node_config.get("budget-epsilon")),
            budget_delta=_opt_float(node_config.get("budget-delta")),
            explain_opt_out=str(node_config.get("explain-opt-out", False)).lower() == "true",
        )
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ConfigError(
            "This node's node config has no 'data-path': start a site with "
            "`candor-client start SITE_DIR --data PATH` (only Flower's simulation engine starts "
            "nodes without one)."
        )
    partition_id = int(node_config["partition-id"])
    public_seed = False
    if cfg.sim_manifest:
        manifest = json.loads(Path(cfg.sim_manifest).read_text())
        sites = manifest["sites"]
        entry = sites[partition_id % len(sites)]
        public_seed = manifest.get("noise_seed") == MANIFEST_PUBLIC_SEED
    else:
        # A bare `flwr run .`: the embedded demo data, as Flower's examples do.
        from candor.common.demo import demo_site

        entry = demo_site(partition_id, int(node_config["num-partitions"]))
    return SiteSpec(
        name=entry["name"],
        data_path=entry["data"],
        schema_path=cfg.schema or str(DEMO_SCHEMA_PATH),
        ledger_path=entry["ledger"],
        test_path=entry.get("test"),
        budget_epsilon=_opt_float(entry.get("budget_epsilon")),
        budget_delta=_opt_float(entry.get("budget_delta")),
        explain_opt_out=bool(entry.get("explain_opt_out", False)),
        simulated=True,
        public_seed=public_seed,
    )


def _opt_float(value: Any) -> float | None:
    if value in (None, "", 0, 0.0):
        return None
    return float(value)
