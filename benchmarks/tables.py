"""The quality benchmark's tables and plot, from verdict.summarise's rows and verdict.verdict's comparisons."""

import math
from pathlib import Path

from verdict import KINDS, best_point, methods_in, points_of


def _rate(row: dict | None) -> str:
    if row is None:
        return "–"
    return f"{100 * row['success']:.0f}% [{100 * row['success_low']:.0f}-{100 * row['success_high']:.0f}]"


def _cell(row: dict | None) -> str:
    return "–" if row is None else f"{100 * row['success']:.0f}% · {row['background_psnr']:.1f} dB"


def _setting(row: dict) -> str:
    return "–" if row["knob"] == "none" else f"{row['knob']} {row['value']:g}"


def main_table(rows: list[dict]) -> str:
    """Each method at its best point: success with its 95% interval over cases, named success, preservation,
    closeness, and cost (training per edit and seconds per image or per peer edit)."""
    lines = ["| method | best point | success [95% CI] | named only | background PSNR | identity PSNR | PSNR to ideal "
             "| cases | train s | s per image |", "|" + "---|" * 10]
    for method in methods_in(rows):
        best = best_point(rows, method)
        lines.append(f"| {method} | {_setting(best)} | {_rate(best)} | {100 * best['named_success']:.0f}% | "
                     f"{best['background_psnr']:.1f} dB | {best['identity_psnr']:.1f} dB | {best['ideal_psnr']:.1f} dB | "
                     f"{best['cases']} | {best['train_s']:.1f} | {best['sample_s']:.2f} |")
    return "\n".join(lines) + "\n"


def curves_table(rows: list[dict]) -> str:
    """Every point of every method: success [interval] and background PSNR per knob value (the trade-off's data)."""
    lines = ["| method | setting | success [95% CI] | background PSNR |", "|---|---|---|---|"]
    for method in methods_in(rows):
        for row in sorted(points_of(rows, method), key=lambda r: (r["value"] is None, r["value"] or 0)):
            lines.append(f"| {method} | {_setting(row)} | {_rate(row)} | {row['background_psnr']:.1f} dB |")
    return "\n".join(lines) + "\n"


def groups_table(rows: list[dict], prefix: str) -> str:
    """Each method's best point overall, per kind of edit ("kind:") or per identity ("identity:"): success ·
    background, and how often a named success kept the identity (the pose row is the paper's claim)."""
    groups = sorted({r["group"] for r in rows if r["group"].startswith(prefix)},
                    key=lambda g: (KINDS.index(g[5:]) if prefix == "kind:" and g[5:] in KINDS else 9, g))
    names = [g.removeprefix(prefix) for g in groups]
    lines = ["| method | " + " | ".join(f"{n}: success · background | {n}: identity kept" for n in names) + " |",
             "|" + "---|" * (1 + 2 * len(groups))]
    for method in methods_in(rows):
        best = best_point(rows, method)
        cells = []
        for group in groups:
            row = next((r for r in points_of(rows, method, group) if r["value"] == best["value"]), None)
            kept = "–" if row is None or math.isnan(row["identity_kept"]) else f"{100 * row['identity_kept']:.0f}%"
            cells += [_cell(row), kept]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict_table(result: dict) -> str:
    """Each Imagic configuration against each peer: best points, the paired test, where its curve is below."""
    lines = ["| configuration | peer | best points (ours vs peer) | cases more / fewer, p | curve below the peer's at | "
             "beats |", "|---|---|---|---|---|---|"]
    for method, comparisons in result["comparisons"].items():
        for peer, c in comparisons.items():
            paired = c["paired"]
            below = ", ".join(f"{s['background_psnr']:.1f} dB ({100 * s['ours']:.0f}% < {100 * s['peer']:.0f}%)"
                              for s in c["curve_below_at"]) or "nowhere"
            lines.append(f"| {method} | {peer} | {_cell(c['best'])} vs {_cell(c['peer_best'])} | "
                         f"{paired['first_more']} / {paired['second_more']}, {paired['p_value']:.2g} | {below} | "
                         f"{'**yes**' if c['beats'] else 'no'} |")
    return "\n".join(lines) + "\n"


def baseline_table(comparisons: list[dict]) -> str:
    """Each configuration against the baseline configuration (verdict.against_baseline): at their best points and at
    each setting, success [95% CI] and background, and the paired test."""
    lines = ["| configuration | baseline | at | ours | baseline's | cases more / fewer, p |", "|---|---|---|---|---|---|"]
    for c in comparisons:
        at = c["at"] if isinstance(c["at"], str) else _setting(c["ours"])
        paired = c["paired"]
        lines.append(f"| {c['configuration']} | {c['baseline']} | {at} | {_rate(c['ours'])} · "
                     f"{c['ours']['background_psnr']:.1f} dB | {_rate(c['theirs'])} · {c['theirs']['background_psnr']:.1f}"
                     f" dB | {paired['first_more']} / {paired['second_more']}, {paired['p_value']:.2g} |")
    return "\n".join(lines) + "\n"


def plot(panels: list[tuple[str, list[dict]]], path: Path) -> None:
    """Success against preservation, a curve per method over its knob, a panel per split (the paper's Fig. 7)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        for method in methods_in(rows):
            points = sorted(points_of(rows, method), key=lambda r: r["background_psnr"])
            style = "o-" if method.startswith("imagic") else "*" if method == "text-only" else "s--"
            ax.plot([p["background_psnr"] for p in points], [100 * p["success"] for p in points], style, label=method,
                    markersize=8 if method == "text-only" else 4)
            for p in points:
                if p["knob"] != "none":
                    ax.annotate(f"{p['value']:g}", (p["background_psnr"], 100 * p["success"]), fontsize=6,
                                xytext=(2, 2), textcoords="offset points")
        ax.set_title(title)
        ax.set_xlabel("preservation: background PSNR to the input, dB (higher keeps more)")
        ax.set_ylabel("edit success (identity kept), % of samples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
