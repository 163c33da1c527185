"""Run every bad input we know of through the CLI and write docs/bad-inputs.md.

Each case is a command line (plus files it prepares in a scratch folder). The CLI must
answer each with exit code 2 and exactly one line on stderr; the table records the line.

    python tools/bad_inputs.py            # rewrite docs/bad-inputs.md
    python tools/bad_inputs.py --check    # only verify (exit 1 on a violation)
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MAX_LINE = 200


@dataclass
class Case:
    """One bad input: what it is, the command, and files it needs."""

    what: str
    argv: list[str]
    prepare: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


def _truncated_idx(tmp: Path) -> None:
    d = tmp / "fashion_mnist"
    d.mkdir(parents=True, exist_ok=True)
    header = (2051).to_bytes(4, "big") + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(d / "train-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(header + b"\x00" * 1000)  # 1,000 of 47,040,000 pixel bytes
    for name, magic, n in [
        ("train-labels-idx1-ubyte.gz", 2049, 60000),
        ("t10k-images-idx3-ubyte.gz", 2051, 10000),
        ("t10k-labels-idx1-ubyte.gz", 2049, 10000),
    ]:
        with gzip.open(d / name, "wb") as fh:
            fh.write(magic.to_bytes(4, "big") + n.to_bytes(4, "big"))


def _not_gzip(tmp: Path) -> None:
    d = tmp / "mnist"
    d.mkdir(parents=True, exist_ok=True)
    for name in [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]:
        (d / name).write_bytes(b"this is not a gzip file")


def _bad_toml(tmp: Path) -> None:
    (tmp / "bad.toml").write_text("[data\nnum_clients = 3\n")


def _wrong_type_toml(tmp: Path) -> None:
    (tmp / "typed.toml").write_text('[federation]\nrounds = "many"\n')


def _misspelt_table(tmp: Path) -> None:
    (tmp / "table.toml").write_text("[prunning]\nfinal_sparsity = 0.9\n")


def _empty_npz(tmp: Path) -> None:
    import numpy as np

    d = tmp / "femnist"
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "femnist_train.npz", x=np.zeros((2, 28, 28), np.uint8))
    np.savez(d / "femnist_test.npz", x=np.zeros((2, 28, 28), np.uint8))


def _not_a_run(tmp: Path) -> None:
    (tmp / "notarun").mkdir(exist_ok=True)


def _data_cases(case_cls: type) -> list[Case]:
    """The lying-header cases of every data reader (tools/bad_inputs_data.py)."""
    import importlib.util

    path = Path(__file__).with_name("bad_inputs_data.py")
    if not path.is_file():  # pragma: no cover
        return []
    spec = importlib.util.spec_from_file_location("bad_inputs_data", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases: list[Case] = mod.cases(case_cls)
    return cases


class _Stop(Exception):
    pass


def _interrupted(tmp: Path) -> None:
    """A 3-round run stopped after round 2's record (its checkpoint holds round 1)."""
    from fedprune.config import load_config
    from fedprune.experiment import run_experiment

    def stop(rec: dict[str, object]) -> None:
        if rec["round"] == 2:
            raise _Stop

    cfg = load_config(overrides=[f"out='{tmp}'", "name='stopped'", "federation.rounds=3"])
    with contextlib.suppress(_Stop), contextlib.redirect_stdout(io.StringIO()):
        run_experiment(cfg, on_round=stop)


def _finished(tmp: Path) -> None:
    from fedprune.config import load_config
    from fedprune.experiment import run_experiment

    run_experiment(load_config(overrides=[f"out='{tmp}'", "name='done'", "federation.rounds=1"]))


def _flipped_checkpoint(tmp: Path) -> None:
    _interrupted(tmp)
    path = tmp / "stopped" / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


def _truncated_checkpoint(tmp: Path) -> None:
    _interrupted(tmp)
    path = tmp / "stopped" / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:64])


def _edited_config(tmp: Path) -> None:
    _interrupted(tmp)
    path = tmp / "stopped" / "config.toml"
    path.write_text(path.read_text().replace("seed = 0", "seed = 1"))


