"""``candor-client start SITE_DIR --data PATH``: join the federation from a data holder.

``start`` validates the data first and refuses to start on any problem; it checks the
key and reaches the server over TLS (:mod:`client.preflight`) before it runs Flower's
SuperNode (:mod:`client.supernode`), so that a wrong CA, an unreadable key or a server
that is down each give one clear line. ``--budget-epsilon/--budget-delta`` set the site's
lifetime budget (:mod:`client.budget`), and ``--max-rounds``, ``--max-run-epsilon``,
``--max-grad-norm``, ``--max-batch-size``, ``--allow-non-private`` its limits on any run
(:class:`candor.common.policy.SiteLimits`), both kept in the site directory across
restarts; ``--data-loader`` and ``--allow-model-plugin`` name the only plug-in code the
site runs. A coordinator's run config can change none of these.

A server that cannot be reached yet (down, restarting, a link not up) is waited for,
with one line naming the address and the bound, retrying with backoff for up to
``--connect-timeout`` seconds (default 30; 0: one attempt), then a non-zero exit naming
the reason; a server that has just come up registers its sites' keys only after it
answers, so a refused key is then tried again within the same bound. Before Flower starts, the site's clock is compared with the server's (the
``Date`` of its HTTPS answer): Flower's node authentication refuses every request of a
site whose clock is more than 5 s ahead of the server's or 5 min behind it, and Flower
then only stops; ``start`` says so in one line instead.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import errno
import http.client
import socket
import ssl
import time
from pathlib import Path

from candor.common.commands import add_command, add_verbose_option
from candor.common.errors import ConfigError, ConnectionFailed, SiteError
from candor.common.schema import Schema

from .budget import SiteBudget
from .keys import load_private_key
from .preflight import CONNECT_TIMEOUT, check_server, split_address, trusted_cas
from .site import EVALUATION_MODES
from .site_cmds import import_invite
from .site_dir import SiteDir
from .supernode import KeyRefused, run_supernode, write_node_config

__all__ = ["CONNECT_WAIT_SECONDS", "check_clock", "clock_offset", "register", "wait_for_server"]

CONNECT_WAIT_SECONDS = 30.0  # --connect-timeout's default: how long start waits for a server it cannot reach
# (a server restart takes ~10 s; longer outages are the service manager's: Restart=on-failure)
RETRY_FIRST, RETRY_MAX = 1.0, 15.0  # seconds between attempts: 1, 2, 4, 8, 15, 15, ...
KEY_RETRY_SECONDS = 5.0  # between SuperNode starts while the server refuses the key (within --connect-timeout)
# Flower 1.42's node authentication (flwr.common.constant, flwr/superlink/routers/fleet/node_auth.py):
# a SuperNode's signed timestamp is accepted if the server's clock minus it lies strictly
# between -SYSTEM_TIME_TOLERANCE and TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE.
FLOWER_AHEAD_LIMIT = 5.0  # seconds a site's clock may be ahead of the server's
FLOWER_BEHIND_LIMIT = 305.0  # seconds it may be behind


def _unreachable_reason(err: OSError, timeout: float) -> str:
    if isinstance(err, socket.gaierror):
        return "its host name does not resolve"
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    if isinstance(err, TimeoutError):
        return f"no answer within {timeout:.0f} s"
    return {errno.EHOSTUNREACH: "no route to host", errno.ENETUNREACH: "network unreachable"}.get(
        err.errno, err.strerror or str(err))


def wait_for_server(address: str, *, timeout: float, attempt_timeout: float = CONNECT_TIMEOUT) -> bool:
    """Wait until the server's port at ``address`` accepts a TCP connection, retrying with
    backoff (1 s doubling to 15 s between attempts) for up to ``timeout`` seconds (0: one
    attempt). Prints one line when it starts waiting and one when the server answers.
    Returns True if it had to wait (the server has just come up).

    Raises:
        ConfigError: ``address`` is not HOST:PORT.
        ConnectionFailed: not reachable within ``timeout``; names the address, the last
            reason, the attempts and the bound.
    """
    host, port = split_address(address)
    began = time.monotonic()
    deadline = began + timeout
    delay, attempts, reason = RETRY_FIRST, 0, ""
    while True:
        attempts += 1
        per_attempt = max(1.0, min(attempt_timeout, deadline - time.monotonic()))
        try:
            with socket.create_connection((host, port), timeout=per_attempt):
                pass
        except OSError as err:
            reason = _unreachable_reason(err, per_attempt)
        else:
            if attempts > 1:
                print(f"Server {address} answered after {time.monotonic() - began:.0f} s ({attempts} attempts).",
                      flush=True)
            return attempts > 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waited = (f" within --connect-timeout {timeout:g} s ({attempts} attempts)" if timeout > 0 else "")
            raise ConnectionFailed(f"cannot reach the Candor server at {address} ({reason}){waited}: is "
                                   "`candor-server start` running there, and is the port open to this machine? "
                                   "Start again when it is, or wait longer with --connect-timeout SECONDS")
        if attempts == 1:
            print(f"Waiting for the Candor server at {address} ({reason}): retrying with backoff ("
                  f"{RETRY_FIRST:g} s doubling to {RETRY_MAX:g} s) for up to {timeout:g} s (--connect-timeout); "
                  "Ctrl-C to stop.", flush=True)
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, RETRY_MAX)


def clock_offset(address: str, ca_cert: Path, *, verify: bool = True,
                 timeout: float = CONNECT_TIMEOUT) -> tuple[float, float, str] | None:
    """How far this machine's clock is ahead of the server's (negative: behind), from the
    ``Date`` header of the server's ``/health`` answer: ``(seconds, uncertainty, the
    server's Date)``, or None if the server gives no date or cannot be asked.

    ``verify=False`` reads the date over TLS without verifying the server (only to name
    what is wrong when verification failed, e.g. because this clock is off by months)."""
    host, port = split_address(address)
    if verify:
        context = ssl.create_default_context(cafile=str(ca_cert))
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    try:
        sent = time.time()
        conn.request("GET", "/health")
        response = conn.getresponse()
        received = time.time()
        date = response.getheader("Date")
        response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    try:
        server = email.utils.parsedate_to_datetime(date).timestamp() + 0.5  # Date is truncated to the second
    except (TypeError, ValueError):
        return None
    return (sent + received) / 2 - server, 0.5 + (received - sent) / 2, str(date)


def _span(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def check_clock(address: str, offset: tuple[float, float, str] | None) -> str | None:
    """None if this site's clock is close enough to the server's for Flower's node
    authentication (or cannot be compared); else the one-line reason it is not."""
    if offset is None:
        return None
    seconds, uncertainty, date = offset
    if seconds - uncertainty < FLOWER_AHEAD_LIMIT and seconds + uncertainty > -FLOWER_BEHIND_LIMIT:
        return None
    local = dt.datetime.now(dt.timezone.utc)
    return (f"this machine's clock is {_span(seconds)} {'ahead of' if seconds > 0 else 'behind'} the server's "
            f"(the server at {address} says {date}; this machine says {local:%a, %d %b %Y %H:%M:%S} GMT): "
            f"Flower's node authentication refuses every request of a site whose clock is more than "
            f"{FLOWER_AHEAD_LIMIT:g} s ahead of the server's or {FLOWER_BEHIND_LIMIT / 60:g} min behind it. Set this "
            "machine's clock (NTP, e.g. `timedatectl set-ntp true`), or ask the coordinator whether the server's "
            "clock is wrong, and start again")


def _budget_lines(site: SiteDir, name: str, budget: SiteBudget) -> list[str]:
    """What ``start`` prints about the site's lifetime budget and what its ledger has
    spent: :func:`candor.common.policy.lifetime_spent`, the rule the ClientApp enforces."""
    if budget.epsilon is None:
        return ["Privacy budget: none set (each run's target applies); set one with --budget-epsilon E."]
    # common.policy and .ledger import opacus and pandas: imported here, not at the top.
    from candor.common.policy import lifetime_spent

    from .ledger import Ledger

    entries = Ledger(site.ledger_path, site=name).entries()
    spent = lifetime_spent([e.mechanism for e in entries], [e.delta for e in entries], budget)
    lines = [f"Privacy budget: lifetime ε ≤ {budget.epsilon:g} at δ = " +
             (f"{budget.delta:g}" if budget.delta else "the smallest δ of this site's runs") +
             f"; spent so far ε = {spent.epsilon:.3f} at δ = {spent.delta:g} ({spent.accountant.upper()}) "
             f"over {spent.rounds} rounds."]
    if spent.epsilon >= budget.epsilon:
        lines.append("The budget is spent: this site will refuse every private training round.")
    return lines


_LIMIT_OPTIONS = ("max_rounds", "max_run_epsilon", "max_grad_norm", "max_batch_size")


def _update_limits(site: SiteDir, config: dict, args: argparse.Namespace) -> dict:
    """The site's limits and plug-ins: site.toml's ``[limits]`` with this start's options
    applied (saved when they change). Returns the ``[limits]`` table."""
    limits = dict(config.get("limits", {}))
    for name in _LIMIT_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            limits[name.replace("_", "-")] = value
    if args.allow_non_private is not None:
        limits["allow-non-private"] = args.allow_non_private
    if args.data_loader is not None:
        limits["data-loader"] = args.data_loader
    if args.allow_model_plugin:
        limits["model-plugins"] = sorted(set(limits.get("model-plugins", [])) | set(args.allow_model_plugin))
    from candor.common.policy import SiteLimits

    SiteLimits(**{name: limits.get(name.replace("_", "-")) for name in _LIMIT_OPTIONS},
               allow_non_private=bool(limits.get("allow-non-private")))  # a bad value: one line, nothing saved
    if limits != config.get("limits", {}):
        config["limits"] = limits
        site.save_config(config)
    return limits


def _limits_line(limits: dict) -> str:
    shown = [f"{k} {limits[k]:g}" for k in ("max-rounds", "max-run-epsilon", "max-grad-norm", "max-batch-size")
             if limits.get(k)]
    private = ("non-private runs allowed (--allow-non-private)" if limits.get("allow-non-private")
               else "private runs only")
    plugins = ", ".join(limits.get("model-plugins", [])) or "none"
    return (f"Run limits (this site's own, in site.toml): {', '.join(shown) or 'no numeric limits'}; {private}; "
            f"data loader {limits.get('data-loader') or 'built-in CSV/Parquet'}; model plug-ins allowed: {plugins}.")


def cmd_start(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    config = site.config()
    name = str(config["site"])
    if args.invite:
        config = import_invite(site, Path(args.invite))
    if not site.joined(config):
        raise SiteError(f"site '{name}' has not joined a federation yet: pass the coordinator's invite once, "
                        f"`candor-client start {site.dir} --invite FILE --data PATH`")
    server = args.server or str(config["server"])
    if not args.connect_timeout >= 0:
        raise ConfigError(f"--connect-timeout must be 0 or more seconds; got {args.connect_timeout:g}")
    try:
        stored = SiteBudget.read(site.budget_path)
    except SiteError:
        if args.budget_epsilon is None:
            raise
        stored = SiteBudget()  # the unreadable budget file is replaced by the budget given now
    budget = stored.updated(epsilon=args.budget_epsilon, delta=args.budget_delta)
    if budget != stored:
        budget.write(site.budget_path)
    if args.explain_opt_out is not None and args.explain_opt_out != config.get("explain-opt-out", False):
        config["explain-opt-out"] = args.explain_opt_out
        site.save_config(config)
    explain_opt_out = bool(config.get("explain-opt-out", False))
    if args.evaluation is not None and args.evaluation != config.get("evaluation", "dp"):
        config["evaluation"] = args.evaluation
        site.save_config(config)
    evaluation = str(config.get("evaluation", "dp"))
    limits = _update_limits(site, config, args)

    from candor.common.validation import load_table  # imports pandas: only here

    # 1. The data, against the federation's schema: any problem stops here.
    schema = Schema.load(site.schema_path)
    data = Path(args.data).expanduser().resolve()
    test = Path(args.test).expanduser().resolve() if args.test else None
    rows = len(load_table(data, schema, min_rows=int(config.get("min-rows", 20))))
    if test is not None:
        load_table(test, schema, min_rows=1)
    print(f"Data OK: {data} has {rows} usable rows for schema {schema.sha256()[:12]}.")
    for line in _budget_lines(site, name, budget):
        print(line)

    # 2. The key and the server, before Flower starts.
    load_private_key(site.private_key)
    trusted_cas(site.ca_cert)  # a damaged CA file is one line now, not after waiting for the server
    deadline = time.monotonic() + args.connect_timeout
    came_up = wait_for_server(server, timeout=args.connect_timeout)
    try:
        check_server(server, site.ca_cert)
    except ConnectionFailed as err:
        # a certificate "expired" or "not valid yet" may be this machine's clock, not the certificate
        if (clock := check_clock(server, clock_offset(server, site.ca_cert, verify=False))) is not None:
            raise ConnectionFailed(f"{clock} (with this clock, TLS says: {err})") from None
        raise
    print(f"Server {server} reached over TLS; certificate verified against {site.ca_cert}.")
    if (clock := check_clock(server, clock_offset(server, site.ca_cert))) is not None:
        raise ConnectionFailed(clock)

    # 3. Flower's SuperNode.
    print(_limits_line(limits))
    node_config = write_node_config(site, name, data, test, budget, explain_opt_out=explain_opt_out,
                                    limits=limits, schema_sha256=str(config.get("schema-sha256", "")),
                                    evaluation=evaluation)
    if explain_opt_out:
        print("This site sends no feature importances (explain opt-out, kept in site.toml).")
    print({"dp": "Evaluation: a private release each round (noisy sums, in this site's ε).",
           "local": "Evaluation: kept at this site (its log); nothing is sent.",
           "clear": "Evaluation: sent IN THE CLEAR (exact metrics of the held-out rows, not covered by ε; "
                    "privacy.json and the model card say so)."}[evaluation])
    while True:
        try:
            return run_supernode(site, name, server=server, node_config=node_config, runtime_port=args.runtime_port,
                                 verbose=args.verbose)
        except KeyRefused:
            # a server that has just come up registers its sites' keys after it answers (`candor-server
            # start` reconciles its registry then): a refusal then may pass by itself
            remaining = deadline - time.monotonic()
            if not came_up or remaining <= 0:
                raise
            wait = min(KEY_RETRY_SECONDS, remaining)
            print(f"The server, which has just come up, refused this site's key (it may not have registered its "
                  f"sites yet); trying again in {wait:.0f} s, until "
                  f"{time.strftime('%H:%M:%S', time.localtime(time.time() + remaining))} (--connect-timeout).",
                  flush=True)
            time.sleep(wait)


def register(subparsers) -> None:
    p = add_command(subparsers, "start", cmd_start,
                    help="validate the data, then join the federation (Flower SuperNode)")
    p.add_argument("--data", required=True, help="this site's CSV or Parquet file")
    p.add_argument("--test", help="optional held-out test file (default: a split of --data)")
    p.add_argument("--invite", help="the coordinator's invite file (needed once)")
    p.add_argument("--server", help="HOST:PORT of the server (default: from the invite)")
    p.add_argument("--budget-epsilon", type=float, metavar="E",
                   help="lifetime ε this site allows over all runs (kept in SITE_DIR/budget.toml)")
    p.add_argument("--budget-delta", type=float, metavar="D",
                   help="δ of the lifetime budget (default: each run's δ)")
    p.add_argument("--evaluation", choices=EVALUATION_MODES, default=None,
                   help="what this site sends of each round's evaluation on its held-out rows: dp (a private "
                        "release, the default), local (nothing; metrics in its log) or clear (exact metrics, not "
                        "covered by ε); kept in site.toml")
    p.add_argument("--explain-opt-out", dest="explain_opt_out", action="store_const", const=True,
                   help="send nothing for the federated explanation of the final model (kept in site.toml)")
    p.add_argument("--explain-opt-in", dest="explain_opt_out", action="store_const", const=False,
                   help="undo --explain-opt-out")
    p.add_argument("--max-rounds", type=int, metavar="N", help="refuse any run of more than N rounds (kept in site.toml)")
    p.add_argument("--max-run-epsilon", type=float, metavar="E",
                   help="the most ε one run may cost this site, training and releases together (kept in site.toml)")
    p.add_argument("--max-grad-norm", type=float, metavar="C", help="refuse any run clipping at a norm above C")
    p.add_argument("--max-batch-size", type=int, metavar="B", help="refuse any run with an expected batch above B")
    p.add_argument("--allow-non-private", dest="allow_non_private", action="store_const", const=True,
                   help="let runs with dp=false train on this site's data (default: private runs only)")
    p.add_argument("--private-only", dest="allow_non_private", action="store_const", const=False,
                   help="undo --allow-non-private")
    p.add_argument("--data-loader", metavar="MODULE:FUNCTION",
                   help="this site's own plug-in data loader (docs/plugins.md); a run config cannot name one")
    p.add_argument("--allow-model-plugin", action="append", default=[], metavar="MODULE:FACTORY",
                   help="a plug-in model this site allows a run to use (repeatable)")
    p.add_argument("--connect-timeout", type=float, default=CONNECT_WAIT_SECONDS, metavar="SECONDS",
                   help="how long to wait for a server that cannot be reached yet, retrying with backoff "
                        f"(default {CONNECT_WAIT_SECONDS:g}; 0: one attempt)")
    p.add_argument("--runtime-port", type=int, help="local port of the SuperNode's Runtime API (default: a free one)")
    add_verbose_option(p, help="print every line of the SuperNode's log")
