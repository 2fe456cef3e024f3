"""The quality benchmark's parts: metrics, edit cases and their truth, scoring, the verdict, the outputs."""

import json
import sys
from dataclasses import replace
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
from imagic.shapes.world import ACCENTS, BUILDS, LIMB_WIDTH, render

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
        changed = {f for f in ("form", "colour", "accent", "build") if getattr(case.scene, f) != getattr(case.target, f)}
        assert changed == ({"colour"} if case.kind == "colour" else {"form"})  # the identity is kept
        assert case.target.background == case.scene.background and case.target_text != case.scene.caption


def test_the_confirmation_split_mirrors_the_tuning_splits_mix_with_new_cases():
    tuning, confirmation = edit_cases("tuning"), edit_cases("confirmation")
    assert len(confirmation) == len(tuning) >= 102 and confirmation == edit_cases("confirmation")
    assert [c.kind for c in confirmation].count("pose") == len(confirmation) // 3
    for mine, theirs in zip(confirmation, tuning):  # the same kind, subject and identity, case by case
        assert (mine.kind, mine.scene.subject, mine.identity) == (theirs.kind, theirs.scene.subject, theirs.identity)
        assert mine.scene != theirs.scene and mine.split == "confirmation"
    # everything else is drawn afresh: not one scene, background or target text of the tuning split comes back
    assert not {c.scene.background for c in confirmation} & {c.scene.background for c in tuning}
    assert sum(a.target_text == b.target_text for a, b in zip(confirmation, tuning)) < len(tuning) // 4
    with pytest.raises(ValueError, match="unknown split"):
        edit_cases("validation")


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(CLASSIFIER_FILE)


def test_the_ideal_edit_scores_as_success_and_the_input_as_failure(classifier):
    for case in edit_cases()[:12]:
        truth = case.render()
        ideal, unchanged = score_outputs(case, [truth["ideal"], truth["input"]], classifier)
        assert ideal["success"] == 1.0 and ideal["background_psnr"] == 100.0 and ideal["ideal_psnr"] == 100.0
        assert ideal["identity_psnr"] == 100.0 and ideal["named_success"] == 1.0
        assert unchanged["success"] == 0.0 and unchanged["background_psnr"] == 100.0 and unchanged["ideal_psnr"] < 40


def test_an_edit_that_loses_the_subjects_identity_is_not_a_success(classifier):
    """The caption is met, but the subject is another one: SDEdit's typical failure on this world."""
    for case in edit_cases()[:12]:
        other_accent = next(a for a in ACCENTS if a != case.target.accent)
        other_build = next(b for b in BUILDS[case.target.subject] if b != case.target.build)
        low, high = LIMB_WIDTH.get(other_build, (case.target.thickness,) * 2)  # a person's build is its limbs too
        strangers = [render(replace(case.target, accent=other_accent))[0],
                     render(replace(case.target, build=other_build, thickness=(low + high) / 2))[0]]
        for score in score_outputs(case, strangers, classifier):
            assert score["named_success"] == 1.0 and score["success"] == 0.0, score["read"]
            assert score["identity_psnr"] < 40 and score["background_psnr"] > 40


def _result(kind: str, points: list[tuple[str, object, float, float]], case: str = "000", seed: int = 0,
            tier: str = "decide") -> dict:
    return {"case": case, "index": int(case), "kind": kind, "points": [
        {"method": m, "knob": "eta" if m.startswith("imagic") else "strength", "value": v, "seed": seed, "tier": tier,
         "success": s,
         "named_success": s, "background_psnr": p, "background_ssim": 0.5, "identity_psnr": 20.0,
         "identity_ssim": 0.5, "ideal_psnr": 15.0, "ideal_ssim": 0.5,
         "train_s": 1.0 if m.startswith("imagic") else 0.0, "peak_mib": 100.0, "sample_s": 0.1,
         "optimiser_steps": 10} for m, v, s, p in points]}