CASES: list[Case] = [
    Case("misspelt key (`--set`)", ["run", "--set", "pruning.final_sparsty=0.9"]),
    Case("misspelt table in a config file", ["run", "{tmp}/table.toml"], _misspelt_table),
    Case("unknown section", ["run", "--set", "trainer.lr=0.1"]),
    Case("`--set` without `=`", ["run", "--set", "pruning.final_sparsity"]),
    Case("value where a table is expected", ["run", "--set", "data=3"]),
    Case("wrong type (string for an integer)", ["run", "--set", "train.batch_size=abc"]),
    Case("wrong type in a config file", ["run", "{tmp}/typed.toml"], _wrong_type_toml),
    Case("fractional integer", ["run", "--set", "data.num_clients=2.5"]),
    Case("not a boolean", ["run", "--set", "federation.local_eval=maybe"]),
    Case("sparsity = 1", ["run", "--set", "pruning.final_sparsity=1.0"]),
    Case("sparsity < 0", ["run", "--set", "pruning.final_sparsity=-0.1"]),
    Case(
        "initial sparsity above final",
        ["run", "--set", "pruning.initial_sparsity=0.9", "--set", "pruning.final_sparsity=0.5"],
    ),
    Case("learning rate <= 0", ["run", "--lr", "0"]),
    Case("zero rounds", ["run", "--rounds", "0"]),
    Case("zero clients", ["run", "--clients", "0"]),
    Case(
        "more clients per round than clients", ["run", "--clients", "5", "--clients-per-round", "8"]
    ),
    Case("more clients than samples", ["run", "--clients", "5000"]),
    Case("Dirichlet alpha <= 0", ["run", "--partition", "dirichlet", "--set", "data.alpha=0"]),
    Case(
        "classes per client above the class count",
        ["run", "--partition", "shards", "--set", "data.classes_per_client=11"],
    ),
    Case("natural split without writer ids", ["run", "--partition", "natural"]),
    Case("local test fraction = 1", ["run", "--set", "data.local_test_fraction=1"]),
    Case("negative server momentum", ["run", "--set", "federation.server_momentum=-0.1"]),
    Case(
        "trim fraction >= 0.5",
        [
            "run",
            "--set",
            "federation.aggregation=trimmed_mean",
            "--set",
            "federation.trim_fraction=0.5",
        ],
    ),
    Case(
        "robust aggregation with FedSparsify Local's vote merge",
        [
            "run",
            "--method",
            "fedsparsify-local",
            "--set",
            "federation.aggregation=median",
        ],
    ),
    Case(
        "min_clients above the clients per round",
        ["run", "--clients", "5", "--set", "federation.min_clients=6"],
    ),
    Case("failure rate of 1", ["run", "--set", "engine.fail_rate=1"]),
    Case("structured k <= 0", ["run", "--set", "structured.k=0"]),
    Case("unknown method", ["run", "--method", "fedsparsify-glob"]),
    Case("unknown model", ["run", "--model", "resnet99"]),
    Case("model too big for the input", ["run", "--model", "gap-cnn"]),
    Case("unknown data set", ["run", "--dataset", "imagenet"]),
    Case("unknown partition", ["run", "--partition", "pathological"]),
    Case("unknown engine", ["run", "--engine", "ray"]),
    Case("unknown optimizer", ["run", "--set", "train.optimizer=rmsprop"]),
    Case("missing config file", ["run", "{tmp}/missing.toml"]),
    Case("config file that is not TOML", ["run", "{tmp}/bad.toml"], _bad_toml),
    Case(
        "missing data folder",
        ["run", "--dataset", "mnist", "--data-dir", "{tmp}/nowhere"],
        env={"FEDPRUNE_DATA": ""},
    ),
    Case(
        "truncated IDX file",
        ["run", "--dataset", "fashion-mnist", "--data-dir", "{tmp}"],
        _truncated_idx,
    ),
    Case(
        "data file that is not gzip",
        ["run", "--dataset", "mnist", "--data-dir", "{tmp}"],
        _not_gzip,
    ),
    Case(
        "npz file without its arrays",
        ["run", "--dataset", "femnist", "--data-dir", "{tmp}"],
        _empty_npz,
    ),
    Case("resume: not a run directory", ["run", "--resume", "{tmp}/notarun"], _not_a_run),
    Case("resume: a finished run", ["run", "--resume", "{tmp}/done"], _finished),
    Case(
        "resume with other options",
        ["run", "--resume", "{tmp}/stopped", "--rounds", "5"],
        _interrupted,
    ),
    Case(
        "resume: checkpoint edited (one bit flipped)",
        ["run", "--resume", "{tmp}/stopped"],
        _flipped_checkpoint,
    ),
    Case(
        "resume: checkpoint truncated", ["run", "--resume", "{tmp}/stopped"], _truncated_checkpoint
    ),
    Case("resume: config.toml edited", ["run", "--resume", "{tmp}/stopped"], _edited_config),
    Case("not a number for a flag", ["run", "--rounds", "many"]),
    Case("unknown flag", ["run", "--roundz", "3"]),
    # numbers at and past the edges of the keys (issue 17)
    Case("learning rate inf", ["run", "--lr", "inf"]),
    Case("learning rate nan", ["run", "--lr", "nan"]),
    Case("learning rate above its bound", ["run", "--lr", "1e9"]),
    Case("momentum inf", ["run", "--set", "train.momentum=inf"]),
    Case("momentum = 1", ["run", "--set", "train.momentum=1"]),
    Case("seed above 2**63", ["run", "--seed", str(2**64)]),
    Case("negative seed", ["run", "--seed", "-1"]),
    Case("seed 1e400 (overflows to inf)", ["run", "--set", "seed=1e400"]),
    Case("huge model.hidden", ["run", "--set", "model.hidden=100000"]),
    Case("huge engine.threads", ["run", "--set", "engine.threads=100000"]),
    Case("huge --workers", ["run", "--workers", "1000"]),
    Case("batch size 0", ["run", "--batch-size", "0"]),
    Case("huge batch size", ["run", "--batch-size", "10000000"]),
    Case("zero local epochs", ["run", "--local-epochs", "0"]),
    Case("ten million rounds", ["run", "--rounds", "10000000"]),
    Case("a million clients", ["run", "--clients", "1000000"]),
    Case("Dirichlet alpha inf", ["run", "--set", "data.alpha=inf"]),
    Case("negative weight decay", ["run", "--set", "train.weight_decay=-0.1"]),
    Case("lr decay 0", ["run", "--set", "train.lr_decay=0"]),
    Case("lr decay above 1", ["run", "--set", "train.lr_decay=1.5"]),
    Case("server momentum 1", ["run", "--set", "federation.server_momentum=1"]),
    Case("eval_every 0", ["run", "--set", "federation.eval_every=0"]),
    Case("negative max_retries", ["run", "--set", "federation.max_retries=-1"]),
    Case("min_clients 0", ["run", "--set", "federation.min_clients=0"]),
    Case("fractional clients per round above 1", ["run", "--clients-per-round", "2.5"]),
    Case("negative clients per round", ["run", "--set", "federation.clients_per_round=-1"]),
    Case("schedule exponent 0", ["run", "--set", "pruning.exponent=0"]),
    Case("nnz rate 1", ["run", "--set", "pruning.nnz_rate=1"]),
    Case("pruning start round 0", ["run", "--set", "pruning.start_round=0"]),
    Case("pruning frequency 0", ["run", "--set", "pruning.frequency=0"]),
    Case("update norm bound nan", ["run", "--set", "validation.max_update_norm=nan"]),
    Case("max_examples above 2**31-1", ["run", "--set", "validation.max_examples=4294967296"]),
    Case("structured k inf", ["run", "--set", "structured.k=inf"]),
    Case("structured patience 0", ["run", "--set", "structured.patience=0"]),
    Case("structured round_to 0", ["run", "--set", "structured.round_to=0"]),
    Case("structured round_to above 1024", ["run", "--set", "structured.round_to=2048"]),
    Case("structured max_drop above 1", ["run", "--set", "structured.max_drop=1.5"]),
    Case("structured max_drop nan", ["run", "--set", "structured.max_drop=nan"]),
    Case("structured recovery_rounds -1", ["run", "--set", "structured.recovery_rounds=-1"]),
    Case("structured unknown k schedule", ["run", "--set", "structured.k_schedule=cosine"]),
    Case(
        "structured adaptive k without the guard",
        ["run", "--method", "autostructured", "--set", "structured.k_schedule=adaptive"],
    ),
    Case(
        "structured guard_z without the guard",
        ["run", "--method", "autostructured", "--set", "structured.guard_z=2"],
    ),
    Case("structured guard_z above 10", ["run", "--set", "structured.guard_z=11"]),
    Case(
        "structured guard without local validation splits",
        ["run", "--method", "autostructured", "--set", "structured.max_drop=0.01"],
    ),
    Case("AutoFLIP threshold 1", ["run", "--set", "autoflip.threshold=1"]),
    Case("AutoFLIP zero exploration epochs", ["run", "--set", "autoflip.explore_epochs=0"]),
    Case("AutoFLIP explore fraction 0", ["run", "--set", "autoflip.explore_fraction=0"]),
    Case("AutoFLIP unknown normalisation", ["run", "--set", "autoflip.normalisation=zscore"]),
    Case("AutoFLIP unknown threshold rule", ["run", "--set", "autoflip.threshold_rule=quantile"]),
    Case("misspelt key in a method section", ["run", "--set", "autoflip.thresold=0.1"]),
    Case("negative failure rate", ["run", "--set", "engine.fail_rate=-0.1"]),
    Case("local test fraction nan", ["run", "--set", "data.local_test_fraction=nan"]),
    Case("a 1,000-character data set name", ["run", "--set", "data.dataset='" + "x" * 1000 + "'"]),
    Case("a 1,000-character optimizer", ["run", "--set", "train.optimizer='" + "y" * 1000 + "'"]),
    # names (issue 17)
    Case("run name with '..'", ["run", "--name", "../x"]),
    Case("absolute run name", ["run", "--name", "/tmp/fedprune-abs"]),
    Case("run name with a separator", ["run", "--name", "a/b"]),
    Case("run name '..'", ["run", "--name", ".."]),
    Case("300-character run name", ["run", "--name", "n" * 300]),
    # combinations checked before any work (issue 17)
    Case(
        "autostructured conv-only on a model without convolutions",
        ["run", "--method", "autostructured", "--set", "structured.prune_linear=false"],
    ),
    Case(
        "OMP prune round after the last round",
        ["run", "--method", "omp", "--rounds", "3", "--set", "pruning.prune_round=5"],
    ),
    Case(
        "compare: a method that cannot serve the model (reported before training)",
        [
            "compare",
            "--methods",
            "fedavg,fedsparsify-global,autostructured",
            "--rounds",
            "1",
            "--set",
            "structured.prune_linear=false",
        ],
    ),
    Case(
        "compare: two impossible methods, both reported",
        [
            "compare",
            "--methods",
            "fedavg,autostructured,omp",
            "--rounds",
            "2",
            "--set",
            "pruning.prune_round=9",
            "--set",
            "structured.prune_linear=false",
        ],
    ),
    Case("compare: a method twice", ["compare", "--methods", "fedavg,fedavg"]),
    Case("compare: unknown method", ["compare", "--methods", "fedavg,fedprox"]),
    Case("compare: a seed twice", ["compare", "--methods", "fedavg", "--seeds", "1,1"]),
    Case("compare: seeds not integers", ["compare", "--methods", "fedavg", "--seeds", "a,b"]),
    Case("compare: target above 1", ["compare", "--methods", "fedavg", "--target", "2"]),
    Case("compare: a seed above 2**63", ["compare", "--methods", "fedavg", "--seeds", str(2**64)]),
    Case(
        "plugin module that does not exist",
        ["run", "--method", "fedavg"],
        env={"FEDPRUNE_PLUGINS": "no_such_fedprune_plugin"},
    ),
]
CASES += _data_cases(Case)


