"""The quality benchmark's statistics: rates with intervals, tables per kind and identity, and the verdict.

A case's result holds its kind, its identity and its scored points (one per method, knob value and seed:
imagic.shapes.scoring's metrics). Everything here counts cases, not samples: a case's seeds are several
looks at one case, so intervals come from resampling cases and paired tests compare case by case.

The verdict of an Imagic configuration against a peer, on one split:
(a) its best point (highest success, ties to the better background) edits more often than the peer's best
    point at no less background PSNR, and case by case significantly so (exact sign test, p < 0.05);
(b) at the background of each of the peer's measured points it has a point that keeps at least that much
    background and edits at least as often: its curve is nowhere below the peer's.
It beats the peer when both hold.
"""

import math
import statistics

import numpy as np

METRICS = ("success", "named_success", "background_psnr", "background_ssim", "identity_psnr", "identity_ssim",
           "ideal_psnr", "ideal_ssim")
COSTS = ("train_s", "peak_mib", "sample_s")
KINDS = ("pose", "shape", "colour")
CONFIDENCE = 0.95
RESAMPLES = 2000
SIGNIFICANCE = 0.05


def _groups(result: dict) -> tuple[str, ...]:
    """Every table a case counts in: all cases, its kind, its identity."""
    return ("all", f"kind:{result['kind']}", f"identity:{result['identity']}")


