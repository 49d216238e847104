"""bench/sample.py runs end to end and only ever replaces its own section of docs/benchmarks.md."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sample.py"


def load_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH.parent))  # as when run as `python bench/sample.py`
    spec = importlib.util.spec_from_file_location("bench_sample", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_measures_three_configurations_and_keeps_other_sections(tmp_path, capsys, monkeypatch):
    bench = load_bench(monkeypatch)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Training step\n\nkept\n")
    args = ["--preset", "tiny", "--steps", "1", "--frames", "2", "--repeats", "1", "--docs", str(docs)]
    assert bench.main(args) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in table] == ["| no LoRA", "| temporal LoRA, unfused",
                                                     "| temporal LoRA, fused"]
    assert all(float(row.split(" | ")[1]) > 0 for row in table)
    assert "## Training step\n\nkept\n" in docs.read_text() and "| no LoRA |" in docs.read_text()
    bench.replace_section(docs, bench.SECTION, "## Sampling\n\nnew numbers\n")  # a later run replaces the section
    text = docs.read_text()
    assert text.count("## Sampling") == 1 and "new numbers" in text and "| no LoRA |" not in text
    assert "## Training step\n\nkept\n" in text
