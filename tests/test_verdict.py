"""The quality benchmark's statistics: intervals over cases, tables per kind and identity, the verdict per peer."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import verdict  # noqa: E402


def _point(method: str, value, success: float, psnr: float, seed: int = 0, named: float | None = None) -> dict:
    return {"method": method, "knob": "strength", "value": value, "seed": seed, "success": success,
            "named_success": success if named is None else named, "background_psnr": psnr, "background_ssim": 0.5,
            "identity_psnr": 20.0, "identity_ssim": 0.5, "ideal_psnr": 15.0, "ideal_ssim": 0.5,
            "train_s": 1.0 if method.startswith("imagic") else 0.0, "peak_mib": 100.0, "sample_s": 0.1}


def _cases(count: int, points, kind: str = "pose", identity: str = "cyan stocky") -> list[dict]:
    """`count` cases, each with the points `points(i)` gives."""
    return [{"case": f"{i:03d}-{kind}", "index": i, "kind": kind, "identity": identity, "points": points(i)}
            for i in range(count)]


def _imagic_and_peer(count: int) -> list[dict]:
    """imagic-a edits every case at 19 dB and none at 25 dB; the peer 3 in 4 at 13 dB and 9 in 16 at 18 dB."""
    return _cases(count, lambda i: [
        _point("imagic-a", 0.8, 1.0, 19.0), _point("imagic-a", 0.4, 0.0, 25.0), _point("peer", 0.3, 0.0, 25.0),
        _point("peer", 0.6, float(i % 16 < 9), 18.0), _point("peer", 0.9, float(i % 4 < 3), 13.0)])


def test_a_configuration_beats_a_peer_with_a_better_significant_best_point_and_a_curve_nowhere_below():
    results = _imagic_and_peer(32)
    rows = verdict.summarise(results)
    comparison = verdict.against_peer(rows, results, "imagic-a", "peer")
    assert comparison["best"]["value"] == 0.8 and comparison["peer_best"]["value"] == 0.9
    assert comparison["better_best_point"] and comparison["paired"]["first_more"] == 8
    assert comparison["paired"]["p_value"] < 0.05 and comparison["nowhere_below"] and comparison["beats"]
    result = verdict.verdict(rows, results, ["peer"])
    assert result["winners"] == ["imagic-a"] and result["cheapest_winner"] == "imagic-a"
    alone = verdict.verdict(rows, results, [])  # a probe with no peer run has beaten nothing
    assert alone["winners"] == [] and alone["cheapest_winner"] is None

    few = results[:12]  # 3 cases edited by imagic alone: not significant
    comparison = verdict.against_peer(verdict.summarise(few), few, "imagic-a", "peer")
    assert comparison["paired"]["first_more"] == 3 and comparison["paired"]["p_value"] == 0.25
    assert comparison["better_best_point"] and not comparison["significant"] and not comparison["beats"]


def test_a_curve_below_the_peers_at_one_of_its_backgrounds_does_not_beat_it():
    """Imagic's best point is far better, but where the peer keeps 25 dB it edits 20% and Imagic nothing."""
    results = _cases(20, lambda i: [
        _point("imagic-a", 0.8, 1.0, 19.0), _point("peer", 0.3, float(i % 5 < 1), 25.0),
        _point("peer", 0.9, float(i % 10 < 3), 13.0)])
    comparison = verdict.against_peer(verdict.summarise(results), results, "imagic-a", "peer")
    assert comparison["better_best_point"] and comparison["significant"] and not comparison["nowhere_below"]
    assert [(s["value"], s["peer"], s["ours"]) for s in comparison["curve_below_at"]] == [(0.3, 0.2, 0.0)]
    assert not comparison["beats"]


