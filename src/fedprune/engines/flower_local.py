"""A Flower deployment on this machine: one SuperLink and N SuperNodes on loopback.

For integration tests, benchmarks and trying ``flwr run .`` without a cluster. Every
process runs insecure (no TLS) on free private ports, with runtime dependency
installation disabled and its own ``FLWR_HOME`` under ``home``; each is stopped by PID
and process group, never by name (:func:`stop_processes`). SuperNode ``i`` holds
``partition-id=i`` of ``num-partitions=N``, as the fedprune ClientApp expects.

    with local_deployment(Path("/tmp/flwr"), nodes=2) as dep:
        run_id = dep.submit(Path("."), {"federation.rounds": 2, "data.num_clients": 2})
        print(dep.status(run_id))
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LocalDeployment", "free_ports", "local_deployment", "stop_processes"]

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
    groups = set()
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
        The SuperLink (first) and the SuperNodes.
    logs
        Folder of one ``<process>.log`` per process.
    connection
        The connection name ``flwr run . <connection>`` uses.
    address
        The SuperLink's control address.
    """

    home: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    logs: Path
    connection: str
    address: str

    def flwr(self, *args: str, timeout: float = 180) -> str:
        """Run the ``flwr`` CLI against this deployment; its stdout.

        Raises
        ------
        RuntimeError
            A non-zero exit (the message holds its output).
        """
        out = subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
        return out.stdout

    def submit(self, app: Path, run_config: Mapping[str, Any]) -> int:
        """``flwr run APP <connection> --run-config ...``; the run id."""
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        app_dir = str(Path(app).resolve())  # the CLI runs in ``home``, not here
        out = self.flwr("run", app_dir, self.connection, "--format", "json", "--run-config", text)
        return int(json.loads(out[out.index("{") :])["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (e.g. ``finished:completed``)."""
        out = self.flwr("ls", self.connection, "--run-id", str(run_id), "--format", "json")
        return str(json.loads(out[out.index("{") :])["runs"][0]["status"])

    def alive(self) -> bool:
        """Whether every process is still running."""
        return all(p.poll() is None for p in self.procs)

    def log_tails(self, chars: int = 3000) -> str:
        """The end of every process's log (for error messages)."""
        return "\n".join(
            f"--- {f.name}\n" + f.read_text(errors="replace")[-chars:]
            for f in sorted(self.logs.glob("*.log"))
        )


@contextlib.contextmanager
def local_deployment(
    home: Path,
    nodes: int,
    *,
    connection: str = "fedprune-local",
    env: Mapping[str, str] | None = None,
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
    """
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
    link, *node_ports = free_ports(1 + nodes)
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, cmd: list[str]) -> None:
        flwr_home = home / name
        flwr_home.mkdir()
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**base, "FLWR_HOME": str(flwr_home)},
                    cwd=flwr_home,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                *("--insecure", "--host", "127.0.0.1", "--port", str(link)),
                "--disable-runtime-dependency-installation",
            ],
        )
        wait_port(link)
        for i, port in enumerate(node_ports):
            start(
                f"supernode{i}",
                [
                    str(BIN / "flower-supernode"),
                    *("--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port)),
                    *("--node-config", f"partition-id={i} num-partitions={nodes}"),
                ],
            )
        cli_home = home / "cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n[superlink."{connection}"]\n'
            f'address = "127.0.0.1:{link}"\ninsecure = true\n',
            encoding="utf-8",
        )
        cli_env = {**base, "FLWR_HOME": str(cli_home)}
        yield LocalDeployment(home, cli_env, procs, logs, connection, f"127.0.0.1:{link}")
    finally:
        stop_processes(procs)
