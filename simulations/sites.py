"""Simulated sites: which table each simulated node holds, written as a manifest that
the ClientApp reads (``client.site``). Each site's rows stay in its own file; the
ClientApp validates, splits and encodes them exactly as a deployed site would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from candor.common.atomic import write_json_atomic
from candor.common.errors import ConfigError, DataValidationError
from candor.common.schema import Schema
from candor.common.validation import load_table

from candor.client.site import MANIFEST_PUBLIC_SEED


@dataclass(frozen=True)
class SimSite:
    name: str
    data: Path
    test: Path | None = None
    budget_epsilon: float | None = None


def parse_site_arg(text: str) -> SimSite:
    """``NAME=PATH`` or ``NAME=TRAIN_PATH,TEST_PATH``."""
    name, sep, paths = text.partition("=")
    if not sep or not name or not paths:
        raise ConfigError(f"--site expects NAME=PATH or NAME=TRAIN,TEST; got {text!r}")
    train, _, test = paths.partition(",")
    return SimSite(name=name.strip(), data=Path(train).expanduser().resolve(),
                   test=Path(test).expanduser().resolve() if test else None)


def check_sites(sites: list[SimSite], schema: Schema, *, min_rows: int) -> None:
    """Validate every site's file(s) before anything starts; all problems at once."""
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names must be unique; got {', '.join(names)}")
    if len(sites) < 2:
        raise ConfigError(f"a federation needs at least 2 sites; got {len(sites)}")
    problems = []
    for site in sites:
        for path, rows in ((site.data, min_rows), (site.test, 1)):
            if path is None:
                continue
            try:
                load_table(path, schema, min_rows=rows)
            except DataValidationError as err:
                problems += err.problems
    if problems:
        raise DataValidationError(problems)


def write_manifest(sites: list[SimSite], out_dir: Path, *, evaluation: str = "dp") -> Path:
    """``out_dir/sites.json``; ``evaluation``: what every simulated site releases of its
    evaluation (client/site.py: dp, local, clear)."""
    entries = []
    for site in sites:
        entry = {"name": site.name, "data": str(site.data), "ledger": str(out_dir / "ledgers" / f"{site.name}.json"),
                 "evaluation": evaluation}
        if site.test:
            entry["test"] = str(site.test)
        if site.budget_epsilon:
            entry["budget_epsilon"] = site.budget_epsilon
        entries.append(entry)
    path = out_dir / "sites.json"
    # Simulated sites seed sampling and noise from the run's public seed: reproducible
    # research runs (client/site.py; privacy.json says so for every site).
    write_json_atomic(path, {"noise_seed": MANIFEST_PUBLIC_SEED, "sites": entries})
    return path


def write_embedded_sites(out_dir: Path, *, num_sites: int, scheme: str = "iid", alpha: float = 0.5,
                         seed: int = 0) -> list[SimSite]:
    """Split the embedded demo data (:mod:`candor.common.demo`) into ``num_sites``
    hospitals, one CSV each in ``out_dir/data``."""
    from candor.common.demo import write_demo_sites

    return [SimSite(name=name, data=path)
            for name, path in write_demo_sites(out_dir, num_sites=num_sites, scheme=scheme, alpha=alpha, seed=seed)]
