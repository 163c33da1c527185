"""AutoFLIP's exploration as a long setup phase: progress lines, setup checkpoints and
``--resume`` during exploration, and ``autoflip.compat = "authors-code"``."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_autoflip import _cfg, _data

from fedprune.checkpoint import CHECKPOINT, load_checkpoint
from fedprune.cli import main
from fedprune.config import RunConfig, load_config
from fedprune.core.codec import Payload, decode_payload, encode_payload
from fedprune.core.guidance import squared_deviation
from fedprune.data.federation import ClientData
from fedprune.engines.inprocess import tap_messages
from fedprune.errors import ConfigError
from fedprune.experiment import resume_experiment, run_experiment
from fedprune.methods.autoflip import (
    PRETRAIN_EPOCHS,
    AutoFlipClient,
    AutoFlipServer,
    duration,
    trainable_names,
)
from fedprune.methods.base import (
    PROGRESS_LOGGER,
    ClientMethod,
    ClientReply,
    ModelSpec,
    SetupIO,
    state_of,
)

FC = ModelSpec("fc", (1, 1, 6), 3, hidden=8)
TIMING = ("round_s", "wall_s")


# ------------------------------------------------------------------ a recording fake


class RecordingIO:
    """A FederatedIO that encodes both ways and records every exchange."""

    def __init__(self, client: ClientMethod, data: list[ClientData]) -> None:
        self.client = client
        self.data = data
        self.num_clients = len(data)
        self.calls: list[tuple[str, list[int]]] = []
        self.received: list[tuple[int, Payload]] = []
        self.sent_back: list[tuple[int, Payload]] = []

    def exchange(self, task: str, payloads: Mapping[int, Payload]) -> list[ClientReply]:
        self.calls.append((task, list(payloads)))
        out = []
        for cid, p in payloads.items():
            got = decode_payload(encode_payload(p))
            self.received.append((cid, got))
            back = decode_payload(encode_payload(self.client.handle(task, got, self.data[cid])))
            self.sent_back.append((cid, back))
            out.append(ClientReply(cid, back))
        return out


def _unit_cfg(*extra: str) -> RunConfig:
    return _cfg("autoflip.structured=false", *extra)


def _server(cfg: RunConfig, clients: int = 5) -> tuple[AutoFlipServer, RecordingIO]:
    server = AutoFlipServer(cfg, FC, FC.build(seed=0))
    return server, RecordingIO(AutoFlipClient(cfg, FC), [_data(c, FC) for c in range(clients)])


# ------------------------------------------------------------------ groups and progress


def test_groups_follow_the_engines_parallelism_and_change_nothing() -> None:
    cfg = _unit_cfg()
    whole, io_whole = _server(cfg)
    whole.setup(io_whole)  # a plain FederatedIO: one exchange for all
    assert io_whole.calls == [("explore", [0, 1, 2, 3, 4])]

    lines: list[str] = []
    saves: list[int] = []
    grouped, io = _server(cfg)
    grouped.setup(
        SetupIO(
            io,
            parallel=2,
            on_progress=lines.append,
            on_checkpoint=lambda: saves.append(len(grouped.exploration)),
        )
    )
    assert io.calls == [("explore", [0, 1]), ("explore", [2, 3]), ("explore", [4])]
    assert saves == [2, 4, 5]  # a setup checkpoint after every group
    assert lines[0] == "exploration: 5 explorers, up to 3 epochs each, 2 at a time"
    done = [ln.split(" explorers done")[0] for ln in lines[1:]]
    assert done == ["exploration: 2/5", "exploration: 4/5", "exploration: 5/5"]
    assert all("left" in ln for ln in lines[1:3]) and "left" not in lines[3]
    assert "(mean 3 epochs)" in lines[3]
    assert list(grouped.guidance) == list(whole.guidance)
    for cid, g in whole.guidance.items():
        for n, t in g.items():
            assert torch.equal(grouped.guidance[cid][n], t), (cid, n)
    for n, m in whole.masks.items():  # type: ignore[union-attr]
        assert torch.equal(grouped.masks[n], m), n  # type: ignore[index]
    assert whole.take_reports() == grouped.take_reports()


def test_duration_format() -> None:
    assert [duration(s) for s in (0.4, 42, 130, 3725)] == ["0s", "42s", "2m10s", "1h02m"]


def _run_cfg(tmp_path: Path, name: str, *extra: str) -> RunConfig:
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            f"name='{name}'",
            "method=autoflip",
            "model.name=fc",
            "model.hidden=16",
            "data.num_clients=6",
            "federation.clients_per_round=3",
            "federation.rounds=3",
            "train.local_epochs=1",
            "autoflip.explore_epochs=2",
            "autoflip.explore_patience=1",
            "federation.aggregation=fedavgm",
            *extra,
        ]
    )


def test_progress_lines_of_a_run_and_epoch_lines_of_in_process_explorers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines: list[str] = []
    cfg = _run_cfg(tmp_path, "p", "autoflip.explore_epochs=12", "autoflip.explore_patience=20")
    with caplog.at_level(logging.INFO, logger=PROGRESS_LOGGER):
        run_experiment(cfg, on_progress=lines.append)
    assert lines[0] == "exploration: 6 explorers, up to 12 epochs each, 1 at a time"
    assert [ln.split(" explorers")[0] for ln in lines[1:]] == [
        f"exploration: {i}/6" for i in range(1, 7)
    ]
    assert "(mean 12 epochs)" in lines[-1] and "elapsed" in lines[-1]
    epochs = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert [e.split(", loss ")[0] for e in epochs] == [
        f"  explorer {c}: epoch 10/12" for c in range(6)
    ]


def test_library_use_is_quiet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_experiment(_run_cfg(tmp_path, "q", "federation.rounds=1"))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_fedprune_run_prints_exploration_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "--method", "autoflip", "--model", "fc", "--clients", "4", "--rounds", "1"]
    args += ["--out", str(tmp_path), "--set", "autoflip.explore_epochs=11"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "exploration: 4 explorers, up to 11 epochs each, 1 at a time" in out
    assert "exploration: 4/4 explorers done" in out
    assert "explorer 3: epoch 10/11" in out
    assert main([*args, "-q", "--name", "quiet"]) == 0
    assert "exploration" not in capsys.readouterr().out


# ------------------------------------------------------------------ killed during exploration


class Crash(Exception):
    """Stands for a crash right after a setup checkpoint."""


def _crash_after(done: str, lines: list[str] | None = None):  # type: ignore[no-untyped-def]
    def on_progress(text: str) -> None:
        if lines is not None:
            lines.append(text)
        if text.startswith(done):
            raise Crash

    return on_progress


def _untimed(rec: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in TIMING and not k.startswith("time_")}


def _same_run(ref: Any, res: Any) -> None:
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [_untimed(r) for r in ref.records] == [_untimed(r) for r in res.records]
    for key in ("final_accuracy", "total_bytes_up", "total_bytes_down", "final_nonzero_params"):
        assert res.summary[key] == ref.summary[key], key


ENGINES = {
    "inprocess": [],
    "workers": ["engine.workers=2"],
    "cohort": ["engine.cohort=on"],
    "authors-code": ["autoflip.compat=authors-code"],
    "authors-code-cohort": ["autoflip.compat=authors-code", "engine.cohort=on"],
}


@pytest.mark.parametrize("variant", list(ENGINES))
def test_a_run_killed_during_exploration_resumes_to_the_uninterrupted_result(
    tmp_path: Path, variant: str
) -> None:
    extra = ENGINES[variant]
    ref = run_experiment(_run_cfg(tmp_path, "ref", *extra))
    # crash after the setup checkpoint that holds 2 (with two workers: 4) explorers
    stop = "exploration: 4/6" if variant == "workers" else "exploration: 2/6"
    with pytest.raises(Crash):
        run_experiment(_run_cfg(tmp_path, "crashed", *extra), on_progress=_crash_after(stop))
    run_dir = tmp_path / "crashed"
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.round == 0 and ckpt.engine["in_setup"] is True
    assert len(ckpt.server["exploration"]) == int(stop[-3])
    assert ckpt.engine["traffic"]["down"] > 0  # the exploration's bytes so far

    explore_msgs: list[int] = []
    lines: list[str] = []

    def tap(direction: str, task: str, cid: int, buf: bytes, refs: object) -> None:
        if direction == "down" and task == "explore":
            explore_msgs.append(cid)

    resumed_from: list[int] = []
    with tap_messages(tap):
        res = resume_experiment(run_dir, on_resume=resumed_from.append, on_progress=lines.append)
    assert resumed_from == [0]
    assert lines[0] == f"exploration: resuming with {stop[-3]}/6 explorers done"
    assert len(explore_msgs) == 6 - int(stop[-3])  # only the remaining explorers
    _same_run(ref, res)


def test_a_crash_after_the_last_explorer_resumes_without_exploring(tmp_path: Path) -> None:
    extra = ["autoflip.compat=authors-code"]
    ref = run_experiment(_run_cfg(tmp_path, "ref", *extra))
    with pytest.raises(Crash):  # the last pre-training step is checkpointed
        run_experiment(
            _run_cfg(tmp_path, "crashed", *extra), on_progress=_crash_after("pre-training: 6/6")
        )
    tasks: list[str] = []
    with tap_messages(lambda d, task, *_: tasks.append(task) if d == "down" else None):
        res = resume_experiment(tmp_path / "crashed")
    assert "explore" not in tasks and "pretrain" not in tasks
    _same_run(ref, res)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedprune.cli", *args],
        env={**os.environ, "FEDPRUNE_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_sigkill_during_exploration_then_resume_with_the_cli(tmp_path: Path) -> None:
    """A real SIGKILL right after the third setup checkpoint, then `--resume`: the run
    continues with the remaining explorers and ends bit-identical to an uninterrupted one."""
    args = ["run", "--method", "autoflip", "--model", "fc", "--clients", "6", "--rounds", "2"]
    args += ["--out", str(tmp_path), "--set", "autoflip.explore_epochs=3"]
    ref = _cli(*args, "--name", "ref", "-q")
    assert ref.returncode == 0, ref.stdout + ref.stderr
    killed = _cli(*args, "--name", "killed", env={"FEDPRUNE_FAULT": "setup-checkpoint@3"})
    assert killed.returncode == -signal.SIGKILL
    assert "exploration: 3/6" not in killed.stdout  # killed before that line
    run_dir = tmp_path / "killed"
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.round == 0 and len(ckpt.server["exploration"]) == 3
    done = _cli("run", "--resume", str(run_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming the setup phase before round 1 from its checkpoint" in done.stdout
    assert "exploration: resuming with 3/6 explorers done" in done.stdout
    assert "exploration: 4/6 explorers done" in done.stdout
    a = load_file(str(tmp_path / "ref" / "model.safetensors"))
    b = load_file(str(run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [_untimed(r) for r in ra] == [_untimed(r) for r in rb]


def test_a_tampered_setup_checkpoint_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(Crash):
        run_experiment(_run_cfg(tmp_path, "crashed"), on_progress=_crash_after("exploration: 2/6"))
    path = tmp_path / "crashed" / CHECKPOINT
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["run", "--resume", str(tmp_path / "crashed")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "fails its integrity check" in err and "\n" not in err


# ------------------------------------------------------------------ authors-code


def test_compat_is_validated_by_its_declaration() -> None:
    assert load_config(overrides=["method='autoflip'"]).autoflip.compat == "paper"
    with pytest.raises(ConfigError, match=r"autoflip\.compat: unknown value 'author-code'"):
        load_config(overrides=["autoflip.compat='author-code'"])


def test_authors_code_chains_explorers_and_pretrains_the_global_model() -> None:
    cfg = _unit_cfg("autoflip.compat='authors-code'", "autoflip.structured=true")
    server, io = _server(cfg, clients=4)
    theta0 = state_of(server.model)
    lines: list[str] = []
    server.setup(SetupIO(io, parallel=4, on_progress=lines.append))
    # exploration: one explorer at a time, each from where the previous one ended
    explore = [(c, p) for c, p in io.received if p.config["task"] == "explore"]
    back = io.sent_back[:4]
    assert [c for c, _ in explore] == server.explorers == [0, 1, 2, 3]
    assert io.calls[:4] == [("explore", [c]) for c in range(4)]
    for k, v in theta0.items():
        assert torch.equal(explore[0][1].arrays[k], v)
    for (_, got), (_, prev) in zip(explore[1:], back[:3], strict=True):
        for k in theta0:
            assert torch.equal(got.arrays[k], prev.arrays[k]), k  # explorer i+1 starts at i's end
    # every explorer's guidance is the last explorer's movement
    names = trainable_names(server.model)
    last = squared_deviation(back[3][1].arrays, explore[3][1].arrays, names)
    for g in server.guidance.values():
        for n in names:
            assert torch.equal(g[n], last[n]), n
    # pre-training: a chain from theta_0 through the explorers, 2 epochs each
    pre = [(c, p) for c, p in io.received if p.config["task"] == "pretrain"]
    assert [c for c, _ in pre] == [0, 1, 2, 3]
    assert all(p.config["epochs"] == PRETRAIN_EPOCHS for _, p in pre)
    for k, v in theta0.items():
        assert torch.equal(pre[0][1].arrays[k], v)
    assert any(not torch.equal(server.model.state_dict()[k], theta0[k]) for k in theta0)
    # no structured step; the mask is applied once and not kept in force
    assert server.history == [] and server.masks is None
    reports = server.take_reports()
    assert reports["pretrain_clients"] == 4 and 0.29 < reports["initial_mask_sparsity"] < 0.31
    w = server.model.state_dict()
    zeros = sum(int((w[n] == 0).sum()) for n in names)
    assert zeros / sum(w[n].numel() for n in names) == pytest.approx(0.3, abs=0.01)
    assert server.round_config(1)["mask"] == "none"
    assert not any(k.startswith("mask/") for k in server.configure_fit(1, [0])[0].arrays)
    assert lines[0] == "exploration: 4 explorers, up to 3 epochs each, one at a time, chained"
    assert lines[5] == "pre-training: 4 explorers, up to 2 epochs each, chained"


def test_authors_code_lets_pruned_weights_regrow_and_counts_every_byte(tmp_path: Path) -> None:
    down: dict[str, int] = {}
    up: dict[str, int] = {}

    def tap(direction: str, task: str, cid: int, buf: bytes, refs: object) -> None:
        side = down if direction == "down" else up
        side[task] = side.get(task, 0) + len(buf)

    with tap_messages(tap):
        res = run_experiment(
            _run_cfg(tmp_path, "a", "autoflip.compat=authors-code", "federation.rounds=1")
        )
    rec = res.records[0]
    m = rec["method_metrics"]
    assert m["initial_mask_sparsity"] == pytest.approx(0.3, abs=0.01)
    assert m["unstructured_sparsity"] == 0.0 and m["structured_sparsity"] == 0.0
    # the initial mask's zeros regrew in round 1 (but for weights on digits' never-lit
    # border pixels, which get no gradient)
    assert rec["sparsity"] < 0.1
    assert set(down) == {"explore", "pretrain", "fit"}
    assert rec["bytes_down"] == sum(down.values()) and rec["bytes_up"] == sum(up.values())
    # chained explorers upload weights, not guidance: as many bytes as the pre-training
    assert up["explore"] > 0.9 * up["pretrain"]


# ------------------------------------------------------------------ slow setup checkpoints


def test_skip_rule_for_setup_checkpoints() -> None:
    from fedprune.engines.common import (
        SETUP_CHECKPOINT_BIG_BYTES,
        SETUP_CHECKPOINT_RATIO,
        _skip_setup_checkpoint,
    )

    big, small, cost = SETUP_CHECKPOINT_BIG_BYTES, SETUP_CHECKPOINT_BIG_BYTES - 1, 2.0
    assert _skip_setup_checkpoint(SETUP_CHECKPOINT_RATIO * cost / 2, cost, big)
    assert not _skip_setup_checkpoint(SETUP_CHECKPOINT_RATIO * cost, cost, big)
    assert not _skip_setup_checkpoint(0.0, 100.0, small)  # small ones: always written
    assert not _skip_setup_checkpoint(0.0, 100.0, None)  # size unknown
    assert not _skip_setup_checkpoint(math.inf, 0.0, None)  # the first one


def test_slow_setup_checkpoints_are_spaced_and_the_finished_setup_is_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When setup checkpoints are large (every one counts as large here), later
    steps are not checkpointed until the wait has passed; the complete setup is written
    once before round 1; a run killed in between resumes from the last written one and
    ends as the uninterrupted run."""
    import fedprune.engines.common as common
    import fedprune.experiment as experiment

    ref = run_experiment(_run_cfg(tmp_path, "ref"))
    monkeypatch.setattr(common, "SETUP_CHECKPOINT_BIG_BYTES", 0)
    monkeypatch.setattr(common, "SETUP_CHECKPOINT_RATIO", 1e12)
    held: list[int] = []
    save = experiment.save_checkpoint

    def counting(run_dir: Path, ckpt: Any) -> int:
        if ckpt.round == 0:
            held.append(len(ckpt.server["exploration"]))
        return save(run_dir, ckpt)

    monkeypatch.setattr(experiment, "save_checkpoint", counting)
    run_experiment(_run_cfg(tmp_path, "whole"))
    assert held == [1, 6]  # the first explorer, then the finished exploration

    held.clear()
    with pytest.raises(Crash):
        run_experiment(_run_cfg(tmp_path, "crashed"), on_progress=_crash_after("exploration: 4/6"))
    assert held == [1]
    run_dir = tmp_path / "crashed"
    lines: list[str] = []
    res = resume_experiment(run_dir, on_progress=lines.append)
    assert lines[0] == "exploration: resuming with 1/6 explorers done"
    _same_run(ref, res)
