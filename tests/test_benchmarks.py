"""The speed benchmarks run end to end and report every figure side by side."""

import argparse
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import stages  # noqa: E402


def test_stage_benchmark_reports_both_methods_and_the_quantized_base_side_by_side(tmp_path, capsys):
    out = tmp_path / "figures.json"
    stages.main(["--arch", "tiny", "--embedding-steps", "3", "--finetune-steps", "3", "--sample-steps", "3",
                 "--quantize-base", "int8", "--json", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"full", "lora", "lora int8"}
    for figures in results.values():
        assert all(figures[key] > 0 for key, _, _ in stages.ROWS)
        assert len(figures["step_s"]["fine-tune"]) == 2  # 3 steps, the first a warm-up
    assert "lora/full" in printed and "lora int8/lora" in printed and "training peak, GiB" in printed


def test_stage_benchmark_times_each_level_of_a_cascade(tmp_path, capsys):
    out = tmp_path / "figures.json"
    stages.main(["--arch", "tiny-if", "--embedding-steps", "2", "--finetune-steps", "3", "--sample-steps", "2",
                 "--methods", "lora", "--json", str(out)])
    figures = json.loads(out.read_text())["results"]["lora"]
    assert len(figures["step_s"]["fine-tune stage_2"]) == 2 and figures["fine-tune stage_2_s_per_step"] > 0
    assert figures["resolution"] == [16, 16] and "fine-tune stage_2, s/step" in capsys.readouterr().out


def test_adam_benchmark_times_torchs_default_and_the_fused_optimiser(capsys):
    import adam

    adam.main(["--arch", "shapes", "--steps", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["torch", "default", "fused", "fused/default"]
    for label, line in zip(("Adam step, s", "fine-tuning step, s"), lines[2:]):
        assert line.startswith(label)
        default, fused, ratio = (float(x) for x in line[len(label):].split())
        assert default > 0 and fused > 0 and ratio > 0


def test_the_transformer_architectures_are_the_models_own_sizes(tmp_path):
    """sd35-medium and flux are measured at the real models' sizes (built here on the meta device: no memory);
    a block fraction builds that share of the blocks."""
    from architectures import build_flux_pipeline, build_sd35_medium_pipeline

    def billions(pipe) -> float:
        return round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e9, 2)

    assert billions(build_sd35_medium_pipeline(tmp_path / "sd3", "meta")) == 2.24  # + a 0.23B position buffer
    assert billions(build_flux_pipeline(tmp_path / "flux", "meta")) == 11.90
    quarter = build_flux_pipeline(tmp_path / "quarter", "meta", block_fraction=0.25).transformer
    assert (len(quarter.transformer_blocks), len(quarter.single_transformer_blocks)) == (5, 10)


def test_stage_benchmark_sets_whole_edits_of_two_recipes_side_by_side(tmp_path, capsys):
    out = tmp_path / "figures.json"
    stages.main(["--arch", "tiny", "--methods", "lora", "--recipes", "4@1e-2+2@1e-3", "2@1e-2+2@1e-3", "--sample-steps",
                 "2", "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["4@1e-2+2@1e-3", "2@1e-2+2@1e-3"]
    assert [results[name]["optimiser_steps"] for name in results] == [6, 4]  # every step of each recipe run
    assert all(r["train_s"] > 0 and r["sample_s"] > 0 and r["edit_s"] >= r["train_s"] for r in results.values())
    printed = capsys.readouterr().out
    assert "2@1e-2+2@1e-3/4@1e-2+2@1e-3" in printed and "optimiser steps (stages 1 + 2)" in printed
    assert "whole edits: 4@1e-2+2@1e-3: 4@0.01 + 2@0.001" in printed


def test_stage_benchmark_recipes_are_checked():
    assert stages.parse_recipe("paper") == "paper" and stages.parse_recipe("100@1e-2+50@2.5e-5")
    for bad in ("fast", "100@1e-2", "1@1e-2+100@1e-5", "100@-1+100@1e-5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected paper | defaults"):
            stages.parse_recipe(bad)
