"""Checkpoints and ``--resume``: a run killed at any moment ends exactly like an
uninterrupted one; damaged or edited run directories are refused with a message."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedprune.checkpoint import CHECKPOINT, load_checkpoint, pack, unpack
from fedprune.cli import main
from fedprune.config import load_config
from fedprune.experiment import resume_experiment, run_experiment

TIMING = ("round_s", "wall_s")


def _untimed(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in TIMING and not k.startswith("time_")}


def _same_records(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert _untimed(ra) == _untimed(rb), ra["round"]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------ state trees


def test_pack_unpack_round_trip_is_exact() -> None:
    value = {
        "masks": {"fc.weight": torch.rand(3, 4) > 0.5},
        "guidance": {3: {"w": torch.randn(2, 2, dtype=torch.float64)}, 7: {}},
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
        "floats": [1.5, math.nan, math.inf, -math.inf, -0.0],
        "pair": (1, "a", None, True),
        "big": 2**70 + 3,
    }
    tensors: dict[str, torch.Tensor] = {}
    back = unpack(json.loads(json.dumps(pack(value, tensors))), tensors)
    assert set(back["guidance"]) == {3, 7}  # integer keys stay integers
    assert torch.equal(back["masks"]["fc.weight"], value["masks"]["fc.weight"])
    assert back["masks"]["fc.weight"].dtype == torch.bool
    assert torch.equal(back["guidance"][3]["w"], value["guidance"][3]["w"])
    assert back["scalar"].shape == () and float(back["scalar"]) == 2.5
    assert back["empty"].shape == (0, 5)
    f = back["floats"]
    assert f[0] == 1.5 and math.isnan(f[1]) and f[2:4] == [math.inf, -math.inf]
    assert math.copysign(1.0, f[4]) == -1.0
    assert back["pair"] == (1, "a", None, True) and back["big"] == 2**70 + 3


def test_pack_names_what_it_cannot_store() -> None:
    with pytest.raises(TypeError, match=r"state/opt: values of type object"):
        pack({"opt": object()}, {})
    with pytest.raises(TypeError, match="key"):
        pack({(1, 2): 3}, {})


# ------------------------------------------------------- every method resumes exactly


class Crash(Exception):
    """Stands for a crash after the round's record is written, before its checkpoint."""


def _crash_at(rnd: int):  # type: ignore[no-untyped-def]
    def on_round(rec: dict[str, Any]) -> None:
        if rec["round"] == rnd:
            raise Crash

    return on_round


FC = ["model.name=fc", "model.hidden=32"]
CNN = ["model.name=twocnn", "model.hidden=16"]

METHODS = {
    "fedavgm": ["method=fedavg", "federation.aggregation=fedavgm", *FC],
    "fedsparsify-global": ["method=fedsparsify-global", *FC],
    "fedsparsify-local": ["method=fedsparsify-local", "federation.aggregation=fedavgm", *FC],
    "omp": ["method=omp", *FC],
    "snip": ["method=snip", *FC],
    "grasp": ["method=grasp", *FC],
    "random": ["method=random", *FC],
    "prunefl": ["method=prunefl", "pruning.readjust_every=2", *FC],
    "autoflip": [
        "method=autoflip",
        "autoflip.explore_epochs=2",
        "autoflip.explore_patience=1",
        "autoflip.explore_fraction=0.5",
        "federation.aggregation=fedavgm",
        *CNN,
    ],
    "autostructured": ["method=autostructured", "structured.k=1.0", *CNN],
    "cnn6-dropout": ["method=fedavg", "model.name=cnn6"],
    "moving-average": ["method=fedsparsify-global", "federation.average_decay=0.8", *FC],
}


def _cfg(tmp_path: Path, name: str, *extra: str):  # type: ignore[no-untyped-def]
    return load_config(
        overrides=[
            f"out='{tmp_path}'",
            f"name='{name}'",
            "data.num_clients=6",
            "federation.clients_per_round=4",
            "federation.rounds=5",
            "train.local_epochs=1",
            *extra,
        ]
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path: Path, method: str) -> None:
    extra = METHODS[method]
    ref = run_experiment(_cfg(tmp_path, "ref", *extra))
    crash_round = 3
    with pytest.raises(Crash):
        run_experiment(_cfg(tmp_path, "crashed", *extra), on_round=_crash_at(crash_round))
    run_dir = tmp_path / "crashed"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == crash_round
    ckpt = load_checkpoint(run_dir)
    assert ckpt is not None and ckpt.round == crash_round - 1
    resumed_from: list[int] = []
    res = resume_experiment(run_dir, on_resume=resumed_from.append)
    assert resumed_from == [crash_round - 1]
    _same_weights(ref.model.state_dict(), res.model.state_dict())
    _same_records(ref.records, res.records)
    on_disk = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in on_disk] == [1, 2, 3, 4, 5]  # the crashed round 3 once
    for key in ("final_accuracy", "total_bytes_up", "total_bytes_down", "final_params"):
        assert res.summary[key] == ref.summary[key], key
    _same_weights(load_file(str(ref.run_dir / "model.safetensors")), res.model.state_dict())
    average = ref.run_dir / "model_average.safetensors"
    assert average.exists() == (method == "moving-average")
    if average.exists():
        _same_weights(load_file(str(average)), load_file(str(run_dir / average.name)))