def _cases(count: int, points) -> list[dict]:
    """`count` cases of the same points; `points` may be a function of the case's number."""
    return [_result("pose", points(i) if callable(points) else points, case=f"{i:03d}") for i in range(count)]


def _sdedit_and_imagic(count: int) -> list[dict]:
    """`count` cases: imagic-a edits all at 19 dB; SDEdit 3 in 4 at 0.9 (13 dB), 9 in 16 at 0.6 (18 dB)."""
    def points(i):
        return [("imagic-a", 0.8, 1.0, 19.0), ("imagic-a", 0.4, 0.0, 25.0), ("sdedit", 0.3, 0.0, 25.0),
                ("sdedit", 0.6, float(i % 16 < 9), 18.0), ("sdedit", 0.9, float(i % 4 < 3), 13.0),
                ("text-only", None, 0.0, 12.0)]

    return _cases(count, points)


def test_a_configuration_beats_sdedit_with_a_better_best_point_significance_and_a_larger_area():
    results = _sdedit_and_imagic(32)
    rows = quality.summarise(results)
    comparison = quality.compare_with_sdedit(rows, results, "imagic-a")
    assert comparison["best"]["value"] == 0.8 and comparison["better_best_point"]
    assert comparison["paired"]["first_more"] == 8 and comparison["paired"]["p_value"] < 0.05
    assert comparison["areas"]["range_db"] == [13.0, 18.0]
    assert comparison["areas"]["first"] == 1.0 and comparison["areas"]["second"] == pytest.approx(18 / 32)
    assert comparison["larger_area"] and comparison["beats"]
    verdict = quality.choose_default(rows, results)
    assert verdict["winners"] == ["imagic-a"] and verdict["cheapest_winner"]["method"] == "imagic-a"

    few = _sdedit_and_imagic(32)[:12]  # 3 samples edited by imagic alone: not significant
    few_rows = quality.summarise(few)
    comparison = quality.compare_with_sdedit(few_rows, few, "imagic-a")
    assert comparison["paired"]["first_more"] == 3 and comparison["paired"]["p_value"] == 0.25
    assert comparison["better_best_point"] and not comparison["significant"]
    assert quality.choose_default(few_rows, few)["cheapest_winner"] is None


def test_a_best_point_that_keeps_less_background_than_sdedits_does_not_beat_it():
    def points(i):
        return [("imagic-a", 1.0, 1.0, 14.0), ("sdedit", 0.9, float(i < 2), 15.0), ("text-only", None, 0.0, 12.0)]

    results = _cases(8, points)
    comparison = quality.compare_with_sdedit(quality.summarise(results), results, "imagic-a")
    assert comparison["significant"] and not comparison["better_best_point"] and not comparison["beats"]


def test_shared_areas_compare_the_curves_where_both_edit_half_the_cases():
    imagic = [(15.0, 1.0), (20.0, 0.8), (25.0, 0.2)]
    sdedit = [(14.0, 1.0), (18.0, 0.6), (24.0, 0.1)]
    areas = quality.shared_areas(imagic, sdedit)
    assert areas["range_db"] == [14.0, 18.0]  # from the lowest point to SDEdit's last point editing half or more
    assert areas["first"] == pytest.approx((1 * 1.0 + 3 * 0.8) / 4) and areas["second"] == pytest.approx(0.6)
    assert quality.success_keeping(imagic, 19.0) == 0.8 and quality.success_keeping(imagic, 26.0) == 0.0
    assert quality.shared_areas(imagic, [(10.0, 0.4)]) is None


