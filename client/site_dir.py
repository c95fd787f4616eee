"""The site directory (``SITE_DIR``): everything an institution keeps, in one place.

Layout::

    site.toml          site name; from the invite: federation, server address, min-rows,
                       the accepted schema's sha256; [limits]: what a run may ask of the
                       site (candor-client start --max-rounds ...; common.policy.SiteLimits)
    keys/node.key      the node's private key (0600; never leaves this machine)
    keys/node.pub      its public key: send this file to the coordinator
    keys/retired/      keys replaced by `candor-client new-key`
    federation/        ca.crt and schema.toml, from the coordinator's invite
    budget.toml        the site's lifetime privacy budget (its own setting; client.budget; 0600)
    ledger.json        every private round this site ever trained (client.ledger; 0600)
    receipts.jsonl     what the site received and sent, per message (client.receipts)
    approved_apps.json apps the site approved beyond its installed release (client.approval; 0600)
    superexec.secret   the SuperNode/SuperExec secret (0600, rewritten at each start)
    node_config.toml   what the SuperNode passes to the ClientApp (rewritten each start)
    flwr/              the SuperNode's FLWR_HOME
    logs/supernode.log everything the SuperNode and the ClientApp printed
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from candor.common.atomic import write_atomic
from candor.common.errors import SiteError
from candor.common.invite import Invite

__all__ = ["SiteDir"]


@dataclass(frozen=True)
class SiteDir:
    """Paths of one site directory, and its ``site.toml``."""

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
    def retired_keys(self) -> Path:
        return self.dir / "keys" / "retired"

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
    def node_config_path(self) -> Path:
        return self.dir / "node_config.toml"

    @property
    def flwr_home(self) -> Path:
        return self.dir / "flwr"

    @property
    def log_path(self) -> Path:
        return self.dir / "logs" / "supernode.log"

    def config(self) -> dict[str, Any]:
        """``site.toml`` as a dict; it always holds the site's name under ``site``.

        Raises:
            SiteError: no site.toml (not a site directory), or it is unreadable.
        """
        try:
            config = tomllib.loads(self.config_path.read_text())
        except FileNotFoundError:
            raise SiteError(f"{self.dir} is not a Candor site directory (no site.toml); "
                            "create it with `candor-client init DIR --site-name NAME`") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise SiteError(f"{self.config_path} is unreadable ({err}); fix the file, or create a new site "
                            "directory with `candor-client init`") from None
        if not isinstance(config.get("site"), str):
            raise SiteError(f"{self.config_path} names no site (the entry 'site = \"NAME\"' is missing); "
                            "add it back with the site's name")
        return config

    def save_config(self, config: dict[str, Any]) -> None:
        write_atomic(self.config_path, tomli_w.dumps(config))

    def join(self, invite: Invite, *, source: Path) -> dict[str, Any]:
        """Keep ``invite``'s CA certificate and schema here and its federation, server and
        min-rows in site.toml; returns the new site.toml.

        Raises:
            SiteError: the invite (read from ``source``) was made for another site.
        """
        config = self.config()
        if invite.site and invite.site != config["site"]:
            raise SiteError(f"{source} invites site '{invite.site}' but {self.dir} is site '{config['site']}'; "
                            "use the invite made for this site")
        write_atomic(self.ca_cert, invite.ca_certificate)
        invite.schema.save(self.schema_path)
        config.update({"federation": invite.federation, "server": invite.server,
                       "min-rows": invite.min_rows, "schema-sha256": invite.schema.sha256()})
        self.save_config(config)
        return config

    def joined(self, config: dict[str, Any]) -> bool:
        """True once an invite was imported (the server address, CA certificate and schema are here)."""
        return "server" in config and self.ca_cert.exists() and self.schema_path.exists()
