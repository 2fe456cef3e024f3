"""The stage benchmark runs end to end and reports every figure for both methods."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import stages  # noqa: E402


def test_stage_benchmark_reports_both_methods_side_by_side(tmp_path, capsys):
    out = tmp_path / "figures.json"
    stages.main(["--arch", "tiny", "--embedding-steps", "3", "--finetune-steps", "3", "--sample-steps", "3",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"full", "lora"}
    for figures in results.values():
        assert all(figures[key] > 0 for key, _, _ in stages.ROWS)
        assert len(figures["step_s"]["fine-tune"]) == 2  # 3 steps, the first a warm-up
    assert "lora/full" in printed and "peak memory, GiB" in printed
