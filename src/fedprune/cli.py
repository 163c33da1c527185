"""The ``fedprune`` command line (typer + rich).

Exit codes: 0 success, 2 bad input (config, data, arguments) with a one-line message
and no traceback, 1 anything else.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedprune.errors import FedpruneError, UserInputError, elide

MAX_MESSAGE = 193
"""Longest error message: with its 'error: ' prefix a line stays within 200 characters."""

app = typer.Typer(
    name="fedprune",
    help="Federated learning that prunes the model while it trains.",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

MB = 1e6

ConfigArg = Annotated[
    Path | None, typer.Argument(help="TOML config file (tables: data, model, train, ...).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: section.key=value (repeatable)."),
]

# CLI flag -> dotted config key
_FLAG_KEYS = {
    "method": "method",
    "dataset": "data.dataset",
    "model": "model.name",
    "partition": "data.partition",
    "clients": "data.num_clients",
    "clients_per_round": "federation.clients_per_round",
    "rounds": "federation.rounds",
    "local_epochs": "train.local_epochs",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "seed": "seed",
    "engine": "engine.name",
    "data_dir": "data.data_dir",
    "out": "out",
    "workers": "engine.workers",
    "name": "name",
}


def _build_config(config: Path | None, sets: list[str] | None, flags: dict[str, Any]) -> Any:
    from fedprune.config import load_config

    values = {_FLAG_KEYS[k]: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
    return load_config(config, sets or (), values)


def _fmt_round(rec: Mapping[str, Any], rounds: int) -> str:
    acc = rec.get("test_accuracy")
    acc_s = f"{100 * acc:5.1f}%" if acc is not None else "   -  "
    up, down = rec["bytes_up"] / MB, rec["bytes_down"] / MB
    dense = rec["dense_bytes_up"] + rec["dense_bytes_down"]
    saved = 1 - (rec["bytes_up"] + rec["bytes_down"]) / dense if dense else 0.0
    return (
        f"round {rec['round']:>3}/{rounds}  acc {acc_s}  sparsity {100 * rec['sparsity']:5.1f}%  "
        f"up {up:7.3f} MB  down {down:7.3f} MB  saved {100 * saved:5.1f}%  "
        f"{rec['round_s']:.2f} s"
    )


@contextmanager
def _client_progress(target: Console, *, enabled: bool) -> Iterator[None]:
    """Print the client halves' progress records (``fedprune.progress`` logger, INFO) of
    this process while the block runs: with the in-process engine, clients that run in
    the main process (e.g. an AutoFLIP explorer's epochs). Forked workers' records are
    dropped (they would print over the progress bar)."""
    if not enabled:
        yield
        return
    from fedprune.methods.base import PROGRESS_LOGGER

    pid = os.getpid()

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.process == pid:
                target.print(record.getMessage(), soft_wrap=True)

    logger = logging.getLogger(PROGRESS_LOGGER)
    handler = _Handler(logging.INFO)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed here, not again by a root handler
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@app.command()
def run(
    config: ConfigArg = None,
    method: Annotated[str | None, typer.Option(help="Method (see `fedprune methods`).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Data set (see `fedprune datasets`).")] = None,
    model: Annotated[str | None, typer.Option(help="Model (see `fedprune models`).")] = None,
    partition: Annotated[
        str | None, typer.Option(help="iid, dirichlet, shards, sort-and-deal, natural.")
    ] = None,
    clients: Annotated[int | None, typer.Option(help="Number of clients.")] = None,
    clients_per_round: Annotated[
        float | None, typer.Option(help="Clients per round: count, fraction, or 0 for all.")
    ] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    local_epochs: Annotated[int | None, typer.Option(help="Local epochs per round.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Client learning rate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data split, init, sampling.")] = None,
    engine: Annotated[str | None, typer.Option(help="inprocess (default) or flower.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding the data set.")] = None,
    out: Annotated[Path | None, typer.Option(help="Parent folder of run directories.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Train clients in this many processes.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run directory name.")] = None,
    set_: SetOpt = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the unfinished run in this run directory from its last "
            "checkpoint (with its own config; only --workers may be given besides).",
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-round lines.")] = False,
) -> None:
    """Run one federated experiment and write its run directory."""
    flags = {k: v for k, v in locals().items() if k in _FLAG_KEYS and v is not None}
    from fedprune.checkpoint import CHECKPOINT
    from fedprune.experiment import resume_config, resume_experiment, run_experiment

    if resume is not None:
        extra = sorted(k for k in flags if k != "workers")
        if config is not None or set_ or extra:
            given = ", ".join(
                [*(["a config file"] if config else []), *(["--set"] if set_ else [])]
                + [f"--{k.replace('_', '-')}" for k in extra]
            )
            raise UserInputError(f"--resume continues a run with its own config.toml; drop {given}")
        cfg = resume_config(resume)
        if workers is not None:
            cfg.engine.workers = workers
            cfg.validate()
    else:
        cfg = _build_config(config, set_, flags)

    rounds_total = cfg.federation.rounds
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    task = progress.add_task(cfg.method, total=rounds_total)

    started: list[Path] = []

    def on_start(run_dir: Path, fed: Any) -> None:
        started.append(run_dir)
        if not quiet:
            console.print(
                f"fedprune {cfg.method}: {cfg.data.dataset} ({len(fed.clients)} clients, "
                f"{cfg.data.partition}), model {cfg.model.name}, {rounds_total} rounds, "
                f"{cfg.clients_per_round()} clients/round -> {run_dir}",
                soft_wrap=True,
            )

    def on_round(rec: Mapping[str, Any]) -> None:
        if not quiet:
            progress.console.print(_fmt_round(rec, rounds_total), soft_wrap=True)
        progress.advance(task)

    def on_resume(done: int) -> None:
        progress.advance(task, done)
        if not quiet:
            if done:
                text = f"resuming after round {done} of {rounds_total}"
            elif resume is not None and (resume / CHECKPOINT).is_file():
                text = "resuming the setup phase before round 1 from its checkpoint"
            else:
                text = "no checkpoint yet: starting over from round 1"
            console.print(text, soft_wrap=True)

    def on_progress(text: str) -> None:
        if not quiet:
            progress.console.print(text, soft_wrap=True)

    t0 = time.perf_counter()
    try:
        with progress, _client_progress(progress.console, enabled=not quiet):
            if resume is not None:
                result = resume_experiment(
                    resume,
                    cfg=cfg,
                    on_round=on_round,
                    on_start=on_start,
                    on_resume=on_resume,
                    on_progress=on_progress,
                )
            else:
                result = run_experiment(
                    cfg, on_round=on_round, on_start=on_start, on_progress=on_progress
                )
    except KeyboardInterrupt:
        if started and cfg.engine.checkpoint:
            # plain print: rich would wrap a long path
            print(
                f"interrupted; continue with: fedprune run --resume {started[0]}", file=sys.stderr
            )
            raise typer.Exit(130) from None
        raise
    s = result.summary
    total = (s["total_bytes_up"] + s["total_bytes_down"]) / MB
    dense = (s["dense_bytes_up"] + s["dense_bytes_down"]) / MB
    console.print(
        f"done in {time.perf_counter() - t0:.1f} s: final accuracy "
        f"{100 * s['final_accuracy']:.2f}% (best {100 * s['best_accuracy']:.2f}%), "
        f"sparsity {100 * s['final_sparsity']:.1f}%, non-zero params "
        f"{s['final_nonzero_params']:,}/{s['dense_params']:,}, {total:.2f} MB communicated "
        f"({dense:.2f} MB as dense fp32)",
        soft_wrap=True,
    )
    if s.get("final_average_accuracy") is not None:
        console.print(
            f"moving average of the global models: {100 * s['final_average_accuracy']:.2f}% "
            f"(best {100 * s['best_average_accuracy']:.2f}%)"
        )
    console.print(f"run directory: {result.run_dir}")


@app.command()
def partition(
    config: ConfigArg = None,
    dataset: Annotated[str | None, typer.Option(help="Data set.")] = None,
    partition: Annotated[str | None, typer.Option(help="Partition name.")] = None,
    clients: Annotated[int | None, typer.Option(help="Number of clients.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding the data set.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a label-distribution PNG here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Show how a data set is split among clients (sizes and labels per client)."""
    flags = {k: v for k, v in locals().items() if k in _FLAG_KEYS and v is not None}
    cfg = _build_config(config, set_, flags)
    from fedprune.data import format_summary, plot_label_distribution
    from fedprune.experiment import load_federation

    fed = load_federation(cfg)
    console.print(format_summary(fed))
    if plot is not None:
        plot_label_distribution(fed, plot)
        console.print(f"label distribution written to {plot}")


@app.command()
def datasets() -> None:
    """List the data sets and where their files were found."""
    from fedprune.data import DATASETS, locate_dataset

    table = Table("name", "classes", "input", "found at", "description")
    for name, info in DATASETS.items():
        where = locate_dataset(name)
        table.add_row(
            name,
            str(info.num_classes),
            "x".join(map(str, info.input_shape)),
            where or (f"hub {info.hub_id} (online only)" if info.hub_id else "not found"),
            info.description,
        )
    console.print(table)


@app.command()
def models() -> None:
    """List the model zoo with parameter counts and FLOPs at each model's default input."""
    from fedprune.core.accounting import count_params
    from fedprune.core.flops import count_flops
    from fedprune.models import build_model, list_models

    table = Table("name", "default input", "classes", "params", "MFLOPs", "paper")
    for info in list_models():
        m = build_model(info.name, info.default_input, info.default_classes)
        flops = count_flops(m, info.default_input).total
        table.add_row(
            info.name,
            "x".join(map(str, info.default_input)),
            str(info.default_classes),
            f"{count_params(m):,}",
            f"{flops / 1e6:.2f}",
            info.paper,
        )
    console.print(table)


@app.command()
def methods() -> None:
    """List the federated methods."""
    from fedprune.methods import list_methods

    table = Table("name", "paper", "description")
    for info in list_methods():
        table.add_row(info.name, info.paper, info.description)
    console.print(table)


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    format_: Annotated[
        str,
        typer.Option("--format", help="onnx, or pte (ExecuTorch; needs the executorch package)."),
    ] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(help="Output file (default RUN_DIR/model.onnx or .pte; model_average.*)."),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="final (the final global model), or average (the moving average of the "
            "global models; runs with federation.average_decay > 0)."
        ),
    ] = "final",
) -> None:
    """Export a run's final model (rebuilt from its architecture JSON and weights)."""
    from fedprune.export import export_onnx, export_pte

    fmt = format_.lower()
    if fmt == "onnx":
        path = export_onnx(run_dir, out, weights=weights)
    elif fmt in ("pte", "executorch"):
        path = export_pte(run_dir, out, weights=weights)
    else:
        raise UserInputError(f"unknown export format {format_!r}: choose onnx or pte")
    console.print(
        f"{fmt.upper()} model written to {path} ({path.stat().st_size / 1e3:.1f} kB)",
        soft_wrap=True,
    )


