"""Issue 17: every number validated, names confined, rejected rounds never "done",
combinations checked before any work starts."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedprune import config as config_mod
from fedprune.cli import main
from fedprune.config import RunConfig, key_table, load_config
from fedprune.core.codec import decode_payload, encode_payload
from fedprune.engines import inprocess
from fedprune.errors import ConfigError
from fedprune.params import key_rows, undeclared

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------- every key


def test_every_key_is_declared_with_a_range_or_choices() -> None:
    assert undeclared(RunConfig) == ["sections"] or undeclared(RunConfig) == []
    for _, cls in config_mod.registry.sections().items():
        assert undeclared(cls) == []
    numeric = [r for r in key_table() if r[1] in ("int", "float")]
    assert numeric, "no numeric keys found"
    for key, _typ, _default, accepted, doc in numeric:
        assert accepted.startswith(("[", "(")) and accepted.endswith(("]", ")")), key
        assert doc, key


def _numeric_keys() -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in key_table() if r[1] in ("int", "float")]


def _spec(key: str):  # type: ignore[no-untyped-def]
    section, _, leaf = key.rpartition(".")
    cls = type(RunConfig()) if not section else None
    if section:
        cfg = RunConfig()
        obj = getattr(cfg, section) if hasattr(cfg, section) else cfg.section(section)
        cls = type(obj)
    rows = {r.key: r.spec for r in key_rows(cls)}  # type: ignore[arg-type]
    return rows[leaf]


@pytest.mark.parametrize(("key", "typ"), _numeric_keys())
def test_numbers_at_and_past_the_edges_of_every_key(key: str, typ: str) -> None:
    spec = _spec(key)
    rng = spec.range_text()
    bad: list[object] = ["inf", "-inf", "nan"] if typ == "float" else ["2.5"]
    hi = spec.le if spec.le is not None else spec.lt
    lo = spec.ge if spec.ge is not None else spec.gt
    assert hi is not None, f"{key} has no upper bound"
    step = 1 if typ == "int" else max(abs(hi) * 1e-6, 1e-9)
    bad.append(repr(hi + step if spec.le is not None else hi))
    if lo is not None:
        bad.append(repr(lo - step if spec.ge is not None else lo))
    bad.append("1e400" if typ == "float" else str(2**70))
    for value in bad:
        with pytest.raises(ConfigError) as exc:
            load_config(overrides=[f"{key}={value}"])
        msg = str(exc.value)
        assert msg.startswith(key) or key in msg, msg
        assert "\n" not in msg and len(msg) <= 200, msg
        if value not in ("2.5",) and "integer" not in msg:
            assert rng in msg or "finite" in msg or "whole" in msg or "only" in msg, msg
    # the edges themselves are accepted (unless a cross-key rule forbids them)
    for edge in (spec.ge, spec.le):
        if edge is None:
            continue
        value = int(edge) if typ == "int" else float(edge)
        try:
            load_config(overrides=[f"{key}={value!r}"])
        except ConfigError as exc:
            assert str(rng) not in str(exc), f"{key}={value} is inside {rng}: {exc}"


def test_readme_table_is_current() -> None:
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "tools/config_table.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert mod.render() in text, "run: python tools/config_table.py"
    for key, *_ in key_table():
        assert f"| `{key}`" in text, key


def test_lr_inf_and_momentum_inf_are_refused_before_any_work(tmp_path: Path) -> None:
    for args in (["--lr", "inf"], ["--set", "train.momentum=inf"], ["--seed", str(2**64)]):
        assert main(["run", "--out", str(tmp_path / "o"), "--quiet", *args]) == 2
        assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name", ["../x", "/abs/x", "a/b", "..", ".", ".hidden", "-dash", "a\\b", "x" * 200, "a b"]
)
def test_run_names_are_one_safe_component(tmp_path: Path, name: str, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    code = main(["run", "--out", str(out), "--name", name, "--rounds", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and len(err[0]) <= 200, err
    assert "name" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing anywhere


def test_a_good_name_stays_inside_out(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), "--name", "ok-1.a", "--rounds", "1", "--quiet"]) == 0
    assert (out / "ok-1.a" / "summary.json").is_file()


def test_symlinked_run_name_cannot_escape(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    cfg = load_config(overrides=[f"out='{out}'", "name='link'"])
    from fedprune.rundir import make_run_dir

    path = make_run_dir(cfg)  # 'link' exists, so a suffixed fresh directory is made
    assert path.parent == out and path.name == "link-2"


# ----------------------------------------------------------------------- hostile client


def _hostile(monkeypatch: pytest.MonkeyPatch, bad_cid: int | None) -> None:
    """Client ``bad_cid`` (every client if None) answers every fit with NaN weights."""
    real = inprocess._run_client

    def run_client(client, fed, cid, task, buf):  # type: ignore[no-untyped-def]
        out = real(client, fed, cid, task, buf)
        if task == "fit" and (bad_cid is None or cid == bad_cid):
            p = decode_payload(out)
            for k, v in p.arrays.items():
                if v.is_floating_point():
                    p.arrays[k] = torch.full_like(v, math.nan)
            out = encode_payload(p)
        return out

    monkeypatch.setattr(inprocess, "_run_client", run_client)


def test_hostile_nan_client_every_round_stops_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _hostile(monkeypatch, bad_cid=3)
    code = main(
        [
            "run", "--out", str(tmp_path), "--name", "h", "--clients", "5", "--rounds", "3",
            "--set", "federation.min_clients=5", "--set", "federation.max_retries=1", "--quiet",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert code == 1, captured.err
    assert len(err) == 1
    assert "min_clients=5" in err[0] and "rejected" in err[0] and "nan" in err[0].lower()
    assert "done" not in captured.out
    assert not (tmp_path / "h" / "summary.json").exists()


def test_one_hostile_client_is_rejected_each_round_and_the_rest_aggregate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedprune.experiment import run_experiment

    _hostile(monkeypatch, bad_cid=3)
    cfg = load_config(
        overrides=[
            f"out='{tmp_path}'",
            "data.num_clients=5",
            "federation.rounds=3",
            "method='fedavg'",
        ]
    )
    res = run_experiment(cfg)
    for r in res.records:
        assert r["rejected"] == 1 and list(map(int, r["rejections"])) == [3]
        assert r["clients"] == 4 and math.isfinite(r["train_loss"])
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values())


def test_all_clients_hostile_never_says_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _hostile(monkeypatch, bad_cid=None)
    code = main(["run", "--out", str(tmp_path), "--name", "all", "--rounds", "2", "--quiet"])
    out = capsys.readouterr()
    assert code == 1 and "accepted replies" in out.err and "done" not in out.out


# ----------------------------------------------------------------------- combinations


def test_compare_checks_every_combination_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "cmp"
    code = main(
        [
            "compare", "--methods", "fedavg,fedsparsify-global,autostructured,omp",
            "--rounds", "2", "--out", str(dest), "--set", "pruning.prune_round=5",
            "--set", "structured.prune_linear=false", "--quiet",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "2 problems" in err[0] and "autostructured" in err[0] and "omp" in err[0]
    assert not dest.exists(), "nothing may be left behind"
    # and the same --out works at once with good methods
    assert main(["compare", "--methods", "fedavg", "--rounds", "1", "--out", str(dest), "-q"]) == 0


def test_run_with_an_impossible_combination_leaves_no_run_directory(tmp_path: Path) -> None:
    args = ["--set", "structured.prune_linear=false", "--out", str(tmp_path / "o"), "-q"]
    assert main(["run", "--method", "autostructured", *args]) == 2
    assert not (tmp_path / "o").exists()


def test_cli_bad_input_does_not_print_a_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedprune.cli", "run", "--lr", "nan", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and len(proc.stderr.strip()) <= 200
