"""The federation directory the coordinator keeps, and its registry of sites.

Layout of ``DIR`` (created by ``candor-server init``)::

    federation.toml   name, host names/IPs in the server certificate, port
    schema.toml       the federation's data contract (sha256 shown to every site)
    run_config.toml   the federation's run-config defaults (hyphenated keys)
    sites.json        registry: the institutions allowed to join, by name, with
                      their node public keys (Flower SuperNode authentication)
    pki/              ca.crt, ca.key (0600), server.crt, server.key (0600)
    flwr/             FLWR_HOME of the coordinator's `flwr` CLI: config.toml, and
                      credentials.yaml (0600) with the coordinator's control token
    state/            the SuperLink's database (runs, registered nodes);
                      control-token.sha256 (0600, the token's SHA-256, all the server
                      keeps of it) and superexec.secret (0600); see server.control_plane
    logs/             superlink.log
    runs/<stamp>/     one directory per training run (see docs/outputs.md)
    invites/          the files handed to sites (nothing secret)

The registry is the source of truth for who may join; ``candor-server start``
reconciles the SuperLink's registered nodes with it.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from candor.common.atomic import write_atomic, write_json_atomic
from candor.common.config import RunConfig
from candor.common.errors import ConfigError, FederationError
from candor.common.names import check_name
from candor.common.node_keys import fingerprint, read_public_key
from candor.common.schema import Schema

from . import control_plane
from .pki import SERVER_DAYS, ServerPKI, create_pki

__all__ = ["CONNECTION", "DEFAULT_PORT", "Federation", "SiteEntry"]

CONNECTION = "candor"  # the `flwr` CLI's name for this federation's SuperLink
DEFAULT_PORT = 9092


@dataclass
class SiteEntry:
    name: str
    public_key: str
    fingerprint: str
    added: str
    node_id: int | None = None  # the SuperLink's node id once registered there

    def to_dict(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "fingerprint": self.fingerprint, "added": self.added,
                "node_id": None if self.node_id is None else str(self.node_id)}


@dataclass
class Federation:
    dir: Path
    name: str
    hosts: list[str]
    port: int
    sites: dict[str, SiteEntry] = field(default_factory=dict)
    removed: dict[str, dict[str, Any]] = field(default_factory=dict)  # fingerprint -> {name, removed}

    # --- paths ------------------------------------------------------------------
    @property
    def pki(self) -> ServerPKI:
        return ServerPKI.in_dir(self.dir / "pki")

    @property
    def schema_path(self) -> Path:
        return self.dir / "schema.toml"

    @property
    def run_config_path(self) -> Path:
        return self.dir / "run_config.toml"

    @property
    def flwr_home(self) -> Path:
        return self.dir / "flwr"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def control_token_digest(self) -> Path:
        """The SHA-256 of the coordinator's control token (the server never holds the token)."""
        return self.state_dir / control_plane.TOKEN_DIGEST_FILE

    @property
    def superexec_secret(self) -> Path:
        return self.state_dir / control_plane.SUPEREXEC_SECRET_FILE

    @property
    def local_address(self) -> str:
        """Where this machine's `flwr` CLI reaches the server by default (127.0.0.1, the port)."""
        return f"127.0.0.1:{self.port}"

    @property
    def runs_dir(self) -> Path:
        return self.dir / "runs"

    @property
    def invites_dir(self) -> Path:
        return self.dir / "invites"

    @property
    def address(self) -> str:
        """Where sites dial: the first host given to ``init``, and the port."""
        host = self.hosts[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    # --- create / load ------------------------------------------------------------
    @classmethod
    def create(cls, directory: Path, *, name: str, hosts: list[str], port: int, schema: Path,
               run_config: dict[str, Any], cert_days: int = SERVER_DAYS) -> Federation:
        """Create the federation directory (refuses to touch an existing federation); the
        server certificate is valid for ``cert_days`` (the CA for ``pki.CA_DAYS``).

        Raises:
            ConfigError: bad name, host, port or certificate lifetime, or an invalid run config.
            SchemaError: the schema file is unreadable or breaks the format.
            FederationError: ``directory`` already holds a federation or other files.
        """
        check_name(name, where="the federation name")
        if not 1 <= port <= 65535:
            raise ConfigError(f"--port must be in 1-65535; got {port}. Give a free TCP port (default {DEFAULT_PORT})")
        directory = directory.resolve()
        if (directory / "federation.toml").exists():
            raise FederationError(f"{directory} holds a federation already; choose another directory")
        if directory.exists() and any(directory.iterdir()):
            raise FederationError(f"{directory} is not empty; `candor-server init` needs a new or empty directory")
        parsed = Schema.load(schema)
        RunConfig.from_run_config(run_config)  # validates the overrides
        hosts = list(dict.fromkeys(h.strip() for h in hosts if h.strip())) or ["127.0.0.1"]
        create_pki(directory / "pki", federation=name, hosts=hosts, server_days=cert_days)  # validates hosts first
        parsed.save(directory / "schema.toml")
        for sub in ("flwr", "state", "logs", "runs", "invites"):
            (directory / sub).mkdir(exist_ok=True)
        (directory / "state").chmod(0o700)
        (directory / "flwr").chmod(0o700)
        write_atomic(directory / "run_config.toml",
                     "# Run-config defaults of this federation (keys of [tool.flwr.app.config]);\n"
                     "# `candor-server run DIR -c key=value` overrides them for one run.\n"
                     + tomli_w.dumps(run_config))
        fed = cls(directory, name, hosts, port)
        # The closed control plane's secrets: the coordinator's token (its digest here,
        # the token in the coordinator's flwr CLI home) and the SuperExec secret.
        token = control_plane.new_token()
        control_plane.write_token_digest(fed.control_token_digest, token)
        control_plane.write_superexec_secret(fed.superexec_secret)
        control_plane.write_cli_config(fed.flwr_home, connection=CONNECTION, address=fed.local_address,
                                       ca_cert=fed.pki.ca_cert, token=token)
        write_atomic(directory / "federation.toml", tomli_w.dumps({
            "name": name, "hosts": hosts, "port": port, "created": _now()}))
        fed.save_registry()
        return fed

    @classmethod
    def load(cls, directory: Path) -> Federation:
        directory = Path(directory).resolve()
        meta_path = directory / "federation.toml"
        try:
            meta = tomllib.loads(meta_path.read_text())
            registry = json.loads((directory / "sites.json").read_text())
        except FileNotFoundError:
            raise FederationError(f"{directory} is not a Candor federation directory (no {meta_path.name} or "
                                  "sites.json); create one with `candor-server init`") from None
        except (OSError, ValueError) as err:
            raise FederationError(f"{directory}: the federation files are unreadable ({err}); restore them "
                                  "from a backup, or create a new federation with `candor-server init`") from None
        try:
            sites = {
                name: SiteEntry(name, e["public_key"], e["fingerprint"], e["added"],
                                int(e["node_id"]) if e.get("node_id") else None)
                for name, e in registry.get("sites", {}).items()
            }
            return cls(directory, meta["name"], list(meta["hosts"]), int(meta["port"]), sites,
                       dict(registry.get("removed", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise FederationError(f"{directory}: federation.toml or sites.json lacks or garbles an entry "
                                  f"({type(err).__name__}: {err}); restore them from a backup") from None

    def set_hosts(self, hosts: list[str]) -> None:
        """Record the hosts of a new server certificate in federation.toml (the first is
        the address invites name); the other entries are kept."""
        path = self.dir / "federation.toml"
        meta = tomllib.loads(path.read_text())
        meta["hosts"] = list(hosts)
        write_atomic(path, tomli_w.dumps(meta))
        self.hosts = list(hosts)

    def save_registry(self) -> None:
        write_json_atomic(self.dir / "sites.json", {
            "federation": self.name,
            "sites": {n: s.to_dict() for n, s in sorted(self.sites.items())},
            "removed": self.removed,
        })

    # --- registry -----------------------------------------------------------------
    def add_site(self, name: str, public_key_file: Path) -> SiteEntry:
        """Add a site to the registry (the SuperLink is told separately).

        Raises:
            ConfigError: the name breaks the naming rule.
            KeyFileError: the key file is unreadable or not a P-384 public key.
            FederationError: name or key already registered, or the key was removed before.
        """
        check_name(name, where="the site name")
        line = read_public_key(public_key_file)
        fp = fingerprint(line)
        if name in self.sites:
            raise FederationError(f"site '{name}' is registered already (key {self.sites[name].fingerprint}); "
                              f"to change its key: `candor-server remove-site {self.dir} {name}`, then add it again")
        for other in self.sites.values():
            if other.fingerprint == fp:
                raise FederationError(f"the key in {public_key_file} is registered already, as site '{other.name}'; "
                                  "every site needs its own key")
        if fp in self.removed:
            gone = self.removed[fp]
            raise FederationError(f"the key in {public_key_file} belonged to site '{gone['name']}', removed on "
                              f"{gone['removed']}; Flower never re-admits a removed key: the site must make a new "
                              "one (`candor-client new-key SITE_DIR`) and send its new node.pub")
        entry = SiteEntry(name, line, fp, _now())
        self.sites[name] = entry
        self.save_registry()
        return entry

    def remove_site(self, name: str) -> SiteEntry:
        if name not in self.sites:
            known = ", ".join(sorted(self.sites)) or "none"
            raise FederationError(f"no site named '{name}' in {self.dir / 'sites.json'} (registered: {known}); "
                                  f"`candor-server sites {self.dir}` lists them")
        entry = self.sites.pop(name)
        self.removed[entry.fingerprint] = {"name": name, "removed": _now(),
                                           "node_id": None if entry.node_id is None else str(entry.node_id)}
        self.save_registry()
        return entry

    def site_by_node(self, node_id: int) -> str | None:
        return next((s.name for s in self.sites.values() if s.node_id == node_id), None)

    # --- run configuration --------------------------------------------------------
    def run_config_defaults(self) -> dict[str, Any]:
        try:
            return tomllib.loads(self.run_config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise FederationError(f"{self.run_config_path}: unreadable run configuration ({err}); fix the file "
                                  "(TOML, keys of [tool.flwr.app.config])") from None

    def schema(self) -> Schema:
        return Schema.load(self.schema_path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