def test_the_shipped_default_is_marked_only_where_the_run_sampled_it_as_it_ships():
    training = f"imagic-full-{SHAPES.embedding.steps}+{SHAPES.fine_tune['full'].steps}"
    shipped_point = (f"{training}-photo", SHAPES.strength) if SHAPES.strength < 1 else (training, SHAPES.eta)
    points = [(*shipped_point, 0.9, 17.0), ("sdedit", 0.9, 0.8, 15.0), ("text-only", None, 1.0, 12.0)]
    results = [_result("pose", points)]
    rows = quality.summarise(results)
    shipped = quality.Sampling(guidance_scale=SHAPES.guidance_scale, num_inference_steps=SHAPES.num_inference_steps)
    assert quality.choose_default(rows, results, shipped)["shipped_default"]["success"] == 0.9
    other = quality.Sampling(guidance_scale=SHAPES.guidance_scale + 3.5, num_inference_steps=SHAPES.num_inference_steps)
    assert quality.choose_default(rows, results, other)["shipped_default"] is None
    # a run named alike but fine-tuned at another learning rate is not the shipped default
    faster = quality.ImagicRun(SHAPES.method, SHAPES.embedding.steps, SHAPES.embedding.learning_rate, 1e-4,
                               (SHAPES.fine_tune[SHAPES.method].steps,))
    assert quality.choose_default(rows, results, shipped, (faster,))["shipped_default"] is None


def test_paired_outcomes_count_the_cases_each_point_edits():
    results = [_result("pose", [("imagic-a", 1.0, 1.0, 18.0), ("sdedit", 0.9, 0.0, 14.0)]),
               _result("shape", [("imagic-a", 1.0, 0.0, 18.0), ("sdedit", 0.9, 1.0, 14.0)]),
               _result("colour", [("imagic-a", 1.0, 1.0, 18.0), ("sdedit", 0.9, 1.0, 14.0)])]
    first, second = {"method": "imagic-a", "value": 1.0}, {"method": "sdedit", "value": 0.9}
    assert quality.paired_outcomes(results, first, second) == {"first_more": 1, "second_more": 1, "tied": 1}


def test_several_seeds_count_as_samples_of_one_case():
    seeds = [_result("pose", [("imagic-a", 1.0, 1.0, 18.0), ("sdedit", 0.9, 1.0, 14.0)], seed=0),
             _result("pose", [("imagic-a", 1.0, 0.0, 16.0), ("sdedit", 0.9, 1.0, 15.0)], seed=1000)]
    result = {**seeds[0], "points": seeds[0]["points"] + seeds[1]["points"]}
    imagic = next(r for r in quality.summarise([result]) if r["method"] == "imagic-a" and r["kind"] == "all")
    assert (imagic["cases"], imagic["samples"], imagic["success"], imagic["background_psnr"]) == (1, 2, 0.5, 17.0)
    first, second = {"method": "imagic-a", "value": 1.0}, {"method": "sdedit", "value": 0.9}
    # one case: SDEdit edits it more often (2 of 2 against 1 of 2), and its seeds are not two cases
    assert quality.paired_outcomes([result], first, second) == {"first_more": 0, "second_more": 1, "tied": 0}
    deterministic = {**result, "points": seeds[0]["points"][:1] + [p for p in result["points"] if p["method"] == "sdedit"]}
    assert quality.paired_outcomes([deterministic], first, second)["tied"] == 1  # one sample of 1.0 against 1.0
    assert quality.sampling_seeds(7, 3) == [7, 1007, 2007]


def test_the_deciding_tier_has_every_seed_and_the_screen_one_seed_of_every_configuration():
    decide = [("imagic-a", 1.0, 1.0, 18.0), ("sdedit", 0.9, 1.0, 14.0)]
    screened = _result("pose", [("imagic-b", 1.0, 0.0, 19.0)], case="005", seed=5, tier="screen")
    case_5 = [_result("pose", decide, case="005", seed=seed) for seed in (5, 1005)] + [screened]
    case_6 = [_result("shape", decide, case="006", seed=seed) for seed in (6, 1006)]
    results = [{**group[0], "points": [p for r in group for p in r["points"]]} for group in (case_5, case_6)]
    assert [len(r["points"]) for r in quality.deciding(results)] == [4, 4]
    [screen] = quality.screen(results)
    assert screen["case"] == "005" and {(p["method"], p["seed"]) for p in screen["points"]} == {
        ("imagic-a", 5), ("sdedit", 5), ("imagic-b", 5)}
    sampling = quality.Sampling()
    assert sampling.decides(0, "photo", "paper") and not sampling.decides(1, "photo", "paper")
    assert not sampling.decides(0, "inverted", "paper") and not sampling.decides(0, "noise", "forget-kv")
    assert sampling.tier(0, "noise", "paper") == sampling.tier(1, "photo", "forget-kv") == "screen"
    assert sampling.tier(0, "noise", "forget-kv") is None and sampling.tier(1, "noise", "paper") is None
    screened = [i for i in range(102) if sampling.screened(i)]
    assert screened == list(range(0, 102, 17)) and sorted(edit_cases()[i].kind for i in screened) == sorted(EDIT_KINDS * 2)