@app.command()
def latency(
    run_dir: Annotated[
        Path, typer.Argument(help="A finished run directory, or a comparison directory.")
    ],
    runs: Annotated[int, typer.Option(help="Timed runs per model (>= 1).")] = 200,
    warmup: Annotated[int, typer.Option(help="Untimed runs per model first.")] = 20,
) -> None:
    """Time the dense initial and the final model in onnxruntime (1 thread, batch 1) and
    report the speed-up; for a comparison directory, every run, then the table again."""
    from fedprune.compare import COMPARISON_JSON, comparison_run_dirs, refresh_comparison
    from fedprune.export import measure_latency

    if (run_dir / COMPARISON_JSON).is_file():
        table = Table("run", "params", "dense ms", "final ms", "speed-up")
        for d in comparison_run_dirs(run_dir):
            res = measure_latency(d, runs=runs, warmup=warmup)
            table.add_row(
                d.name,
                f"{res['final']['params']:,}",
                f"{res['dense']['median_ms']:.3f}",
                f"{res['final']['median_ms']:.3f}",
                f"{res['speedup']:.2f}x",
            )
        refresh_comparison(run_dir)
        console.print(table)
        console.print(
            f"medians of {runs} runs after {warmup} warm-up each; speed-up = dense median / "
            f"final median; {run_dir / 'comparison.md'} rewritten with the speed-up column",
            soft_wrap=True,
        )
        return
    res = measure_latency(run_dir, runs=runs, warmup=warmup)
    table = Table("model", "params", "ONNX kB", "median ms", "p90 ms", "min ms")
    for key in ("dense", "final"):
        r = res[key]
        table.add_row(
            "dense initial" if key == "dense" else "final",
            f"{r['params']:,}",
            f"{r['onnx_bytes'] / 1e3:.1f}",
            f"{r['median_ms']:.3f}",
            f"{r['p90_ms']:.3f}",
            f"{r['min_ms']:.3f}",
        )
    console.print(table)
    console.print(
        f"speed-up {res['speedup']:.2f}x (dense median / final median), {res['runtime']}, "
        f"{res['runs']} runs after {res['warmup']} warm-up, written to "
        f"{Path(run_dir) / 'summary.json'}",
        soft_wrap=True,
    )


