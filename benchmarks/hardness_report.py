"""Statistics, tables and the plot of benchmarks/bench_hardness.py.

Arms run the same seeds, so an arm is compared with its baseline by the per-seed (paired)
differences: their mean +- std and the paired t statistic; "beyond seed noise" means |t| above
the two-sided 5% point of Student's t with n - 1 degrees of freedom (T_CRIT, by n seeds).
"""

from __future__ import annotations

import statistics
from pathlib import Path

METRICS = ("p1_hard", "p1_random", "cos_pos", "cos_hard1", "cos_hard5", "cos_easy5")
# Two-sided 5% points of Student's t, by the number of seeds n (n - 1 degrees of freedom).
T_CRIT = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(x: list[float], y: list[float]) -> dict:
    """Mean +- std of the per-seed differences x - y and the paired t statistic."""
    d = [a - b for a, b in zip(x, y, strict=True)]
    m, s = mean_std(d)
    n = len(d)
    t = m / (s / n**0.5) if s > 0 else (float("inf") if m else 0.0)
    return {"mean": m, "std": s, "t": t, "beyond_noise": n > 1 and abs(t) > T_CRIT.get(n, 2.0)}


def summarise(arms: list[dict], results: dict[tuple, list[dict]], seeds: list[int]) -> list[dict]:
    """One row per arm: mean/std of each metric, the mean learning curve and the paired
    difference of hard-split P@1 against the arm named by arm["vs"] in the same section.
    results: {(section, label): [run result per seed, in the order of seeds]}."""
    rows = []
    by_label = {(a["section"], a["label"]): a for a in arms}
    for a in arms:
        per_seed = results[(a["section"], a["label"])]
        row = {"section": a["section"], "label": a["label"], "arm": a, "seeds": seeds}
        for m in METRICS:
            row[m] = mean_std([r[m] for r in per_seed])
        row["per_seed_p1_hard"] = [r["p1_hard"] for r in per_seed]
        row["curve"] = [
            {
                "step": c["step"],
                "p1_hard": mean_std([r["curve"][i]["p1_hard"] for r in per_seed]),
                "per_seed_p1_hard": [r["curve"][i]["p1_hard"] for r in per_seed],
            }
            for i, c in enumerate(per_seed[0]["curve"])
        ]
        row["cpu_s"] = statistics.fmean(r["cpu_s"] for r in per_seed)
        base = by_label.get((a["section"], a["vs"])) if a["vs"] else None
        if base is not None:
            base_runs = results[(base["section"], base["label"])]
            row["vs"] = a["vs"]
            row["diff_p1_hard"] = paired(row["per_seed_p1_hard"], [r["p1_hard"] for r in base_runs])
        rows.append(row)
    return rows


def compare(rows: list[dict], comparisons) -> list[dict]:
    """Paired differences of hard-split P@1 between arms of any sections.
    comparisons: [(what, (section, label), (section, label), step or None for the final)]; a
    pair whose arms were not run is skipped."""
    by_key = {(r["section"], r["label"]): r for r in rows}
    out = []
    for what, x_key, y_key, step in comparisons:
        if x_key not in by_key or y_key not in by_key:
            continue
        xy = []
        for row in (by_key[x_key], by_key[y_key]):
            if step is None:
                xy.append(row["per_seed_p1_hard"])
            else:
                xy.append(next(c["per_seed_p1_hard"] for c in row["curve"] if c["step"] == step))
        out.append({"what": what, "x": x_key, "y": y_key, "step": step, **paired(*xy)})
    return out


def _pm(ms: tuple[float, float], digits: int = 1) -> str:
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}"


