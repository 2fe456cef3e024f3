"""The quality benchmark's parts: metrics, edit cases and their truth, scoring, the verdict, the outputs."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagic.defaults import SHAPES
from imagic.metrics import psnr, ssim
from imagic.shapes.cases import EDIT_KINDS, edit_cases
from imagic.shapes.classifier import load_classifier
from imagic.shapes.model import CLASSIFIER_FILE
from imagic.shapes.scoring import score_outputs

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import quality  # noqa: E402


def test_psnr_and_ssim_known_values():
    a = np.full((16, 16, 3), 100, np.uint8)
    b = a + 10
    assert psnr(a, a) == 100.0 and ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, b) == pytest.approx(20 * np.log10(255 / 10))
    mask = np.zeros((16, 16), bool)
    mask[:8] = True
    c = a.copy()
    c[8:] = 0  # differs only outside the mask
    assert psnr(a, c, mask) == 100.0 and psnr(a, c) == pytest.approx(10 * np.log10(255**2 / 5000))
    assert ssim(a, c) < ssim(a, c, mask)
    with pytest.raises(ValueError, match="mask"):
        psnr(a, b, np.zeros((4, 4), bool))


def test_cases_are_seeded_balanced_and_change_one_attribute():
    cases = edit_cases()
    assert len(cases) >= 100 and cases == edit_cases()
    kinds = [c.kind for c in cases]
    assert {k: kinds.count(k) for k in EDIT_KINDS} == {k: len(cases) // 3 for k in EDIT_KINDS}
    for case in cases:
        changed = {f for f in ("form", "colour") if getattr(case.scene, f) != getattr(case.target, f)}
        assert changed == ({"colour"} if case.kind == "colour" else {"form"})
        assert case.target.background == case.scene.background and case.target_text != case.scene.caption


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(CLASSIFIER_FILE)


def test_the_ideal_edit_scores_as_success_and_the_input_as_failure(classifier):
    for case in edit_cases()[:12]:
        truth = case.render()
        ideal, unchanged = score_outputs(case, [truth["ideal"], truth["input"]], classifier)
        assert ideal["success"] == 1.0 and ideal["background_psnr"] == 100.0 and ideal["ideal_psnr"] == 100.0
        assert unchanged["success"] == 0.0 and unchanged["background_psnr"] == 100.0 and unchanged["ideal_psnr"] < 40


def _result(kind: str, points: list[tuple[str, object, float, float]], case: str = "000", seed: int = 0) -> dict:
    return {"case": case, "kind": kind, "points": [
        {"method": m, "knob": "eta" if m.startswith("imagic") else "strength", "value": v, "seed": seed, "success": s,
         "background_psnr": p, "background_ssim": 0.5, "ideal_psnr": 15.0, "ideal_ssim": 0.5, "train_s": 1.0,
         "sample_s": 0.1, "optimiser_steps": 10} for m, v, s, p in points]}


def test_default_is_the_best_imagic_point_above_the_baselines_floor():
    points = [("imagic-a", 0.8, 1.0, 15.0), ("imagic-a", 0.6, 0.7, 20.0), ("imagic-b", 0.9, 0.9, 19.0),
              ("sdedit", 0.5, 0.6, 21.0), ("sdedit", 0.9, 0.8, 18.0), ("text-only", None, 1.0, 12.0)]
    rows = quality.summarise([_result("pose", points)])
    verdict = quality.choose_default(rows)
    assert verdict["preservation_floor"] == 18.0  # SDEdit's best point (80%) preserves more than text-only's
    assert (verdict["rule_pick"]["method"], verdict["rule_pick"]["value"]) == ("imagic-b", 0.9)
    assert verdict["beats_sdedit"]
    worse = [p if p[0] != "imagic-b" else ("imagic-b", 0.9, 0.7, 19.0) for p in points]
    assert not quality.choose_default(quality.summarise([_result("pose", worse)]))["beats_sdedit"]


def test_the_shipped_default_is_marked_only_where_the_run_sampled_it_as_it_ships():
    training = f"imagic-full-{SHAPES.embedding.steps}+{SHAPES.fine_tune['full'].steps}"
    points = [(training, SHAPES.eta, 0.9, 17.0), ("sdedit", 0.9, 0.8, 15.0), ("text-only", None, 1.0, 12.0)]
    rows = quality.summarise([_result("pose", points)])
    shipped = quality.Sampling(guidance_scale=SHAPES.guidance_scale, num_inference_steps=SHAPES.num_inference_steps)
    assert quality.choose_default(rows, shipped)["shipped_default"]["success"] == 0.9
    other = quality.Sampling(guidance_scale=SHAPES.guidance_scale + 3.5, num_inference_steps=SHAPES.num_inference_steps)
    assert quality.choose_default(rows, other)["shipped_default"] is None


def test_paired_outcomes_count_the_cases_each_point_edits():
    results = [_result("pose", [("imagic-a", 1.0, 1.0, 18.0), ("sdedit", 0.9, 0.0, 14.0)]),
               _result("shape", [("imagic-a", 1.0, 0.0, 18.0), ("sdedit", 0.9, 1.0, 14.0)]),
               _result("colour", [("imagic-a", 1.0, 1.0, 18.0), ("sdedit", 0.9, 1.0, 14.0)])]
    first, second = {"method": "imagic-a", "value": 1.0}, {"method": "sdedit", "value": 0.9}
    assert quality.paired_outcomes(results, first, second) == {"both": 1, "first_only": 1, "second_only": 1, "neither": 0}


def test_several_seeds_count_as_samples_of_one_case():
    seeds = [_result("pose", [("imagic-a", 1.0, 1.0, 18.0), ("sdedit", 0.9, 1.0, 14.0)], seed=0),
             _result("pose", [("imagic-a", 1.0, 0.0, 16.0), ("sdedit", 0.9, 1.0, 15.0)], seed=1000)]
    result = {**seeds[0], "points": seeds[0]["points"] + seeds[1]["points"]}
    imagic = next(r for r in quality.summarise([result]) if r["method"] == "imagic-a" and r["kind"] == "all")
    assert (imagic["cases"], imagic["samples"], imagic["success"], imagic["background_psnr"]) == (1, 2, 0.5, 17.0)
    first, second = {"method": "imagic-a", "value": 1.0}, {"method": "sdedit", "value": 0.9}
    assert quality.paired_outcomes([result], first, second) == {"both": 1, "first_only": 0, "second_only": 1, "neither": 0}
    assert quality.sampling_seeds(7, 3) == [7, 1007, 2007]


def test_exact_mcnemar_p_values():
    assert quality.exact_mcnemar_p(0, 0) == 1.0 and quality.exact_mcnemar_p(2, 2) == 1.0
    assert quality.exact_mcnemar_p(1, 3) == pytest.approx(0.625) == quality.exact_mcnemar_p(3, 1)  # 2 * 5/16
    assert quality.exact_mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert quality.exact_mcnemar_p(0, 5) > 0.05 > quality.exact_mcnemar_p(0, 6)


def test_one_case_runs_every_method_and_the_outputs_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "STRENGTHS", (0.5,))
    runs = (quality.ImagicRun("full", 2, 1e-2, 1e-4, (1, 2)), quality.ImagicRun("lora", 2, 1e-2, 1e-3, (2,)))
    quality._start_worker(quality.BUILT_IN_MODEL, threads=2)
    sampling = quality.Sampling(etas=(0.0, 1.0), seed_count=2, num_inference_steps=3)
    result = quality.run_case(1, runs, tmp_path / "grids", sampling)
    methods = {p["method"] for p in result["points"]}
    assert methods == {"imagic-full-2+1", "imagic-full-2+2", "imagic-lora-2+2", "sdedit", "text-only"}
    assert len(result["points"]) == 2 * (3 * 2 + 1 + 1)
    by_seed = {seed: [p for p in result["points"] if p["seed"] == seed] for seed in (1, 1001)}
    assert [(p["method"], p["value"]) for p in by_seed[1]] == [(p["method"], p["value"]) for p in by_seed[1001]]
    assert [p["background_psnr"] for p in by_seed[1]] != [p["background_psnr"] for p in by_seed[1001]]  # other noise
    assert all(0 <= p["success"] <= 1 and p["background_psnr"] > 0 for p in result["points"])
    full = [p for p in result["points"] if p["method"] == "imagic-full-2+2"]
    assert full[0]["optimiser_steps"] == 4 and full[0]["train_s"] > 0
    assert Image.open(tmp_path / "grids" / "001-shape.png").size[0] > 64

    rows = quality.summarise([result])
    quality.write_outputs(rows, [result], tmp_path, runs, quality.settings_fingerprint(runs, quality.BUILT_IN_MODEL),
                          sampling)
    assert Image.open(tmp_path / "tradeoff.png").size[0] > 500
    table = (tmp_path / "table.md").read_text()
    assert "imagic-lora-2+2" in table and "sdedit" in table and "text-only" in table
    assert "imagic-full-2+1,eta,0.0" in (tmp_path / "points.csv").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds_per_case"] == 2 and {r["samples"] for r in summary["rows"]} == {2}
    assert summary["sampling"] == {"num_inference_steps": 3, "guidance_scale": quality.GUIDANCE_SCALE}


def test_cases_scored_on_another_model_are_run_again(tmp_path):
    runs = quality.IMAGIC_RUNS
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.safetensors").write_bytes(b"one")
    (model / "README.md").write_text("a card")
    before = quality.settings_fingerprint(runs, model)
    (model / "README.md").write_text("the card, reworded")
    assert quality.settings_fingerprint(runs, model) == before  # the model card is not the model
    (model / "unet" / "weights.safetensors").write_bytes(b"two")
    assert quality.settings_fingerprint(runs, model) != before


class _Stop(Exception):
    pass


def _what_main_runs(monkeypatch, *argv: str) -> dict:
    """The cases, runs and seed count main() would run for these arguments (it stops before running anything)."""
    seen = {}

    def capture(indices, runs, out, workers, model, fingerprint, sampling):
        seen.update(indices=indices, runs=runs, seed_count=sampling.seed_count, fingerprint=fingerprint,
                    etas=sampling.etas, guidance=sampling.guidance_scale)
        raise _Stop

    monkeypatch.setattr(quality, "run_cases", capture)
    with pytest.raises(_Stop):
        quality.main(list(argv))
    return seen


def test_probe_options_choose_a_strided_subset_the_runs_and_the_seeds(monkeypatch):
    default = _what_main_runs(monkeypatch)
    assert default["indices"] == list(range(len(edit_cases()))) and default["runs"] == quality.IMAGIC_RUNS
    assert default["seed_count"] == 1 and default["etas"] == quality.ETAS
    assert default["guidance"] == quality.GUIDANCE_SCALE
    probe = _what_main_runs(monkeypatch, "--every", "5", "--run", "full:2.5e-5:25,50", "--run", "lora:2e-3:10",
                            "--seeds", "3")
    assert probe["indices"] == list(range(0, len(edit_cases()), 5)) and len(probe["indices"]) == 21
    kinds = [edit_cases()[i].kind for i in probe["indices"]]
    assert {k: kinds.count(k) for k in EDIT_KINDS} == {k: 7 for k in EDIT_KINDS}
    stage_1 = quality.EMBEDDING_STEPS, quality.EMBEDDING_LR
    assert probe["runs"] == (quality.ImagicRun("full", *stage_1, 2.5e-5, (25, 50)),
                             quality.ImagicRun("lora", *stage_1, 2e-3, (10,)))
    assert probe["seed_count"] == 3
    assert _what_main_runs(monkeypatch, "--quick", "--every", "2")["indices"] == [0, 2, 4]
    # more seeds are other settings: a resumed run must not reuse one-seed scores
    assert _what_main_runs(monkeypatch, "--seeds", "2")["fingerprint"] != default["fingerprint"]


def test_probe_options_choose_the_kind_the_embedding_stage_and_the_etas(monkeypatch):
    default = _what_main_runs(monkeypatch)
    shapes = _what_main_runs(monkeypatch, "--kind", "shape", "--every", "5")
    assert shapes["indices"] == [i for i in range(0, len(edit_cases()), 5) if edit_cases()[i].kind == "shape"]
    assert len(shapes["indices"]) == 7
    probe = _what_main_runs(monkeypatch, "--run", "full:2.5e-5:100:300", "--run", "lora:2e-3:25:50:3e-2",
                            "--etas", "0,1.2,1.6")
    assert probe["runs"] == (quality.ImagicRun("full", 300, 1e-2, 2.5e-5, (100,)),
                             quality.ImagicRun("lora", 50, 3e-2, 2e-3, (25,)))
    assert probe["etas"] == (0.0, 1.2, 1.6)
    # other etas are other settings: a resumed run must not reuse scores sampled at the default ones
    assert _what_main_runs(monkeypatch, "--etas", "0,1.6")["fingerprint"] != default["fingerprint"]
    assert quality.settings_fingerprint(quality.IMAGIC_RUNS, quality.BUILT_IN_MODEL) == default["fingerprint"]


def test_probe_guidance_is_parsed_and_part_of_the_fingerprint(monkeypatch):
    default = _what_main_runs(monkeypatch)
    probe = _what_main_runs(monkeypatch, "--guidance", "7.5")
    assert probe["guidance"] == 7.5 and probe["fingerprint"] != default["fingerprint"]
    assert quality.Sampling(guidance_scale=7.5).sampler == {"num_inference_steps": 20, "guidance_scale": 7.5}
    # the benchmark samples as the built-in model ships, so its default command measures the shipped default
    assert quality.Sampling().sampler == {"num_inference_steps": SHAPES.num_inference_steps,
                                          "guidance_scale": SHAPES.guidance_scale}


@pytest.mark.parametrize("argv, message", [
    (["--run", "full:fast:100"], "expected METHOD:LR:STEPS"),
    (["--run", "ful:1e-4:100"], "must be full or lora"),
    (["--run", "full:1e-4:200,100"], "increasing"),
    (["--run", "full:-1e-4:100"], "positive"),
    (["--every", "0"], "at least 1"),
    (["--seeds", "0"], "at least 1"),
    (["--long", "--run", "full:1e-4:100"], "give one of them"),
    (["--run", "full:1e-4:100:0"], "at least 1 step"),
    (["--run", "full:1e-4:100:50:1e-2:9"], "expected METHOD:LR:STEPS"),
    (["--run", "full:1e-4:100:100", "--run", "full:2e-4:50,100:100"], "both be named imagic-full-100+100"),
    (["--etas", "1,0"], "increasing"),
    (["--etas", "1,high"], "comma-separated numbers"),
    (["--kind", "size"], "invalid choice"),
    (["--guidance", "0.5"], "must be at least 1"),
    (["--quick", "--every", "3", "--kind", "shape"], "no shape case"),
])
def test_probe_options_refuse_bad_values_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        quality.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error
