"""Where a site's data, schema, ledger and budget are: from the SuperNode's node config
(deployment) or from the simulation manifest (simulation).

A node is a **deployed site** when its node config has ``data-path`` (``candor-client
start`` sets it); it is a **simulated site** only when Flower's simulation engine says so:
its node config then has ``partition-id`` and ``num-partitions`` and no ``data-path``.

Deployment node config keys (set by ``candor-client start``, the site's own): ``site-name``,
``data-path``, ``schema-path``, ``schema-sha256`` (the schema the site accepted),
``site-dir`` and optionally ``test-path``, ``budget-epsilon``, ``budget-delta``,
``explain-opt-out``, ``evaluation`` (``dp``, ``local`` or ``clear``), the site's limits on a run (``max-rounds``, ``max-run-epsilon``,
``max-grad-norm``, ``max-batch-size``, ``allow-non-private``) and its own plug-ins
(``data-loader``, ``model-plugins``: comma-separated ``module:factory`` it allows).

**The run config cannot reach into a deployed site.** Keys that would select code or
paths there do nothing or are refused: the schema is the node config's (never the run
config's ``schema``), ``sim-manifest`` is never read, a run config ``data-loader`` is
refused, and a plug-in ``model`` runs only when the site's node config names it.

Simulation: ``run_config["sim-manifest"]`` is a JSON file ``{"noise_seed"?, "sites":
[{"name", "data", "test"?, "ledger", "budget_epsilon"?, "budget_delta"?,
"explain_opt_out"?, "evaluation"?}, ...]}`` written by ``candor-sim``; simulated node ``partition-id`` i
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
from candor.common.errors import ConfigError, RunRefused
from candor.common.policy import LifetimeBudget, SiteLimits

EVALUATION_MODES = ("dp", "local", "clear")  # a site's evaluation: a DP release, kept at the site, or in the clear
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
    limits: SiteLimits = SiteLimits(allow_non_private=True)  # what a run may ask of this site
    schema_sha256: str | None = None  # the schema the site accepted (deployment); None = not pinned
    data_loader: str = ""  # the site's own plug-in loader, "module:function"; "" = the CSV/Parquet reader
    model_plugins: tuple[str, ...] = ()  # plug-in models the site allows (deployment)
    simulated: bool = False  # a node of Flower's simulation engine
    # Sampling and noise seeded from the run's public `seed` (reproducible runs). Only a
    # simulated site whose candor-sim manifest asks for it; never a deployed site.
    public_seed: bool = False
    # What the site sends of each round's evaluation on its held-out rows: "dp" (a DP
    # release, recorded; the default), "local" (nothing: the metrics stay at the site) or
    # "clear" (exact metrics; privacy.json lists evaluation as unprotected).
    evaluation: str = "dp"

    def __post_init__(self) -> None:
        if self.evaluation not in EVALUATION_MODES:
            raise ConfigError(f"site '{self.name}': evaluation = {self.evaluation!r} is not one of "
                              f"{', '.join(EVALUATION_MODES)}; set it with `candor-client start --evaluation MODE`")

    @property
    def budget(self) -> LifetimeBudget:
        """The site's own lifetime budget (its setting, never the coordinator's)."""
        return LifetimeBudget(epsilon=self.budget_epsilon, delta=self.budget_delta)

    @property
    def noise_seed(self) -> str:
        """Where this site's sampling and noise seeds come from, as privacy.json states it."""
        return NOISE_PUBLIC_SEED if self.public_seed else NOISE_OS_ENTROPY


    def check_run(self, cfg: RunConfig) -> None:
        """Refuse (RunRefused) a run that asks more than this site allows, or that tries
        to select code at a deployed site; nothing of the run's code is imported."""
        self.limits.check(cfg, site=self.name)
        if self.simulated:
            return
        if cfg.data_loader:
            raise RunRefused(f"site '{self.name}' refuses this run: its run config names data-loader = "
                             f"{cfg.data_loader!r}, code the coordinator chose; a site's loader is its own setting "
                             "(`candor-client start --data-loader MODULE:FUNCTION`). Nothing was imported")
        if ":" in cfg.model and cfg.model not in self.model_plugins:
            raise RunRefused(f"site '{self.name}' refuses this run: model = {cfg.model!r} is a plug-in this site "
                             "has not allowed (`candor-client start --allow-model-plugin MODULE:FACTORY`). "
                             "Nothing was imported")


def resolve_site(node_config: Mapping[str, Any], cfg: RunConfig) -> SiteSpec:
    if "data-path" in node_config:
        site_dir = Path(str(node_config.get("site-dir", ".")))
        name = str(node_config.get("site-name", site_dir.name))
        if not node_config.get("schema-path"):
            raise ConfigError(f"site '{name}': its node config has no 'schema-path' (the schema the site accepted); "
                              "start the site with `candor-client start SITE_DIR --data PATH`")
        return SiteSpec(
            name=name,
            data_path=str(node_config["data-path"]),
            schema_path=str(node_config["schema-path"]),
            ledger_path=str(site_dir / "ledger.json"),
            test_path=str(node_config["test-path"]) if node_config.get("test-path") else None,
            budget_epsilon=_opt_float(node_config.get("budget-epsilon")),
            budget_delta=_opt_float(node_config.get("budget-delta")),
            explain_opt_out=_flag(node_config.get("explain-opt-out")),
            limits=SiteLimits(
                max_rounds=_opt_int(node_config.get("max-rounds")),
                max_run_epsilon=_opt_float(node_config.get("max-run-epsilon")),
                max_grad_norm=_opt_float(node_config.get("max-grad-norm")),
                max_batch_size=_opt_int(node_config.get("max-batch-size")),
                allow_non_private=_flag(node_config.get("allow-non-private"))),
            schema_sha256=str(node_config["schema-sha256"]) if node_config.get("schema-sha256") else None,
            data_loader=str(node_config.get("data-loader") or ""),
            model_plugins=tuple(p.strip() for p in str(node_config.get("model-plugins") or "").split(",") if p.strip()),
            evaluation=str(node_config.get("evaluation") or "dp"),
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
        data_loader=cfg.data_loader,  # a researcher's own simulation: its run config is its own
        simulated=True,
        public_seed=public_seed,
        evaluation=str(entry.get("evaluation", "dp")),
    )


def _opt_float(value: Any) -> float | None:
    if value in (None, "", 0, 0.0):
        return None
    return float(value)


def _opt_int(value: Any) -> int | None:
    return None if value in (None, "", 0) else int(value)


def _flag(value: Any) -> bool:
    return str(value).lower() == "true"
