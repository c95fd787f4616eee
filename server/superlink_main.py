"""``python -m candor.server.superlink_main``: Flower's SuperLink with its control plane closed.

Usage (what :func:`server.superlink.start` runs)::

    python -m candor.server.superlink_main --control-token-sha256 DIGEST_FILE \\
        --superexec-auth-secret-file SECRET_FILE -- FLOWER_SUPERLINK_ARGS...

Flower 1.42 serves its Control API (``flwr run/ls/stop/log/supernode ...``) and its
Runtime API on the federation port, and open-source Flower's Control API authentication
is a no-op: anyone who can reach the port with the CA certificate (every site has it)
could list runs, submit an app of their own (its ServerApp runs here, its ClientApp at
every site), register nodes, or claim a run's ServerApp task. Flower has no hook to plug
an authentication plugin in, so this launcher builds the SuperLink exactly as
``flower-superlink`` does, with two changes:

1. **Control API**: Flower's own argument parsing and start-up configuration
   (``flower_superlink._parse_superlink_lifespan_config``) are used unchanged, then its
   no-op plugin (asserted to be that: this fails loudly if Flower changes) is replaced by
   :class:`CoordinatorTokenAuthn`, which admits exactly the bearer token whose SHA-256 is
   in ``DIGEST_FILE``; Flower's ``ControlAuthenticationMiddleware`` asks it for every
   ``/v1/control/*`` route except the three login routes, which get nothing from it.
   The SuperLink is then run by Flower's own ``_run_superlink_http_api`` (FastAPI app,
   uvicorn, TLS).
2. **Runtime API**: the SuperLink runs with ``--isolation process
   --superexec-auth-secret-file SECRET_FILE``, so that claiming a ServerApp task needs
   the secret, and this launcher starts Flower's own ``flower-superexec`` with the same
   secret once ``/health`` answers. It runs in this process group (``candor-server stop``
   stops both), with ``--parent-pid`` (it exits when the SuperLink does); if it exits,
   the SuperLink stops too (no run could start).

Everything else (TLS files, ``--enable-supernode-auth``, host, port, database) is the
caller's Flower arguments, passed through.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from logging import ERROR, INFO
from pathlib import Path

from flwr.common.constant import ACCESS_TOKEN_KEY, ISOLATION_MODE_PROCESS, NOOP_FLWR_AID
from flwr.common.logger import log
from flwr.supercore.auth.typing import AccountAuthCredentials, AccountAuthLoginDetails, AccountInfo
from flwr.superlink.auth_plugin import ControlAuthnPlugin, NoOpControlAuthnPlugin

from candor.common.errors import CandorError, ConfigError
from candor.common.processes import flower_bin, superlink_healthy, wait_until

from .control_plane import read_secret, read_token_digest, token_matches

__all__ = ["ACCOUNT_NAME", "CoordinatorTokenAuthn", "FlowerChanged", "lifespan_config", "main", "superexec_command"]

# The module itself: `flwr.superlink.cli` re-exports the function `flower_superlink` under
# the module's name, so a plain import would give the function.
_FLOWER_SUPERLINK = importlib.import_module("flwr.superlink.cli.flower_superlink")

ACCOUNT_NAME = "candor-coordinator"
HEALTH_TIMEOUT = 120.0  # seconds for /health to answer before the SuperExec is started
# Flower arguments this launcher sets itself (or refuses): the Runtime API's protection
# and TLS must not be switched off by a caller.
_OWN_FLAGS = ("--isolation", "--superexec-auth-secret-file", "--insecure")
# Flower's switches (on when "1") that open its deprecated gRPC APIs on other ports, or
# load Flower Enterprise's login plugin instead of the no-op one.
_REFUSED_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API", "FLWR_OIDC_ENABLED")


class FlowerChanged(CandorError):
    """The installed Flower no longer builds its SuperLink the way this launcher relies on."""


class CoordinatorTokenAuthn(ControlAuthnPlugin):
    """Flower Control API authentication that admits exactly one bearer token.

    Flower's ``AccountAccessDependency`` passes ``[("flwr-oidc-access-token", X)]`` for a
    request carrying ``Authorization: Bearer X`` (and an empty list without one). The
    token is compared by its SHA-256 against the digest the server keeps, in constant
    time (:func:`hmac.compare_digest`). The account returned is Flower's no-op account
    (``NOOP_FLWR_AID``): Flower's open-source federation manager admits only that id,
    and it owns every run and node, including those in an existing database.

    There is no login flow and no token refresh: the token is made by
    ``candor-server init`` and lives in the coordinator's ``DIR/flwr/credentials.yaml``.
    """

    def __init__(self, token_sha256: bytes) -> None:  # pylint: disable=super-init-not-called
        if len(token_sha256) != 32:
            raise ValueError(f"CoordinatorTokenAuthn: a SHA-256 digest is 32 bytes; got {len(token_sha256)}")
        self._digest = token_sha256

    def get_login_details(self) -> AccountAuthLoginDetails | None:
        return None  # `flwr login` gets an empty answer: there is nothing to log in to

    def validate_tokens_in_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> tuple[bool, AccountInfo | None]:
        values = [value for key, value in metadata if key == ACCESS_TOKEN_KEY]
        if len(values) != 1 or not values[0] or not token_matches(values[0], self._digest):
            return False, None
        return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=ACCOUNT_NAME)

    def get_auth_tokens(self, device_code: str) -> AccountAuthCredentials | None:
        return None

    def refresh_tokens(self, metadata: Sequence[tuple[str, str | bytes]]
                       ) -> tuple[Sequence[tuple[str, str | bytes]] | None, AccountInfo | None]:
        return None, None  # Flower answers "Authentication plugin failed to refresh account tokens"


def _flower_function(name: str):
    fn = getattr(_FLOWER_SUPERLINK, name, None)
    if not callable(fn):
        raise FlowerChanged(f"flwr.superlink.cli.flower_superlink.{name} is gone in this Flower version; the "
                            "closed control plane cannot be built (see docs/architecture.md, Flower internals)")
    return fn


def lifespan_config(flower_args: Sequence[str], *, token_sha256: bytes, superexec_secret_file: Path):
    """Flower's SuperLink start-up configuration for ``flower_args``, as ``flower-superlink``
    would build it, with ``--isolation process --superexec-auth-secret-file FILE`` added
    and the Control API plugin replaced by :class:`CoordinatorTokenAuthn`.

    Raises:
        ConfigError: ``flower_args`` sets a flag the launcher owns.
        FlowerChanged: Flower's configuration is not what this launcher expects.
    """
    for flag in _OWN_FLAGS:
        if any(a == flag or a.startswith(flag + "=") for a in flower_args):
            raise ConfigError(f"superlink_main: {flag} is set by the launcher (process isolation with the SuperExec "
                              "secret, TLS always on); remove it from the SuperLink arguments")
    argv = ["flower-superlink", *flower_args, "--isolation", ISOLATION_MODE_PROCESS,
            "--superexec-auth-secret-file", str(superexec_secret_file)]
    parse = _flower_function("_parse_superlink_lifespan_config")
    saved, sys.argv = sys.argv, argv  # Flower's parser reads sys.argv
    try:
        config = parse()
    finally:
        sys.argv = saved
    fields = {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()
    if "authn_plugin" not in fields:
        raise FlowerChanged(f"Flower's SuperLink configuration ({type(config).__name__}) has no authn_plugin field")
    if type(config.authn_plugin) is not NoOpControlAuthnPlugin:
        raise FlowerChanged("Flower configured a Control API authentication plugin of its own "
                            f"({type(config.authn_plugin).__name__}); refusing to replace it")
    if config.isolation != ISOLATION_MODE_PROCESS or not config.superexec_auth_secret:
        raise FlowerChanged("Flower did not take --isolation process with the SuperExec secret "
                            f"(isolation {config.isolation!r}, secret {'set' if config.superexec_auth_secret else 'unset'})")
    if config.certificates is None or not config.ssl_ca_certfile:
        raise FlowerChanged("the SuperLink would run without TLS")
    return dataclasses.replace(config, authn_plugin=CoordinatorTokenAuthn(token_sha256))


def _local_address(host: str, port: int) -> str:
    """Where this machine reaches the SuperLink (loopback if it binds all interfaces)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def superexec_command(config, superexec_secret_file: Path, *, parent_pid: int) -> list[str]:
    """Flower's ``flower-superexec`` for this SuperLink's ServerApps, holding the secret
    (the command Flower's own subprocess isolation would run, plus the secret)."""
    cmd = [flower_bin("flower-superexec"), "--root-certificates", str(config.ssl_ca_certfile),
           "--runtime-api-address", _local_address(config.host, config.port), "--parent-pid", str(parent_pid),
           "--superexec-auth-secret-file", str(superexec_secret_file)]
    if config.runtime_dependency_install:
        cmd.append("--allow-runtime-dependency-installation")
    return cmd


