"""Where a site's data, schema, ledger and budget are: from the SuperNode's node config
(deployment) or from the simulation manifest (simulation).

Deployment node config keys (set by ``candor-client start``): ``site-name``,
``data-path``, ``schema-path``, ``site-dir`` and optionally ``test-path``,
``budget-epsilon``, ``budget-delta``.

Simulation: ``run_config["sim-manifest"]`` is a JSON file ``{"sites": [{"name", "data",
"test"?, "ledger", "budget_epsilon"?, "budget_delta"?}, ...]}``; simulated node
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
        )
    if not cfg.sim_manifest:
        raise ConfigError(
            "This node has no 'data-path' in its node config and the run has no "
            "'sim-manifest': start sites with `candor-client start` or simulate with `candor-sim`."
        )
    sites = json.loads(Path(cfg.sim_manifest).read_text())["sites"]
    entry = sites[int(node_config["partition-id"]) % len(sites)]
    return SiteSpec(
        name=entry["name"],
        data_path=entry["data"],
        schema_path=cfg.schema,
        ledger_path=entry["ledger"],
        test_path=entry.get("test"),
        budget_epsilon=_opt_float(entry.get("budget_epsilon")),
        budget_delta=_opt_float(entry.get("budget_delta")),
    )


def _opt_float(value: Any) -> float | None:
    if value in (None, "", 0, 0.0):
        return None
    return float(value)
