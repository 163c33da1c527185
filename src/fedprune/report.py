"""A single self-contained HTML page for a run directory or a comparison directory.

Plots are embedded as base64 PNGs and styles are inline, so the page can be mailed or
archived on its own. No JavaScript.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedprune import rundir
from fedprune.compare import COMPARISON_JSON, markdown_table, read_comparison
from fedprune.errors import UserInputError

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#1d2330;background:#fff;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2rem;
border-bottom:1px solid #dde;padding-bottom:.2rem}.sub{color:#667;margin-top:0}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #d6dae3;padding:.3rem .55rem;text-align:right}
th{background:#f2f4f8}td:first-child,th:first-child{text-align:left}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{border:1px solid #d6dae3;border-radius:8px;padding:.6rem .9rem;min-width:150px}
.card b{display:block;font-size:1.3rem}.card span{color:#667;font-size:.8rem}
img{max-width:100%;border:1px solid #eef;margin:.4rem 0}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:.8rem}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem}
"""

MB = 1e6


def _img(path: Path) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(path.stem.replace("_", " "))
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _md_table_to_html(md: str) -> str:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    if len(lines) < 2:
        return ""
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return _table(cells[0], cells[2:])


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _page(title: str, subtitle: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class=sub>{html.escape(subtitle)}</p>{body}"
        "</body></html>"
    )


def _pct(x: Any) -> str:
    return "—" if x is None else f"{100 * float(x):.2f}%"


def run_report(run_dir: Path) -> str:
    """HTML for one run directory."""
    s = rundir.read_summary(run_dir)
    recs = rundir.read_metrics(run_dir)
    total_mb = (s["total_bytes_up"] + s["total_bytes_down"]) / MB
    dense_mb = (s["dense_bytes_up"] + s["dense_bytes_down"]) / MB
    cards = "".join(
        [
            _card(_pct(s.get("final_accuracy")), "final test accuracy"),
            _card(_pct(s.get("best_accuracy")), "best test accuracy"),
            _card(_pct(s.get("final_sparsity")), "weight sparsity"),
            _card(
                f"{s['final_nonzero_params']:,} / {s['dense_params']:,}", "non-zero / dense params"
            ),
            _card(
                f"{s['final_flops'] / 1e6:.2f} M", f"FLOPs (dense {s['dense_flops'] / 1e6:.2f} M)"
            ),
            _card(f"{total_mb:.2f} MB", f"communicated (dense fp32: {dense_mb:.2f} MB)"),
            _card(f"{s['wall_s']:.1f} s", "wall time"),
        ]
    )
    if s.get("final_average_accuracy") is not None:
        cards += _card(
            _pct(s["final_average_accuracy"]),
            "final accuracy, moving average of the global models",
        )
    # `fedprune latency` stores summary["latency"]["speedup"] (dense median / final median)
    if isinstance(s.get("latency"), dict) and s["latency"].get("speedup"):
        cards += _card(f"{s['latency']['speedup']:.2f}x", "ONNX Runtime speed-up, batch 1")
    average = any(r.get("average_test_accuracy") is not None for r in recs)
    head = [
        "round",
        "test acc",
        *(["average acc"] if average else []),
        "sparsity",
        "params",
        "non-zero",
        "MFLOPs eff.",
        "MB up",
        "MB down",
        "round s",
    ]
    rows = [
        [
            r["round"],
            _pct(r.get("test_accuracy")),
            *([_pct(r.get("average_test_accuracy"))] if average else []),
            _pct(r.get("sparsity")),
            f"{r['params']:,}",
            f"{r['nonzero_params']:,}",
            f"{r['effective_flops'] / 1e6:.3f}",
            f"{r['bytes_up'] / MB:.3f}",
            f"{r['bytes_down'] / MB:.3f}",
            f"{r.get('round_s', 0):.2f}",
        ]
        for r in recs
    ]
    plots = "".join(
        _img(run_dir / n) for n in ("accuracy.png", "accuracy_vs_mb.png", "label_distribution.png")
    )
    config = (
        (run_dir / rundir.CONFIG).read_text(encoding="utf-8")
        if (run_dir / rundir.CONFIG).is_file()
        else ""
    )
    body = (
        f'<div class="cards">{cards}</div><h2>Plots</h2><div class="plots">{plots}</div>'
        f"<h2>Rounds</h2>{_table(head, rows)}"
        f"<h2>Configuration</h2><pre>{html.escape(config)}</pre>"
    )
    title = f"{s['method']} on {s['dataset']} ({s['model']})"
    sub = (
        f"{s['rounds']} rounds, {s.get('num_clients', '?')} clients, "
        f"partition {s.get('partition', '?')}, seed {s.get('seed', '?')}"
    )
    return _page(title, sub, body)


def compare_report(cmp_dir: Path) -> str:
    """HTML for a comparison directory."""
    data = read_comparison(cmp_dir)
    rows = data["rows"]
    md_path = cmp_dir / "comparison.md"
    md = (
        md_path.read_text(encoding="utf-8")
        if md_path.is_file()
        else markdown_table(rows, data.get("target"))
    )
    plots = "".join(
        _img(cmp_dir / n)
        for n in (
            "accuracy_vs_round.png",
            "accuracy_vs_mb.png",
            "sparsity_flops_vs_round.png",
            "pareto_flops.png",
            "pareto_mb.png",
        )
    )
    best = max(
        (r for r in rows if r.get("final_accuracy") is not None),
        key=lambda r: r["final_accuracy"],
        default=None,
    )
    cards = "".join(
        [
            _card(str(len(rows)), "methods"),
            _card(str(rows[0]["seeds"]) if rows else "0", "seeds per method"),
        ]
        + (
            [_card(f"{best['method']}: {_pct(best['final_accuracy'])}", "best final accuracy")]
            if best
            else []
        )
    )
    runs = "".join(
        f"<li>{html.escape(m)}: {', '.join(html.escape(p) for p in paths)}</li>"
        for m, paths in data.get("runs", {}).items()
    )
    body = (
        f'<div class="cards">{cards}</div><h2>Table</h2>{_md_table_to_html(md)}'
        f'<h2>Plots</h2><div class="plots">{plots}</div><h2>Run directories</h2><ul>{runs}</ul>'
    )
    title = md.splitlines()[0].lstrip("# ").strip() if md else "Comparison"
    return _page(title, f"target accuracy: {_pct(data.get('target'))}", body)


def write_report(path: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` for a run or comparison directory; return its path."""
    p = Path(path)
    if not p.is_dir():
        raise UserInputError(f"{str(p)!r} is not a directory")
    if (p / COMPARISON_JSON).is_file():
        text = compare_report(p)
    elif (p / rundir.SUMMARY).is_file():
        text = run_report(p)
    else:
        raise UserInputError(
            f"{str(p)!r} holds neither summary.json (a run) nor comparison.json (a comparison)"
        )
    dest = Path(out) if out else p / "report.html"
    dest.write_text(text, encoding="utf-8")
    return dest