@app.command()
def compare(
    config: ConfigArg = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods, e.g. fedavg,fedsparsify-global,snip.")
    ] = "fedavg,fedsparsify-global,fedsparsify-local",
    seeds: Annotated[
        str | None, typer.Option(help="Comma-separated seeds (mean ± std over them).")
    ] = None,
    target: Annotated[
        float | None,
        typer.Option(help="Accuracy (0-1) for rounds/MB-to-target (default FedAvg's - 1 pt)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Comparison directory.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Data set.")] = None,
    model: Annotated[str | None, typer.Option(help="Model.")] = None,
    partition: Annotated[str | None, typer.Option(help="Partition.")] = None,
    clients: Annotated[int | None, typer.Option(help="Number of clients.")] = None,
    rounds: Annotated[int | None, typer.Option(help="Federated rounds.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Folder holding the data set.")] = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-run lines.")] = False,
) -> None:
    """Run several methods on identical partitions, seeds and initial weights; compare them."""
    from fedprune.compare import parse_methods, run_compare

    flags = {k: v for k, v in locals().items() if k in _FLAG_KEYS and v is not None}
    flags.pop("out", None)
    cfg = _build_config(config, set_, flags)
    names = parse_methods(methods)
    try:
        seed_list = [int(x) for x in seeds.split(",")] if seeds else []
    except ValueError:
        raise UserInputError(
            f"--seeds expects comma-separated integers, got {elide(repr(seeds), 60)}"
        ) from None
    if len(set(seed_list)) != len(seed_list):
        raise UserInputError("--seeds lists a seed twice")
    if target is not None and not 0 < target <= 1:
        raise UserInputError(f"--target must be an accuracy in (0, 1], got {target}")
    total_rounds = cfg.federation.rounds * len(names) * max(1, len(seed_list))
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )
    task = progress.add_task("compare", total=total_rounds)

    def on_run_start(method: str, seed: int, index: int, count: int) -> None:
        progress.update(task, description=f"{method} (seed {seed}) {index + 1}/{count}")

    def on_round(method: str, seed: int, rec: Mapping[str, Any]) -> None:
        progress.advance(task)
        if not quiet and rec["round"] == cfg.federation.rounds:
            acc = rec.get("test_accuracy")
            progress.console.print(
                f"{method:<20} seed {seed}: final accuracy "
                f"{'-' if acc is None else f'{100 * acc:.2f}%'}, sparsity "
                f"{100 * rec['sparsity']:.1f}%, "
                f"{(rec['cum_bytes_up'] + rec['cum_bytes_down']) / MB:.2f} MB",
                soft_wrap=True,
            )

    with progress:
        out_dir, _ = run_compare(
            cfg,
            names,
            seeds=seed_list,
            out=out,
            target=target,
            on_run_start=on_run_start,
            on_round=on_round,
        )
    console.print((out_dir / "comparison.md").read_text(encoding="utf-8"), soft_wrap=True)
    console.print(f"comparison directory: {out_dir}")


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A run directory or a comparison directory.")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default PATH/report.html).")] = None,
) -> None:
    """Write a single self-contained HTML report (plots embedded) for a run or comparison."""
    from fedprune.report import write_report

    dest = write_report(path, out)
    console.print(f"report written to {dest}")


