"""``candor-server rotate-certs``: a new server certificate, or a new CA, for a federation.

Three forms (:mod:`server.pki` does the certificates):

* ``rotate-certs DIR [--host H ...] [--cert-days N]``: a new server certificate and key
  from the same CA (the same hosts unless ``--host`` names others). Sites need nothing
  new: they trust the same CA.
* ``rotate-certs DIR --new-ca [--overlap-days D]``: a new CA beside the old one;
  ``pki/ca.crt`` and every invite in ``DIR/invites/`` then hold both, which each site
  imports (``candor-client start SITE_DIR --invite NEW_INVITE``) while the server keeps
  its certificate from the old CA.
* ``rotate-certs DIR --switch``: after the overlap, the server certificate from the new
  CA; the old CA is dropped (from ``pki/`` and the invites, rewritten again). Sites that
  imported the bundle accept the server before and after the switch.

A new certificate takes effect when the server restarts. If it runs and no run is in
progress, the command restarts it on the same host and port (``--no-restart``: never;
it prints the commands instead); while a run is in progress it leaves it running and
says what to run afterwards (``--switch`` then changes nothing: the coordinator's own
``flwr`` would stop trusting the running server). Nothing here touches a site's files,
the registry of sites, the control token or the SuperLink's database.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from candor.common.certificates import day
from candor.common.commands import add_command
from candor.common.errors import CandorError, ConfigError, FederationError
from candor.common.invite import Invite
from candor.common.processes import flwr_json

from . import superlink
from .federation import CONNECTION, Federation
from .federation_cmds import write_invite
from .pki import (
    DEFAULT_OVERLAP_DAYS, MAX_SERVER_DAYS, SERVER_DAYS, Issued, begin_ca_rotation, check_days,
    finish_ca_rotation, issue_server_certificate, subject_alt_names,
)
from .superlink_cmds import restart_hint

__all__ = ["register", "runs_in_progress"]

_ANY_INTERFACE = ("0.0.0.0", "::", "")


def runs_in_progress(fed: Federation) -> list[str]:
    """``RUN_ID (status)`` of every run of the running server that has not finished.

    Raises:
        FlwrCommandFailed: the runs cannot be listed.
    """
    runs = flwr_json(["ls", CONNECTION], env=superlink.env(fed))["runs"]
    return [f"{r['run-id']} ({r.get('status')})" for r in runs if not str(r.get("status", "")).startswith("finished")]


def _rewrite_invites(fed: Federation, sans: set[str], *, only_uncovered: bool = False) -> list[Path]:
    """Write registered sites' invites in ``DIR/invites/`` again, with ``pki/ca.crt`` as it
    is now. Each keeps the server address it named if the certificate covers its host
    (``sans``), else gets the federation's address; ``only_uncovered``: only the invites
    whose address the certificate no longer covers."""
    written = []
    for site in sorted(fed.sites):
        path = fed.invites_dir / f"{site}.toml"
        try:
            server = Invite.read(path).server if path.exists() else None
        except CandorError:
            server = None
        covered = server is not None and server.rpartition(":")[0].strip("[]").lower() in sans
        if only_uncovered and (server is None or covered):
            continue
        written.append(write_invite(fed, site, server=server if covered else None)[1])
    return written


def _san_strings(hosts: list[str]) -> set[str]:
    return {str(name.value) for name in subject_alt_names(hosts)}


def _issued_line(fed: Federation, issued: Issued, what: str) -> str:
    line = f"{what}: valid for {', '.join(issued.hosts)} until {day(issued.not_after)} "
    if not issued.capped:
        return line + f"({issued.days} days)"
    return line + (f"(not {issued.days} days: a certificate cannot outlive its CA, which ends then; start a CA "
                   f"rotation: `candor-server rotate-certs {fed.dir} --new-ca`)")


def _restart(fed: Federation, state: superlink.Running | None, *, allowed: bool, idle: bool = False) -> None:
    """Restart the running server if that is clean (no run in progress; ``idle``: checked
    already), else say how."""
    if state is None:
        print(f"The server is not running: `candor-server start {fed.dir}` uses the new certificate.")
        return
    if allowed:
        try:
            busy = [] if idle else runs_in_progress(fed)
        except CandorError as err:
            busy = [f"unknown: cannot list the runs ({err})"]
        if not busy:
            superlink.stop(fed)
            new = superlink.start(fed, host=state.host, port=state.port)
            for change in superlink.reconcile(fed):
                print(f"  {change}")
            print(f"Restarted the server (pid {state.pid} -> {new.pid}) on https://{new.host}:{new.port} with the "
                  "new certificate; connected sites reconnect by themselves.")
            return
        print(f"Not restarting the server (pid {state.pid}): run(s) in progress: {', '.join(busy)}.")
    print(f"The running server presents its previous certificate until it restarts; when no run is in progress: "
          f"{restart_hint(fed, state)}")


def _check_no_run_in_progress(fed: Federation, state: superlink.Running | None, *, no_restart: bool) -> None:
    """Refuse ``--switch`` on a running server that cannot be restarted now."""
    if state is None:
        return
    if no_restart:
        raise FederationError(f"--switch with --no-restart on a running server: once the CA changes, the "
                              f"coordinator's `flwr` trusts only the new one, and the server would still present the "
                              f"old CA's certificate. Stop it first (`candor-server stop {fed.dir}`), switch, then "
                              "start it; or switch without --no-restart")
    try:
        busy = runs_in_progress(fed)
    except CandorError as err:
        raise FederationError(f"cannot tell whether a run is in progress ({err}); nothing was changed: stop the "
                              f"server (`candor-server stop {fed.dir}`) and run the switch again") from None
    if busy:
        raise FederationError(f"run(s) in progress: {', '.join(busy)}; the switch restarts the server, which would "
                              f"end them. Nothing was changed: run `candor-server rotate-certs {fed.dir} --switch` "
                              "again when they have finished")


def cmd_rotate_certs(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    pki = fed.pki
    if args.new_ca and args.switch:
        raise ConfigError("--new-ca and --switch are the two steps of a CA rotation: run `rotate-certs DIR --new-ca`, "
                          "send the new invites, and after the overlap `rotate-certs DIR --switch`")
    if args.new_ca and (args.host or args.cert_days is not None):
        raise ConfigError("--new-ca issues no server certificate (the server keeps its current one until the switch): "
                          "give --host and --cert-days to `rotate-certs DIR --switch`, or to a plain `rotate-certs DIR`")
    hosts = list(dict.fromkeys(h.strip() for h in args.host or [] if h.strip())) or fed.hosts
    days = check_days(SERVER_DAYS if args.cert_days is None else args.cert_days)
    sans = _san_strings(hosts)  # validates the hosts before anything changes
    state = superlink.running(fed)
    if state is not None and state.host not in _ANY_INTERFACE and state.host not in sans:
        raise ConfigError(f"the server listens on {state.host}, which the new certificate would not name "
                          f"({', '.join(sorted(sans))}); add --host {state.host}, or restart the server on another "
                          "interface first")

    if args.new_ca:
        cert, rotation = begin_ca_rotation(pki, federation=fed.name, overlap_days=args.overlap_days)
        written = _rewrite_invites(fed, sans)
        print(f"Started a CA rotation: a new CA, valid until {day(cert.not_valid_after_utc)}, in {pki.next_dir}; "
              f"{pki.ca_cert} now holds both CA certificates (old first), and so does every invite from now on.")
        if written:
            print(f"Rewrote {len(written)} invite(s) in {fed.invites_dir}: {', '.join(p.name for p in written)}. Send "
                  "each site its new one; it runs `candor-client start SITE_DIR --invite NEW_INVITE --data ITS_DATA` "
                  "(its ledger and key are kept).")
        print(f"The server keeps its certificate from the old CA until the switch; after the overlap (on or after "
              f"{day(rotation.switch_after)}): candor-server rotate-certs {fed.dir} --switch")
        return 0

    if args.switch:
        _check_no_run_in_progress(fed, state, no_restart=args.no_restart)
        issued = finish_ca_rotation(pki, federation=fed.name, hosts=hosts, days=days)
        if hosts != fed.hosts:
            fed.set_hosts(hosts)
        written = _rewrite_invites(fed, sans)
        print(_issued_line(fed, issued, "Switched to the new CA: a server certificate signed by it")
              + f"; the old CA is dropped ({pki.ca_cert} holds only the new one; the old CA's key is deleted).")
        print(f"Rewrote {len(written)} invite(s) in {fed.invites_dir} (the new CA only). Sites that imported the "
              "two-CA invite keep connecting; any other must import its new invite.")
        # Checked before the switch: from now on the coordinator's flwr trusts only the new
        # CA, and the running server still presents the old CA's certificate.
        _restart(fed, state, allowed=True, idle=True)
        return 0

    issued = issue_server_certificate(pki, federation=fed.name, hosts=hosts, days=days)
    if hosts != fed.hosts:
        fed.set_hosts(hosts)
    print(_issued_line(fed, issued, "New server certificate from the same CA")
          + f"; {pki.server_cert} and {pki.server_key} (0600) replaced.")
    if stale := _rewrite_invites(fed, sans, only_uncovered=True):
        print(f"Rewrote {', '.join(p.name for p in stale)} in {fed.invites_dir}: the address they named is not in the "
              f"new certificate; they name {fed.address} now. Send them to their sites.")
    print(("Other sites" if stale else "Sites") + " need nothing new (same CA). No site's ledger or key, nor the "
          "registry or the control token, was touched.")
    _restart(fed, state, allowed=not args.no_restart)
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "rotate-certs", cmd_rotate_certs,
                    help="a new server certificate from the same CA (--new-ca / --switch: replace the CA)")
    p.add_argument("--host", action="append", metavar="NAME_OR_IP",
                   help="the hosts of the new server certificate (repeatable; default: the current ones; "
                        "127.0.0.1 and localhost are always included; the first goes into new invites)")
    p.add_argument("--cert-days", type=int, metavar="N",
                   help=f"the new server certificate's lifetime in days (default {SERVER_DAYS}, at most "
                        f"{MAX_SERVER_DAYS}, never beyond the CA's end)")
    p.add_argument("--new-ca", action="store_true",
                   help="start a CA rotation: a new CA, trusted beside the old one by every invite from now on")
    p.add_argument("--overlap-days", type=int, default=DEFAULT_OVERLAP_DAYS, metavar="D",
                   help=f"with --new-ca: days sites have to import the new invite before the switch "
                        f"(default {DEFAULT_OVERLAP_DAYS}; shown by `status`)")
    p.add_argument("--switch", action="store_true",
                   help="finish a CA rotation: the server certificate from the new CA; the old CA is dropped")
    p.add_argument("--no-restart", action="store_true",
                   help="never restart the running server (print the commands instead)")
