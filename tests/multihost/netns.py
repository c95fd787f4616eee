"""A multi-host test harness: the coordinator and each site in its own Linux network namespace.

Topology (everything is made by the test and removed at its end)::

    candor-t-<pid>-c   (coordinator)  eth0 10.251.0.1/24 ──┐
    candor-t-<pid>-s1  (site s1)      eth0 10.251.0.11/24 ─┤  veth pairs, the other end of each
    candor-t-<pid>-s2  (site s2)      eth0 10.251.0.12/24 ─┼─ enslaved to bridge br0 in
    ...                                                    │  candor-t-<pid>-net as v-<node>
                                                           ┘

No namespace has a default route and no veth end stays in the machine's own namespace:
a packet can only go to another address of 10.251.0.0/24 over the bridge. Cutting a node's
link (``link_down``) sets its bridge-side veth down: the node's packets go nowhere, as when
a cable is pulled (its TCP connections time out, new ones find no route).

Every process is started with ``ip netns exec NS ...`` (which execs, so the pid is the
command's) in its own process group, and :meth:`Network.destroy` stops every group, then
kills anything still inside a namespace (``ip netns pids``), then deletes the namespaces
(their veths go with them). :func:`remove_leftovers` does the same for the namespaces of
an earlier run that crashed (name prefix ``candor-t-``, creator's pid no longer alive).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from candor.common.processes import pid_alive, stop_group, stop_pid_group, wait_until

PREFIX = "candor-t-"
SUBNET = "10.251.0"  # a private /24 that exists only inside the test's namespaces
COORDINATOR = "c"
COORDINATOR_IP = f"{SUBNET}.1"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
IP_TIMEOUT = 20.0
# The multi-host tests' federation (conftest.py): three sites and a spare one for probes.
SITES = ("s1", "s2", "s3")
SPARE = "s4"
S2_SKEW = "-240"  # s2's clock, seconds behind the coordinator's: inside Flower's window (at most 305 s)
FAKETIME_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
                 "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/faketime/libfaketime.so.1")


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (the reason is the message)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip ARGS`` (a real process, with a deadline)."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def namespaces() -> list[str]:
    """Names of every network namespace (``ip netns list``)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def pids_in(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``."""
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here, or None: not root, no ``ip``, or the kernel
    (a container's seccomp profile, say) refuses ``unshare``/``setns``."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the multi-host tests as root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        inside = subprocess.run(["ip", "netns", "exec", probe, "true"], capture_output=True, text=True,
                                timeout=IP_TIMEOUT)
        if inside.returncode != 0:
            return f"`ip netns exec` is not permitted here: {inside.stderr.strip()}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def _kill_inside(ns: str) -> None:
    """SIGKILL every process inside ``ns`` (its process group first), until none is left."""
    def empty() -> bool:
        for pid in pids_in(ns):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return not [p for p in pids_in(ns) if pid_alive(p)]

    wait_until(empty, timeout=30, what=f"the processes in namespace {ns} to die", interval=0.2)


def _delete(ns: str) -> None:
    _kill_inside(ns)
    ip("netns", "del", ns, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces (and what runs in them) of earlier runs of this harness that
    did not clean up (their creating process is gone); returns their names."""
    removed = []
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        owner = ns[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and int(owner) != os.getpid() and pid_alive(int(owner)):
            continue  # another live run's
        _delete(ns)
        removed.append(ns)
    return removed


def faketime_library() -> str | None:
    """Path of libfaketime's preload library, or None if it is not installed."""
    return next((lib for lib in FAKETIME_LIBS if Path(lib).exists()), None)


# libfaketime 0.9.10 (Debian 12) with FAKETIME_DONT_FAKE_MONOTONIC=1 turns Python 3.11's
# time.sleep (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)) into EINVAL, and without
# that setting Python's timed lock waits (sem_clockwait on the faked monotonic clock)
# hang. This shim, preloaded before libfaketime, sends monotonic and relative sleeps
# straight to the kernel and everything else on to libfaketime: wall-clock time is
# libfaketime's, monotonic time and sleeps are the machine's.
_SLEEP_SHIM_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
int clock_nanosleep(clockid_t clk, int flags, const struct timespec *req, struct timespec *rem) {
    if (clk == CLOCK_MONOTONIC || clk == CLOCK_BOOTTIME || !(flags & TIMER_ABSTIME))
        return syscall(SYS_clock_nanosleep, clk, flags, req, rem) == 0 ? 0 : errno;
    int (*next)(clockid_t, int, const struct timespec *, struct timespec *) = dlsym(RTLD_NEXT, "clock_nanosleep");
    return next(clk, flags, req, rem);
}
"""


@dataclass(frozen=True)
class Faketime:
    """What shifts a process's wall clock: libfaketime and the sleep shim (see above)."""

    preload: str  # LD_PRELOAD value

    @classmethod
    def build(cls, directory: Path) -> Faketime:
        """Compile the shim into ``directory``.

        Raises:
            RuntimeError: libfaketime or a C compiler is missing (the message says which).
        """
        lib = faketime_library()
        if lib is None:
            raise RuntimeError("libfaketime is not installed (apt-get install faketime)")
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("no C compiler (cc) to build the sleep shim libfaketime 0.9.10 needs under Python 3.11")
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "sleep_shim.c").write_text(_SLEEP_SHIM_C)
        out = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(directory / "sleep_shim.so"),
                              str(directory / "sleep_shim.c"), "-ldl"], capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"building the sleep shim failed: {out.stderr.strip()[-500:]}")
        return cls(preload=f"{directory / 'sleep_shim.so'}:{lib}")

    def env(self, offset: str) -> dict[str, str]:
        """Environment that shifts a process's (and its children's) wall clock by ``offset``
        (libfaketime's relative form: ``+3h``, ``-240``, ``+400d``); monotonic clocks untouched."""
        return {"LD_PRELOAD": self.preload, "FAKETIME": offset, "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "FAKETIME_NO_CACHE": "1"}


@dataclass
class Node:
    name: str  # "c" or a site name
    ns: str
    address: str
    peer: str  # its veth's end on the bridge (in the bridge namespace)


@dataclass
class Network:
    """A bridge and one namespace per node, each on a veth to the bridge. Use :meth:`create`."""

    tag: str  # "candor-t-<pid>"
    bridge_ns: str
    nodes: dict[str, Node] = field(default_factory=dict)
    procs: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: dict(ENV))  # every process's environment (and its own)

    @classmethod
    def create(cls, sites: list[str]) -> Network:
        tag = f"{PREFIX}{os.getpid()}"
        net = cls(tag=tag, bridge_ns=f"{tag}-net")
        try:
            net._add_ns(net.bridge_ns)
            ip("-n", net.bridge_ns, "link", "add", "br0", "type", "bridge")
            ip("-n", net.bridge_ns, "link", "set", "br0", "up")
            net._add_node(COORDINATOR, COORDINATOR_IP)
            for i, site in enumerate(sites):
                net._add_node(site, f"{SUBNET}.{11 + i}")
        except BaseException:
            net.destroy()
            raise
        return net

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        # no IPv6 (no link-local chatter, no router solicitations), loopback up
        for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}=1"], capture_output=True,
                           timeout=IP_TIMEOUT)
        ip("-n", ns, "link", "set", "lo", "up")

    def _add_node(self, name: str, address: str) -> None:
        ns, peer = f"{self.tag}-{name}", f"v-{name}"
        self._add_ns(ns)
        # both ends are made inside namespaces of the test: nothing appears in the machine's own
        ip("-n", self.bridge_ns, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", self.bridge_ns, "link", "set", peer, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.nodes[name] = Node(name, ns, address, peer)

    @property
    def all_ns(self) -> list[str]:
        return [n.ns for n in self.nodes.values()] + [self.bridge_ns]

    # --- faults --------------------------------------------------------------------

    def link_down(self, name: str) -> None:
        """Cut ``name``'s link: its bridge-side veth goes down (a pulled cable)."""
        ip("-n", self.bridge_ns, "link", "set", self.nodes[name].peer, "down")

    def link_up(self, name: str) -> None:
        ip("-n", self.bridge_ns, "link", "set", self.nodes[name].peer, "up")

    def link_is_up(self, name: str) -> bool:
        out = ip("-n", self.bridge_ns, "-o", "link", "show", self.nodes[name].peer).stdout
        return ",UP" in out or "<UP" in out

    # --- processes -----------------------------------------------------------------

    def argv(self, name: str, cmd: list[object]) -> list[str]:
        """``cmd`` run inside ``name``'s namespace."""
        return ["ip", "netns", "exec", self.nodes[name].ns, *(str(c) for c in cmd)]

    def run(self, name: str, cmd: list[object], *, timeout: float, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
        """Run ``cmd`` in ``name``'s namespace to its end, in its own process group, with a deadline."""
        proc = subprocess.Popen(self.argv(name, cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**self.env, **(env or {})}, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_group(proc, grace=5)
            raise
        finally:
            if proc.poll() is None:
                stop_group(proc, grace=5)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def start(self, name: str, label: str, cmd: list[object], *, log_dir: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``cmd`` in ``name``'s namespace, in its own process group, output to
        ``log_dir/label.log``; stopped by :meth:`stop_all` / :meth:`destroy`."""
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{label}.log"
        with open(log, "a") as fh:
            proc = subprocess.Popen(self.argv(name, cmd), stdout=fh, stderr=subprocess.STDOUT,
                                    env={**self.env, **(env or {})}, start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return next(log for p, log in self.procs if p is proc).read_text(errors="replace")

    def wait_for(self, proc: subprocess.Popen, text: str, *, timeout: float, after: int = 0) -> float:
        """Wait until ``proc``'s output (from character ``after`` on) contains ``text``; the
        monotonic time it was seen. Fails at once if ``proc`` exits first."""
        def seen() -> bool:
            if text in self.output(proc)[after:]:
                return True
            if proc.poll() is not None:
                raise AssertionError(f"process exited ({proc.returncode}) before printing {text!r}:\n"
                                     + self.output(proc)[-3000:])
            return False

        wait_until(seen, timeout=timeout, what=repr(text), interval=0.2)
        return time.monotonic()

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        stop_group(proc, grace=grace)

    def stop_all(self) -> None:
        """Stop every process group started here, all at once (each: SIGTERM, then SIGKILL after 10 s)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.procs))) as pool:
            list(pool.map(lambda entry: stop_group(entry[0], grace=10), self.procs))

    def leftover_pids(self) -> dict[str, list[int]]:
        """Processes still alive in the test's namespaces, by namespace (should be none at the end)."""
        found = {ns: [p for p in pids_in(ns) if pid_alive(p)] for ns in self.all_ns}
        return {ns: pids for ns, pids in found.items() if pids}

    def destroy(self) -> None:
        """Stop every process group started here, kill anything left in the namespaces,
        delete the namespaces (and with them every veth and the bridge)."""
        try:
            self.stop_all()
        finally:
            for ns in [*self.all_ns, *(n for n in namespaces() if n.startswith(self.tag + "-"))]:
                if ns in namespaces():
                    _delete(ns)


def stop_superlink_pid(pid_file: Path) -> None:
    """End a SuperLink that ``candor-server stop`` did not (a failed test)."""
    import json

    try:
        pid = int(json.loads(pid_file.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return
    if pid_alive(pid):
        stop_pid_group(pid, grace=5)


# --- a federation over the network ---------------------------------------------------

def snapshot_code(dest: Path) -> Path:
    """Copy the Candor code as it is now (``pyproject.toml`` and the four packages, the
    working tree's files) to ``dest/candor/``; returns ``dest``, the ``PYTHONPATH`` entry
    that makes every process of the test import it instead of the editable install.

    Every site runs only the app whose hash is its installed release's, and the
    coordinator's ``flwr run`` bundles the files it finds: if the tree changes during the
    test (someone else editing it), sites started before the change refuse the run's app.
    A snapshot taken once gives every process, and the bundle, the same code."""
    from candor.common.processes import APP_DIR

    target = dest / "candor"
    target.mkdir(parents=True)
    shutil.copy2(APP_DIR / "pyproject.toml", target / "pyproject.toml")
    for package in ("common", "client", "server", "simulations"):
        shutil.copytree(APP_DIR / package, target / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def cli(module: str, *args: object) -> tuple[int, str, str]:
    """An offline ``candor-server``/``candor-client`` command (``module`` = "server" or
    "client") in this process; (exit code, stdout, stderr). Only for commands that touch
    no network (init, add-site, invite, ledger)."""
    import contextlib
    import importlib
    import io

    main = importlib.import_module(f"candor.{module}.cli").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@dataclass
class Harness:
    """One federation: its directory, its sites' directories and data, on a :class:`Network`.

    Coordinator commands run in the coordinator's namespace (``candor-server start --host
    10.251.0.1`` binds there; the server certificate names that address); each site's
    ``candor-client start`` runs in the site's namespace and reaches the server only over
    its veth."""

    net: Network
    root: Path
    port: int = 9092
    sites: dict[str, Path] = field(default_factory=dict)
    data: dict[str, Path] = field(default_factory=dict)
    clients: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def fed(self) -> Path:
        return self.root / "federation"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def address(self) -> str:
        return f"{COORDINATOR_IP}:{self.port}"

    def init(self, *config: str) -> None:
        """``candor-server init`` (offline), after a snapshot of the code every process runs."""
        from candor.common.demo import DEMO_SCHEMA_PATH

        code = snapshot_code(self.root / "code")
        self.net.env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [os.environ.get("PYTHONPATH")])])

        code, out, err = cli("server", "init", self.fed, "--name", "multihost", "--host", COORDINATOR_IP,
                             "--port", self.port, "--schema", DEMO_SCHEMA_PATH, *config)
        assert code == 0, err

    def add_site(self, name: str, data: Path) -> Path:
        """``candor-client init`` at the site, then the coordinator's ``add-site`` and ``invite``
        (offline: the server registers the key when it starts)."""
        site = self.root / "sites" / name
        for module, args in (("client", ("init", site, "--site-name", name)),
                             ("server", ("add-site", self.fed, name, site / "keys" / "node.pub")),
                             ("server", ("invite", self.fed, name))):
            code, out, err = cli(module, *args)
            assert code == 0, err
        self.sites[name], self.data[name] = site, data
        return site

    # --- the coordinator ------------------------------------------------------------

    def server(self, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
        """``candor-server ARGS`` in the coordinator's namespace, to its end."""
        return self.net.run(COORDINATOR, [BIN / "candor-server", *args], timeout=timeout)

    def start_coordinator(self) -> float:
        """``candor-server start FED --host 10.251.0.1`` in the coordinator's namespace; seconds it took."""
        began = time.monotonic()
        proc = self.server("start", self.fed, "--host", COORDINATOR_IP, "--port", self.port)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return time.monotonic() - began

    def stop_coordinator(self) -> None:
        """``candor-server stop FED``, then end whatever of the SuperLink's group outlived it."""
        self.server("stop", self.fed, timeout=60)
        stop_superlink_pid(self.fed / "superlink.pid")
        wait_until(lambda: not pids_in(self.net.nodes[COORDINATOR].ns), timeout=30,
                   what="the coordinator's namespace to be empty")

    def restart_coordinator(self) -> float:
        """Stop the SuperLink (with its SuperExec and ServerApp) and start it again in its
        namespace, on the same address, state database and certificate: what a resume
        test needs. Returns the seconds the start took."""
        self.stop_coordinator()
        return self.start_coordinator()

    def run(self, *args: object, label: str = "run") -> subprocess.Popen:
        """``candor-server run FED ARGS`` in the coordinator's namespace, in the background."""
        return self.net.start(COORDINATOR, label, [BIN / "candor-server", "run", self.fed, *args], log_dir=self.logs)

    # --- the sites --------------------------------------------------------------------

    def start_site(self, name: str, *extra: object, env: dict[str, str] | None = None,
                   label: str | None = None, site_dir: Path | None = None) -> subprocess.Popen:
        """``candor-client start`` of site ``name`` in its namespace (the invite, the data)."""
        site = site_dir or self.sites[name]
        invite = self.fed / "invites" / f"{name}.toml"
        proc = self.net.start(name, label or f"client-{name}",
                              [BIN / "candor-client", "start", site, "--invite", invite, "--data", self.data[name],
                               *extra], log_dir=self.logs, env=env)
        if site_dir is None:
            self.clients[name] = proc
        return proc

    def client(self, name: str, *args: object, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
        """``candor-client ARGS`` in site ``name``'s namespace, to its end."""
        return self.net.run(name, [BIN / "candor-client", *args], timeout=timeout, env=env)

    def ledger(self, name: str) -> list[dict]:
        import json

        path = self.sites[name] / "ledger.json"
        return json.loads(path.read_text())["entries"] if path.exists() else []

    def close(self) -> None:
        """Stop everything and delete the network (always; a fixture's finalizer)."""
        try:
            try:
                self.net.stop_all()
            finally:
                if (self.fed / "superlink.pid").exists():
                    stop_superlink_pid(self.fed / "superlink.pid")
        finally:
            self.net.destroy()


def assert_all_removed(h: "Harness") -> None:
    """Close ``h`` and check that nothing it started is left: no namespace of its tag, no
    process, no SuperLink."""
    import json

    tag = h.net.tag
    h.close()
    assert not [ns for ns in namespaces() if ns.startswith(tag)]
    assert all(proc.poll() is not None for proc, _ in h.net.procs)
    superlink = json.loads((h.fed / "superlink.pid").read_text())["pid"] if (h.fed / "superlink.pid").exists() else None
    assert superlink is None or not pid_alive(superlink)
