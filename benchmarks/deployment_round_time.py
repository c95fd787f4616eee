"""Per-round wall time of a deployed run (3 sites on loopback) vs the same rounds simulated.

One invocation runs, on the same 3 site files and run config (logistic regression, DP
on with the default target ε, explanation off):

- ``simulated``: ``simulations.engine.run`` (Flower's simulation engine; warm Ray
  workers: the ClientApp's imports are paid once);
- ``deployed/flower-defaults``: `candor-server` + 3 `candor-client` processes with
  Flower's defaults where Candor changes them (SuperExec task poll 1 s at the sites);
- ``deployed/candor``: the same with Candor's settings (sites' SuperExec poll 0.2 s);
- ``deployed/fast-polls``: Candor's settings plus Flower's two fixed 3 s polls cut to
  0.2 s by a measurement-only patch (no Flower setting exists for them): what they cost.

A round's time is the interval between the ServerApp's successive "round k/R" lines
(as `flwr run --stream` delivers them in both cases; round 1 also includes the σ
calibration). From the SuperNodes' timestamped logs it splits the deployed time per
message into: dispatch (message received -> ClientApp process started), ClientApp
process (start -> reply sent: Python start-up, imports, data loading, training,
accounting), and the rest (waiting for the slowest site plus Flower's fixed 3 s polls
in the SuperNode and in the ServerApp's grid). Prints the ratio deployed/simulated.

    .venv/bin/python benchmarks/deployment_round_time.py               # 3 rounds, ~8 min quiet
    .venv/bin/python benchmarks/deployment_round_time.py --only flower-defaults --only candor --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from candor.common.processes import free_port, stop_group, wait_until  # noqa: E402
from candor.common.demo import DEMO_SCHEMA_PATH, breast_cancer_frame  # noqa: E402
from candor.common.partition import partition  # noqa: E402

BIN = Path(sys.executable).parent
SITES = ("h1", "h2", "h3")
ROUND_LINE = re.compile(r"round (\d+)/(\d+)")
VARIANTS = ("simulated", "flower-defaults", "candor", "fast-polls")


def run_config(rounds: int) -> dict:
    return {"model": "logreg", "num-server-rounds": rounds, "explain": False, "min-sites": len(SITES)}


def round_times(stamps: list[tuple[float, str]], rounds: int) -> list[float]:
    """Seconds per round from (arrival time, line) pairs: header line -> round 1 -> ... -> round R."""
    start = next(t for t, line in stamps if re.search(r"run \S+: \d+ rounds", line))
    ends = {}
    for t, line in stamps:
        if (m := ROUND_LINE.search(line)) and int(m.group(2)) == rounds:
            ends.setdefault(int(m.group(1)), t)
    marks = [start] + [ends[r] for r in range(1, rounds + 1)]
    return [b - a for a, b in zip(marks, marks[1:])]


def simulated(root: Path, data: dict[str, Path], rounds: int) -> list[float]:
    from candor.simulations import engine
    from candor.simulations.sites import SimSite, write_manifest

    out = root
    manifest = write_manifest([SimSite(name=n, data=p) for n, p in data.items()], out)
    stamps: list[tuple[float, str]] = []
    overrides = {**run_config(rounds), "schema": str(DEMO_SCHEMA_PATH), "out-dir": str(out),
                 "sim-manifest": str(manifest)}
    engine.run(overrides, num_sites=len(SITES), log_path=out / "flower.log",
               on_line=lambda line: stamps.append((time.monotonic(), line)))
    return round_times(stamps, rounds)


# Measurement only, never in the product: shortens Flower's two fixed 3 s polls (the
# SuperNode's idle poll and the ServerApp grid's reply poll) in every Flower process, to
# show what they cost. Loaded through PYTHONPATH as sitecustomize.
FAST_POLL_SITECUSTOMIZE = """
import os, time
if os.environ.get("CANDOR_BENCH_FAST_POLL"):
    _sleep, _poll = time.sleep, float(os.environ["CANDOR_BENCH_FAST_POLL"])
    time.sleep = lambda seconds: _sleep(_poll if seconds == 3 else seconds)