def test_dropout_is_seeded_per_client_task(tmp_path: Path) -> None:
    """cnn6 has dropout: one worker or two, the weights are bit-identical."""
    extra = METHODS["cnn6-dropout"]
    one = run_experiment(_cfg(tmp_path, "one", *extra, "federation.rounds=2"))
    two = run_experiment(_cfg(tmp_path, "two", *extra, "federation.rounds=2", "engine.workers=2"))
    _same_weights(one.model.state_dict(), two.model.state_dict())


def test_resume_without_a_checkpoint_starts_over(tmp_path: Path) -> None:
    ref = run_experiment(_cfg(tmp_path, "ref", *FC))
    with pytest.raises(Crash):
        run_experiment(_cfg(tmp_path, "crashed", *FC), on_round=_crash_at(1))
    assert load_checkpoint(tmp_path / "crashed") is None
    res = resume_experiment(tmp_path / "crashed")
    _same_weights(ref.model.state_dict(), res.model.state_dict())
    _same_records(ref.records, res.records)


def test_checkpoint_can_be_switched_off(tmp_path: Path) -> None:
    res = run_experiment(_cfg(tmp_path, "off", *FC, "engine.checkpoint=false"))
    assert not (res.run_dir / CHECKPOINT).exists()


# --------------------------------------------------------------- SIGKILL, for real


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt even when the tests were started in the background by a shell
    without job control (which ignores SIGINT for its children)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedprune.cli", *args],
        env={**os.environ, "FEDPRUNE_OFFLINE": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )


