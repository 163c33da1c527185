"""A Flower deployment on this machine: one SuperLink and N SuperNodes on loopback.

For integration tests, benchmarks and trying ``flwr run .`` without a cluster. Every
process runs on free private ports, with runtime dependency installation disabled and
its own ``FLWR_HOME`` under ``home``; each is stopped by PID and process group, never by
name (:func:`stop_processes`). SuperNode ``i`` holds ``partition-id=i`` of
``num-partitions=N``, as the fedprune ClientApp expects.

By default everything is insecure (no TLS) and every SuperNode runs Flower's own
executor (a ``flwr-clientapp`` process per message). Options:

- ``tls``: the SuperLink serves TLS with the given certificate, and the SuperNodes and
  the CLI verify it with the CA (:class:`TlsFiles`, made e.g. as ``docs/flower.md``
  shows);
- ``node_keys``: SuperNode authentication: the SuperLink admits only registered
  SuperNodes; each public key (``<key>.pub``) is registered with
  ``flwr supernode register`` before SuperNode ``i`` starts with private key ``i``
  (needs ``tls``);
- ``executor="warm"``: each SuperNode starts with ``--isolation process`` beside a
  ``fedprune flower exec`` process (:mod:`fedprune.engines.flower.warm`).

    with local_deployment(Path("/tmp/flwr"), nodes=2) as dep:
        run_id = dep.submit(Path("."), {"federation.rounds": 2, "data.num_clients": 2})
        print(dep.wait(run_id))
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedprune.engines.flower.submit import FlowerCli, run_config_text

__all__ = [
    "LocalDeployment",
    "TlsFiles",
    "free_ports",
    "local_deployment",
    "stop_processes",
]

BIN = Path(sys.executable).parent
"""Where this environment's ``flwr``, ``flower-superlink`` and ``flower-supernode`` are."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _descendants(pids: Iterable[int]) -> set[int]:
    """Every descendant of ``pids``, from the parent links in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's pid by now
        return True
    return True


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    """SIGTERM our processes, their process groups and every descendant; then SIGKILL.

    The SuperLink starts its SuperExec detached (a session of its own), so descendants
    are collected by parent pid before anything is signalled. The caller's own process
    group is never signalled.
    """
    own = os.getpgid(0)
    pids = {p.pid for p in procs} | _descendants(p.pid for p in procs)
    # a process started in a session of its own leads a group with its pid: that group
    # is signalled even after its leader exited (a SuperNode's orphaned SuperExec)
    groups = {p.pid for p in procs}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(pid))
    groups.discard(own)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        if not any(_alive(pid) for pid in pids):
            return


def wait_port(port: int, limit: float = 60.0) -> None:
    """Wait until something listens on 127.0.0.1:``port``.

    Raises
    ------
    TimeoutError
        Nothing listened within ``limit`` seconds.
    """
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {limit:g} s")


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files.

    Attributes
    ----------
    ca
        The CA certificate the SuperNodes and the CLI verify the SuperLink with.
    cert, key
        The SuperLink's certificate (its names must include ``127.0.0.1``) and key.
    """

    ca: Path
    cert: Path
    key: Path


