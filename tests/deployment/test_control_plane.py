"""The closed control plane: only the coordinator's token opens Flower's Control API, and
only the SuperExec holding the federation's secret may claim a ServerApp task.

Flower 1.42 serves its Control API and Runtime API on the federation port, which every
site reaches, and authenticates neither. An outsider here has exactly what every site
has: the CA certificate and the address from an invite. The real-process tests run one
federation (one registered site, whose SuperNode need not run: the control plane is what
is under test) under Candor's launcher on 127.0.0.1. The first two tests build the same
SuperLink application in this process and walk its routes, so that a route a new Flower
release adds cannot slip through unprotected.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import secrets
import ssl
import stat
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from candor.common.errors import ConfigError
from candor.common.invite import Invite
from candor.common.processes import free_port, pid_alive
from candor.server import control_plane, superlink_main
from candor.server.federation import Federation
from candor.server.pki import create_pki
from candor.server.superlink import superexec_pids
from candor.common.demo import DEMO_SCHEMA_PATH

from deploy_helpers import client, flwr, outsider_home, refused, server, stop_superlink, write_outsider_app

slow = pytest.mark.slow  # starts a real SuperLink (this module does not use the `deployment` fixture)

LOGIN_ROUTES = {"/v1/control/get-login-details", "/v1/control/get-auth-tokens"}  # Flower's, minus refresh
PUBLIC_GET_ROUTES = {"/health", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
PROTOBUF = {"content-type": "application/protobuf", "accept": "application/protobuf"}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the SuperLink application, built in this process (no server) ---------------------

@pytest.fixture
def superlink_app(tmp_path):
    """(Flower's SuperLink FastAPI app as the launcher configures it, the coordinator's token)."""
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan
    from flwr.superlink.main import create_app

    pki = create_pki(tmp_path / "pki", federation="f", hosts=["127.0.0.1"])
    token = control_plane.new_token()
    control_plane.write_superexec_secret(tmp_path / "superexec.secret")
    config = superlink_main.lifespan_config(
        ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert), "--ssl-keyfile",
         str(pki.server_key), "--enable-supernode-auth", "--database", ":flwr-in-memory:"],
        token_sha256=control_plane.token_digest(token), superexec_secret_file=tmp_path / "superexec.secret")
    return create_app(config, SuperLinkLifespan), token


@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_every_route_refuses_an_anonymous_caller_and_control_routes_open_only_to_the_token(superlink_app):
    from fastapi.routing import iter_route_contexts
    from starlette.testclient import TestClient

    app, token = superlink_app
    routes = [(method, ctx.path) for ctx in iter_route_contexts(app.routes) for method in ctx.methods or ()]
    assert {path for method, path in routes if method != "POST"} == PUBLIC_GET_ROUTES, routes
    posts = sorted(path for method, path in routes if method == "POST")
    assert {p.split("/")[2] for p in posts} == {"control", "fleet", "runtime"}, posts  # a new family shows here
    control = [p for p in posts if p.startswith("/v1/control/")]
    assert "/v1/control/start-run" in control and "/v1/control/register-node" in control and len(control) > 30
    web = TestClient(app, base_url="https://testserver")  # no `with`: the lifespan (SuperExec) never starts
    for path in posts:
        anonymous = web.post(path, content=b"", headers=PROTOBUF)
        if path in LOGIN_ROUTES:  # Flower leaves these open; the plugin gives nothing
            assert anonymous.status_code == 200 and anonymous.content == b"", path
            continue
        assert anonymous.status_code == 401, (path, anonymous.status_code, anonymous.text)
        if path.startswith("/v1/control/"):  # Flower's ControlAuthenticationMiddleware, asking our plugin
            assert anonymous.headers.get("www-authenticate") == "Bearer", path
            wrong = web.post(path, content=b"", headers={**PROTOBUF, "authorization": f"Bearer {token}x"})
            assert wrong.status_code == 401, path
    for path in ("/v1/control/list-runs", "/v1/control/list-nodes"):  # the 401s above were the token's doing
        assert web.post(path, content=b"", headers={**PROTOBUF, "authorization": f"Bearer {token}"}).status_code == 200
    acquire = web.post("/v1/runtime/acquire-task", content=b"", headers=PROTOBUF)
    assert acquire.status_code == 401 and acquire.json()["code"] == 1008  # SuperExec authentication


def test_the_plugin_admits_exactly_the_token_and_the_launcher_fails_loudly(tmp_path, monkeypatch):
    from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_FLWR_AID, REFRESH_TOKEN_KEY

    token = control_plane.new_token()
    plugin = superlink_main.CoordinatorTokenAuthn(control_plane.token_digest(token))
    ok, account = plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, token)])
    assert ok and account.flwr_aid == NOOP_FLWR_AID  # Flower's no-op federation admits only this id
    assert plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, token.encode())])[0]
    for metadata in ([], [(ACCESS_TOKEN_KEY, "")], [(ACCESS_TOKEN_KEY, token + "x")], [(ACCESS_TOKEN_KEY, token[:-1])],
                     [(ACCESS_TOKEN_KEY, token), (ACCESS_TOKEN_KEY, token)], [(REFRESH_TOKEN_KEY, token)],
                     [(ACCESS_TOKEN_KEY, control_plane.token_digest(token).hex())]):
        assert plugin.validate_tokens_in_metadata(metadata) == (False, None), metadata
    assert plugin.refresh_tokens([(REFRESH_TOKEN_KEY, token)]) == (None, None)
    assert plugin.get_login_details() is None and plugin.get_auth_tokens("code") is None

    pki = create_pki(tmp_path / "pki", federation="f", hosts=["127.0.0.1"])
    control_plane.write_superexec_secret(tmp_path / "secret")
    tls = ["--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert),
           "--ssl-keyfile", str(pki.server_key)]
    kwargs = {"token_sha256": control_plane.token_digest(token), "superexec_secret_file": tmp_path / "secret"}
    for flag in (["--insecure"], ["--isolation", "subprocess"], ["--superexec-auth-secret-file=/dev/null"]):
        with pytest.raises(ConfigError, match="set by the launcher"):
            superlink_main.lifespan_config([*tls, *flag], **kwargs)
    # Flower loading an authentication plugin of its own (e.g. its enterprise OIDC) is refused.
    monkeypatch.setattr(superlink_main._FLOWER_SUPERLINK, "load_control_authn_plugin", lambda: plugin)
    with pytest.raises(superlink_main.FlowerChanged, match="plugin of its own"):
        superlink_main.lifespan_config(tls, **kwargs)
    # Flower's switches that would open its deprecated gRPC Control API on another port.
    digest_file = tmp_path / "digest"
    control_plane.write_token_digest(digest_file, token)
    monkeypatch.setenv("FLWR_INTERNAL_GRPC_CONTROL_API", "1")
    with pytest.raises(SystemExit, match="FLWR_INTERNAL_GRPC_CONTROL_API is set"):
        superlink_main.main(["--control-token-sha256", str(digest_file), "--superexec-auth-secret-file",
                             str(tmp_path / "secret"), "--", *tls])


# --- a real federation -----------------------------------------------------------------

@dataclass(frozen=True)
class Closed:
    fed: Path
    port: int
    invite: Invite
    root: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def home(self) -> Path:  # the coordinator's FLWR_HOME
        return self.fed / "flwr"

    def runs(self) -> dict[str, str]:
        proc = flwr(self.home, "ls", "candor", "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {r["run-id"]: r["status"] for r in json.loads(proc.stdout)["runs"]}

    def nodes(self) -> list[dict]:
        proc = flwr(self.home, "supernode", "list", "candor", "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)["nodes"]


def _init(fed: Path, port: int) -> None:
    code, out, err = server("init", fed, "--name", "closed", "--port", port, "--schema", DEMO_SCHEMA_PATH,
                            "-c", "model=logreg")
    assert code == 0, err


@pytest.fixture(scope="module")
def closed(tmp_path_factory):
    root = tmp_path_factory.mktemp("closed")
    fed, port = root / "federation", free_port()
    _init(fed, port)
    try:
        assert client("init", root / "site", "--site-name", "h1")[0] == 0
        assert server("add-site", fed, "h1", root / "site" / "keys" / "node.pub")[0] == 0
        assert server("invite", fed, "h1")[0] == 0
        code, out, err = server("start", fed)
        assert code == 0, out + err
        yield Closed(fed, port, Invite.read(fed / "invites" / "h1.toml"), root)
    finally:
        stop_superlink(fed)


@slow
def test_credential_files_are_private_and_the_server_keeps_only_a_digest(closed):
    fed = Federation.load(closed.fed)
    credentials = fed.flwr_home / "credentials.yaml"
    for path in (credentials, fed.control_token_digest, fed.superexec_secret):
        assert _mode(path) == 0o600, path
    assert _mode(fed.flwr_home) == 0o700 and _mode(fed.state_dir) == 0o700
    assert len(fed.superexec_secret.read_bytes()) == 32
    doc = yaml.safe_load(credentials.read_text())
    authn, access, refresh = (f"flower.account-auth.{closed.address}.{k}"
                              for k in ("authn-type", "oidc-access-token", "oidc-refresh-token"))
    assert set(doc) == {authn, access, refresh}  # the address of the connection in config.toml
    assert f'address = "{closed.address}"' in (fed.flwr_home / "config.toml").read_text()
    token = control_plane.read_token(fed.flwr_home)
    assert len(token) == 43 and doc[authn] == "b2lkYw=="  # base64 "oidc"
    assert fed.control_token_digest.read_text().strip() == hashlib.sha256(token.encode()).hexdigest()
    # The token is nowhere else in the federation directory: not in state/, logs, invites.
    for path in closed.fed.rglob("*"):
        if path.is_file() and path != credentials:
            assert token.encode() not in path.read_bytes(), path
    assert "ca-certificate" in (closed.fed / "invites" / "h1.toml").read_text()


@slow
def test_an_outsider_holding_a_sites_ca_certificate_is_refused_everything(closed, tmp_path):
    home = outsider_home(tmp_path / "outsider", closed.invite.ca_certificate, closed.address)
    app = write_outsider_app(tmp_path / "app")
    marker = tmp_path / "outsider-ran"
    runs, nodes = closed.runs(), closed.nodes()
    coordinators = tmp_path / "coordinator-ran"  # one run of the coordinator's, for stop and log to aim at
    proc = flwr(closed.home, "run", app, "candor", "--stream", "--run-config", f'marker="{coordinators}"')
    assert proc.returncode == 0 and coordinators.exists(), proc.stdout + proc.stderr
    run_id = next(r for r in closed.runs() if r not in runs)
    runs = closed.runs()
    key = tmp_path / "intruder.pub"
    key.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    attempts = {
        "ls": ["ls", "candor"],
        "run": ["run", app, "candor", "--run-config", f'marker="{marker}"'],
        "run --stream": ["run", app, "candor", "--stream", "--run-config", f'marker="{marker}"'],
        "stop": ["stop", run_id, "candor"],
        "log": ["log", run_id, "candor", "--show"],
        "log --stream": ["log", run_id, "candor"],
        "supernode register": ["supernode", "register", key, "candor"],
        "supernode list": ["supernode", "list", "candor"],
    }
    for what, args in attempts.items():
        proc = flwr(home, *args, timeout=60)
        assert refused(proc), (what, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    time.sleep(3)  # a ServerApp, had one been started, would have written by now (the coordinator's took ~2 s)
    assert not marker.exists()
    assert closed.runs() == runs  # nothing submitted, nothing stopped
    assert closed.nodes() == nodes  # nothing registered


@slow
def test_a_wrong_or_stolen_looking_token_is_refused(closed, tmp_path):
    digest = (closed.fed / "state" / "control-token.sha256").read_text().strip()
    for i, token in enumerate((secrets.token_urlsafe(32), digest)):
        home = outsider_home(tmp_path / f"guess{i}", closed.invite.ca_certificate, closed.address, token=token)
        for args in (["ls", "candor"], ["supernode", "list", "candor"]):
            proc = flwr(home, *args, timeout=60)
            assert refused(proc), (args, proc.stdout[-2000:], proc.stderr[-2000:])


@slow
def test_the_coordinator_lists_nodes_and_runs_its_own_app(closed, tmp_path):
    nodes = closed.nodes()
    assert [n["status"] for n in nodes] == ["registered"]  # h1, registered by `candor-server start`
    code, out, err = server("status", closed.fed)
    assert code == 0 and "SuperLink: running" in out and "SuperExec pid" in out, out + err
    marker = tmp_path / "ran"
    proc = flwr(closed.home, "run", write_outsider_app(tmp_path / "app"), "candor", "--stream",
                "--run-config", f'marker="{marker}"')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_id = marker.read_text().split()[1]  # the ServerApp ran, started by the SuperExec holding the secret
    assert closed.runs()[run_id] == "finished:completed"


@slow
def test_claiming_a_serverapp_task_needs_the_superexec_secret(closed):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    context = ssl.create_default_context(cafile=str(closed.fed / "pki" / "ca.crt"))
    request = urllib.request.Request(f"https://{closed.address}/v1/runtime/acquire-task", method="POST",
                                     data=AcquireTaskRequest(supported_task_types=["serverapp"]).SerializeToString(),
                                     headers=PROTOBUF)
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, context=context, timeout=30)
    assert raised.value.code == 401
    assert json.loads(raised.value.read())["code"] == 1008  # SuperExec authentication failed


@slow
def test_no_spelling_of_a_control_path_gets_past_authentication(closed):
    context = ssl.create_default_context(cafile=str(closed.fed / "pki" / "ca.crt"))
    for path in ("/v1/control/list-runs", "//v1/control/list-runs", "/v1//control/list-runs",
                 "/v1/control//list-runs", "/V1/control/list-runs", "/v1/Control/list-runs", "/v1/control/%6Cist-runs",
                 "/v1/%63ontrol/list-runs", "/v1/control/list-runs/", "/v1/./control/list-runs",
                 "/v1/fleet/../control/list-runs", "/v1/control/list-runs?x=1", "/v1/control/list-runs%2F",
                 "/v1/control/list-runs;x", "/v1/control/list-runs#x"):
        conn = http.client.HTTPSConnection("127.0.0.1", closed.port, context=context, timeout=30)
        try:
            conn.request("POST", path, body=b"", headers=PROTOBUF)
            response = conn.getresponse()
            status = response.status
            response.read()
        finally:
            conn.close()
        assert not 200 <= status < 300, (path, status)


@slow
def test_an_old_directory_gets_its_secrets_at_start_and_stop_ends_the_superexec(tmp_path):
    fed, port = tmp_path / "federation", free_port()
    _init(fed, port)
    old_token = control_plane.read_token(fed / "flwr")
    for name in ("state/control-token.sha256", "state/superexec.secret", "flwr/credentials.yaml", "flwr/config.toml"):
        (fed / name).unlink()  # as a directory made before the control plane was closed
    other = free_port()
    try:
        code, out, err = server("start", fed, "--port", other)
        assert code == 0, out + err
        created = [l for l in out.splitlines() if l.startswith("Created")]
        assert len(created) == 1 and "SuperExec secret" in created[0] and "control token" in created[0], out
        for name in ("state/control-token.sha256", "state/superexec.secret", "flwr/credentials.yaml"):
            assert _mode(fed / name) == 0o600, name
        keys = set(yaml.safe_load((fed / "flwr" / "credentials.yaml").read_text()))
        assert all(k.startswith(f"flower.account-auth.127.0.0.1:{other}.") for k in keys) and len(keys) == 3
        assert flwr(fed / "flwr", "ls", "candor").returncode == 0
        home = outsider_home(tmp_path / "old", (fed / "pki" / "ca.crt").read_text(), f"127.0.0.1:{other}",
                             token=old_token)
        assert refused(flwr(home, "ls", "candor", timeout=60))  # the lost token opens nothing
        pid = int(json.loads((fed / "superlink.pid").read_text())["pid"])
        helpers = superexec_pids(pid)
        assert len(helpers) == 1
        code, out, err = server("stop", fed)
        assert code == 0 and "Stopped" in out
        assert not pid_alive(pid) and not any(pid_alive(p) for p in helpers)
    finally:
        stop_superlink(fed)
