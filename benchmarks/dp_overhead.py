"""What DP-SGD and Candor's data pipeline cost per local epoch, as ratios.

For each case (model x rows x batch size), one run times, interleaved repetition by
repetition so that machine noise hits every variant alike, one epoch of:

- ``raw``: a hand-written loop, the floor: a shuffled permutation, ``x[idx[i:i+B]]``,
  forward, loss, backward, SGD step;
- ``plain``: ``common.training.train`` without DP (Candor's non-private path);
- ``dp-hooks``: ``common.training.train`` with DP-SGD through Opacus' default per-sample
  gradient hooks (Poisson sampling, clipping, noise);
- ``dp-ghost``: the same with Opacus' ghost clipping (``grad_sample_mode="ghost"``).

and reports median ratios ``dp/plain`` (goal <= 2) and ``plain/raw`` (goal <= 1.3).
Times are this process's CPU time by default (``--clock cpu``): on a shared machine,
wall time also counts the time other processes hold the core, which is noise here;
``--clock wall`` measures wall time instead.
An epoch is ``steps_for_epochs(n, B, 1)`` optimizer steps; every variant takes exactly
that many, from the same initial weights, on one thread (``torch.set_num_threads(1)``).
The timed region of a ``train`` variant is the whole call (loader and, for DP, the
Opacus wrapping), as a site pays it once per round.

    .venv/bin/python benchmarks/dp_overhead.py             # 12 cases, ~8 min CPU
    .venv/bin/python benchmarks/dp_overhead.py --quick     # 10k rows only, 3 repetitions
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from candor.common.models import build_model  # noqa: E402
from candor.common.training import LocalTraining, TensorSplit, loss_function, steps_for_epochs, train  # noqa: E402

NUM_FEATURES = 30
LEARNING_RATE = 0.05
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
DP_GOAL = 2.0  # DP epoch / non-private epoch of the same pipeline
PIPELINE_GOAL = 1.3  # non-private pipeline epoch / raw tensor-slice loop epoch
VARIANTS = ("raw", "plain", "dp-hooks", "dp-ghost")


def synthetic(rows: int, seed: int = 0) -> TensorSplit:
    """``rows`` x 30 standard-normal features; a binary label from a random logistic model."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, NUM_FEATURES, generator=g)
    w = torch.randn(NUM_FEATURES, generator=g) / NUM_FEATURES**0.5
    y = torch.bernoulli(torch.sigmoid(x @ w), generator=g)
    return TensorSplit(x.contiguous(), y.float())


