"""Learning quality of the hardness-aware losses: a controlled task where the loss decides.

Trains small heads over fixed synthetic "pretrained" features (benchmarks/hardness_task.py)
through hardneg.fused_hardneg_loss itself (modes infonce, llave, ega), against plain-torch
controls and EGA variants (benchmarks/hardness_losses.py): infonce at other temperatures, a
constant-margin (CosFace) loss, llave without its stop-gradient and llave with a flipped hardness
weight (alpha < 0). Every arm runs the same seeds, so differences are paired per seed (same world,
initialisation, batches and views); "beyond seed noise" means a paired t statistic |t| > 2.78
(p < 0.05, two-sided, 4 degrees of freedom at 5 seeds).

Sections (--sections): main (128 items per step, tau 0.02, 1000 steps, and the controls), pool
(items per step), groups (negatives local to simulated ranks), hardneg (explicit mined hard
negatives at a fixed candidate budget), temperature, long (4000 steps at tau 0.1, with learning
curves), noise, and ega (the variants' beta x margin grid). One run takes a few seconds on one
core; the full grid about 20 CPU minutes.

    nice -n 10 python benchmarks/bench_hardness.py   # results/bench_hardness_<machine>_<date>.*
    python benchmarks/bench_hardness.py --sections main --seeds 0,1

The written reading of the results is added below the generated tables of the markdown file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hardneg  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.hardness_losses import (  # noqa: E402
    cosface_loss,
    ega_surrogate_loss,
    llave_without_stop_gradient,
)
from benchmarks.hardness_task import RunConfig, World, WorldConfig, train  # noqa: E402

METRICS = ("p1_hard", "p1_random", "cos_pos", "cos_hard1", "cos_hard5", "cos_easy5")
T_CRIT = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}
WORLD = WorldConfig(noise=0.5)
MAIN_RUN = RunConfig(items_per_step=128, steps=1000, eval_at=(250, 500))
TAU = 0.02
# EGA variants: (normalise, threshold) of benchmarks/hardness_losses.py.
EGA_VARIANTS = {
    "a": ("none", True),  # the kernels' current reconstruction, run through the fused op
    "b": ("row", True),
    "c": ("negatives", True),
    "d": ("row", False),
}
EGA_GRID = {
    "a": [(b, m) for b in (1.0, 2.0, 5.0) for m in (0.0, 0.1, 0.3)],
    "b": [(b, m) for b in (2.0, 5.0, 20.0, 50.0, 100.0) for m in (0.0, 0.1, 0.3, 0.5)],
    "c": [(50.0, 0.0), (50.0, 0.3)],
    "d": [(50.0, 0.0), (20.0, 0.3)],
}
# The chosen EGA: variant b with these defaults (the README's "Learning quality" section).
EGA_CHOSEN = {"loss": "ega_b", "beta": 50.0, "margin": 0.3}


# ---------------------------------------------------------------------------------------------
# Arms
# ---------------------------------------------------------------------------------------------


def arm(section, label, loss, *, vs=None, tau=TAU, world=None, run=None, **params) -> dict:
    """One arm: a loss with its parameters in a world and run regime; vs: the label of the arm
    (same section) its paired difference is taken against."""
    return {
        "section": section,
        "label": label,
        "loss": loss,
        "temperature": tau,
        "params": params,
        "world": dataclasses.asdict(world or WORLD),
        "run": dataclasses.asdict(run or MAIN_RUN),
        "vs": vs,
    }


def _three(section, suffix, vs_suffix=None, **kw) -> list[dict]:
    """infonce, llave and the chosen EGA in one regime; differences against infonce there."""
    base = f"infonce{suffix}"
    return [
        arm(section, base, "infonce", vs=vs_suffix and f"infonce{vs_suffix}", **kw),
        arm(section, f"llave{suffix}", "llave", vs=base, alpha=9.0, **kw),
        arm(section, f"ega-b{suffix}", EGA_CHOSEN["loss"], vs=base, **_chosen_params(), **kw),
    ]


def _chosen_params() -> dict:
    return {"beta": EGA_CHOSEN["beta"], "margin": EGA_CHOSEN["margin"]}


def build_arms(sections: list[str]) -> list[dict]:
    out: list[dict] = []
    if "main" in sections:
        s = "main"
        out += _three(s, "")
        out += [
            arm(s, "ega-a (fused, default 2/0)", "ega", vs="infonce", beta=2.0, margin=0.0),
            arm(s, "cosface m0.1", "cosface", vs="infonce", margin=0.1),
            arm(s, "cosface m0.2", "cosface", vs="infonce", margin=0.2),
            arm(s, "llave alpha3", "llave", vs="infonce", alpha=3.0),
            arm(s, "llave alpha20", "llave", vs="infonce", alpha=20.0),
            arm(s, "llave no stop-gradient", "llave_nosg", vs="llave", alpha=9.0),
            arm(s, "llave flipped (alpha -9)", "llave", vs="llave", alpha=-9.0),
        ]
        out += [arm(s, f"infonce tau{t}", "infonce", vs="infonce", tau=t) for t in (0.05, 0.1, 0.2)]
    if "pool" in sections:
        for n in (32, 64, 256):
            out += _three("pool", f" {n}/step", run=dataclasses.replace(MAIN_RUN, items_per_step=n))
    if "groups" in sections:
        for g in (2,):
            run = dataclasses.replace(MAIN_RUN, groups=g)
            out += _three("groups", f" local x{g}", run=run)
    if "hardneg" in sections:
        for n, m in ((64, 1), (128, 1)):
            run = dataclasses.replace(MAIN_RUN, items_per_step=n, hard_negatives=m)
            out += _three("hardneg", f" {n}+{m}hn", run=run)
    if "temperature" in sections:
        out += _three("temperature", " tau0.1", tau=0.1)
    if "long" in sections:
        run = RunConfig(steps=4000, eval_at=(250, 500, 1000, 2000))
        out += _three("long", " 4000 tau0.1", tau=0.1, run=run)
    if "noise" in sections:
        out += _three("noise", " noise1.5", world=dataclasses.replace(WORLD, noise=1.5))
    if "ega" in sections:
        out.append(arm("ega", "infonce", "infonce"))
        for variant, grid in EGA_GRID.items():
            loss = "ega" if variant == "a" else f"ega_{variant}"
            for beta, margin in grid:
                label = f"ega-{variant} {beta:g}/{margin:g}"
                out.append(arm("ega", label, loss, vs="infonce", beta=beta, margin=margin))
    return out


# ---------------------------------------------------------------------------------------------
# Losses and runs
# ---------------------------------------------------------------------------------------------


def make_loss(a: dict):
    """The arm's loss as fn(q_BD, t_BD, h_BMD | None, ids_B, h_ids_BM | None), symmetric."""
    loss, tau, p = a["loss"], a["temperature"], a["params"]

    def fused(q, t, h, ids, h_ids):
        return hardneg.fused_hardneg_loss(
            q,
            t,
            hard_negatives=h,
            target_ids=ids,
            hard_negative_ids=h_ids,
            mode=loss,
            temperature=tau,
            alpha=p.get("alpha", 9.0),
            ega_beta=p.get("beta", 2.0),
            ega_margin=p.get("margin", 0.0),
            symmetric=True,
        )

    def plain(fn, **kw):
        def call(q, t, h, ids, h_ids):
            return fn(q, t, hard_negatives=h, target_ids=ids, hard_negative_ids=h_ids, **kw)

        return call

    if loss in ("infonce", "llave", "ega"):
        return fused
    if loss == "cosface":
        return plain(cosface_loss, temperature=tau, margin=p["margin"])
    if loss == "llave_nosg":
        return plain(llave_without_stop_gradient, temperature=tau, alpha=p["alpha"])
    if loss.startswith("ega_"):
        normalise, threshold = EGA_VARIANTS[loss[4:]]
        return plain(
            ega_surrogate_loss,
            temperature=tau,
            beta=p["beta"],
            margin=p["margin"],
            normalise=normalise,
            threshold=threshold,
        )
    raise ValueError(f"unknown loss {loss!r}")