def test_exact_sign_test_p_values():
    assert quality.exact_sign_test_p(0, 0) == 1.0 and quality.exact_sign_test_p(2, 2) == 1.0
    assert quality.exact_sign_test_p(1, 3) == pytest.approx(0.625) == quality.exact_sign_test_p(3, 1)  # 2 * 5/16
    assert quality.exact_sign_test_p(0, 6) == pytest.approx(2 / 64)
    assert quality.exact_sign_test_p(0, 5) > 0.05 > quality.exact_sign_test_p(0, 6)


def test_one_case_runs_every_method_and_the_outputs_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "STRENGTHS", (0.5,))
    runs = (quality.ImagicRun("full", 2, 1e-2, 1e-4, (1, 2)),
            quality.ImagicRun("lora", 0, 1e-2, 1e-3, (2,), joint=True, copies=2))
    quality._start_worker(quality.BUILT_IN_MODEL, threads=2)
    sampling = quality.Sampling(etas=(0.0, 1.0), seed_count=2, num_inference_steps=3, variants=("paper", "project"),
                                decide_starts=("noise", "inverted"), screen_every=1, photo_strengths=(0.6,),
                                photo_etas=(1.0, 1.4))
    result = quality.run_case(1, runs, tmp_path / "grids", sampling)
    methods = {p["method"] for p in result["points"]}
    trainings = ("imagic-full-2+1", "imagic-full-2+2", "imagic-lora-0+2-joint-x2")
    sampled = (*trainings, *(f"{t}-project" for t in trainings))
    # every run in every variant from the deciding starts; the first run from the photo too, in the paper's variant,
    # each photo eta a method of its own
    photo_starts = {f"{t}-photo{eta}" for t in trainings[:2] for eta in ("", "-eta1.4")}
    assert methods == {*sampled, *(f"{t}-inverted" for t in sampled), *photo_starts, "sdedit", "text-only"}
    # deciding: the first run's 2 checkpoints from noise (2 etas, both seeds) and inversion (2 etas, deterministic:
    # one seed), SDEdit (both seeds), text-only (the first seed); screened, the first seed: the first run's
    # project variant from noise and inversion and its photo start (1 strength, 2 etas), the second run's 2 variants
    tiers = {tier: [p for p in result["points"] if p["tier"] == tier] for tier in ("decide", "screen")}
    assert len(tiers["decide"]) == 2 * 2 * 2 + 2 * 2 + 2 + 1 and {p["seed"] for p in tiers["decide"]} == {1, 1001}
    assert len(tiers["screen"]) == 2 * (2 + 2 + 2) + 2 * (2 + 2) and {p["seed"] for p in tiers["screen"]} == {1}
    joint = [p for p in result["points"] if p["method"] == "imagic-lora-0+2-joint-x2"]
    assert joint[0]["optimiser_steps"] == 2
    photo = [p for p in result["points"] if p["method"] == "imagic-full-2+2-photo"]
    assert [(p["knob"], p["value"], p["tier"]) for p in photo] == [("strength", 0.6, "screen")]
    faster = [p for p in result["points"] if p["method"] == "imagic-full-2+2-photo-eta1.4"]
    assert [p["background_psnr"] for p in faster] != [p["background_psnr"] for p in photo]  # sampled at its own eta
    assert {p["seed"] for p in result["points"] if p["method"].endswith("-inverted")} == {1}
    noise = {seed: [p for p in tiers["decide"] if p["seed"] == seed and p["method"] in ("imagic-full-2+2", "sdedit")]
             for seed in (1, 1001)}
    assert [(p["method"], p["value"]) for p in noise[1]] == [(p["method"], p["value"]) for p in noise[1001]]
    assert [p["background_psnr"] for p in noise[1]] != [p["background_psnr"] for p in noise[1001]]  # other noise
    assert all(0 <= p["success"] <= 1 and p["background_psnr"] > 0 for p in result["points"])
    full = [p for p in result["points"] if p["method"] == "imagic-full-2+2"]
    assert full[0]["optimiser_steps"] == 4 and full[0]["train_s"] > 0 and full[0]["peak_mib"] > 100
    assert Image.open(tmp_path / "grids" / "001-shape.png").size[0] > 64

    quality.write_outputs([result], tmp_path, runs, quality.settings_fingerprint(runs, quality.BUILT_IN_MODEL),
                          sampling)
    assert Image.open(tmp_path / "tradeoff.png").size[0] > 1000  # two panels: deciding and screen
    deciding, screen = (tmp_path / "table.md").read_text().split("Screen:")
    assert "imagic-full-2+2-inverted" in deciding and "sdedit" in deciding and "text-only" in deciding
    assert "imagic-lora-0+2-joint-x2-project-inverted" in screen and "-photo" not in deciding
    assert "imagic-full-2+1,eta,0.0" in (tmp_path / "points.csv").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds_per_case"] == 2
    assert {r["method"]: r["samples"] for r in summary["rows"] if r["kind"] == "all"} == {
        "imagic-full-2+1": 2, "imagic-full-2+2": 2, "imagic-full-2+1-inverted": 1, "imagic-full-2+2-inverted": 1,
        "sdedit": 2, "text-only": 1}
    assert summary["screen"]["cases"] == 1 and {r["samples"] for r in summary["screen"]["rows"]} == {1}

    unscreened = quality.run_case(3, runs, None, replace(sampling, screen_every=2))
    assert {p["tier"] for p in unscreened["points"]} == {"decide"}
    assert {p["method"] for p in unscreened["points"]} == {
        "imagic-full-2+1", "imagic-full-2+2", "imagic-full-2+1-inverted", "imagic-full-2+2-inverted", "sdedit",
        "text-only"}
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
                    etas=sampling.etas, guidance=sampling.guidance_scale, starts=sampling.starts,
                    variants=sampling.variants, sampling=sampling)
        raise _Stop

    monkeypatch.setattr(quality, "run_cases", capture)
    with pytest.raises(_Stop):
        quality.main(list(argv))
    return seen


