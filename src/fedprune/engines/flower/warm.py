"""An opt-in warm executor for a SuperNode: one process that runs every ClientApp task.

By default a Flower 1.41 SuperNode starts Flower's SuperExec, which starts a new
``flwr-clientapp`` process for every message: the Python start, Flower's runtime,
torch, the method and the node's data are paid for each message. This executor takes
SuperExec's place for one SuperNode and keeps a single process for the node's whole
life: it acquires each ClientApp task from the SuperNode's Runtime API (Flower's
ClientAppIo API of the pinned version), pulls the task's message, context and app
package, runs the ClientApp in this process and pushes the reply and the task's
status back, exactly as ``flwr-clientapp`` does, with the same Flower functions. What
stays warm between tasks: the imports, the loaded ClientApp (per app package), and
fedprune's per-process cache of the node's partition and client half
(:mod:`~fedprune.engines.flower.client`).

Start the SuperNode without its own executor (``--isolation process``), then this
executor against the SuperNode's Runtime API::

    flower-supernode --isolation process --port 9094 ... &
    fedprune flower exec --runtime-api-address 127.0.0.1:9094 --insecure

Failures are isolated per task, not per process: an exception raised while a task
runs (pulling it, loading the app, the ClientApp itself, pushing the reply) is
reported to Flower as that task's failure (an error reply with the same code and
reason format as ``flwr-clientapp``, and the task's status ``failed``), and the
executor goes on with the next task. What this does *not* isolate, unlike Flower's
process per message: a task that crashes the interpreter (a segfault, ``os._exit``,
the out-of-memory killer) takes the executor down; a task that hangs blocks the node;
module-level state a ClientApp leaves behind is seen by the next task, also of another
run. Runtime dependency installation is not supported (it needs a fresh process).

The executor refuses to start on any Flower version but :data:`FLOWER_VERSION` (it
relies on internals of Flower's Runtime API client), with a one-line message.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.supercore.runtime import RuntimeHttpClient

__all__ = ["FLOWER_VERSION", "WarmExecutor", "check_flower_version", "main"]

FLOWER_VERSION = "1.41.0"
"""The only Flower version whose ClientAppIo API this executor speaks."""

_LOG = logging.getLogger("flwr.fedprune")
_SUPEREXEC_AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})
_MAX_APPS = 4
"""ClientApps (app packages) kept loaded."""


class _Stop(BaseException):
    """Raised in the main thread by SIGTERM: finish the current task's bookkeeping, exit."""