def interval(values: list[float], confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of per-case values (seeded, so tables do not change between
    runs); one case gives no interval, only its value."""
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2:
        return (float(data.mean()), float(data.mean())) if len(data) else (math.nan, math.nan)
    draws = np.random.default_rng(seed).integers(0, len(data), size=(RESAMPLES, len(data)))
    means = data[draws].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def summarise(results: list[dict]) -> list[dict]:
    """One row per (method, knob value, group): the mean of every metric and cost over the samples, the cases and
    samples counted, an interval of the success rate over cases, and how often a named success kept the identity."""
    samples: dict[tuple, list[dict]] = {}
    for result in results:
        for point in result["points"]:
            for group in _groups(result):
                samples.setdefault((point["method"], point["knob"], point["value"], group), []).append(
                    {**point, "case": result["case"]})
    rows = []
    for (method, knob, value, group), points in samples.items():
        per_case: dict[str, list[float]] = {}
        for point in points:
            per_case.setdefault(point["case"], []).append(point["success"])
        named = sum(p["named_success"] for p in points)
        row = {"method": method, "knob": knob, "value": value, "group": group, "cases": len(per_case),
               "samples": len(points), **{key: statistics.fmean(p[key] for p in points) for key in METRICS + COSTS},
               "identity_kept": sum(p["success"] for p in points) / named if named else math.nan}
        row["success_low"], row["success_high"] = interval([statistics.fmean(v) for v in per_case.values()])
        rows.append(row)
    return rows


def methods_in(rows: list[dict]) -> list[str]:
    """Imagic's configurations first, then the peers, each alphabetically."""
    return sorted({r["method"] for r in rows}, key=lambda m: (not m.startswith("imagic"), m))


def points_of(rows: list[dict], method: str, group: str = "all") -> list[dict]:
    return [r for r in rows if r["method"] == method and r["group"] == group]


def best_point(rows: list[dict], method: str, group: str = "all") -> dict | None:
    """The method's highest-success point; ties go to the better preservation."""
    return max(points_of(rows, method, group), key=lambda r: (r["success"], r["background_psnr"]), default=None)


def paired_outcomes(results: list[dict], first: dict, second: dict) -> dict[str, int]:
    """Case by case, which of two points (method and value) edits more often over its samples: the cases where one
    does are what a difference in success rests on."""
    counts = {"first_more": 0, "second_more": 0, "tied": 0}
    for result in results:
        rates = []
        for point in (first, second):
            successes = [p["success"] for p in result["points"] if (p["method"], p["value"]) == (point["method"],
                                                                                                  point["value"])]
            rates.append(statistics.fmean(successes) if successes else math.nan)
        if math.isnan(rates[0]) or math.isnan(rates[1]):
            continue  # a case one of them did not sample
        counts["first_more" if rates[0] > rates[1] else "second_more" if rates[1] > rates[0] else "tied"] += 1
    return counts


def exact_sign_test_p(first_more: int, second_more: int) -> float:
    """Two-sided exact sign test on the untied cases: how likely a split at least this uneven is if both points
    edit equally often (each untied case a fair coin)."""
    untied = first_more + second_more
    tail = sum(math.comb(untied, k) for k in range(min(first_more, second_more) + 1)) / 2**untied
    return min(1.0, 2 * tail)


def against_baseline(rows: list[dict], results: list[dict], baseline: str) -> list[dict]:
    """Every other Imagic configuration against `baseline` (a faster training against the default's, say), at their
    best points and at each setting both sampled: success and background, and the paired sign test case by case.
    Whether a cheaper configuration holds is read here: within noise of the baseline, or not."""
    comparisons = []
    for method in (m for m in methods_in(rows) if m.startswith("imagic") and m != baseline):
        pairs = [(best_point(rows, method), best_point(rows, baseline))]
        theirs = {r["value"]: r for r in points_of(rows, baseline)}
        pairs += [(ours, theirs[ours["value"]]) for ours in sorted(points_of(rows, method), key=lambda r: r["value"])
                  if ours["value"] in theirs]
        for index, (ours, base) in enumerate(pairs):
            paired = paired_outcomes(results, ours, base)
            comparisons.append({"configuration": method, "baseline": baseline, "at": "best points" if index == 0 else
                                ours["value"], "ours": ours, "theirs": base,
                                "paired": {**paired, "p_value": exact_sign_test_p(paired["first_more"],
                                                                                  paired["second_more"])}})
    return comparisons


def success_keeping(points: list[dict], psnr: float) -> float:
    """The best success among the points that keep at least `psnr` dB of background: the curve's upper envelope."""
    return max((p["success"] for p in points if p["background_psnr"] >= psnr), default=0.0)


def against_peer(rows: list[dict], results: list[dict], method: str, peer: str) -> dict:
    """The verdict's two tests of `method` against `peer` (the module's docstring), with what they rest on."""
    best, theirs = best_point(rows, method), best_point(rows, peer)
    paired = paired_outcomes(results, best, theirs)
    p_value = exact_sign_test_p(paired["first_more"], paired["second_more"])
    ours = points_of(rows, method)
    shortfalls = [{"value": point["value"], "background_psnr": point["background_psnr"], "peer": point["success"],
                   "ours": success_keeping(ours, point["background_psnr"])} for point in points_of(rows, peer)]
    below = [s for s in shortfalls if s["ours"] < s["peer"]]
    better = best["success"] > theirs["success"] and best["background_psnr"] >= theirs["background_psnr"]
    significant = paired["first_more"] > paired["second_more"] and p_value < SIGNIFICANCE
    return {"peer": peer, "best": best, "peer_best": theirs, "paired": {**paired, "p_value": p_value},
            "better_best_point": better, "significant": significant, "curve_below_at": below,
            "nowhere_below": not below, "beats": better and significant and not below}


def tradeoff(rows: list[dict], method: str, peers: list[str]) -> float:
    """How well `method` trades success for background where the peers work: its best success keeping at least the
    background of each of the peers' measured points, averaged over those points."""
    ours = points_of(rows, method)
    backgrounds = [p["background_psnr"] for peer in peers for p in points_of(rows, peer)]
    return statistics.fmean(success_keeping(ours, b) for b in backgrounds) if backgrounds else math.nan


def verdict(rows: list[dict], results: list[dict], peers: list[str]) -> dict:
    """Every Imagic configuration against every peer; the cheapest (training time, then peak memory) that beats
    them all, and, whether or not one does, the one with the best trade-off (`tradeoff`)."""
    configurations = [m for m in methods_in(rows) if m.startswith("imagic")]
    comparisons = {m: {peer: against_peer(rows, results, m, peer) for peer in peers} for m in configurations}
    # With no peer run (a probe of Imagic alone) nothing has beaten anything.
    winners = [m for m in configurations if all(c["beats"] for c in comparisons[m].values())] if peers else []

    def cost(method: str) -> tuple[float, float]:
        best = best_point(rows, method)
        return best["train_s"], best["peak_mib"]

    scores = {m: tradeoff(rows, m, peers) for m in configurations}
    return {"peers": peers, "comparisons": comparisons, "winners": winners,
            "cheapest_winner": min(winners, key=cost, default=None), "tradeoff": scores,
            "best_tradeoff": max(configurations, key=lambda m: (scores[m], -cost(m)[0]), default=None)}
