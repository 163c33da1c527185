"""Submit a Flower run and wait for its end, with an exit status that says how it ended.

``flwr run . <connection> --stream`` exits 0 once the log stream ends, also when the
ServerApp failed: only ``flwr ls`` shows ``finished:failed``. ``fedprune flower run``
submits the run with ``flwr run``, optionally streams its log (``flwr log``), polls
``flwr ls`` until the run is finished and exits with

- 0 when the run finished as ``finished:completed``;
- 1 when it finished otherwise (``finished:failed``, ``finished:stopped``);
- 2 when it could not be submitted (the ``flwr`` CLI's message is printed).

It drives the ``flwr`` CLI of this environment (the one next to this Python, else the
one on ``PATH``), so it uses the same connections (``$FLWR_HOME/config.toml``) as
``flwr run`` and works with any SuperLink ``flwr`` can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FlowerCli", "FlowerCliError", "main", "run_config_text"]


class FlowerCliError(RuntimeError):
    """The ``flwr`` CLI exited with a non-zero status (the message holds its output)."""


def _flwr_executable() -> str:
    here = Path(sys.executable).parent / "flwr"
    if here.exists():
        return str(here)
    return shutil.which("flwr") or "flwr"


def run_config_text(values: Mapping[str, Any]) -> str:
    """``--run-config`` text for a mapping (``key=<TOML value>`` pairs, JSON-quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _json_of(text: str) -> Any:
    """The JSON object in a CLI's output (which may start with other lines)."""
    return json.loads(text[text.index("{") :])


@dataclass
class FlowerCli:
    """The ``flwr`` CLI with a given environment and working directory.

    Attributes
    ----------
    env
        The CLI's environment (``FLWR_HOME`` selects the connections); None: this
        process's.
    cwd
        The CLI's working directory; None: this process's.
    exe
        The ``flwr`` executable.
    """

    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    exe: str = field(default_factory=lambda: _flwr_executable())

    def call(self, *args: str, timeout: float = 180) -> str:
        """Run ``flwr ARGS``; its stdout.

        Raises
        ------
        FlowerCliError
            A non-zero exit status.
        """
        out = subprocess.run(
            [self.exe, *args],
            env=None if self.env is None else dict(self.env),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            text = "\n".join(s.strip() for s in (out.stdout, out.stderr) if s.strip())
            raise FlowerCliError(f"flwr {' '.join(args[:2])} failed: {text}")
        return out.stdout

    def submit(
        self,
        app: Path,
        connection: str | None,
        run_config: Sequence[str] = (),
        federation_config: Sequence[str] = (),
    ) -> int:
        """``flwr run APP CONNECTION --run-config ...``; the run id."""
        args = ["run", str(Path(app).resolve())]
        if connection:
            args.append(connection)
        for text in run_config:
            args += ["--run-config", text]
        for text in federation_config:
            args += ["--federation-config", text]
        out = self.call(*args, "--format", "json")
        try:
            return int(_json_of(out)["run-id"])
        except (ValueError, KeyError, TypeError) as e:
            raise FlowerCliError(f"flwr run printed no run id: {out.strip()[:300]}") from e

    def status(self, run_id: int, connection: str | None) -> str:
        """The run's status as ``flwr ls`` reports it (``finished:completed``, ...)."""
        args = ["ls", *([connection] if connection else []), "--run-id", str(run_id)]
        out = self.call(*args, "--format", "json")
        return str(_json_of(out)["runs"][0]["status"])

    def wait(
        self,
        run_id: int,
        connection: str | None,
        *,
        poll: float = 2.0,
        until: Callable[[], bool] | None = None,
    ) -> str:
        """Poll the status every ``poll`` seconds until it starts with ``finished``
        (or ``until()`` says to stop early); the last status seen."""
        while True:
            status = self.status(run_id, connection)
            if status.startswith("finished") or (until is not None and until()):
                return status
            time.sleep(poll)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedprune flower run",
        description="Submit a Flower run (flwr run) and wait for its end; exit 0 only "
        "if it finished as completed (1: failed or stopped, 2: not submitted).",
    )
    p.add_argument("app", nargs="?", default=".", help="the app folder (default: .)")
    p.add_argument("connection", nargs="?", help="a connection of $FLWR_HOME/config.toml")
    p.add_argument(
        "-c", "--run-config", action="append", default=[], help="as for flwr run (repeatable)"
    )
    p.add_argument(
        "--federation-config", action="append", default=[], help="as for flwr run (repeatable)"
    )
    p.add_argument("--stream", action="store_true", help="stream the run's log (flwr log)")
    p.add_argument(
        "--poll", type=float, default=2.0, help="seconds between two status checks (default 2)"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``fedprune flower run``; the exit status (see the module's documentation)."""
    args = _parser().parse_args(argv)
    if args.poll <= 0:
        print("error: --poll must be positive", file=sys.stderr)
        return 2
    cli = FlowerCli(env=os.environ)
    try:
        run_id = cli.submit(
            Path(args.app), args.connection, args.run_config, args.federation_config
        )
    except (FlowerCliError, OSError, subprocess.TimeoutExpired) as e:
        print(f"error: {' '.join(str(e).split())[:1000]}", file=sys.stderr)
        return 2
    print(f"run {run_id} submitted", flush=True)
    log: subprocess.Popen[bytes] | None = None
    if args.stream:
        log = subprocess.Popen(
            [
                cli.exe,
                "log",
                str(run_id),
                *([args.connection] if args.connection else []),
                "--stream",
            ]
        )
    try:
        status = cli.wait(run_id, args.connection, poll=args.poll)
    except KeyboardInterrupt:
        print(f"interrupted; the run goes on (flwr stop {run_id} to stop it)", file=sys.stderr)
        return 130
    except (FlowerCliError, OSError, subprocess.TimeoutExpired) as e:
        print(f"error: {' '.join(str(e).split())[:1000]}", file=sys.stderr)
        return 1
    finally:
        if log is not None:
            if log.poll() is None:
                time.sleep(min(args.poll, 2.0))  # let the stream print the last lines
                log.terminate()
            try:
                log.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.kill()
                log.wait()
    print(f"run {run_id} {status}", flush=True)
    return 0 if status == "finished:completed" else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