def test_a_best_point_that_keeps_less_background_than_the_peers_does_not_beat_it():
    results = _cases(8, lambda i: [_point("imagic-a", 1.0, 1.0, 14.0), _point("peer", 0.9, float(i < 2), 15.0)])
    comparison = verdict.against_peer(verdict.summarise(results), results, "imagic-a", "peer")
    assert comparison["significant"] and not comparison["better_best_point"] and not comparison["beats"]


def test_seeds_are_samples_of_one_case_in_rates_intervals_and_paired_tests():
    points = [_point("imagic-a", 1.0, 1.0, 18.0, seed=0), _point("imagic-a", 1.0, 0.0, 16.0, seed=1000),
              _point("peer", 0.9, 1.0, 14.0, seed=0), _point("peer", 0.9, 1.0, 15.0, seed=1000)]
    results = _cases(1, lambda i: points)
    imagic = next(r for r in verdict.summarise(results) if r["method"] == "imagic-a" and r["group"] == "all")
    assert (imagic["cases"], imagic["samples"], imagic["success"], imagic["background_psnr"]) == (1, 2, 0.5, 17.0)
    assert imagic["success_low"] == imagic["success_high"] == 0.5  # one case: no spread to resample
    first, second = {"method": "imagic-a", "value": 1.0}, {"method": "peer", "value": 0.9}
    assert verdict.paired_outcomes(results, first, second) == {"first_more": 0, "second_more": 1, "tied": 0}


def test_intervals_cover_the_rate_and_narrow_with_more_cases():
    low, high = verdict.interval([1.0] * 30 + [0.0] * 70)
    assert low < 0.3 < high and high - low == pytest.approx(0.18, abs=0.03)  # about 2 x 1.96 x sqrt(.21 / 100)
    wide = verdict.interval([1.0] * 3 + [0.0] * 7)
    assert wide[1] - wide[0] > 2 * (high - low)
    assert verdict.interval([1.0] * 30 + [0.0] * 70) == (low, high)  # seeded: the same table every run


def test_rows_per_kind_and_identity_and_the_identity_kept_among_named_successes():
    pose = _cases(4, lambda i: [_point("peer", 0.5, float(i < 1), 20.0, named=float(i < 2))], "pose", "cyan slim")
    shape = _cases(2, lambda i: [_point("peer", 0.5, 1.0, 22.0)], "shape", "white core")
    rows = verdict.summarise(pose + shape)
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {"all", "kind:pose", "kind:shape", "identity:cyan slim", "identity:white core"}
    assert by_group["kind:pose"]["success"] == 0.25 and by_group["kind:pose"]["identity_kept"] == 0.5
    assert by_group["identity:white core"]["cases"] == 2 and by_group["all"]["success"] == pytest.approx(0.5)


def test_without_a_winner_the_best_tradeoff_is_the_configuration_editing_most_at_the_peers_backgrounds():
    results = _cases(10, lambda i: [
        _point("imagic-a", 0.7, 0.6, 24.0), _point("imagic-b", 0.7, 0.9, 16.0),
        _point("peer", 0.3, 0.5, 25.0), _point("peer", 0.6, 0.7, 20.0)])
    result = verdict.verdict(verdict.summarise(results), results, ["peer"])
    assert result["winners"] == [] and result["cheapest_winner"] is None
    # at the peer's 25 dB neither has a point; at 20 dB imagic-a keeps 24 dB at 60%, imagic-b nothing above 16 dB
    assert result["tradeoff"] == {"imagic-a": pytest.approx(0.3), "imagic-b": 0.0}
    assert result["best_tradeoff"] == "imagic-a"


def test_exact_sign_test_p_values():
    assert verdict.exact_sign_test_p(0, 0) == 1.0 and verdict.exact_sign_test_p(2, 2) == 1.0
    assert verdict.exact_sign_test_p(1, 3) == pytest.approx(0.625) == verdict.exact_sign_test_p(3, 1)
    assert verdict.exact_sign_test_p(0, 5) > 0.05 > verdict.exact_sign_test_p(0, 6)