def _run_superexec_when_healthy(config, superexec_secret_file: Path) -> None:
    """Thread: wait for /health, start the SuperExec, and stop the SuperLink if it exits."""
    address = _local_address(config.host, config.port)
    try:
        wait_until(lambda: superlink_healthy(address, ca_cert=Path(config.ssl_ca_certfile)), timeout=HEALTH_TIMEOUT,
                   what=f"the SuperLink to answer at {address}", interval=0.1)
        cmd = superexec_command(config, superexec_secret_file, parent_pid=os.getpid())
        # Same process group and log as the SuperLink: stopped with it, logging beside it.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    except BaseException as err:  # noqa: BLE001 - any failure here leaves no way to run a ServerApp
        log(ERROR, "Candor: could not start flower-superexec (%s); stopping the SuperLink", err)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    log(INFO, "Candor: started flower-superexec (pid %d) holding the SuperExec secret", proc.pid)
    code = proc.wait()
    # On `candor-server stop` the whole group gets SIGTERM; a second one changes nothing.
    log(ERROR, "Candor: flower-superexec (pid %d) exited with code %s; no ServerApp could start: stopping the "
        "SuperLink", proc.pid, code)
    os.kill(os.getpid(), signal.SIGTERM)


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m candor.server.superlink_main --control-token-sha256 FILE "
                         "--superexec-auth-secret-file FILE -- FLOWER_SUPERLINK_ARGS...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m candor.server.superlink_main", allow_abbrev=False,
                                     description="Flower's SuperLink with the Control and Runtime APIs closed")
    parser.add_argument("--control-token-sha256", required=True, type=Path,
                        help="file with the hex SHA-256 of the coordinator's control token")
    parser.add_argument("--superexec-auth-secret-file", required=True, type=Path,
                        help="file with the SuperExec secret (raw bytes)")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> None:
    args, flower_args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if refused := [name for name in _REFUSED_ENV if os.environ.get(name) == "1"]:
            raise ConfigError(f"superlink_main: {', '.join(refused)} is set; it would open Flower's deprecated "
                              "gRPC APIs or its enterprise login beside the closed control plane; unset it")
        digest = read_token_digest(args.control_token_sha256)
        read_secret(args.superexec_auth_secret_file)  # exists, private, long enough
        config = lifespan_config(flower_args, token_sha256=digest,
                                 superexec_secret_file=args.superexec_auth_secret_file)
        run = _flower_function("_run_superlink_http_api")
    except CandorError as err:
        sys.exit(f"candor superlink: {err}")
    log(INFO, "Starting Flower SuperLink (Candor: Control API open to the coordinator's token only, "
        "ServerApp tasks to the SuperExec secret only)")
    threading.Thread(target=_run_superexec_when_healthy, args=(config, args.superexec_auth_secret_file),
                     name="candor-superexec", daemon=True).start()
    run(lifespan_config=config)  # Flower's create_app(config, SuperLinkLifespan) and uvicorn.run


if __name__ == "__main__":
    main()