def markdown(rows: list[dict], record: dict) -> str:
    mach = record["machine"]
    lines = [
        f"# Learning quality: hardness-aware losses on the controlled task ({mach['date']})",
        "",
        f"{mach['cpu']}, {mach['logical_cores']} logical cores (shared with other work), one "
        f"torch thread; torch {mach['torch']}, hardneg {mach['hardneg']} ({mach['git_commit']}). "
        f"Seeds {record['seeds']}; world {record['world']}. P@1 in %: hard split = positive + the "
        "28 items one attribute away (chance 3.4%), random = positive + 99 random items (chance "
        "1%). cos: mean cosine of the positive, the hardest negative, the 5 hardest and 5 easiest "
        "of the gallery (LLaVE Table 1). diff: paired per-seed difference of hard-split P@1 vs the "
        "named arm, mean ± std, and its t statistic (* beyond seed noise, |t| > t_0.975).",
        "",
    ]
    header = "| arm | P@1 hard | P@1 random | cos pos | cos hard-1 | cos hard-5 | cos easy-5 "
    header += "| diff P@1 hard (vs) | t | CPU s/run |"
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"## {section}", "", header, "|---|" + "---:|" * 9]
        for r in (r for r in rows if r["section"] == section):
            d = r.get("diff_p1_hard")
            diff = f"{_pm((d['mean'], d['std']))} ({r['vs']})" if d else ""
            t = f"{d['t']:.1f}{'*' if d['beyond_noise'] else ''}" if d else ""
            cells = [r["label"], _pm(r["p1_hard"]), _pm(r["p1_random"])]
            cells += [_pm(r[m], 3) for m in METRICS[2:]] + [diff, t, f"{r['cpu_s']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if record.get("comparisons"):
        lines += [
            "## paired comparisons across sections (hard-split P@1, x - y)",
            "",
            "| comparison | x | y | step | diff | t |",
            "|---|---|---|---:|---:|---:|",
        ]
        for c in record["comparisons"]:
            step = c["step"] or "final"
            t = f"{c['t']:.1f}{'*' if c['beyond_noise'] else ''}"
            x, y = " / ".join(c["x"]), " / ".join(c["y"])
            lines.append(
                f"| {c['what']} | {x} | {y} | {step} | {_pm((c['mean'], c['std']))} | {t} |"
            )
        lines.append("")
    curves = [r for r in rows if len(r["curve"]) > 1 and r["section"] in ("main", "long")]
    if curves:
        lines += ["## learning curves (hard-split P@1 by step)", ""]
        for r in curves[:3] + [r for r in curves if r["section"] == "long"]:
            pts = ", ".join(f"{c['step']}: {c['p1_hard'][0]:.1f}" for c in r["curve"])
            lines.append(f"- {r['section']} / {r['label']}: {pts}")
        lines.append("")
    lines.append(f"Command: `{record['command']}`; {record['cpu_total_s']:.0f} CPU s in all.")
    return "\n".join(lines) + "\n"


LOSSES = ("infonce", "llave", "ega-b")  # the three losses run in every regime


def _panel_main(a, rows) -> bool:
    main = [r for r in rows if r["section"] == "main"]
    if not main:
        return False
    y = list(range(len(main)))
    a.barh(y, [r["p1_hard"][0] for r in main], xerr=[r["p1_hard"][1] for r in main])
    a.set_yticks(y, [r["label"] for r in main], fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("hard-split P@1 (%)")
    a.set_title("main regime: 128 items/step, tau 0.02, 1000 steps")
    return True


def _panel_ega(a, rows, variants) -> bool:
    grid = [r for r in rows if r["section"] == "ega" and r["arm"]["loss"].startswith("ega")]
    if not grid:
        return False
    for variant in variants:
        pts = [r for r in grid if r["label"].startswith(f"ega-{variant} ")]
        a.scatter([r["cos_pos"][0] for r in pts], [r["p1_hard"][0] for r in pts], label=variant)
    for r in rows:
        if r["section"] == "main" and r["label"] in ("infonce", "llave"):
            a.axhline(r["p1_hard"][0], ls="--", lw=1, color="grey")
            a.annotate(r["label"], (-0.95, r["p1_hard"][0] + 0.5), fontsize=8)
    a.set_xlabel("positives' mean cosine")
    a.set_ylabel("hard-split P@1 (%)")
    a.set_title("EGA variants over the beta x margin grid (tau 0.02)")
    a.legend(title="variant", fontsize=8)
    return True


def _panel_curves(a, rows) -> bool:
    drawn = False
    for r in rows:
        in_main = r["section"] == "main" and r["label"] in LOSSES
        if (in_main or r["section"] == "long") and len(r["curve"]) > 1:
            steps = [c["step"] for c in r["curve"]]
            style = ":" if in_main else "-"
            label = f"{r['label']} tau 0.02" if in_main else r["label"]
            a.plot(steps, [c["p1_hard"][0] for c in r["curve"]], style, marker="o", label=label)
            drawn = True
    if drawn:
        a.set_xscale("log")
        steps = sorted({c["step"] for r in rows for c in r["curve"]})
        a.set_xticks(steps, [str(x) for x in steps], minor=False)
        a.minorticks_off()
        a.set_xlabel("step")
        a.set_ylabel("hard-split P@1 (%)")
        a.set_title("learning curves (mean over seeds)")
        a.legend(fontsize=8)
    return drawn


def _panel_pool(a, rows) -> bool:
    regimes = []
    for r in rows:
        if r["section"] in ("pool", "groups", "hardneg") and r["label"].startswith("infonce "):
            suffix = r["label"][len("infonce") :]
            regimes.append((r["section"], suffix, suffix.strip()))
    if not regimes:
        return False
    # The main regime (128 items per step) sits between 64 and 256 items per step.
    at = next((i for i, reg in enumerate(regimes) if reg[2] == "256/step"), 0)
    regimes.insert(at, ("main", "", "128/step"))
    by_key = {(r["section"], r["label"]): r for r in rows}
    for i, loss in enumerate(LOSSES):
        pts = [(x, by_key.get((sec, loss + suffix))) for x, (sec, suffix, _) in enumerate(regimes)]
        pts = [(x, r) for x, r in pts if r is not None]
        a.errorbar(
            [x + 0.15 * (i - 1) for x, _ in pts],
            [r["p1_hard"][0] for _, r in pts],
            yerr=[r["p1_hard"][1] for _, r in pts],
            marker="o",
            ls="",
            label=loss,
            color=f"C{i}",
        )
    a.set_xticks(range(len(regimes)), [name for _, _, name in regimes], rotation=30, fontsize=8)
    a.set_ylabel("hard-split P@1 (%)")
    a.set_title("negative pool: items/step, local groups, mined hard negatives (+hn)")
    a.legend(fontsize=8, loc="lower right")
    return True


def plot(rows: list[dict], path: Path, variants: tuple[str, ...]) -> None:
    """Four panels: the main regime's arms, the EGA grid (P@1 vs the positives' cosine: collapse
    shows on the left), learning curves, and the negative-pool regimes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    drawn = [
        _panel_main(ax[0, 0], rows),
        _panel_ega(ax[0, 1], rows, variants),
        _panel_curves(ax[1, 0], rows),
        _panel_pool(ax[1, 1], rows),
    ]
    for a, ok in zip(ax.flat, drawn, strict=True):
        if not ok:
            a.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
