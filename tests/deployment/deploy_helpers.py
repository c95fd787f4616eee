"""Helpers of the deployment tests (fixtures are in conftest.py).

One real federation on 127.0.0.1, shared by the deployment tests.

`candor-server init/add-site/invite/start` set up a federation with TLS and node
authentication; four `candor-client start` processes join it (three ordinary sites and
one whose lifetime budget is nearly spent); `candor-server run` trains 2 rounds once,
for every test that inspects a run. Every process runs in its own process group and
the fixtures stop every group (SIGTERM, then SIGKILL), whatever the tests did.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from independent_accounting import pld_epsilon  # noqa: F401  (re-exported for the deployment tests)

from candor.common.processes import pid_alive, stop_group, stop_pid_group, wait_until

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}  # Flower starts its helpers by name
SITES = ("h1", "h2", "h3")
BUDGET_SITE = "h4"  # its lifetime budget admits round 1 but not round 2
TARGET = 3.0  # the run's target ε per site (the product default)
BUDGET = 2.8  # h4's lifetime ε: above its round-1 ε (about 2.1), below rounds 1+2 (3.0)
DELTA = 1e-5
RUN_CONFIG = ["-c", "model=logreg", "-c", "num-server-rounds=2", "-c", f"target-epsilon={TARGET}",
              "-c", f"target-delta={DELTA}", "-c", "round-timeout=300", "-c", "min-sites=4", "-c", "explain=false"]


def cli(main, *args: str) -> tuple[int, str, str]:
    """Run a command's ``main`` in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def server(*args: str) -> tuple[int, str, str]:
    from candor.server.cli import main

    return cli(main, *args)


def client(*args: str) -> tuple[int, str, str]:
    from candor.client.cli import main

    return cli(main, *args)


class Processes:
    """Processes started for a test, each leading its own process group, all stopped at the end."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.log_dir / f"{name}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen([str(a) for a in args], stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                                    start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        log = next(path for p, path in self.procs if p is proc)
        return log.read_text(errors="replace")

    def wait_for(self, proc: subprocess.Popen, text: str, *, timeout: float) -> None:
        def seen() -> bool:
            if text in self.output(proc):
                return True
            if proc.poll() is not None:
                raise AssertionError(f"process exited ({proc.returncode}) before printing {text!r}:\n"
                                     + self.output(proc)[-3000:])
            return False

        wait_until(seen, timeout=timeout, what=repr(text), interval=0.2)

    def stop_all(self) -> None:
        for proc, _ in self.procs:
            stop_group(proc, grace=10)


@dataclass
class Deployment:
    root: Path
    fed: Path
    port: int
    sites: dict[str, Path] = field(default_factory=dict)  # site name -> site dir
    data: dict[str, Path] = field(default_factory=dict)  # site name -> CSV
    clients: dict[str, subprocess.Popen] = field(default_factory=dict)
    procs: Processes | None = None

    def start_client(self, name: str, *extra: str) -> subprocess.Popen:
        invite = self.fed / "invites" / f"{name}.toml"
        proc = self.procs.start(f"client-{name}", [BIN / "candor-client", "start", self.sites[name],
                                                   "--invite", invite, "--data", self.data[name], *extra])
        self.clients[name] = proc
        return proc


def stop_superlink(fed: Path) -> None:
    """`candor-server stop FED`, then end a SuperLink that outlived it (a failed test)."""
    server("stop", fed)
    try:
        pid = int(json.loads((fed / "superlink.pid").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    if pid_alive(pid):
        stop_pid_group(pid, grace=5)


def make_site(dep: Deployment, name: str) -> Path:
    """`candor-client init`, then the coordinator's `add-site` and `invite`."""
    site_dir = dep.root / "sites" / name
    code, out, err = client("init", site_dir, "--site-name", name)
    assert code == 0, err
    code, out, err = server("add-site", dep.fed, name, site_dir / "keys" / "node.pub")
    assert code == 0, err
    code, out, err = server("invite", dep.fed, name)
    assert code == 0, err
    return site_dir


def flwr(home: Path, *args: object, timeout: float = 180) -> subprocess.CompletedProcess:
    """Flower's own CLI, ``flwr ARGS``, with ``FLWR_HOME=home`` (a real process, with a deadline)."""
    return subprocess.run([BIN / "flwr", *(str(a) for a in args)], capture_output=True, text=True, timeout=timeout,
                          env={**ENV, "FLWR_HOME": str(home)})


def refused(proc: subprocess.CompletedProcess) -> bool:
    """True if a `flwr` call failed with Flower's refusal of its credentials."""
    return proc.returncode != 0 and "Authentication failed" in proc.stdout + proc.stderr


def outsider_home(home: Path, ca_certificate: str, address: str, *, token: str | None = None) -> Path:
    """An FLWR_HOME holding what anyone with a site's invite has: the federation's CA
    certificate and the server's address (connection ``candor``); with ``token``, also a
    guessed control token, written as Flower's credential store keeps it."""
    home.mkdir(parents=True)
    (home / "ca.crt").write_text(ca_certificate)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "candor"\n\n[superlink.candor]\naddress = "{address}"\n'
                                      f'root-certificates = "{home / "ca.crt"}"\n')
    if token is not None:
        (home / "credentials.yaml").write_text("".join(
            f"flower.account-auth.{address}.{key}: {base64.b64encode(value.encode()).decode()}\n"
            for key, value in (("authn-type", "oidc"), ("oidc-access-token", token), ("oidc-refresh-token", "x"))))
    return home


# A complete Flower App of someone else's: its ServerApp writes the file named by its run
# config's `marker`, so a test can tell whether it ever ran on the coordinator.
OUTSIDER_APP = {
    "pyproject.toml": """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "outsider"
version = "1.0.0"
description = "not the federation's app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "outsider_app:server"
clientapp = "outsider_app:client"

[tool.flwr.app.config]
marker = "/nonexistent/marker"
""",
    "outsider_app.py": """\
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    Path(str(context.run_config["marker"])).write_text(f"run {context.run_id}\\n")
""",
}


def write_outsider_app(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name, text in OUTSIDER_APP.items():
        (directory / name).write_text(text)
    return directory


def copy_site(dep: Deployment, name: str, new: str) -> Path:
    """A copy of a site directory (same key, same invite): for tests that break one thing."""
    target = dep.root / "variants" / new
    shutil.copytree(dep.sites[name], target, ignore=shutil.ignore_patterns("flwr", "logs", "ledger.json*"))
    return target
