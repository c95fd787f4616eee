"""Where a site's data, schema, ledger and budget are: from the SuperNode's node config
(deployment) or from the simulation manifest (simulation).

Deployment node config keys (set by ``candor-client start``): ``site-name``,
``data-path``, ``schema-path``, ``site-dir`` and optionally ``test-path``,
``budget-epsilon``, ``budget-delta``, ``explain-opt-out``.

Simulation: ``run_config["sim-manifest"]`` is a JSON file ``{"sites": [{"name", "data",
"test"?, "ledger", "budget_epsilon"?, "budget_delta"?, "explain_opt_out"?}, ...]}``; simulated node
``partition-id`` i is ``sites[i]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.config import RunConfig
from common.errors import ConfigError


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
    # Simulation only: sampling and noise seeded from the run's public `seed`, so runs
    # are reproducible. A deployed site draws them from the OS's entropy instead:
    # noise anyone could regenerate from public values would void the guarantee.
    reproducible_noise: bool = False


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
    if "partition-id" not in node_config:
        raise ConfigError(
            "This node has no 'data-path' in its node config: start sites with "
            "`candor-client start DIR --data PATH`."
        )
    partition_id = int(node_config["partition-id"])
    if cfg.sim_manifest:
        sites = json.loads(Path(cfg.sim_manifest).read_text())["sites"]
        entry = sites[partition_id % len(sites)]
    else:
        # A bare `flwr run .`: the embedded demo data, as Flower's examples do.
        from simulations.sites import embedded_default_site

        entry = embedded_default_site(partition_id, int(node_config.get("num-partitions", 2)))
    return SiteSpec(
        name=entry["name"],
        data_path=entry["data"],
        schema_path=cfg.schema or str(default_schema_path()),
        ledger_path=entry["ledger"],
        test_path=entry.get("test"),
        budget_epsilon=_opt_float(entry.get("budget_epsilon")),
        budget_delta=_opt_float(entry.get("budget_delta")),
        explain_opt_out=bool(entry.get("explain_opt_out", False)),
        reproducible_noise=True,
    )


def default_schema_path() -> Path:
    """The embedded demo's schema, used when a simulation names none."""
    from simulations.embedded import BREAST_CANCER_SCHEMA_PATH

    return BREAST_CANCER_SCHEMA_PATH


def _opt_float(value: Any) -> float | None:
    if value in (None, "", 0, 0.0):
        return None
    return float(value)