def installed_flower_version() -> str | None:
    """The installed ``flwr`` distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version("flwr")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_flower_version(found: str | None = None) -> str | None:
    """None when Flower :data:`FLOWER_VERSION` is installed, else the one-line refusal."""
    found = installed_flower_version() if found is None else found
    if found == FLOWER_VERSION:
        return None
    return (
        f"fedprune's warm executor needs flwr {FLOWER_VERSION}, this environment has "
        f"{found or 'no flwr'}; start the SuperNode without --isolation process instead"
    )


@dataclass
class WarmExecutor:
    """Runs a SuperNode's ClientApp tasks in this process, one after the other.

    Parameters
    ----------
    runtime_api_address
        The SuperNode's Runtime API (``host:port``; the SuperNode's ``--port``).
    insecure
        Connect without TLS (a SuperNode without ``--ssl-certfile``).
    root_certificates
        PEM bundle that verifies the Runtime API's certificate (TLS).
    auth_secret
        The SuperNode's ``--superexec-auth-secret-file`` content, if it has one.
    poll_interval
        Seconds between two requests for a task when there is none.

    Attributes
    ----------
    completed, failed : int
        Tasks that ended as completed and as failed.
    """

    runtime_api_address: str
    insecure: bool = False
    root_certificates: bytes | None = None
    auth_secret: bytes | None = None
    poll_interval: float = 0.1
    completed: int = 0
    failed: int = 0
    _apps: OrderedDict[str, ClientApp] = field(default_factory=OrderedDict, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> None:
        """Acquire and run tasks until :meth:`stop` (or SIGTERM/SIGINT in :func:`main`)."""
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        client = self._client(superexec=True)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        backoff = self.poll_interval
        _LOG.info("fedprune warm executor: serving %s", self.runtime_api_address)
        try:
            while not self._stop.is_set():
                try:
                    res = client.AcquireTask(request)
                except Exception as e:  # the SuperNode restarting or gone: wait, retry
                    backoff = min(max(backoff * 2, self.poll_interval), 5.0)
                    _LOG.warning(
                        "fedprune warm executor: no task (%s); retry in %.1f s", e, backoff
                    )
                    self._stop.wait(backoff)
                    continue
                backoff = self.poll_interval
                if res.HasField("task") and res.token:
                    self.run_task(res.token, res.task.task_id)
                else:
                    self._stop.wait(self.poll_interval)
        finally:
            client.close()

    def stop(self) -> None:
        """Ask the loop to stop after the current task."""
        self._stop.set()

    # -- one task ---------------------------------------------------------------------
    def run_task(self, token: str, task_id: int = 0) -> bool:
        """Run one acquired task as ``flwr-clientapp`` would; True when it completed.

        Every exception is caught and reported to Flower as this task's failure.
        """
        from flwr.app import Context, Message
        from flwr.app.error import Error
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        t0 = time.perf_counter()
        client = self._client(token=token)
        heartbeat = HeartbeatSender(self._heartbeat_fn(client, task_id))
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = self._pull_task_input(client)
            app = self._client_app(run.fab_id, run.fab_version, fab)
            reply = app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except (Exception, SystemExit) as ex:  # a ClientApp's sys.exit fails its task only
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = f"{type(ex)}:<'{ex}'>"  # flwr-clientapp's format
            if isinstance(ex, LoadClientAppError):
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            _LOG.error("fedprune warm executor: task %d failed: %s", task_id, reason)
            details = reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:
                _LOG.error("fedprune warm executor: task %d: reply not pushed: %s", task_id, ex)
                sub_status, details = SubStatus.FAILED, f"reply not pushed: {ex}"
            push_task_output(client, context, sub_status, details)  # logs its own errors
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        ok = sub_status == SubStatus.COMPLETED
        if ok:
            self.completed += 1
        else:
            self.failed += 1
        _LOG.info(
            "fedprune warm executor: task %d %s in %.3f s",
            task_id,
            "completed" if ok else "failed",
            time.perf_counter() - t0,
        )
        return ok

    # -- helpers ----------------------------------------------------------------------
    def _pull_task_input(self, client: RuntimeHttpClient) -> tuple[Any, Any, Any, Any]:
        """The task's message, context, run and app package, as ``flwr-clientapp``
        pulls them, but retrying an object the SuperNode does not hold yet after
        :attr:`poll_interval` (doubling) instead of Flower's 1 s: a task is acquirable
        as soon as the SuperNode has its message's header, before its arrays, and a
        warm executor asks for them that early."""
        from flwr.app import Message
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
        from flwr.supercore.task_identity import TaskIdentity

        res = client.PullTaskInput(PullTaskInputRequest())
        context = context_from_proto(res.context)
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = context.node_id
        messages = client.PullMessages(PullAppMessagesRequest())
        if not messages.messages_list:
            raise RuntimeError("the SuperNode has no message for this task")
        tree = messages.message_object_trees[0]
        node = Node(node_id=context.node_id)
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
            initial_backoff=self.poll_interval,
            backoff_cap=1.0,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # not in the tree
        return message, context, run_from_proto(res.run), fab_from_proto(res.fab)

    def _client(self, *, token: str | None = None, superexec: bool = False) -> RuntimeHttpClient:
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
            SuperExecAuthHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient

        interceptors: list[Any] = [
            RuntimeVersionHttpInterceptor(
                component_name="SuperExec" if superexec else "flwr-clientapp"
            )
        ]
        if superexec and self.auth_secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=self.auth_secret, protected_methods=_SUPEREXEC_AUTH_METHODS
                )
            )
        if token is not None:
            interceptors.append(RuntimeTokenHttpInterceptor(token))
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=self.insecure,
            root_certificates=None if self.insecure else self.root_certificates,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _heartbeat_fn(self, client: RuntimeHttpClient, task_id: int) -> Callable[[], bool]:
        """Flower's task heartbeat, except that a refused heartbeat (the task is no
        longer valid, e.g. its run was stopped) is logged instead of interrupting this
        process (``flwr-clientapp`` raises SIGINT in itself)."""
        import httpx
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

        req = SendTaskHeartbeatRequest()
        warned = False

        def fn() -> bool:
            nonlocal warned
            try:
                res = client.SendTaskHeartbeat(req)
            except httpx.TransportError:
                return False
            except httpx.HTTPStatusError as err:
                if err.response.status_code in (503, 504):
                    return False
                res = None
            if (res is None or not res.success) and not warned:
                warned = True
                _LOG.warning("fedprune warm executor: task %d is no longer valid", task_id)
            return True

        return fn

    def _client_app(self, fab_id: str, fab_version: str, fab: Any) -> ClientApp:
        """The ClientApp of an app package, installed and loaded once per package."""
        app = self._apps.get(fab.hash_str)
        if app is not None:
            self._apps.move_to_end(fab.hash_str)
            return app
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.utils import get_load_client_app_fn
        from flwr.common.config import get_project_dir

        if not get_project_dir(fab_id, fab_version, fab.hash_str).is_dir():
            install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app = self._apps[fab.hash_str] = load(fab_id, fab_version, fab.hash_str)
        while len(self._apps) > _MAX_APPS:
            self._apps.popitem(last=False)
        return app


def _preload() -> None:
    """Import what a fedprune train task needs (torch, the codec, the method base, the
    data classes), before the first task arrives; the ClientApp's own module is loaded
    by the first task, from the app package's component reference."""
    import fedprune.engines.common
    import fedprune.engines.flower.client
    import fedprune.engines.flower.partitions
    import fedprune.engines.flower.wire
    import fedprune.methods.base  # noqa: F401


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedprune flower exec",
        description="Run a SuperNode's ClientApp tasks in one warm process "
        "(the SuperNode started with --isolation process).",
    )
    p.add_argument(
        "--runtime-api-address",
        default="127.0.0.1:9094",
        help="the SuperNode's Runtime API, host:port (its --port; default 127.0.0.1:9094)",
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="connect without TLS")
    tls.add_argument(
        "--root-certificates", metavar="PEM", help="CA bundle for the Runtime API's TLS"
    )
    p.add_argument(
        "--superexec-auth-secret-file",
        metavar="PATH",
        help="the SuperNode's --superexec-auth-secret-file, if it has one",
    )
    p.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) exits")
    p.add_argument(
        "--poll-interval",
        type=float,
        default=0.1,
        help="seconds between two requests for a task (default 0.1)",
    )
    p.add_argument(
        "--no-preload",
        action="store_true",
        help="import torch and fedprune's ClientApp with the first task, not at start",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``fedprune flower exec``: run until SIGTERM/SIGINT; the exit status.

    0 after a signal, 2 for bad arguments or another Flower version (one line on
    stderr).
    """
    args = _parser().parse_args(argv)
    refusal = check_flower_version()
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if args.poll_interval <= 0:
        print("error: --poll-interval must be positive", file=sys.stderr)
        return 2
    if not args.insecure and args.root_certificates is None:
        print("error: give --insecure or --root-certificates (as the SuperNode)", file=sys.stderr)
        return 2
    try:
        certs = None
        if args.root_certificates is not None:
            with open(args.root_certificates, "rb") as f:
                certs = f.read()
        secret = None
        if args.superexec_auth_secret_file is not None:
            with open(args.superexec_auth_secret_file, "rb") as f:
                secret = f.read()
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import flwr.supercore  # noqa: F401  (Flower's console logging)

    executor = WarmExecutor(
        args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=certs,
        auth_secret=secret,
        poll_interval=args.poll_interval,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        executor.stop()
        raise _Stop

    signal.signal(signal.SIGTERM, on_signal)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)  # SIGINT when the SuperNode exits
    try:
        if not args.no_preload:
            _preload()
        executor.run()
    except (_Stop, KeyboardInterrupt):
        pass
    _LOG.info(
        "fedprune warm executor: stopped after %d completed and %d failed tasks",
        executor.completed,
        executor.failed,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
