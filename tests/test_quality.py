"""The quality benchmark's parts: metrics, edit cases and their truth, scoring, one case end to end, the deciding and
confirming runs, the outputs and the command's options."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def _tiny_plan(**changes) -> "quality.Plan":
    runs = (quality.ImagicRun("full", 2, 1e-2, 1e-4, (1, 2)),)
    plan = quality.Plan(runs, (quality.Sampling(1.0), quality.Sampling(1.4)), peers=("sdedit", "diffedit"),
                        strengths=(0.6, 1.0), steps=5)
    return plan if not changes else quality.Plan(**{**plan.__dict__, **changes})


def test_configurations_are_a_runs_checkpoints_sampled_each_way_and_a_choice_confirms_one():
    plan = _tiny_plan()
    names = list(plan.configurations())
    assert names == ["imagic-full-2+1@0.0001-eta1", "imagic-full-2+1@0.0001-eta1.4", "imagic-full-2+2@0.0001-eta1",
                     "imagic-full-2+2@0.0001-eta1.4"]
    confirming = plan.confirming("imagic-full-2+1@0.0001-eta1.4")
    assert list(confirming.configurations()) == ["imagic-full-2+1@0.0001-eta1.4"]
    assert confirming.runs[0].checkpoints == (1,) and confirming.samplings == (quality.Sampling(1.4),)
    masked = quality.Sampling(1.0, "auto", "project")
    assert masked.suffix() == "-eta1-mask-project"
    assert masked.options() == {"mix": "project", "mask": "auto", "mask_threshold": 0.5, "mask_grow": 1}
    assert quality.Sampling(1.4, "auto", mask_threshold=0.3, mask_grow=2).suffix() == "-eta1.4-mask-t0.3-g2"
    assert quality.Sampling(1.0).options() == {"mask": "none"}  # not the model's default mask


def test_one_case_runs_every_configuration_and_peer_from_one_training(tmp_path):
    quality._start_worker(quality.BUILT_IN_MODEL)
    result = quality.run_case("confirmation", 1, _tiny_plan(seed_count=2), tmp_path / "grids")
    assert result["split"] == "confirmation" and result["identity"] == edit_cases("confirmation")[1].identity
    by_method: dict = {}
    for point in result["points"]:
        by_method.setdefault(point["method"], []).append(point)
    assert set(by_method) == {*_tiny_plan().configurations(), "sdedit", "diffedit", "text-only"}
    for name in _tiny_plan().configurations():  # every strength from both seeds
        assert sorted((p["value"], p["seed"]) for p in by_method[name]) == [(0.6, 1), (0.6, 1001), (1.0, 1), (1.0, 1001)]
    assert len(by_method["diffedit"]) == 2 * len(quality.PEERS["diffedit"].values) and len(by_method["text-only"]) == 1
    early, late = by_method["imagic-full-2+1@0.0001-eta1"][0], by_method["imagic-full-2+2@0.0001-eta1"][0]
    assert (early["optimiser_steps"], late["optimiser_steps"]) == (3, 4) and 0 < early["train_s"] < late["train_s"]
    # one fine-tuning, sampled after 1 and after 2 steps: the checkpoints' images differ
    assert early["background_psnr"] != late["background_psnr"]
    assert all(0 <= p["success"] <= 1 and p["background_psnr"] > 0 for p in result["points"])
    assert Image.open(tmp_path / "grids" / "001-shape.png").size[0] > 64


def _fake_results(split: str, count: int, imagic_edits: float, peer_edits: float) -> list[dict]:
    """Cases where imagic-a edits in `imagic_edits` of the cases at 25 dB and the peer in `peer_edits` at 20 dB."""
    def point(method, knob, value, success, psnr):
        return {"method": method, "knob": knob, "value": value, "seed": 0, "success": success, "named_success": success,
                "background_psnr": psnr, "background_ssim": 0.5, "identity_psnr": 20.0, "identity_ssim": 0.5,
                "ideal_psnr": 15.0, "ideal_ssim": 0.5, "train_s": 1.0, "peak_mib": 1.0, "sample_s": 0.1}

    kinds = ("pose", "shape", "colour")
    return [{"case": f"{i:03d}-{kinds[i % 3]}", "index": i, "split": split, "kind": kinds[i % 3],
             "identity": "cyan slim", "points": [
                 point("imagic-full-2+1@0.0001-eta1", "strength", 0.6, float(i < imagic_edits * count), 25.0),
                 point("imagic-full-2+2@0.0001-eta1", "strength", 0.6, 0.0, 26.0),
                 point("sdedit", "strength", 0.6, float(i < peer_edits * count), 20.0),
                 point("text-only", "none", None, 0.0, 12.0)]} for i in range(count)]


def test_the_deciding_run_chooses_and_the_confirming_run_samples_only_the_choice(tmp_path, monkeypatch):
    seen = []

    def fake(split, indices, plan, out, workers, model):
        seen.append((split, list(plan.configurations())))
        return _fake_results(split, len(indices), 0.8, 0.2)

    monkeypatch.setattr(quality, "run_cases", fake)
    monkeypatch.setattr(quality, "PEERS", {"sdedit": quality.PEERS["sdedit"]})
    out = tmp_path / "out"
    assert quality.main(["--run", "full:1e-4:1,2:2", "--etas", "1", "--peers", "sdedit", "--out", str(out), "--cases",
                         "30"]) == 0
    assert seen == [("tuning", ["imagic-full-2+1@0.0001-eta1", "imagic-full-2+2@0.0001-eta1"]),
                    ("confirmation", ["imagic-full-2+1@0.0001-eta1"])]  # it beats SDEdit at its background
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen"] == "imagic-full-2+1@0.0001-eta1" and [s["split"] for s in summary["splits"]] == [
        "tuning", "confirmation"]
    table = (out / "table.md").read_text()
    assert "## Tuning split: 30 cases" in table and "## Confirmation split: 30 cases" in table
    assert "### Per identity" in table and "source caption" in table and "**yes**" in table
    assert Image.open(out / "tradeoff.png").size[0] > 1000  # a panel per split
    assert (out / "confirmation" / "points.csv").read_text().count("\n") > 3

    seen.clear()  # the confirmation split alone takes the recorded choice
    assert quality.main(["--split", "confirmation", "--run", "full:1e-4:1,2:2", "--etas", "1", "--peers", "sdedit", "--out",
                         str(out), "--cases", "30"]) == 0
    assert seen == [("confirmation", ["imagic-full-2+1@0.0001-eta1"])]


def test_a_confirming_run_holds_several_configurations_against_a_baseline_case_by_case(tmp_path, monkeypatch):
    seen = []

    def fake(split, indices, plan, out, workers, model):
        seen.append((split, list(plan.configurations()), [run.checkpoints for run in plan.runs]))
        return _fake_results(split, len(indices), 0.8, 0.2)

    monkeypatch.setattr(quality, "run_cases", fake)
    faster, slower = "imagic-full-2+1@0.0001-eta1", "imagic-full-2+2@0.0001-eta1"
    out = tmp_path / "out"
    assert quality.main(["--split", "confirmation", "--run", "full:1e-4:1,2:2", "--etas", "1", "--peers", "none",
                         "--choose", f"{faster},{slower}", "--baseline", slower, "--out", str(out), "--cases", "30"]) == 0
    assert seen == [("confirmation", [faster, slower], [(1, 2)])]  # one training gives both checkpoints
    table = (out / "table.md").read_text()
    # 24 of 30 cases edited by the faster one, none by the slower: 24 cases more, 0 fewer, far from noise.
    assert "### Against the baseline configuration" in table
    assert f"| {faster} | {slower} | best points | 80% [" in table and "| 24 / 0, 1.2e-07 |" in table
    assert json.loads((out / "summary.json").read_text())["chosen"] == f"{faster},{slower}"


def test_cases_scored_under_other_settings_or_another_model_run_again(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.safetensors").write_bytes(b"one")
    (model / "README.md").write_text("a card")
    plan = _tiny_plan()
    before = quality.fingerprint(plan, model)
    (model / "README.md").write_text("the card, reworded")
    (model / "imagic_defaults.json").write_text("{}")
    assert quality.fingerprint(plan, model) == before  # neither the card nor its defaults are the model
    assert quality.fingerprint(_tiny_plan(seed_count=3), model) != before
    (model / "unet" / "weights.safetensors").write_bytes(b"two")
    assert quality.fingerprint(plan, model) != before


class _Stop(Exception):
    pass


def _what_main_runs(monkeypatch, *argv: str) -> dict:
    """The split, cases and plan main() would run for these arguments (it stops before running anything)."""
    seen = {}

    def capture(split, indices, plan, out, workers, model):
        seen.update(split=split, indices=indices, plan=plan)
        raise _Stop

    monkeypatch.setattr(quality, "run_cases", capture)
    with pytest.raises(_Stop):
        quality.main(list(argv))
    return seen


def test_the_default_command_decides_on_every_tuning_case_with_every_peer(monkeypatch):
    default = _what_main_runs(monkeypatch)
    assert default["split"] == "tuning" and default["indices"] == list(range(102))
    assert default["plan"].peers == tuple(quality.PEERS) and default["plan"].runs == quality.IMAGIC_RUNS
    assert _what_main_runs(monkeypatch, "--quick")["indices"] == list(quality.QUICK_CASES)
    probe = _what_main_runs(monkeypatch, "--every", "5", "--kind", "pose", "--run", "lora:2e-3:10:50:3e-2",
                            "--etas", "1,1.4", "--masks", "none,auto", "--strengths", "0.8,1", "--seeds", "2")
    assert probe["indices"] == [i for i in range(0, 102, 5) if i % 3 == 0]
    plan = probe["plan"]
    assert plan.runs == (quality.ImagicRun("lora", 50, 3e-2, 2e-3, (10,)),) and plan.seed_count == 2
    assert plan.strengths == (0.8, 1.0) and len(plan.samplings) == 4
    assert quality.parse_run("full:2.5e-5:200:0:1e-2:joint,copies=4,stop=0.5") == quality.ImagicRun(
        "full", 0, 1e-2, 2.5e-5, (200,), joint=True, copies=4, stop_ratio=0.5)


@pytest.mark.parametrize("argv, message", [
    (["--run", "full:fast:100"], "expected METHOD:LR:STEPS"),
    (["--run", "ful:1e-4:100"], "must be full or lora"),
    (["--run", "full:1e-4:200,100"], "increasing"),
    (["--run", "full:1e-4:100:0"], "at least 1 step"),
    (["--run", "full:1e-4:100,200:50:1e-2:stop=0.5"], "one step count"),
    (["--run", "full:1e-4:100:50:1e-2:copies=0"], "copies"),
    (["--every", "0"], "at least 1"),
    (["--masks", "none,sometimes"], "expected some of none,auto"),
    (["--peers", "sdedit,instructpix2pix"], "expected some of sdedit"),
    (["--strengths", "0.5,1.2"], "each must be in (0, 1]"),
    (["--etas", "1,0"], "increasing"),
    (["--guidance", "0.5"], "must be at least 1"),
    (["--quick", "--every", "3", "--kind", "shape"], "no shape case"),
    (["--split", "confirmation", "--choose", "imagic-nothing"], "not one of this plan's configurations"),
    (["--run", "full:1e-4:1,2:2", "--etas", "1", "--choose", "imagic-full-2+1@0.0001-eta1", "--baseline",
      "imagic-full-2+2@0.0001-eta1"], "confirm it too"),
])
def test_bad_options_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        quality.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error