@dataclass
class Outcome:
    """What the CLI did with a case."""

    code: int
    stderr: str
    written: list[str] = field(default_factory=list)
    """Output folders the failed command left behind (must be empty)."""

    @property
    def lines(self) -> list[str]:
        """Non-empty stderr lines."""
        return [line for line in self.stderr.splitlines() if line.strip()]


def run_case(case: Case, tmp: Path) -> Outcome:
    """Run one case in-process; returns its exit code and stderr."""
    if case.prepare is not None:
        case.prepare(tmp)
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    if argv[0] == "run":
        argv += ["--quiet"] if "--resume" in argv else ["--out", str(tmp / "runs"), "--quiet"]
    elif argv[0] == "compare":
        argv += ["--out", str(tmp / "cmp"), "--quiet"]
    old = {k: os.environ.get(k) for k in case.env}
    os.environ.update(case.env)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    written = [p.name for p in (tmp / "runs", tmp / "cmp", Path("/tmp/fedprune-abs")) if p.exists()]
    return Outcome(code, err.getvalue().replace(str(tmp), "TMP"), written)


def main_cli(argv: list[str]) -> int:
    """Check every case; rewrite the docs table unless ``--check``."""
    os.environ.setdefault("FEDPRUNE_OFFLINE", "1")
    rows = []
    bad = 0
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            out = run_case(case, Path(d))
        ok = (
            out.code == 2
            and len(out.lines) == 1
            and len(out.lines[0]) <= MAX_LINE
            and not out.written
            and "Traceback" not in out.stderr
        )
        bad += not ok
        msg = out.lines[0] if out.lines else "(nothing)"
        shown = " ".join(a if len(a) <= 40 else a[:20] + "..." + a[-8:] for a in case.argv)
        if case.env:
            shown = " ".join(f"{k}={v}" for k, v in case.env.items()) + " fedprune " + shown
        else:
            shown = "fedprune " + shown
        rows.append(f"| {case.what} | `{shown}` | {out.code} | `{msg}` |")
        if not ok:
            print(
                f"VIOLATION: {case.what}: exit {out.code}, {len(out.lines)} lines", file=sys.stderr
            )
    if "--check" not in argv:
        text = (
            "# Bad input and the answers it gets\n\n"
            "Generated by `python tools/bad_inputs.py` (tests/test_bad_inputs.py checks every\n"
            "row: exit code 2, exactly one line on stderr of at most 200 characters, no\n"
            "traceback, and no run or comparison directory left behind). `{tmp}` is a\n"
            "scratch folder the script prepares; `TMP` in a message is that folder.\n\n"
            "| bad input | command | exit | message |\n| --- | --- | --- | --- |\n"
            + "\n".join(rows)
            + "\n"
        )
        (ROOT / "docs" / "bad-inputs.md").write_text(text, encoding="utf-8")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_cli(sys.argv[1:]))