@dataclass
class LocalDeployment:
    """A running SuperLink with its SuperNodes, and a ``flwr`` CLI configured for it.

    Attributes
    ----------
    home
        Folder of the processes' ``FLWR_HOME`` folders.
    env
        Environment for the ``flwr`` CLI (its ``FLWR_HOME`` names the connection).
    procs
        The SuperLink (first), the SuperNodes and their executors.
    logs
        Folder of one ``<process>.log`` per process.
    connection
        The connection name ``flwr run . <connection>`` uses.
    address
        The SuperLink's address (Fleet and Control API).
    tls
        The TLS files, or None (insecure).
    extra
        Processes started with :meth:`start_supernode` (stopped on exit too, but not
        part of :meth:`alive`).
    """

    home: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    logs: Path
    connection: str
    address: str
    tls: TlsFiles | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _base_env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def cli(self) -> FlowerCli:
        """The ``flwr`` CLI for this deployment."""
        return FlowerCli(env=self.env, cwd=self.home, exe=str(BIN / "flwr"))

    def flwr(self, *args: str, timeout: float = 180) -> str:
        """Run the ``flwr`` CLI against this deployment; its stdout.

        Raises
        ------
        RuntimeError
            A non-zero exit (the message holds its output).
        """
        return self.cli.call(*args, timeout=timeout)

    def submit(self, app: Path, run_config: Mapping[str, Any]) -> int:
        """``flwr run APP <connection> --run-config ...``; the run id."""
        return self.cli.submit(Path(app), self.connection, [run_config_text(run_config)])

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
        return self.cli.status(run_id, self.connection)

    def wait(self, run_id: int, poll: float = 2.0) -> str:
        """Poll until the run is finished (or a process of the deployment died); the
        last status seen."""
        return self.cli.wait(run_id, self.connection, poll=poll, until=lambda: not self.alive())

    def alive(self) -> bool:
        """Whether every process is still running."""
        return all(p.poll() is None for p in self.procs)

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every process's log (for error messages)."""
        return "\n".join(
            f"--- {f.name}\n" + f.read_text(errors="replace")[-chars:]
            for f in sorted(self.logs.glob("*.log"))
        )

    def start_supernode(
        self,
        name: str,
        partition: int,
        partitions: int,
        *,
        key: Path | None = None,
        executor: str = "subprocess",
        extra: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start one more SuperNode (and its warm executor), log in ``logs/<name>.log``.

        Parameters
        ----------
        name
            Its name (its ``FLWR_HOME`` folder and log).
        partition, partitions
            Its node config (``partition-id``, ``num-partitions``).
        key
            Its authentication private key (``--auth-supernode-private-key``).
        executor
            ``"subprocess"`` (Flower's) or ``"warm"`` (``fedprune flower exec``).
        extra
            Keep it in :attr:`extra` (not part of :meth:`alive`) rather than
            :attr:`procs`.

        Returns
        -------
        subprocess.Popen
            The SuperNode process.
        """
        if executor not in ("subprocess", "warm"):
            raise ValueError(f"executor must be 'subprocess' or 'warm', got {executor!r}")
        out = self.extra if extra else self.procs
        (port,) = free_ports(1)
        cmd = [
            str(BIN / "flower-supernode"),
            *("--superlink", self.address, "--port", str(port)),
            *("--node-config", f"partition-id={partition} num-partitions={partitions}"),
        ]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.tls.ca)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if executor == "warm":
            cmd += ["--isolation", "process"]
        node = _start(self.home, self.logs, name, cmd, self._base_env)
        out.append(node)
        if executor == "warm":
            # the executor talks to this SuperNode's Runtime API (plain HTTP on loopback)
            exe = [
                sys.executable,
                *("-m", "fedprune.engines.flower.warm"),
                *("--runtime-api-address", f"127.0.0.1:{port}", "--insecure"),
                *("--parent-pid", str(node.pid)),
            ]
            out.append(_start(self.home, self.logs, f"{name}-exec", exe, self._base_env))
        return node


def _start(
    home: Path, logs: Path, name: str, cmd: list[str], env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own, with ``FLWR_HOME=home/name`` (made if
    needed) and its output in ``logs/name.log``."""
    flwr_home = home / name
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            cmd,
            env={**env, "FLWR_HOME": str(flwr_home)},
            cwd=flwr_home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def local_deployment(
    home: Path,
    nodes: int,
    *,
    connection: str = "fedprune-local",
    env: Mapping[str, str] | None = None,
    tls: TlsFiles | None = None,
    node_keys: list[Path] | None = None,
    executor: str = "subprocess",
) -> Iterator[LocalDeployment]:
    """Start a SuperLink and ``nodes`` SuperNodes; stop them all on exit.

    Parameters
    ----------
    home
        An empty or new folder for the processes' state and logs.
    nodes
        SuperNodes to start (one per federated client).
    connection
        Name of the ``flwr`` CLI connection written to the CLI's ``config.toml``.
    env
        Extra environment for every process.
    tls
        Serve TLS with these files (None: insecure).
    node_keys
        One authentication private key per SuperNode (``<key>.pub`` beside it): the
        SuperLink admits only registered SuperNodes, and each key is registered before
        its SuperNode starts. Needs ``tls``.
    executor
        ``"subprocess"`` (Flower's, a process per message) or ``"warm"`` (one
        ``fedprune flower exec`` process per SuperNode).
    """
    if node_keys is not None and (tls is None or len(node_keys) != nodes):
        raise ValueError("node_keys needs tls and one key per SuperNode")
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        **(env or {}),
    }
    (link,) = free_ports(1)
    procs: list[subprocess.Popen[bytes]] = []
    dep: LocalDeployment | None = None
    try:
        cmd = [
            str(BIN / "flower-superlink"),
            *("--host", "127.0.0.1", "--port", str(link)),
            "--disable-runtime-dependency-installation",
        ]
        if tls is None:
            cmd.append("--insecure")
        else:
            cmd += [
                *("--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert)),
                *("--ssl-keyfile", str(tls.key)),
            ]
        if node_keys is not None:
            cmd.append("--enable-supernode-auth")
        procs.append(_start(home, logs, "superlink", cmd, base))
        wait_port(link)
        cli_home = home / "cli"
        cli_home.mkdir()
        security = "insecure = true\n"
        if tls is not None:
            security = f"root-certificates = {json.dumps(str(Path(tls.ca).resolve()))}\n"
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n[superlink."{connection}"]\n'
            f'address = "127.0.0.1:{link}"\n{security}',
            encoding="utf-8",
        )
        cli_env = {**base, "FLWR_HOME": str(cli_home)}
        dep = LocalDeployment(
            home, cli_env, procs, logs, connection, f"127.0.0.1:{link}", tls, _base_env=base
        )
        for i in range(nodes):
            key = None
            if node_keys is not None:
                key = node_keys[i]
                pub = key.with_name(key.name + ".pub")
                dep.flwr("supernode", "register", str(pub), connection, "--name", f"supernode{i}")
            dep.start_supernode(f"supernode{i}", i, nodes, key=key, executor=executor, extra=False)
        yield dep
    finally:
        stop_processes(procs + (dep.extra if dep is not None else []))