def run_key(a: dict, seed: int) -> str:
    """Identical configurations (an arm shared by two sections) run once."""
    fields = {k: a[k] for k in ("loss", "temperature", "params", "world", "run")}
    return json.dumps({**fields, "seed": seed}, sort_keys=True)


_WORLDS: dict[tuple, World] = {}


def run_one(a: dict, seed: int) -> dict:
    world_cfg = WorldConfig(**a["world"])
    key = (world_cfg, seed)
    if key not in _WORLDS:
        _WORLDS.clear()  # one world at a time: they are cheap to rebuild
        _WORLDS[key] = World(world_cfg, seed)
    run = a["run"]
    run = RunConfig(**{**run, "eval_at": tuple(run["eval_at"])})
    t0 = time.process_time()
    out = train(_WORLDS[key], make_loss(a), run, seed)
    out["cpu_s"] = time.process_time() - t0
    return out


# ---------------------------------------------------------------------------------------------
# Statistics and output
# ---------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(x: list[float], y: list[float]) -> dict:
    """Mean +- std of the per-seed differences x - y and the paired t statistic."""
    d = [a - b for a, b in zip(x, y, strict=True)]
    m, s = mean_std(d)
    n = len(d)
    t = m / (s / n**0.5) if s > 0 else (float("inf") if m else 0.0)
    return {"mean": m, "std": s, "t": t, "beyond_noise": n > 1 and abs(t) > T_CRIT.get(n, 2.0)}


