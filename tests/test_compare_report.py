from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fedprune.compare import parse_methods, reach, run_compare
from fedprune.config import load_config
from fedprune.errors import ConfigError
from fedprune.report import write_report

METHODS = ["fedavg", "fedsparsify-global", "snip"]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("cmp")
    cfg = load_config(
        overrides=[
            f"out='{tmp}'",
            "federation.rounds=3",
            "data.num_clients=5",
            "federation.clients_per_round=3",
            "data.partition='dirichlet'",
        ]
    )
    return run_compare(cfg, METHODS, seeds=[0, 1], out=tmp / "cmp")


def test_every_method_gets_the_same_partitions_and_initial_weights(comparison) -> None:  # type: ignore[no-untyped-def]
    out, _ = comparison
    for seed in (0, 1):
        sums = [
            json.loads((out / "runs" / f"{m}-seed{seed}" / "summary.json").read_text())
            for m in METHODS
        ]
        assert len({s["partition_sha"] for s in sums}) == 1
        assert len({s["init_sha"] for s in sums}) == 1
        recs = [
            [
                json.loads(line)["sampled"]
                for line in (out / "runs" / f"{m}-seed{seed}" / "metrics.jsonl")
                .read_text()
                .splitlines()
            ]
            for m in METHODS
        ]
        assert recs[0] == recs[1] == recs[2], "same client sampling stream"
    s0 = json.loads((out / "runs" / "fedavg-seed0" / "summary.json").read_text())
    s1 = json.loads((out / "runs" / "fedavg-seed1" / "summary.json").read_text())
    assert s0["partition_sha"] != s1["partition_sha"] and s0["init_sha"] != s1["init_sha"]


def test_table_matches_the_runs_summaries(comparison) -> None:  # type: ignore[no-untyped-def]
    out, rows = comparison
    data = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in data["rows"]] == METHODS
    for row in data["rows"]:
        sums = [
            json.loads((out / "runs" / f"{row['method']}-seed{s}" / "summary.json").read_text())
            for s in (0, 1)
        ]
        mean_acc = sum(s["final_accuracy"] for s in sums) / 2
        assert row["final_accuracy"] == pytest.approx(mean_acc)
        mb_up = sum(s["total_bytes_up"] for s in sums) / 2 / 1e6
        assert row["mb_up"] == pytest.approx(mb_up)
        assert row["final_nonzero_params"] == pytest.approx(
            sum(s["final_nonzero_params"] for s in sums) / 2
        )
        md = (out / "comparison.md").read_text()
        assert f"| {row['method']} | {100 * row['final_accuracy']:,.2f} ±" in md
    for name in (
        "comparison.csv",
        "accuracy_vs_round.png",
        "accuracy_vs_mb.png",
        "sparsity_flops_vs_round.png",
        "pareto_flops.png",
        "pareto_mb.png",
    ):
        assert (out / name).stat().st_size > 0, name
    fedavg = rows[0]
    assert data["target"] == pytest.approx(fedavg["final_accuracy"] - 0.01)


def test_reach() -> None:
    recs = [
        {"round": 1, "test_accuracy": 0.5, "cum_bytes_up": 1e6, "cum_bytes_down": 1e6},
        {"round": 2, "test_accuracy": None, "cum_bytes_up": 2e6, "cum_bytes_down": 2e6},
        {"round": 3, "test_accuracy": 0.8, "cum_bytes_up": 3e6, "cum_bytes_down": 3e6},
    ]
    assert reach(recs, 0.7) == (3, 6.0)
    assert reach(recs, 0.9) == (None, None)


def test_parse_methods() -> None:
    assert parse_methods("fedavg, omp") == ["fedavg", "omp"]
    for bad in ("", "fedavg,nope", "omp,omp"):
        with pytest.raises(ConfigError):
            parse_methods(bad)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
@pytest.mark.parametrize("which", ["run", "comparison"])
def test_html_report_renders_in_headless_chromium(comparison, which: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out, _ = comparison
    target = out if which == "comparison" else out / "runs" / "fedsparsify-global-seed0"
    page = write_report(target, tmp_path / "report.html")
    html_text = page.read_text()
    assert "<script" not in html_text and "data:image/png;base64," in html_text
    profile = tmp_path / "profile"
    base = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--window-size=1200,1600"]
    dom = subprocess.run(
        [*base, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    if which == "comparison":
        for m in METHODS:
            assert f"<td>{m}</td>" in dom
    else:
        assert "fedsparsify-global on digits" in dom and "final test accuracy" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*base, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True
    )
    from PIL import Image

    img = Image.open(shot).convert("L")
    assert img.size[0] >= 1000
    colors = img.getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 20, "the page rendered more than a blank"


def test_report_of_a_non_run_directory_is_a_user_error(tmp_path: Path) -> None:
    from fedprune.errors import UserInputError

    with pytest.raises(UserInputError, match=r"neither summary\.json"):
        write_report(tmp_path)