@app.command(
    name="flower",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def flower(ctx: typer.Context) -> None:
    """Flower deployment: exec (a SuperNode's warm executor), run (exit 0 iff it completed)."""
    args = list(ctx.args)
    action, rest = (args[0], args[1:]) if args else ("", [])
    if action == "exec":
        from fedprune.engines.flower.warm import main as flower_main
    elif action == "run":
        from fedprune.engines.flower.submit import main as flower_main
    else:
        print("usage: fedprune flower {exec,run} [--help] ...", file=sys.stderr)
        raise typer.Exit(0 if action in ("", "-h", "--help") else 2)
    try:
        code = flower_main(rest)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        code = exc.code if isinstance(exc.code, int) else 2
    raise typer.Exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedprune`` console script; returns the exit code."""
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            return code  # typer.Exit(code) inside a command, with standalone_mode off
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:  # usage errors from click itself: one line too
        print(f"error: {elide(exc.format_message(), MAX_MESSAGE)}", file=sys.stderr)
        return 2
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except UserInputError as exc:
        msg = elide(str(exc), MAX_MESSAGE) if str(exc) else type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)  # plain print: rich would wrap the line
        return 2
    except FedpruneError as exc:  # e.g. a round without enough clients: stopped cleanly
        # one line, not shortened: it may end in the resume command with the run's path
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def _console_main() -> None:  # pragma: no cover - thin wrapper
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _console_main()