def raw_epoch(model: nn.Module, data: TensorSplit, *, batch_size: int, steps: int, generator: torch.Generator) -> None:
    """The floor: what a hand-written loop costs for the same steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    idx = torch.randperm(len(data), generator=generator)
    for step in range(steps):
        batch = idx[step * batch_size:(step + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(data.x[batch]).squeeze(-1), data.y[batch])
        loss.backward()
        optimizer.step()


def candor_epoch(model: nn.Module, data: TensorSplit, *, batch_size: int, steps: int, generator: torch.Generator,
                 noise_multiplier: float | None = None, grad_sample_mode: str = "hooks") -> None:
    extra = {"grad_sample_mode": grad_sample_mode} if noise_multiplier is not None else {}
    settings = LocalTraining(steps=steps, batch_size=batch_size, learning_rate=LEARNING_RATE,
                             noise_multiplier=noise_multiplier, max_grad_norm=MAX_GRAD_NORM, **extra)
    train(model, data, settings=settings, num_outputs=1, generator=generator)


def variants(data: TensorSplit, batch_size: int, steps: int) -> dict[str, Callable[[nn.Module, torch.Generator], None]]:
    common = dict(data=data, batch_size=batch_size, steps=steps)
    return {
        "raw": lambda m, g: raw_epoch(m, generator=g, **common),
        "plain": lambda m, g: candor_epoch(m, generator=g, **common),
        "dp-hooks": lambda m, g: candor_epoch(m, generator=g, noise_multiplier=NOISE_MULTIPLIER, **common),
        "dp-ghost": lambda m, g: candor_epoch(m, generator=g, noise_multiplier=NOISE_MULTIPLIER,
                                              grad_sample_mode="ghost", **common),
    }


def time_case(model_spec: str, rows: int, batch_size: int, repeats: int,
              clock: Callable[[], float] = time.process_time) -> dict[str, list[float]]:
    """Seconds per epoch of each variant, ``repeats`` interleaved repetitions."""
    data = synthetic(rows)
    steps = steps_for_epochs(rows, batch_size, 1.0)
    torch.manual_seed(0)
    initial = build_model(model_spec, num_features=NUM_FEATURES, num_outputs=1)
    runs = variants(data, batch_size, steps)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(repeats + 1):  # repetition 0 warms up (imports, allocator) and is discarded
        order = list(runs) if rep % 2 else list(reversed(runs))
        for name in order:
            model = copy.deepcopy(initial)  # Opacus attaches hooks: a fresh model per epoch
            generator = torch.Generator().manual_seed(rep)
            start = clock()
            runs[name](model, generator)
            elapsed = clock() - start
            if rep:
                times[name].append(elapsed)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median of the per-repetition ratios (each pair measured back to back)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "logreg"], choices=["mlp", "logreg"])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 256])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per case (default 5)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="time.process_time (default; robust to other load) or time.perf_counter")
    parser.add_argument("--quick", action="store_true", help="10k rows and 3 repetitions only")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.repeats = [10_000], 3
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # Opacus' secure-RNG advisory
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, {args.clock} time; medians of "
          f"{args.repeats} interleaved "
          f"repetitions; σ = {NOISE_MULTIPLIER}, C = {MAX_GRAD_NORM}; MLP = {NUM_FEATURES}-64-32-1, "
          f"logreg = {NUM_FEATURES}-1", flush=True)
    head = ("model", "rows", "B", "steps", "raw ms", "plain ms", "hooks ms", "ghost ms",
            "plain/raw", "hooks/plain", "ghost/plain")
    print(("{:<7}{:>8}{:>5}{:>7}" + "{:>10}" * 4 + "{:>11}{:>13}{:>13}").format(*head), flush=True)
    met = {"plain/raw": [], "hooks/plain": [], "ghost/plain": []}
    for model_spec in args.models:
        for rows in args.rows:
            for batch_size in args.batch_sizes:
                times = time_case(model_spec, rows, batch_size, args.repeats, clock)
                med = {k: statistics.median(v) * 1000 for k, v in times.items()}
                r = {"plain/raw": ratio(times, "plain", "raw"), "hooks/plain": ratio(times, "dp-hooks", "plain"),
                     "ghost/plain": ratio(times, "dp-ghost", "plain")}
                for key, value in r.items():
                    met[key].append(value <= (PIPELINE_GOAL if key == "plain/raw" else DP_GOAL))
                flags = {k: f"{v:.2f}{'' if v <= (PIPELINE_GOAL if k == 'plain/raw' else DP_GOAL) else ' ✗'}"
                         for k, v in r.items()}
                print(("{:<7}{:>8}{:>5}{:>7}" + "{:>10.1f}" * 4 + "{:>11}{:>13}{:>13}").format(
                    model_spec, rows, batch_size, steps_for_epochs(rows, batch_size, 1.0), med["raw"], med["plain"],
                    med["dp-hooks"], med["dp-ghost"], flags["plain/raw"], flags["hooks/plain"],
                    flags["ghost/plain"]), flush=True)
    print(f"\nGoals: non-private pipeline <= {PIPELINE_GOAL}x the raw loop; DP <= {DP_GOAL}x non-private "
          "(✗ = missed).")
    for key, oks in met.items():
        print(f"  {key:<12} goal met in {sum(oks)}/{len(oks)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
