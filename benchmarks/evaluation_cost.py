"""What the private evaluation costs, on the four UCI heart-disease hospitals.

Each seed runs the real simulation twice with the same recipe and seed
(benchmarks/heart_disease.py's FLamby split and recipe, target ε = 3):

- ``--evaluation clear``: every site sends its exact held-out metrics each round;
- ``--evaluation dp`` (the default): every site sends its noisy sums (docs/privacy.md).

Training is the same in both (its releases are composed on the training side; the
evaluations on the held-out side): the script checks that the final models are equal,
so the exact metrics of the clear run are the truth the private run's metrics estimate.
It prints, per seed: the accuracy the coordinator sees in the last round (private vs
exact), the round each would pick as the best (highest aggregate accuracy), and, from
10,000 fresh draws of the same mechanism's noise on the exact per-site sums (σ_e and the
noisy counts as the sites recorded them), how often the private evaluation picks a
round other than the exact best and what the picked round's exact accuracy is.

    .venv/bin/python benchmarks/evaluation_cost.py            # seeds 42-44, ~6 min
    .venv/bin/python benchmarks/evaluation_cost.py --quick    # seed 42, ~2 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heart_disease import DEFAULT_DATA, FIXED, RECIPE, SCHEMA, Mode, load_centers, run_candor, write_sites  # noqa: E402

DRAWS = 10_000


def _run(evaluation: str, *, sites, seed: int, out: Path) -> Path:
    mode = Mode(f"DP ε=3, evaluation {evaluation}", "run", ("dp=true", "target-epsilon=3"))
    run_candor(mode, sites=sites, recipe=RECIPE, seed=seed, out=out, evaluation=evaluation)
    return out


def _aggregate_accuracy(rounds: list[dict]) -> list[float]:
    return [r["aggregate"]["accuracy"] for r in rounds]


def _monte_carlo(clear_rounds: list[dict], dp_dir: Path, rng: np.random.Generator) -> tuple[float, float, float]:
    """(P[the private evaluation picks another best round], mean exact accuracy of the
    round it picks, exact accuracy of the exact best round), over fresh noise draws."""
    ledgers = {p.stem: json.loads(p.read_text())["entries"] for p in (dp_dir / "ledgers").glob("*.json")}
    sigma = {s: next(e["noise_multiplier"] for e in es if e["kind"] == "evaluation") for s, es in ledgers.items()}
    counts = {s: m["num_examples"] for s, m in json.loads((dp_dir / "metrics.json").read_text())["rounds"][0]
              ["sites"].items()}  # the noisy held-out counts the sites released
    exact = np.array(_aggregate_accuracy(clear_rounds))
    correct = np.array([[r["sites"][s]["accuracy"] * r["sites"][s]["num_examples"] for s in sorted(sigma)]
                        for r in clear_rounds])  # rounds x sites, exact correct counts
    noise = rng.normal(0.0, 1.0, size=(DRAWS, *correct.shape)) * np.array(
        [sigma[s] * math.sqrt(2.0) for s in sorted(sigma)])
    seen = (correct[None] + noise).sum(axis=2) / sum(counts[s] for s in sigma)
    picked = seen.argmax(axis=1)
    best = int(exact.argmax())
    return float((picked != best).mean()), float(exact[picked].mean()), float(exact[best])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help="seed 42 only")
    args = parser.parse_args(argv)
    seeds = [42] if args.quick else [42, 43, 44]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="candor-evalcost-") as tmp:
        sites = write_sites(load_centers(args.data), Path(tmp) / "data")
        for seed in seeds:
            clear = _run("clear", sites=sites, seed=seed, out=Path(tmp) / f"clear-{seed}")
            dp = _run("dp", sites=sites, seed=seed, out=Path(tmp) / f"dp-{seed}")
            models = [torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (clear, dp)]
            same = all(torch.equal(models[0][k], models[1][k]) for k in models[0])
            clear_rounds = json.loads((clear / "metrics.json").read_text())["rounds"]
            dp_rounds = json.loads((dp / "metrics.json").read_text())["rounds"]
            exact, seen = _aggregate_accuracy(clear_rounds), _aggregate_accuracy(dp_rounds)
            p_other, picked_acc, best_acc = _monte_carlo(clear_rounds, dp, rng)
            eps = json.loads((dp / "privacy.json").read_text())["sites"]
            rows.append((seed, same, exact[-1], seen[-1], int(np.argmax(exact)) + 1, int(np.argmax(seen)) + 1,
                         p_other, picked_acc, best_acc, max(p["epsilon"] for p in eps.values())))
    print(f"Heart disease, 4 hospitals, {RECIPE['num-server-rounds']} rounds, target ε = 3 "
          f"({', '.join(FIXED)}), schema {SCHEMA.name}; {DRAWS} noise draws per seed")
    print(f"{'seed':>4} {'same model':>10} {'final acc exact':>15} {'final acc seen (dp)':>19} {'best round exact':>16} "
          f"{'best round seen':>15} {'P(other best)':>13} {'acc of picked':>13} {'acc of best':>11} {'max ε':>6}")
    for r in rows:
        print(f"{r[0]:>4} {str(r[1]):>10} {r[2]:>15.3f} {r[3]:>19.3f} {r[4]:>16} {r[5]:>15} {r[6]:>13.2f} "
              f"{r[7]:>13.3f} {r[8]:>11.3f} {r[9]:>6.3f}")
    return 0 if all(r[1] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