def test_probe_options_choose_a_strided_subset_the_runs_and_the_seeds(monkeypatch):
    default = _what_main_runs(monkeypatch)
    assert default["indices"] == list(range(len(edit_cases()))) and default["runs"] == quality.IMAGIC_RUNS
    assert default["seed_count"] == quality.DECIDING_SEEDS == 3 and default["etas"] == quality.ETAS
    assert _what_main_runs(monkeypatch, "--quick")["seed_count"] == 1
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
    assert probe["etas"] == (0.0, 1.2, 1.6) and default["starts"] == quality.STARTS
    paper = _what_main_runs(monkeypatch, "--starts", "noise")
    assert paper["starts"] == ("noise",) and paper["fingerprint"] != default["fingerprint"]
    assert paper["sampling"].decide_starts == ("noise",)  # the default deciding starts that are sampled
    assert _what_main_runs(monkeypatch, "--starts", "inverted")["sampling"].decide_starts == ("inverted",)
    # other etas are other settings: a resumed run must not reuse scores sampled at the default ones
    assert _what_main_runs(monkeypatch, "--etas", "0,1.6")["fingerprint"] != default["fingerprint"]
    assert quality.settings_fingerprint(quality.IMAGIC_RUNS, quality.BUILT_IN_MODEL) == default["fingerprint"]