"""


def quiet(main, args: list[str]) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(args)
    if code != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{out.getvalue()}")


def deployed(root: Path, data: dict[str, Path], rounds: int, *, poll: str | None,
             fast_polls: bool = False) -> tuple[list[float], dict[str, float]]:
    """``poll``: FLWR_SUPEREXEC_TASK_POLL_INTERVAL for every Flower process; None = Candor's defaults."""
    from candor.client.cli import main as client_main
    from candor.server.cli import main as server_main

    os.environ.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)
    settings = {"CANDOR_BENCH_FAST_POLL": ""}
    if poll is not None:
        settings["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = poll
    if fast_polls:
        (root / "fastpoll").mkdir()
        (root / "fastpoll" / "sitecustomize.py").write_text(FAST_POLL_SITECUSTOMIZE)
        settings.update(CANDOR_BENCH_FAST_POLL="0.2", PYTHONPATH=os.pathsep.join(
            filter(None, [str(root / "fastpoll"), os.environ.get("PYTHONPATH", "")])))
    os.environ.update(settings)  # also for the SuperLink, started in-process below
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    fed = root / "federation"
    quiet(server_main, ["init", str(fed), "--name", "bench", "--port", str(free_port()),
                        "--schema", str(DEMO_SCHEMA_PATH)])
    for name in SITES:
        quiet(client_main, ["init", str(root / name), "--site-name", name])
        quiet(server_main, ["add-site", str(fed), name, str(root / name / "keys" / "node.pub")])
        quiet(server_main, ["invite", str(fed), name])
    procs: list[subprocess.Popen] = []
    try:
        quiet(server_main, ["start", str(fed)])
        for name in SITES:
            log = open(root / f"client-{name}.out", "w")
            procs.append(subprocess.Popen(
                [BIN / "candor-client", "start", root / name, "--invite", fed / "invites" / f"{name}.toml",
                 "--data", data[name]], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        for name in SITES:
            wait_until(lambda: "connected as node" in (root / f"client-{name}.out").read_text(), timeout=300,
                       what=f"{name} to connect")
        stamps: list[tuple[float, str]] = []
        cmd = [BIN / "candor-server", "run", fed] + [a for k, v in run_config(rounds).items()
                                                     for a in ("-c", f"{k}={str(v).lower()}")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True)
        procs.append(proc)
        for line in proc.stdout:
            stamps.append((time.monotonic(), line.rstrip()))
        if proc.wait() != 0:
            raise SystemExit("the deployed run failed:\n" + "\n".join(l for _, l in stamps[-30:]))
        return round_times(stamps, rounds), message_breakdown(root)
    finally:
        for p in procs:
            stop_group(p)
        quiet(server_main, ["stop", str(fed)])


def message_breakdown(root: Path) -> dict[str, float]:
    """Median seconds per message phase, from the SuperNodes' timestamped logs."""
    phases: dict[str, list[float]] = {"dispatch": [], "clientapp": [], "between messages": []}
    for name in SITES:
        events = []
        for line in (root / name / "logs" / "supernode.log").read_text(errors="replace").splitlines():
            m = re.match(r"(\d\d:\d\d:\d\d\.\d{3}) ", line)
            if not m:
                continue
            t = datetime.strptime(m.group(1), "%H:%M:%S.%f").timestamp()
            for key, label in (("Receiving:", "recv"), ("Start `flwr-clientapp`", "start"), ("Sending:", "send")):
                if key in line:
                    events.append((label, t))
        last_send = None
        for i, (label, t) in enumerate(events):
            if label == "recv" and last_send is not None:
                phases["between messages"].append(t - last_send)
            if label == "start" and i and events[i - 1][0] == "recv":
                phases["dispatch"].append(t - events[i - 1][1])
            if label == "send" and i and events[i - 1][0] == "start":
                phases["clientapp"].append(t - events[i - 1][1])
            if label == "send":
                last_send = t
    return {k: statistics.median(v) for k, v in phases.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=VARIANTS, action="append")
    parser.add_argument("--repeat", type=int, default=1, help="alternate the deployed variants this many times")
    args = parser.parse_args()
    variants = args.only or list(VARIANTS)
    root = Path(tempfile.mkdtemp(prefix="candor-bench-"))
    parts = partition(breast_cancer_frame(), num_sites=len(SITES), label="diagnosis", seed=3)
    data = {}
    for name, part in zip(SITES, parts):
        data[name] = root / f"{name}.csv"
        part.to_csv(data[name], index=False)
    print(f"3 sites x ~{len(parts[0])} rows, logreg, DP on, {args.rounds} rounds; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at start; work dir {root}", flush=True)
    results: dict[str, list[float]] = {}
    order = [v for v in variants if v == "simulated"] + [v for v in variants if v != "simulated"] * args.repeat
    for i, variant in enumerate(order):
        started = time.monotonic()
        work = root / f"{variant}-{i}"
        work.mkdir()
        if variant == "simulated":
            times, breakdown = simulated(work, data, args.rounds), {}
        else:
            times, breakdown = deployed(work, data, args.rounds, fast_polls=variant == "fast-polls",
                                        poll="1.0" if variant == "flower-defaults" else None)
        results.setdefault(variant, []).extend(times[1:] or times)  # steady-state rounds
        print(f"{variant:<18} rounds {', '.join(f'{t:.1f}' for t in times)} s "
              f"(whole variant {time.monotonic() - started:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        if breakdown:
            print("    per message (median): " + ", ".join(f"{k} {v:.1f} s" for k, v in breakdown.items()),
                  flush=True)
    for variant, times in results.items():
        print(f"{variant:<18} median steady-state round (rounds 2..{args.rounds}, all repeats): "
              f"{statistics.median(times):.1f} s")
    if "simulated" in results:
        base = statistics.median(results["simulated"])
        for variant, times in results.items():
            if variant != "simulated":
                print(f"ratio {variant}/simulated (median steady-state round): {statistics.median(times) / base:.1f}x")


if __name__ == "__main__":
    main()
