"""Write the README's table of config keys from the declarations in fedprune.config.

    python tools/config_table.py           # rewrite the table in README.md
    python tools/config_table.py --check   # exit 1 if README.md is out of date

The table sits between the markers ``<!-- keys:start -->`` and ``<!-- keys:end -->``.
Each row comes from the key's declaration (``fedprune.params.key``), which is also what
``RunConfig.validate`` checks, so the documented ranges are the enforced ones.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fedprune.config import RunConfig, key_table
from fedprune.params import key_rows

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def _default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"`{value}`" if value else "(empty)"
    return str(value)


def render() -> str:
    """The Markdown table, markers included."""
    flags = {r.key: r.spec.flag for r in key_rows(RunConfig) if r.spec and r.spec.flag}
    lines = [
        START,
        "| key | default | accepted | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for key, _typ, default, accepted, doc in key_table():
        flag = f" (`{flags[key]}`)" if key in flags else ""
        lines.append(f"| `{key}`{flag} | {_default(default)} | {accepted} | {doc} |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print("README.md has no keys table markers", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = head + render() + tail
    if "--check" in argv:
        if new != text:
            print("README.md's table of keys is out of date: python tools/config_table.py")
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