def test_forgedit_runs_and_sampling_variants_are_parsed(monkeypatch):
    default = _what_main_runs(monkeypatch)
    assert default["variants"] == tuple(quality.VARIANTS)
    probe = _what_main_runs(monkeypatch, "--run", "full:2.5e-5:200:0:1e-2:joint,copies=4,stop=0.5",
                            "--variants", "paper,forget-encoder")
    [run] = probe["runs"]
    assert run == quality.ImagicRun("full", 0, 1e-2, 2.5e-5, (200,), joint=True, copies=4, stop_ratio=0.5)
    assert run.name(200) == "imagic-full-0+200-joint-x4-stop0.5"
    settings = run.settings(7)
    assert settings.joint and settings.fine_tune.copies == 4 and settings.fine_tune.stop_ratio == 0.5
    assert settings.embedding.copies == 4 and settings.seed == 7
    assert probe["variants"] == ("paper", "forget-encoder") and probe["fingerprint"] != default["fingerprint"]


def test_the_deciding_configurations_and_the_screen_are_chosen_and_part_of_the_fingerprint(monkeypatch):
    default = _what_main_runs(monkeypatch)
    assert default["sampling"].decide_starts == quality.DECIDE_STARTS and default["sampling"].screen_every == 17
    probe = _what_main_runs(monkeypatch, "--decide-starts", "noise,inverted", "--decide-variants", "paper,forget-kv",
                            "--screen-every", "10")
    sampling = probe["sampling"]
    assert (sampling.decide_starts, sampling.decide_variants, sampling.screen_every) == (
        ("noise", "inverted"), ("paper", "forget-kv"), 10)
    assert probe["fingerprint"] != default["fingerprint"]
    photo = _what_main_runs(monkeypatch, "--photo-strengths", "0.8,1", "--photo-etas", "1,1.4")["sampling"]
    assert (photo.photo_strengths, photo.photo_etas) == ((0.8, 1.0), (1.0, 1.4))
    assert quality.settings_fingerprint(quality.IMAGIC_RUNS, quality.BUILT_IN_MODEL, photo) != default["fingerprint"]
    assert _what_main_runs(monkeypatch, "--screen-every", "10")["fingerprint"] != default["fingerprint"]


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
    (["--run", "full:1e-4:100:50:1e-2:joint:x"], "expected METHOD:LR:STEPS"),
    (["--run", "full:1e-4:100,200:50:1e-2:stop=0.5"], "one step count"),
    (["--run", "full:1e-4:100:50:1e-2:copies=0"], "copies"),
    (["--run", "full:1e-4:100:0:1e-2:copies=2"], "0 with joint"),
    (["--variants", "paper,sideways"], "expected some of paper,project"),
    (["--run", "full:1e-4:100:100", "--run", "full:2e-4:50,100:100"], "both be named imagic-full-100+100"),
    (["--etas", "1,0"], "increasing"),
    (["--etas", "1,high"], "comma-separated numbers"),
    (["--kind", "size"], "invalid choice"),
    (["--guidance", "0.5"], "must be at least 1"),
    (["--starts", "noise,middle"], "expected some of noise,photo,inverted"),
    (["--starts", "noise,noise"], "each once"),
    (["--screen-every", "0"], "at least 1"),
    (["--photo-strengths", "0.5,1.2"], "each must be in (0, 1]"),
    (["--starts", "noise", "--decide-starts", "photo"], "each must also be sampled"),
    (["--variants", "paper", "--decide-variants", "forget-kv"], "each must also be sampled"),
    (["--quick", "--every", "3", "--kind", "shape"], "no shape case"),
])
def test_probe_options_refuse_bad_values_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        quality.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error