def summarise(arms: list[dict], runs: dict[str, dict], seeds: list[int]) -> list[dict]:
    rows = []
    by_label = {(a["section"], a["label"]): a for a in arms}
    for a in arms:
        per_seed = [runs[run_key(a, s)] for s in seeds]
        row = {"section": a["section"], "label": a["label"], "arm": a, "seeds": seeds}
        for m in METRICS:
            row[m] = mean_std([r[m] for r in per_seed])
        row["per_seed_p1_hard"] = [r["p1_hard"] for r in per_seed]
        row["curve"] = [
            {"step": c["step"], "p1_hard": mean_std([r["curve"][i]["p1_hard"] for r in per_seed])}
            for i, c in enumerate(per_seed[0]["curve"])
        ]
        row["cpu_s"] = statistics.fmean(r["cpu_s"] for r in per_seed)
        base = by_label.get((a["section"], a["vs"])) if a["vs"] else None
        if base is not None:
            base_runs = [runs[run_key(base, s)] for s in seeds]
            row["vs"] = a["vs"]
            row["diff_p1_hard"] = paired(row["per_seed_p1_hard"], [r["p1_hard"] for r in base_runs])
        rows.append(row)
    return rows


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
    curves = [r for r in rows if len(r["curve"]) > 1 and r["section"] in ("main", "long")]
    if curves:
        lines += ["## learning curves (hard-split P@1 by step)", ""]
        for r in curves[:3] + [r for r in curves if r["section"] == "long"]:
            pts = ", ".join(f"{c['step']}: {c['p1_hard'][0]:.1f}" for c in r["curve"])
            lines.append(f"- {r['section']} / {r['label']}: {pts}")
        lines.append("")
    lines.append(f"Command: `{record['command']}`; {record['cpu_total_s']:.0f} CPU s in all.")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    main = [r for r in rows if r["section"] == "main"]
    if main:
        a = ax[0, 0]
        y = range(len(main))
        a.barh(y, [r["p1_hard"][0] for r in main], xerr=[r["p1_hard"][1] for r in main])
        a.set_yticks(list(y), [r["label"] for r in main], fontsize=8)
        a.invert_yaxis()
        a.set_xlabel("hard-split P@1 (%)")
        a.set_title("main regime: 128 items/step, tau 0.02, 1000 steps")
    grid = [r for r in rows if r["section"] == "ega" and r["arm"]["loss"].startswith("ega")]
    if grid:
        a = ax[0, 1]
        for variant in EGA_VARIANTS:
            pts = [r for r in grid if r["label"].startswith(f"ega-{variant} ")]
            a.scatter([r["cos_pos"][0] for r in pts], [r["p1_hard"][0] for r in pts], label=variant)
        for r in (r for r in rows if r["section"] == "main" and r["label"] in ("infonce", "llave")):
            a.axhline(r["p1_hard"][0], ls="--", lw=1, color="grey")
            a.annotate(r["label"], (a.get_xlim()[0], r["p1_hard"][0]), fontsize=8)
        a.set_xlabel("positives' mean cosine")
        a.set_ylabel("hard-split P@1 (%)")
        a.set_title("EGA variants over the beta x margin grid")
        a.legend(title="variant", fontsize=8)
    a = ax[1, 0]
    for r in rows:
        if (
            r["section"] in ("main", "long")
            and len(r["curve"]) > 1
            and r["label"][:5]
            in (
                "infon",
                "llave",
                "ega-b",
            )
        ):
            if r["section"] == "main" and r["label"] not in ("infonce", "llave", "ega-b"):
                continue
            steps = [c["step"] for c in r["curve"]]
            ls = "-" if r["section"] == "long" else ":"
            a.plot(steps, [c["p1_hard"][0] for c in r["curve"]], ls, marker="o", label=r["label"])
    a.set_xscale("log")
    a.set_xlabel("step")
    a.set_ylabel("hard-split P@1 (%)")
    a.set_title("learning curves (dotted: tau 0.02; solid: tau 0.1)")
    a.legend(fontsize=8)
    a = ax[1, 1]
    for section in ("pool", "groups", "hardneg"):
        sec = [r for r in rows if r["section"] == section]
        for loss in ("infonce", "llave", "ega-b"):
            pts = [r for r in sec if r["label"].startswith(loss)]
            if pts:
                a.errorbar(
                    [r["label"][len(loss) :].strip() for r in pts],
                    [r["p1_hard"][0] for r in pts],
                    yerr=[r["p1_hard"][1] for r in pts],
                    marker="o",
                    ls="",
                    label=f"{loss}",
                    color={"infonce": "C0", "llave": "C1", "ega-b": "C2"}[loss],
                )
    a.tick_params(axis="x", labelrotation=45, labelsize=8)
    a.set_ylabel("hard-split P@1 (%)")
    a.set_title("negative pool: items/step, local groups, explicit hard negatives")
    handles, labels = a.get_legend_handles_labels()
    a.legend(handles[:3], labels[:3], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Entry
# ---------------------------------------------------------------------------------------------

SECTIONS = ("main", "pool", "groups", "hardneg", "temperature", "long", "noise", "ega")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (paired per arm)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {SECTIONS}")
    p.add_argument("--cache", type=Path, help="JSON lines of finished runs, to resume from")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sections = args.sections.split(",")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    return args


def run_all(arms: list[dict], seeds: list[int], cache: Path | None) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    if cache is not None and cache.exists():
        for line in cache.read_text().splitlines():
            entry = json.loads(line)
            runs[entry["key"]] = entry["result"]
    todo = list(
        dict.fromkeys(run_key(a, s) for a in arms for s in seeds if run_key(a, s) not in runs)
    )
    by_key = {run_key(a, s): (a, s) for a in arms for s in seeds}
    for i, key in enumerate(todo, 1):
        a, seed = by_key[key]
        result = run_one(a, seed)
        runs[key] = result
        print(
            f"[{i}/{len(todo)}] {a['section']} / {a['label']} seed {seed}: "
            f"P@1 hard {result['p1_hard']:.1f}, cos pos {result['cos_pos']:.2f}, "
            f"{result['cpu_s']:.1f} CPU s",
            flush=True,
        )
        if cache is not None:
            with cache.open("a") as f:
                f.write(json.dumps({"key": key, "result": result}) + "\n")
    return runs


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(1)
    arms = build_arms(args.sections)
    runs = run_all(arms, args.seeds, args.cache)
    rows = summarise(arms, runs, args.seeds)
    record = {
        "machine": common.machine_record(),
        "command": "python benchmarks/bench_hardness.py " + " ".join(sys.argv[1:]),
        "seeds": args.seeds,
        "world": dataclasses.asdict(WORLD),
        "ega_chosen": EGA_CHOSEN,
        "cpu_total_s": sum(r["cpu_s"] for r in runs.values()),
        "rows": rows,
    }
    json_path = common.write_results(
        "bench_hardness", record, markdown(rows, record), out_dir=args.out_dir
    )
    plot(rows, json_path.with_suffix(".png"))
    print(f"wrote {json_path} (+ .md, .png)")
    return json_path


if __name__ == "__main__":
    main()
