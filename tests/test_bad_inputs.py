"""Every documented bad input exits with code 2 and one line, and the docs table is current."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bad_inputs", ROOT / "tools" / "bad_inputs.py")
assert spec is not None and spec.loader is not None
bad_inputs = importlib.util.module_from_spec(spec)
sys.modules["bad_inputs"] = bad_inputs
spec.loader.exec_module(bad_inputs)


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=[c.what for c in bad_inputs.CASES])
def test_bad_input_gets_one_line_and_exit_2(case, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = bad_inputs.run_case(case, tmp_path)
    assert out.code == 2, out.stderr
    assert len(out.lines) == 1, out.stderr
    assert out.lines[0].startswith(("error: ", "Usage:", "Error:")), out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.lines[0]) <= bad_inputs.MAX_LINE, out.lines[0]
    assert not out.written, f"left behind: {out.written}"


def test_docs_table_lists_every_case() -> None:
    text = (ROOT / "docs" / "bad-inputs.md").read_text(encoding="utf-8")
    for case in bad_inputs.CASES:
        assert f"| {case.what} |" in text, f"regenerate docs/bad-inputs.md: {case.what}"
