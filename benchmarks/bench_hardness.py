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
negatives, at a fixed candidate budget and on top of the batch), temperature, long (4000 steps at
tau 0.1, with learning curves), noise, and ega (the variants' beta x margin grid). One run takes a
few seconds on one core; the full grid about 25 CPU minutes (70 distinct arms x 5 seeds).
Cross-device negatives are simulated: the loss over the whole step against the mean of the losses
over `groups` slices (hardneg's group= loss equals the single-process loss over the
concatenation: tests/distributed).

    nice -n 10 python benchmarks/bench_hardness.py   # results/bench_hardness_<machine>_<date>.*
    python benchmarks/bench_hardness.py --sections main --seeds 0,1

The written reading of the results is added below the generated tables of the markdown file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hardneg  # noqa: E402

from benchmarks import common, hardness_report  # noqa: E402
from benchmarks.hardness_losses import (  # noqa: E402
    cosface_loss,
    ega_surrogate_loss,
    llave_without_stop_gradient,
)
from benchmarks.hardness_task import RunConfig, World, WorldConfig, train  # noqa: E402

WORLD = WorldConfig(noise=0.5)
MAIN_RUN = RunConfig(items_per_step=128, steps=1000, eval_at=(250, 500))
TAU = 0.02
# EGA variants: (normalise, threshold) of benchmarks/hardness_losses.py.
EGA_VARIANTS = {
    "a": ("none", True),  # the kernels' form before the renormalisation
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
# The chosen EGA: variant b (Pbar renormalised over the whole row) at beta 50, margin 0.3, the
# middle of the grid's plateau (its neighbours 20/0.5, 50/0.5, 100/0.3 score within 1 point);
# hardness_losses.ega_surrogate_loss's defaults, and hardneg's mode="ega" with its defaults (the
# main section's fused arm, paired against the plain-torch one). README "Learning quality".
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


def _fused_ega_defaults() -> dict:
    return {"beta": hardneg.EGA_BETA, "margin": hardneg.EGA_MARGIN}


def build_arms(sections: list[str]) -> list[dict]:
    out: list[dict] = []
    if "main" in sections:
        s = "main"
        out += _three(s, "")
        out += [
            arm(s, "ega (fused, default)", "ega", vs="ega-b", **_fused_ega_defaults()),
            arm(s, "ega-a (old default 2/0)", "ega_a", vs="infonce", beta=2.0, margin=0.0),
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
            loss = f"ega_{variant}"
            for beta, margin in grid:
                label = f"ega-{variant} {beta:g}/{margin:g}"
                out.append(arm("ega", label, loss, vs="infonce", beta=beta, margin=margin))
    return out


# Paired comparisons across sections: (what, x arm, y arm, step or None for the final result).
COMPARISONS = [
    ("cross-device vs local negatives", ("main", "infonce"), ("groups", "infonce local x2"), None),
    ("llave vs tuned-temperature infonce", ("main", "llave"), ("main", "infonce tau0.1"), None),
    ("chosen EGA vs llave", ("main", "ega-b"), ("main", "llave"), None),
    ("llave vs infonce at twice the pool", ("main", "llave"), ("pool", "infonce 256/step"), None),
    ("mined negatives on top, infonce", ("hardneg", "infonce 128+1hn"), ("main", "infonce"), None),
    ("mined negatives on top, llave", ("hardneg", "llave 128+1hn"), ("main", "llave"), None),
    (
        "mined vs in-batch at 128 candidates",
        ("hardneg", "infonce 64+1hn"),
        ("main", "infonce"),
        None,
    ),
    ("temperature 0.1 vs 0.02, infonce", ("main", "infonce tau0.1"), ("main", "infonce"), None),
    ("temperature 0.1 vs 0.02, llave", ("temperature", "llave tau0.1"), ("main", "llave"), None),
    ("temperature 0.1 vs 0.02, EGA", ("temperature", "ega-b tau0.1"), ("main", "ega-b"), None),
    (
        "long run, llave - infonce",
        ("long", "llave 4000 tau0.1"),
        ("long", "infonce 4000 tau0.1"),
        250,
    ),
    (
        "long run, llave - infonce",
        ("long", "llave 4000 tau0.1"),
        ("long", "infonce 4000 tau0.1"),
        500,
    ),
    (
        "long run, llave - infonce",
        ("long", "llave 4000 tau0.1"),
        ("long", "infonce 4000 tau0.1"),
        2000,
    ),
    (
        "long run, EGA - infonce",
        ("long", "ega-b 4000 tau0.1"),
        ("long", "infonce 4000 tau0.1"),
        250,
    ),
    (
        "long run, EGA - infonce",
        ("long", "ega-b 4000 tau0.1"),
        ("long", "infonce 4000 tau0.1"),
        2000,
    ),
    (
        "4000 vs 1000 steps, infonce tau 0.1",
        ("long", "infonce 4000 tau0.1"),
        ("main", "infonce tau0.1"),
        None,
    ),
]


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
            ega_beta=p.get("beta", hardneg.EGA_BETA),
            ega_margin=p.get("margin", hardneg.EGA_MARGIN),
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
# Entry
# ---------------------------------------------------------------------------------------------

SECTIONS = ("main", "pool", "groups", "hardneg", "temperature", "long", "noise", "ega")


def custom_arms(specs: list[str]) -> list[dict]:
    """Arms from "key=value ..." strings (--arm), each with an infonce baseline at tau 0.02 in
    the same world and run regime. Keys: loss (infonce, llave, ega, ega_a, ega_b, ega_c, ega_d,
    cosface, llave_nosg), tau, alpha, beta, margin; any RunConfig or WorldConfig field."""
    run_fields = {f.name for f in dataclasses.fields(RunConfig)} - {"eval_at"}
    world_fields = {f.name for f in dataclasses.fields(WorldConfig)}
    out: list[dict] = []
    for spec in specs:
        kv = dict(item.split("=", 1) for item in spec.split())
        loss = kv.pop("loss", "llave")
        tau = float(kv.pop("tau", TAU))
        params = {k: float(kv.pop(k)) for k in ("alpha", "beta", "margin") if k in kv}
        run = {k: int(kv.pop(k)) if k != "lr" else float(kv.pop(k)) for k in run_fields & set(kv)}
        world = {k: type(getattr(WORLD, k))(kv.pop(k)) for k in world_fields & set(kv)}
        if kv:
            raise ValueError(f"--arm {spec!r}: unknown keys {sorted(kv)}")
        regime = {
            "run": dataclasses.replace(MAIN_RUN, **run),
            "world": dataclasses.replace(WORLD, **world),
        }
        section = f"custom {' '.join(f'{k}={v}' for k, v in {**run, **world}.items())}".strip()
        out += [
            arm(section, "infonce", "infonce", **regime),
            arm(section, spec, loss, vs="infonce", tau=tau, **regime, **params),
        ]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (paired per arm)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {SECTIONS}")
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        help='a custom arm, e.g. "loss=llave alpha=3 tau=0.05 items_per_step=64 groups=2 '
        'hard_negatives=1 steps=500 noise=1.0" (with --sections "" to run only these)',
    )
    p.add_argument("--cache", type=Path, help="JSON lines of finished runs, to resume from")
    p.add_argument("--out-dir", type=Path, default=common.RESULTS_DIR)
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.sections = [s for s in args.sections.split(",") if s]
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
    arms = build_arms(args.sections) + custom_arms(args.arm)
    runs = run_all(arms, args.seeds, args.cache)
    results = {(a["section"], a["label"]): [runs[run_key(a, s)] for s in args.seeds] for a in arms}
    rows = hardness_report.summarise(arms, results, args.seeds)
    record = {
        "machine": common.machine_record(),
        "command": "python benchmarks/bench_hardness.py " + " ".join(argv or sys.argv[1:]),
        "seeds": args.seeds,
        "world": dataclasses.asdict(WORLD),
        "ega_chosen": EGA_CHOSEN,
        "cpu_total_s": sum(
            runs[k]["cpu_s"] for k in {run_key(a, s) for a in arms for s in args.seeds}
        ),
        "comparisons": hardness_report.compare(rows, COMPARISONS),
        "rows": rows,
    }
    json_path = common.write_results(
        "bench_hardness", record, hardness_report.markdown(rows, record), out_dir=args.out_dir
    )
    hardness_report.plot(rows, json_path.with_suffix(".png"), tuple(EGA_VARIANTS))
    print(f"wrote {json_path} (+ .md, .png)")
    return json_path


if __name__ == "__main__":
    main()
