"""``candor-client init | new-key | start | ledger``: join a federation from a data holder.

The site directory (``SITE_DIR``) holds everything the institution keeps::

    site.toml          site name; from the invite: federation, server address, min-rows
    keys/node.key      the node's private key (0600; never leaves this machine)
    keys/node.pub      its public key: send this file to the coordinator
    federation/        ca.crt and schema.toml, from the coordinator's invite
    budget.toml        the site's lifetime privacy budget (its own setting)
    ledger.json        every private round this site ever trained (client.ledger)
    node_config.toml   what the SuperNode passes to the ClientApp (rewritten each start)
    flwr/              the SuperNode's FLWR_HOME
    logs/supernode.log everything the SuperNode and the ClientApp printed

``start`` validates the data first and refuses to start on any problem; it checks the
key and reaches the server over TLS before it runs Flower's SuperNode, so that a wrong
CA, an unreadable key or a server that is down each give one clear line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import queue
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from candor.common.atomic import write_atomic
from candor.common.errors import CandorError
from candor.common.processes import flower_bin, flower_env, free_port
from candor.common.schema import Schema

from .keys import create_node_key, fingerprint, load_private_key

# common.privacy, common.validation and .ledger import torch, opacus and pandas: they are
# imported inside the commands that need them, so that `candor-client --help` stays fast.
ACCOUNTANTS = ("prv", "rdp")  # = common.privacy.ACCOUNTANTS

__all__ = ["register"]

INVITE_VERSION = 1
# Flower's SuperExec polls the SuperNode for a ClientApp process to start every 1 s by
# default: on average 0.5 s of every message. 0.2 s saves ~0.4 s per message for ~2.7 %
# of a core while idle (1 s: 0.6 %, 0.1 s: 4.2 %; measured here). The server keeps
# Flower's default: its SuperExec starts one ServerApp per run. An explicit
# FLWR_SUPEREXEC_TASK_POLL_INTERVAL in the environment wins.
SUPEREXEC_POLL_SECONDS = "0.2"
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class SiteDir:
    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "site.toml"

    @property
    def private_key(self) -> Path:
        return self.dir / "keys" / "node.key"

    @property
    def public_key(self) -> Path:
        return self.dir / "keys" / "node.pub"

    @property
    def ca_cert(self) -> Path:
        return self.dir / "federation" / "ca.crt"

    @property
    def schema_path(self) -> Path:
        return self.dir / "federation" / "schema.toml"

    @property
    def budget_path(self) -> Path:
        return self.dir / "budget.toml"

    @property
    def ledger_path(self) -> Path:
        return self.dir / "ledger.json"  # where client.site puts it: site-dir/ledger.json

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "supernode.log"

    def config(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise CandorError(f"{self.dir} is not a Candor site directory (no site.toml); "
                              "create it with `candor-client init DIR --site-name NAME`") from None
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise CandorError(f"{self.config_path} is unreadable ({err})") from None

    def save_config(self, config: dict[str, Any]) -> None:
        write_atomic(self.config_path, tomli_w.dumps(config))

    def budget(self) -> dict[str, float]:
        if not self.budget_path.exists():
            return {}
        try:
            return {k: float(v) for k, v in tomllib.loads(self.budget_path.read_text()).items()}
        except (OSError, tomllib.TOMLDecodeError, TypeError, ValueError) as err:
            raise CandorError(f"{self.budget_path} is unreadable ({err}); it holds this site's privacy budget: "
                              "fix it or set the budget again with --budget-epsilon") from None


# --- init / new-key -------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    name = args.site_name
    if not name or not all(c.isalnum() or c in "._-" for c in name) or not name[0].isalnum() or len(name) > 63:
        raise CandorError(f"--site-name {name!r} must be 1-63 letters, digits, '.', '_' or '-', starting "
                          "with a letter or digit (e.g. st-marys-hospital)")
    if site.config_path.exists():
        raise CandorError(f"{site.dir} is a site directory already (site '{site.config()['site']}'); "
                          "use another directory, or `candor-client new-key` to replace only the key")
    line = create_node_key(site.private_key, site.public_key, comment=name)
    site.dir.chmod(0o700)
    site.save_config({"site": name})
    if args.invite:
        _import_invite(site, Path(args.invite))
    print(f"Created site '{name}' in {site.dir}")
    print(f"  private key {site.private_key} (mode 0600: it never leaves this machine)")
    print(f"  public key  {site.public_key}  ({fingerprint(line)})")
    print(f"Send {site.public_key} to the coordinator (it is not secret); they run:\n"
          f"  candor-server add-site FEDERATION_DIR {name} node.pub")
    print(line)
    return 0


def cmd_new_key(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    name = site.config()["site"]
    retired = site.dir / "keys" / "retired" / time.strftime("%Y%m%d-%H%M%S")
    retired.mkdir(parents=True, mode=0o700)
    for path in (site.private_key, site.public_key):
        if path.exists():
            path.rename(retired / path.name)
    line = create_node_key(site.private_key, site.public_key, comment=name)
    print(f"New key for site '{name}': {site.public_key} ({fingerprint(line)}); the old one is in {retired}.")
    print("The ledger is untouched. Send the new node.pub to the coordinator (`candor-server add-site`).")
    return 0


def _import_invite(site: SiteDir, path: Path) -> dict[str, Any]:
    try:
        doc = tomllib.loads(path.read_text())["candor-invite"]
        version = int(doc["version"])
        ca_pem, schema_text, server = str(doc["ca-certificate"]), str(doc["schema"]), str(doc["server"])
    except FileNotFoundError:
        raise CandorError(f"invite file {path} not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as err:
        raise CandorError(f"{path} is not a Candor invite ({err}); ask the coordinator for the file "
                          "written by `candor-server invite`") from None
    if version != INVITE_VERSION:
        raise CandorError(f"{path} is a version-{version} invite; this candor-client reads version {INVITE_VERSION}")
    config = site.config()
    if doc.get("site") and doc["site"] != config["site"]:
        raise CandorError(f"{path} invites site '{doc['site']}' but {site.dir} is site '{config['site']}'; "
                          "use the invite made for this site")
    if "BEGIN CERTIFICATE" not in ca_pem:
        raise CandorError(f"{path}: the 'ca-certificate' entry is not a PEM certificate")
    schema = Schema.from_dict(tomllib.loads(schema_text), source=f"{path} (schema)")
    if doc.get("schema-sha256") and schema.sha256() != doc["schema-sha256"]:
        raise CandorError(f"{path}: the schema does not match its own fingerprint; the file was altered: "
                          "ask the coordinator for a fresh invite")
    write_atomic(site.ca_cert, ca_pem)
    schema.save(site.schema_path)
    config.update({"federation": str(doc.get("federation", "")), "server": server,
                   "min-rows": int(doc.get("min-rows", 20)), "schema-sha256": schema.sha256()})
    site.save_config(config)
    print(f"Joined federation '{config['federation']}' (server {server}); schema sha256 {schema.sha256()[:12]}: "
          "confirm this fingerprint with the coordinator.")
    return config


# --- start ------------------------------------------------------------------------------

def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise CandorError(f"the server address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


def check_server(address: str, ca_cert: Path, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Open a TLS connection to the server, verifying it against the federation's CA.

    Raises:
        CandorError: one line for each failure a site can meet: unreachable server,
            a certificate from another CA, or a certificate without this host name.
    """
    host, port = _split_address(address)
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        if "match" in str(err.verify_message) or "hostname" in str(err).lower():
            raise CandorError(f"the server's certificate is not valid for '{host}' ({err.verify_message}): dial a "
                              "name the coordinator gave (--server HOST:PORT) or ask for a certificate with this "
                              "name (`candor-server init --host`)") from None
        raise CandorError(f"the server at {address} presented a certificate that the federation's CA "
                          f"({ca_cert}) did not sign ({err.verify_message}): this invite belongs to another "
                          "federation, or someone is intercepting the connection; ask the coordinator for "
                          "a fresh invite") from None
    except ssl.SSLError as err:
        raise CandorError(f"TLS with the server at {address} failed ({err.reason or err}); is that port the "
                          "Candor server's?") from None
    except socket.gaierror:
        raise CandorError(f"cannot resolve the server's host name '{host}'; check the address "
                          f"({address}) or the machine's DNS") from None
    except (ConnectionRefusedError, TimeoutError, OSError) as err:
        reason = "connection refused" if isinstance(err, ConnectionRefusedError) else (
            "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err)))
        raise CandorError(f"cannot reach the Candor server at {address} ({reason}): is `candor-server start` "
                          "running there, and is the port open to this machine?") from None


def _update_budget(site: SiteDir, args: argparse.Namespace) -> dict[str, float]:
    budget = site.budget()
    changed = False
    if args.budget_epsilon is not None:
        if not args.budget_epsilon > 0:
            raise CandorError(f"--budget-epsilon must be a number > 0 (the lifetime ε this site allows); "
                              f"got {args.budget_epsilon}")
        changed |= budget.get("epsilon") != args.budget_epsilon
        budget["epsilon"] = float(args.budget_epsilon)
    if args.budget_delta is not None:
        if not 0 < args.budget_delta < 1:
            raise CandorError(f"--budget-delta must be in (0, 1); got {args.budget_delta}")
        changed |= budget.get("delta") != args.budget_delta
        budget["delta"] = float(args.budget_delta)
    if changed:
        write_atomic(site.budget_path, "# This site's lifetime privacy budget (its own setting).\n"
                     + tomli_w.dumps(budget))
    return budget


def _node_config(site: SiteDir, name: str, data: Path, test: Path | None, budget: dict[str, float],
                 *, explain_opt_out: bool = False) -> Path:
    config: dict[str, Any] = {
        "site-name": name,
        "data-path": str(data),
        "schema-path": str(site.schema_path),
        "site-dir": str(site.dir),
    }
    if test is not None:
        config["test-path"] = str(test)
    if "epsilon" in budget:
        config["budget-epsilon"] = float(budget["epsilon"])
    if "delta" in budget:
        config["budget-delta"] = float(budget["delta"])
    if explain_opt_out:
        config["explain-opt-out"] = True
    path = site.dir / "node_config.toml"
    write_atomic(path, tomli_w.dumps(config))  # a file: paths with spaces or quotes stay intact
    return path


def cmd_start(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    config = site.config()
    name = str(config["site"])
    if args.invite:
        config = _import_invite(site, Path(args.invite))
    if "server" not in config or not site.ca_cert.exists() or not site.schema_path.exists():
        raise CandorError(f"site '{name}' has not joined a federation yet: pass the coordinator's invite once, "
                          f"`candor-client start {site.dir} --invite FILE --data PATH`")
    server = args.server or str(config["server"])
    budget = _update_budget(site, args)
    if args.explain_opt_out is not None and args.explain_opt_out != config.get("explain-opt-out", False):
        config["explain-opt-out"] = args.explain_opt_out
        site.save_config(config)
    explain_opt_out = bool(config.get("explain-opt-out", False))

    from candor.common.privacy import epsilon
    from candor.common.validation import load_table

    from .ledger import Ledger

    # 1. The data, against the federation's schema: any problem stops here.
    schema = Schema.load(site.schema_path)
    data = Path(args.data).expanduser().resolve()
    test = Path(args.test).expanduser().resolve() if args.test else None
    rows = len(load_table(data, schema, min_rows=int(config.get("min-rows", 20))))
    if test is not None:
        load_table(test, schema, min_rows=1)
    print(f"Data OK: {data} has {rows} usable rows for schema {schema.sha256()[:12]}.")
    ledger = Ledger(site.ledger_path, site=name)
    spent = ledger.history()
    if "epsilon" in budget:
        delta = budget.get("delta") or min((e.delta for e in ledger.entries()), default=1e-5)
        used = epsilon(spent, delta=delta, accountant="prv")
        print(f"Privacy budget: lifetime ε ≤ {budget['epsilon']:g}" +
              (f" at δ = {budget['delta']:g}" if "delta" in budget else " (at each run's δ)") +
              f"; spent so far ε = {used:.3f} over {len(spent)} rounds.")
        if used >= budget["epsilon"]:
            print("The budget is spent: this site will refuse every private training round.")
    else:
        print("Privacy budget: none set (each run's target applies); set one with --budget-epsilon E.")

    # 2. The key and the server, before Flower starts.
    load_private_key(site.private_key)
    check_server(server, site.ca_cert)
    print(f"Server {server} reached over TLS; certificate verified against {site.ca_cert}.")

    # 3. Flower's SuperNode.
    node_config = _node_config(site, name, data, test, budget, explain_opt_out=explain_opt_out)
    if explain_opt_out:
        print("This site sends no feature importances (explain opt-out, kept in site.toml).")
    cmd = [
        flower_bin("flower-supernode"),
        "--superlink", server,
        "--root-certificates", str(site.ca_cert),
        "--auth-supernode-private-key", str(site.private_key),
        "--node-config", str(node_config),
        "--isolation", "subprocess",
        # the SuperNode's local Runtime API for its ClientApp processes: loopback, own port
        "--host", "127.0.0.1", "--port", str(args.runtime_port or free_port()),
    ]
    site.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = flower_env(site.dir / "flwr")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_SECONDS)
    return _supervise(cmd, env, site, name, verbose=args.verbose)


class _Stop(Exception):
    pass


def _supervise(cmd: list[str], env: dict[str, str], site: SiteDir, name: str, *, verbose: bool) -> int:
    """Run the SuperNode in this process group; log everything; turn known failures into one line.

    The SuperNode's children (SuperExec, ClientApp processes) share its output pipe and
    exit when they see it gone, which they only do once it is reaped: so this loop
    waits on the process, not on the end of the pipe.
    """
    failure: str | None = None
    connected = False
    stopping = False

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop()

    previous = signal.signal(signal.SIGTERM, on_term)
    lines: queue.Queue[str | None] = queue.Queue()
    with open(site.log_path, "a") as log:
        log.write(f"\n=== candor-client start {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=site.dir,
                                preexec_fn=_die_with_parent)
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    raw = lines.get(timeout=0.2)
                except queue.Empty:
                    if proc.poll() is not None:  # reaped: now its children see it gone and exit
                        reader.join(timeout=15)
                        if lines.empty():
                            break
                    continue
                if raw is None:
                    break
                log.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {raw}")
                log.flush()
                line = raw.strip()
                if "SuperNode ID:" in line and not connected:
                    connected = True
                    print(f"Site '{name}' connected as node {line.rsplit(':', 1)[1].strip()}; waiting for "
                          "training requests (Ctrl-C to stop).", flush=True)
                elif "Failed to activate SuperNode" in line or "code: 2004" in line:
                    failure = (f"the server refused this site's key ({site.public_key}): the coordinator has not "
                               f"registered it yet (`candor-server add-site DIR {name} node.pub`) or has removed "
                               "this site")
                elif "CERTIFICATE_VERIFY_FAILED" in line:
                    failure = (f"the server's certificate was not signed by the federation's CA ({site.ca_cert}): "
                               "ask the coordinator for a fresh invite")
                elif "Receiving:" in line or "refuses round" in line or "ERROR" in line or verbose:
                    print(_short(line), flush=True)
            proc.wait()
        except (KeyboardInterrupt, _Stop):
            stopping = True
        finally:
            signal.signal(signal.SIGTERM, previous)
            _stop_child(proc)
    if stopping:
        print(f"Site '{name}' stopped.")
        return 0
    if failure:
        raise CandorError(failure)
    if connected and proc.returncode == 0:
        raise CandorError(f"the SuperNode stopped (the coordinator may have removed site '{name}'); "
                          f"its log is {site.log_path}")
    raise CandorError(f"the SuperNode exited with code {proc.returncode}: {_last_error(site.log_path)} "
                      f"(full log: {site.log_path})")


def _pump(stream, lines: queue.Queue) -> None:
    for raw in stream:
        lines.put(raw)
    lines.put(None)


def _die_with_parent() -> None:
    """In the SuperNode, before exec: get SIGTERM if `candor-client` dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _short(line: str) -> str:
    """A log line without Flower's coloured level prefix ("INFO :      ")."""
    return re.sub(r"^(\x1b\[[0-9;]*m)?[A-Z]+\s*(\x1b\[0m)?\s*:\s*", "", line)


def _stop_child(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the SuperNode (its SuperExec and ClientApp processes watch its pid), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _last_error(path: Path) -> str:
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return "no output"
    errors = [l for l in lines if "ERROR" in l or "rror" in l]
    return (errors or lines or ["no output"])[-1]


# --- ledger -------------------------------------------------------------------------------

def cmd_ledger(args: argparse.Namespace) -> int:
    from candor.common.privacy import PRIVACY_UNIT_LONG, epsilon

    from .ledger import Ledger

    site = SiteDir(Path(args.dir).resolve())
    name = str(site.config()["site"])
    ledger = Ledger(site.ledger_path, site=name)
    entries = ledger.entries()
    budget = site.budget()
    accountant = args.accountant
    runs: dict[str, list] = {}
    for e in entries:
        runs.setdefault(e.mechanism.run_id, []).append(e)
    delta = args.delta or budget.get("delta") or min((e.delta for e in entries), default=1e-5)
    total = epsilon([e.mechanism for e in entries], delta=delta, accountant=accountant)
    per_run = []
    for run_id, items in runs.items():
        run_delta = items[-1].delta
        per_run.append({
            "run_id": run_id, "rounds": len(items), "steps": sum(e.mechanism.steps for e in items),
            "delta": run_delta, "first": items[0].time, "last": items[-1].time,
            "epsilon": epsilon([e.mechanism for e in items], delta=run_delta, accountant=items[-1].accountant),
            "accountant": items[-1].accountant,
        })
    doc = {"site": name, "ledger": str(site.ledger_path), "privacy_unit": PRIVACY_UNIT_LONG,
           "runs": per_run, "rounds": len(entries),
           "total": {"epsilon": total, "delta": delta, "accountant": accountant},
           "budget": budget or None}
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"Site '{name}': privacy ledger {site.ledger_path} ({len(entries)} rounds in {len(runs)} runs)")
    print(f"Privacy unit: {PRIVACY_UNIT_LONG}. ε recomputed from the recorded mechanisms.")
    if per_run:
        print(f"  {'run':<22} {'rounds':>6} {'steps':>7} {'δ':>9} {'ε (run)':>9}  last round")
        for r in per_run:
            print(f"  {r['run_id'] or '-':<22} {r['rounds']:>6} {r['steps']:>7} {r['delta']:>9.2g} "
                  f"{r['epsilon']:>9.3f}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(r['last']))}")
    print(f"Lifetime total: ε = {total:.3f} at δ = {delta:g} ({accountant.upper()}, all rounds of all runs composed)")
    if "epsilon" in budget:
        print(f"Budget: ε ≤ {budget['epsilon']:g}: {100 * total / budget['epsilon']:.0f}% spent, "
              f"{max(budget['epsilon'] - total, 0):.3f} left")
    return 0


# --- registration ---------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("init", help="create this site's directory and node key pair")
    p.add_argument("dir")
    p.add_argument("--site-name", required=True, help="this institution's name in the federation")
    p.add_argument("--invite", help="the coordinator's invite file (can also be given to `start`)")
    p.set_defaults(func=cmd_init)

    p = subparsers.add_parser("new-key", help="replace this site's node key (the ledger is kept)")
    p.add_argument("dir")
    p.set_defaults(func=cmd_new_key)

    p = subparsers.add_parser("start", help="validate the data, then join the federation (Flower SuperNode)")
    p.add_argument("dir")
    p.add_argument("--data", required=True, help="this site's CSV or Parquet file")
    p.add_argument("--test", help="optional held-out test file (default: a split of --data)")
    p.add_argument("--invite", help="the coordinator's invite file (needed once)")
    p.add_argument("--server", help="HOST:PORT of the server (default: from the invite)")
    p.add_argument("--budget-epsilon", type=float, metavar="E",
                   help="lifetime ε this site allows over all runs (kept in SITE_DIR/budget.toml)")
    p.add_argument("--budget-delta", type=float, metavar="D",
                   help="δ of the lifetime budget (default: each run's δ)")
    p.add_argument("--explain-opt-out", dest="explain_opt_out", action="store_const", const=True,
                   help="send nothing for the federated explanation of the final model (kept in site.toml)")
    p.add_argument("--explain-opt-in", dest="explain_opt_out", action="store_const", const=False,
                   help="undo --explain-opt-out")
    p.add_argument("--runtime-port", type=int, help="local port of the SuperNode's Runtime API (default: a free one)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every line of the SuperNode's log")
    p.set_defaults(func=cmd_start)

    p = subparsers.add_parser("ledger", help="what this site has spent, per run and in total")
    p.add_argument("dir")
    p.add_argument("--delta", type=float, help="δ for the lifetime total (default: the budget's, else the smallest recorded)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="prv")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ledger)
