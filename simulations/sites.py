"""Simulated sites: which table each simulated node holds, written as a manifest that
the ClientApp reads (``client.site``). Each site's rows stay in its own file; the
ClientApp validates, splits and encodes them exactly as a deployed site would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.atomic import write_json_atomic
from common.errors import CandorError, DataValidationError
from common.schema import Schema
from common.validation import load_table


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
        raise CandorError(f"--site expects NAME=PATH or NAME=TRAIN,TEST; got {text!r}")
    train, _, test = paths.partition(",")
    return SimSite(name=name.strip(), data=Path(train).expanduser().resolve(),
                   test=Path(test).expanduser().resolve() if test else None)


def check_sites(sites: list[SimSite], schema: Schema, *, min_rows: int) -> None:
    """Validate every site's file(s) before anything starts; all problems at once."""
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise CandorError(f"site names must be unique; got {', '.join(names)}")
    if len(sites) < 2:
        raise CandorError(f"a federation needs at least 2 sites; got {len(sites)}")
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


def write_manifest(sites: list[SimSite], out_dir: Path) -> Path:
    entries = []
    for site in sites:
        entry = {"name": site.name, "data": str(site.data), "ledger": str(out_dir / "ledgers" / f"{site.name}.json")}
        if site.test:
            entry["test"] = str(site.test)
        if site.budget_epsilon:
            entry["budget_epsilon"] = site.budget_epsilon
        entries.append(entry)
    path = out_dir / "sites.json"
    write_json_atomic(path, {"sites": entries})
    return path


def write_embedded_sites(out_dir: Path, *, num_sites: int, scheme: str = "iid", alpha: float = 0.5,
                         seed: int = 0) -> list[SimSite]:
    """Split the embedded breast-cancer data into ``num_sites`` hospitals, one CSV each
    in ``out_dir/data`` (written atomically)."""
    from common.atomic import write_atomic

    from .embedded import breast_cancer_frame, partition

    parts = partition(breast_cancer_frame(), num_sites=num_sites, label="diagnosis", scheme=scheme,
                      alpha=alpha, seed=seed)
    sites = []
    for i, part in enumerate(parts, start=1):
        path = out_dir / "data" / f"hospital-{i}.csv"
        write_atomic(path, part.to_csv(index=False))
        sites.append(SimSite(name=f"hospital-{i}", data=path))
    return sites


def embedded_default_site(partition_id: int, num_partitions: int) -> dict:
    """Manifest entry of simulated node ``partition_id`` for a bare ``flwr run .``
    (no manifest given): the embedded data split iid over ``num_partitions`` hospitals,
    cached in the temp dir."""
    import tempfile

    root = Path(tempfile.gettempdir()) / f"candor-embedded-{num_partitions}"
    sites = write_embedded_sites(root, num_sites=num_partitions)
    site = sites[partition_id % num_partitions]
    return {"name": site.name, "data": str(site.data), "ledger": str(root / "ledgers" / f"{site.name}.json")}
