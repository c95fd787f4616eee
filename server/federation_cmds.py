"""``candor-server init | add-site | remove-site | sites | invite``: the federation and its sites.

``init`` creates the federation directory (:mod:`server.federation`: CA and server
certificate, schema, run-config defaults, registry); ``add-site``/``remove-site`` change
the registry and, if the server runs, its registered nodes at once; ``invite`` writes the
file a site joins with (:class:`common.invite.Invite`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from candor.common.certificates import day
from candor.common.commands import add_command, add_config_option
from candor.common.config import RunConfig, merge_overrides
from candor.common.errors import FederationError
from candor.common.invite import Invite

from . import superlink
from .federation import DEFAULT_PORT, Federation
from .pki import CA_DAYS, MAX_SERVER_DAYS, SERVER_DAYS, lifetime_report

__all__ = ["register", "write_invite"]


def cmd_init(args: argparse.Namespace) -> int:
    fed = Federation.create(Path(args.dir), name=args.name, hosts=args.host or ["127.0.0.1"], port=args.port,
                            schema=Path(args.schema), run_config=merge_overrides(args.config),
                            cert_days=args.cert_days)
    (ca, server), _ = lifetime_report(fed.pki)
    print(f"Created federation '{fed.name}' in {fed.dir}")
    print(f"  CA certificate   {fed.pki.ca_cert}  (sites get it in their invite); valid until {day(ca.not_after)} "
          f"({CA_DAYS} days)")
    print(f"  server cert      valid for {server.name}; sites dial {fed.address}; valid until "
          f"{day(server.not_after)} ({args.cert_days} days; renew with `candor-server rotate-certs {fed.dir}`)")
    print(f"  schema           {fed.schema_path} (sha256 {fed.schema().sha256()[:12]})")
    print(f"  run config       {fed.run_config_path}")
    print(f"  control token    {fed.flwr_home / 'credentials.yaml'} (0600; opens the server to `flwr`: never send it)")
    print("Next: for each institution, `candor-server add-site DIR NAME node.pub` with the public key it sends you,\n"
          f"then `candor-server invite DIR NAME` and `candor-server start {fed.dir}`.")
    return 0


def cmd_add_site(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    entry = fed.add_site(args.site, Path(args.public_key))
    print(f"Added site '{entry.name}' (key {entry.fingerprint}).")
    if superlink.running(fed):
        node_id = superlink.register(fed, entry.name)
        print(f"Registered with the running server as node {node_id}: the site can connect now.")
    else:
        print("The server is not running; the site is registered with it at the next `candor-server start`.")
    print(f"Send the site its invite: `candor-server invite {fed.dir} {entry.name}`.")
    return 0


def cmd_remove_site(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    entry = fed.remove_site(args.site)
    if superlink.running(fed) and entry.node_id is not None:
        superlink.unregister(fed, entry.node_id)
        print(f"Removed site '{entry.name}': its node {entry.node_id} is unregistered and disconnected now.")
    else:
        print(f"Removed site '{entry.name}' from the registry; the server drops it at the next start.")
    print("Its key can never join again; the site keeps its ledger and may rejoin only with a new key.")
    return 0


def cmd_sites(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    if not fed.sites:
        print(f"No sites registered in {fed.dir}. Add one with `candor-server add-site DIR NAME node.pub`.")
        return 0
    print(f"{'site':<24} {'node id':<22} {'added':<26} key")
    for name, e in sorted(fed.sites.items()):
        print(f"{name:<24} {str(e.node_id or '-'):<22} {e.added:<26} {e.fingerprint}")
    return 0


def cmd_invite(args: argparse.Namespace) -> int:
    fed = Federation.load(Path(args.dir))
    out = Path(args.output) if args.output else None
    invite, out = write_invite(fed, args.site, server=args.server, output=out)
    cas = invite.ca_certificate.count("BEGIN CERTIFICATE")
    print(f"Wrote {out}\n  server {invite.server}, schema sha256 {invite.schema.sha256()[:12]}, "
          + ("CA certificate" if cas == 1 else f"{cas} CA certificates (a CA rotation is under way: old and new)")
          + " (public). Nothing secret: send it by any channel,\n  and confirm the schema "
          "fingerprint with the site by another one.")
    print(f"The site runs: candor-client start SITE_DIR --invite {out.name} --data ITS_DATA.csv")
    return 0


def write_invite(fed: Federation, site: str, *, server: str | None = None,
                 output: Path | None = None) -> tuple[Invite, Path]:
    """Write site ``site``'s invite (default ``DIR/invites/SITE.toml``) with the CA
    certificate(s) of ``pki/ca.crt``; returns it and where it went.

    Raises:
        FederationError: the site is not registered.
    """
    if site not in fed.sites:
        raise FederationError(f"site '{site}' is not registered; add it first: "
                              f"`candor-server add-site {fed.dir} {site} node.pub`")
    invite = Invite(federation=fed.name, site=site, server=server or fed.address,
                    min_rows=RunConfig.from_run_config(fed.run_config_defaults()).min_rows,
                    schema=fed.schema(), ca_certificate=fed.pki.ca_cert.read_text())
    out = output or fed.invites_dir / f"{site}.toml"
    invite.write(out)
    return invite, out


def register(subparsers) -> None:
    p = add_command(subparsers, "init", cmd_init,
                    help="create a federation directory (CA, server certificate, schema, registry)")
    p.add_argument("--name", required=True, help="the federation's name")
    p.add_argument("--host", action="append", metavar="NAME_OR_IP",
                   help="a host name or IP address sites use to reach the server (repeatable; "
                        "127.0.0.1 is always included; the first is written into invites)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the server's port (default {DEFAULT_PORT})")
    p.add_argument("--schema", required=True, help="the federation's schema file (.toml/.json)")
    p.add_argument("--cert-days", type=int, default=SERVER_DAYS, metavar="N",
                   help=f"the server certificate's lifetime in days (default {SERVER_DAYS}, at most "
                        f"{MAX_SERVER_DAYS}; the CA's is {CA_DAYS}); renew it with `candor-server rotate-certs`")
    add_config_option(p, help="a run-config default for this federation (repeatable)")

    add_command(subparsers, "add-site", cmd_add_site, help="allow an institution to join, by its public key",
                positionals=("dir", "site", ("public_key", "the site's node.pub (from `candor-client init`)")))
    add_command(subparsers, "remove-site", cmd_remove_site, help="revoke a site (disconnects it if the server runs)",
                positionals=("dir", "site"))
    add_command(subparsers, "sites", cmd_sites, help="list the registered sites")
    p = add_command(subparsers, "invite", cmd_invite,
                    help="write the file to hand a site (CA certificate, address, schema)", positionals=("dir", "site"))
    p.add_argument("-o", "--output", help="where to write it (default DIR/invites/SITE.toml)")
    p.add_argument("--server", help="HOST:PORT the site should dial (default: the first --host of init)")