def _rounds_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_at_random_rounds_and_mid_checkpoint_then_resume(tmp_path: Path) -> None:
    """One run is killed four times: right after a round's record (before its checkpoint),
    with the checkpoint's temporary file half written, with it complete but not renamed,
    and by an outside SIGKILL at a random moment. Each time it is resumed; the end is
    bit-identical to an uninterrupted run (FedAvgM momentum, pruning masks, sampler)."""
    rounds = 9
    args = [
        "run",
        "--method",
        "fedsparsify-global",
        "--rounds",
        str(rounds),
        "--clients",
        "8",
        "--clients-per-round",
        "5",
        "--out",
        str(tmp_path),
        "-q",
        "--set",
        "federation.aggregation=fedavgm",
        "--set",
        "engine.fail_rate=0.2",
    ]
    ref = _cli(*args, "--name", "ref")
    assert ref.wait(timeout=600) == 0, ref.stdout.read() if ref.stdout else ""

    rng = random.Random(20261121)
    points = ["after-metrics", "checkpoint-partial", "checkpoint-rename"]
    kill_rounds = sorted(rng.sample(range(2, rounds - 2), len(points)))
    rng.shuffle(points)
    run_dir = tmp_path / "killed"
    first = True
    for point, rnd in zip(points, kill_rounds, strict=True):
        start = ["--name", "killed"] if first else []
        proc = _cli(
            *(args + start if first else ["run", "--resume", str(run_dir), "-q"]),
            env={"FEDPRUNE_FAULT": f"{point}@{rnd}"},
        )
        first = False
        assert proc.wait(timeout=600) == -signal.SIGKILL, f"{point}@{rnd}"
        ckpt = load_checkpoint(run_dir)
        assert ckpt is not None and ckpt.round == rnd - 1, (point, rnd, ckpt and ckpt.round)
        if point == "after-metrics":
            assert _rounds_done(run_dir) == rnd  # the record is there, the checkpoint not
        if point != "after-metrics":
            assert (run_dir / (CHECKPOINT + ".tmp")).exists()

    # an outside SIGKILL at a random moment of a later round
    proc = _cli("run", "--resume", str(run_dir), "-q")
    target = rng.randint(kill_rounds[-1] + 1, rounds - 1)
    deadline = time.monotonic() + 600
    while _rounds_done(run_dir) < target and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(rng.random() * 0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    final = _cli("run", "--resume", str(run_dir), "-q")
    out = final.stdout.read() if final.stdout else ""
    assert final.wait(timeout=600) == 0, out
    _same_weights(
        load_file(str(tmp_path / "ref" / "model.safetensors")),
        load_file(str(run_dir / "model.safetensors")),
    )
    a = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    _same_records(a, b)
    assert sum(r.get("failed", 0) for r in b) > 0  # failures were injected all along
    sa = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sb = json.loads((run_dir / "summary.json").read_text())
    assert {k: v for k, v in sa.items() if "time" not in k and k != "wall_s"} == {
        k: v for k, v in sb.items() if "time" not in k and k != "wall_s"
    }


def test_ctrl_c_says_how_to_continue_and_resume_finishes(tmp_path: Path) -> None:
    # many short rounds: the signal must land while work remains, even on a loaded machine
    args = ["run", "--rounds", "100", "--out", str(tmp_path), "--name", "int", "-q"]
    proc = _cli(*args)
    run_dir = tmp_path / "int"
    deadline = time.monotonic() + 600
    while _rounds_done(run_dir) < 2 and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read() if proc.stdout else ""
    assert proc.wait(timeout=60) == 130, out
    assert f"continue with: fedprune run --resume {run_dir}" in out
    done = _cli("run", "--resume", str(run_dir), "-q")
    assert done.wait(timeout=600) == 0
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 100


# ------------------------------------------------------------ refused run directories


@pytest.fixture
def crashed(tmp_path: Path) -> Path:
    with pytest.raises(Crash):
        run_experiment(_cfg(tmp_path, "crashed", *FC), on_round=_crash_at(4))
    return tmp_path / "crashed"


def _refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_a_flipped_byte_in_the_checkpoint_is_refused(
    crashed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = crashed / CHECKPOINT
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data
    path.write_bytes(bytes(data))
    assert "fails its integrity check" in _refused(capsys, "--resume", str(crashed))


def test_a_truncated_checkpoint_is_refused(
    crashed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = crashed / CHECKPOINT
    path.write_bytes(path.read_bytes()[:100])
    assert "is not a readable checkpoint" in _refused(capsys, "--resume", str(crashed))


def test_an_edited_config_is_refused(crashed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = crashed / "config.toml"
    cfg.write_text(cfg.read_text().replace("lr = 0.1", "lr = 0.2"))
    err = _refused(capsys, "--resume", str(crashed))
    assert "config.toml was edited" in err


def test_resume_refuses_other_options_finished_runs_and_non_runs(
    crashed: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "drop --rounds" in _refused(capsys, "--resume", str(crashed), "--rounds", "9")
    assert "not a run directory" in _refused(capsys, "--resume", str(tmp_path))
    assert main(["run", "--resume", str(crashed), "-q"]) == 0
    capsys.readouterr()
    assert "finished run" in _refused(capsys, "--resume", str(crashed))


# ------------------------------------------------------------------ the file writer


def test_checkpoint_writer_is_read_by_safetensors_for_every_dtype(tmp_path: Path) -> None:
    from fedprune.checkpoint import _write_safetensors

    a = torch.randn(3, 4)
    tensors = {
        "f32": a,
        "same_storage": a,  # shared tensors are written twice, not refused
        "f64": torch.tensor(3.5, dtype=torch.float64),
        "bf16": torch.randn(2, 2).to(torch.bfloat16),
        "f16": torch.randn(5).half(),
        "i64": torch.arange(5),
        "i32": torch.arange(3, dtype=torch.int32),
        "u8": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as fh:
        size = _write_safetensors(fh, tensors, {"key": "value"})
    assert size == path.stat().st_size
    back = load_file(str(path))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with open(tmp_path / "y", "wb") as fh, pytest.raises(TypeError, match="dtype"):
        _write_safetensors(fh, {"c": torch.zeros(1, dtype=torch.cfloat)}, {})


_PEAK_SCRIPT = """
import resource, sys
from pathlib import Path
import torch
from fedprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
state = {"guidance": {i: torch.full((8 * 2**20,), float(i)) for i in range(8)}}  # 256 MiB
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
save_checkpoint(Path(sys.argv[1]), Checkpoint(0, state, {}, [], {}))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024)
"""


def test_writing_a_large_checkpoint_needs_no_copy_of_its_tensors(tmp_path: Path) -> None:
    """A setup checkpoint holding many model-sized tensors (AutoFLIP's guidance) is
    written without copying them: the process's peak memory grows by far less than the
    state's 256 MiB (serialising through ``safetensors.torch.save`` copied it three
    times; 100 explorers' guidance on FEMNIST's CNN then ran out of 24 GB)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    grew = int(out.stdout.strip())
    assert grew < 64 * 2**20, f"peak memory grew by {grew / 2**20:.0f} MiB"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None
    assert [float(ckpt.server["guidance"][i][0]) for i in range(8)] == list(map(float, range(8)))
