"""``candor-client init`` and ``candor-client new-key``: create a site directory, replace its key.

``init`` creates the site directory (:mod:`client.site_dir`) and the node key pair
(:mod:`client.keys`), and imports the coordinator's invite if one is given;
``new-key`` retires the key (``keys/retired/STAMP/``) and makes a new one, keeping the
ledger.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


from candor.common.certificates import common_name
from candor.common.commands import add_command
from candor.common.errors import SiteError
from candor.common.invite import Invite
from candor.common.names import check_name
from candor.common.node_keys import fingerprint

from .keys import create_node_key
from .site_dir import SiteDir

__all__ = ["import_invite", "register"]


def import_invite(site: SiteDir, path: Path) -> dict:
    """Join the federation of the invite in ``path``: its files go into ``site``; returns site.toml.

    Raises:
        SiteError: the invite is unreadable, broken, or made for another site.
    """
    invite = Invite.read(path)
    before = site.ca_cert.read_text() if site.ca_cert.exists() else None
    config = site.join(invite, source=path)
    print(f"Joined federation '{config['federation']}' (server {config['server']}); schema sha256 "
          f"{config['schema-sha256'][:12]}: confirm this fingerprint with the coordinator.")
    cas = invite.ca_certificates()
    trusted = ", ".join(f"'{common_name(c)}' (until {c.not_valid_after_utc:%Y-%m-%d})" for c in cas)
    if len(cas) > 1:
        print(f"This site trusts {len(cas)} CA certificates, {trusted}: the coordinator is replacing the federation's "
              "CA, and the server is accepted before and after its switch to the new one.")
    elif before is not None and before != invite.ca_certificate:
        print(f"The federation's CA changed: this site now trusts only {trusted}. Its ledger and key are unchanged.")
    return config


def cmd_init(args: argparse.Namespace) -> int:
    site = SiteDir(Path(args.dir).resolve())
    name = check_name(args.site_name, where="--site-name")
    if site.config_path.exists():
        raise SiteError(f"{site.dir} is a site directory already (site '{site.config()['site']}'); "
                        "use another directory, or `candor-client new-key` to replace only the key")
    line = create_node_key(site.private_key, site.public_key, comment=name)
    site.dir.chmod(0o700)
    site.save_config({"site": name})
    if args.invite:
        import_invite(site, Path(args.invite))
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
    retired = site.retired_keys / time.strftime("%Y%m%d-%H%M%S")
    retired.mkdir(parents=True, mode=0o700)
    for path in (site.private_key, site.public_key):
        if path.exists():
            path.rename(retired / path.name)
    line = create_node_key(site.private_key, site.public_key, comment=name)
    print(f"New key for site '{name}': {site.public_key} ({fingerprint(line)}); the old one is in {retired}.")
    print("The ledger is untouched. Send the new node.pub to the coordinator (`candor-server add-site`).")
    return 0


def register(subparsers) -> None:
    p = add_command(subparsers, "init", cmd_init, help="create this site's directory and node key pair")
    p.add_argument("--site-name", required=True, help="this institution's name in the federation")
    p.add_argument("--invite", help="the coordinator's invite file (can also be given to `start`)")
    add_command(subparsers, "new-key", cmd_new_key, help="replace this site's node key (the ledger is kept)")
