"""The compute experiment's answer (issue 38): every run, each arm's mean and spread, each arm against random
subsets *at the same compute*, and the frontier figure.

    python scripts/compute_frontier.py runs/experiments/cifar10-compute-cpu/results.json [MORE.json ...] \
        [--figure benchmarks/figures/compute-frontier.png] [--time-seeds 0,1] [--untimed ARM-sSEED,...]

Inputs: the experiment's results.json (or its experiment.json record), one or more (several sessions' parts of
one experiment: a later file's row for the same arm and seed wins). Random at equal compute: for each seed, the
random arms (random-F and full data, which is random at 100%) form a curve of accuracy against compute; an arm
is compared with that curve at its own compute, interpolated linearly between the two random points around it
(none outside their range). Compute is counted two ways: images attacked (a count: the same on any machine)
and training wall time (selection included: it depends on the machine and on what ran beside it). A difference
is beyond the noise when it has the same sign on every seed and its mean is more than twice its standard error.
Wall times count only for runs that ran alone: `--time-seeds` keeps those seeds', `--untimed` drops single runs'
(marked † in the table of every run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

MEASURES = [("clean", "SLF clean"), ("pgd20", "PGD-20"), ("autoattack", "AutoAttack")]
COMPUTE = [("images_attacked", "images attacked"), ("wall_s", "wall s")]


def load_rows(paths: list[Path]) -> list[dict]:
    rows: dict = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        found = record.get("rows") if "rows" in record else [r["row"] for r in record.get("runs", {}).values()]
        for r in found:
            rows[(r["arm"], r["seed"])] = r
    return list(rows.values())


def is_random(r: dict) -> bool:
    return r["selector"] == "random" or (r["selector"] == "-" and r["arm"] == "full")


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise-linear curve through `points` (x, y); None outside its range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    xs, ys = zip(*pts)
    return float(np.interp(x, xs, ys))


def mean_sd(values) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def beyond(diffs: list[float]) -> bool:
    if len(diffs) < 3:
        return False
    m, sd = mean_sd(diffs)
    return sd is not None and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)) and abs(m) > 2 * sd / np.sqrt(len(diffs))


def mark_timed(rows: list[dict], time_seeds=None, untimed=()) -> None:
    """Which runs' wall times count: those of `time_seeds` (all seeds when None), less the runs named in
    `untimed` ("ARM-sSEED")."""
    for r in rows:
        r["timed"] = (time_seeds is None or r["seed"] in time_seeds) and f"{r['arm']}-s{r['seed']}" not in untimed


def paired_at_equal_compute(rows: list[dict], compute: str) -> list[dict]:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    by = {(r["arm"], r["seed"]): r for r in rows}
    out = []
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if is_random(mine[0]):
            continue
        line = {"arm": arm, "compute": compute, "measures": {}}
        for m, _ in MEASURES:
            diffs, seeds, shares = [], [], []
            for r in mine:
                if compute == "wall_s" and not r.get("timed", True):
                    continue
                curve = [(by[(a, r["seed"])][compute], by[(a, r["seed"])][m]) for a in arms
                         if (a, r["seed"]) in by and is_random(by[(a, r["seed"])])
                         and by[(a, r["seed"])].get(m) is not None and by[(a, r["seed"])].get(compute) is not None
                         and (compute != "wall_s" or by[(a, r["seed"])].get("timed", True))]
                at = interpolate(curve, r[compute]) if r.get(m) is not None else None
                if at is not None:
                    diffs.append(100 * (r[m] - at))
                    seeds.append(r["seed"])
            mean, sd = mean_sd(diffs)
            line["measures"][m] = {"diffs": diffs, "seeds": seeds, "mean": mean, "sd": sd, "beyond": beyond(diffs)}
        out.append(line)
    return out


def _pm(mean, sd, digits=2) -> str:
    if mean is None:
        return "-"
    return f"{mean:,.{digits}f}" + (f" ± {sd:,.{digits}f}" if sd is not None else "")


def markdown(rows: list[dict], timing: str = "") -> str:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    out = ["Every run (accuracies in %):", "",
           "| arm | seed | " + " | ".join(t for _, t in MEASURES) + " | wall s | images trained on | images attacked |",
           "| --- | ---: | " + " | ".join("---:" for _ in MEASURES) + " | ---: | ---: | ---: |"]
    for arm in arms:
        for s in seeds:
            r = next((x for x in rows if x["arm"] == arm and x["seed"] == s), None)
            if r is None:
                continue
            out.append(f"| {arm} | {s} | " + " | ".join("-" if r.get(m) is None else f"{100 * r[m]:.2f}"
                                                       for m, _ in MEASURES)
                       + f" | {r['wall_s']:.0f}{'' if r.get('timed', True) else ' †'} | {r['images']:,} | "
                       f"{r.get('images_attacked', r['images']):,} |")
    out += ["", "Each arm, mean ± sd over its seeds" + (f" (wall s: {timing})" if timing else "") + ":", "",
            "| arm | seeds | " + " | ".join(t for _, t in MEASURES) + " | wall s | images trained on | images attacked |",
            "| --- | ---: | " + " | ".join("---:" for _ in MEASURES) + " | ---: | ---: | ---: |"]
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        walls = [r["wall_s"] for r in rs if r.get("timed", True)]
        out.append(f"| {arm} | {len(rs)} | " + " | ".join(_pm(*mean_sd([100 * r[m] for r in rs if r.get(m) is not None]))
                                                       for m, _ in MEASURES)
                   + f" | {_pm(*mean_sd(walls), digits=0)} | {_pm(*mean_sd([r['images'] for r in rs]), digits=0)} | "
                   f"{_pm(*mean_sd([r.get('images_attacked', r['images']) for r in rs]), digits=0)} |")
    for compute, title in COMPUTE:
        paired = paired_at_equal_compute(rows, compute)
        out += ["", f"Against random subsets at the same {title} (arm minus random's curve at the arm's {title}, "
                "same seed, points; per seed, then mean ± sd; **bold**: beyond the noise):", "",
                "| arm | " + " | ".join(t for _, t in MEASURES) + " |", "| --- | " + " | ".join("---" for _ in MEASURES) + " |"]
        for p in paired:
            cells = []
            for m, _ in MEASURES:
                c = p["measures"][m]
                if not c["diffs"]:
                    cells.append("- (outside random's range)")
                    continue
                text = " / ".join(f"{d:+.2f}" for d in c["diffs"]) + f" ({_pm(c['mean'], c['sd'])})"
                cells.append(f"**{text}**" if c["beyond"] else text)
            out.append(f"| {p['arm']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (m, title) in zip(axes, MEASURES[2:0:-1]):
        random_pts = []
        for arm in arms:
            rs = [r for r in rows if r["arm"] == arm and r.get(m) is not None]
            walls = [r["wall_s"] for r in rs if r.get("timed", True)]
            if not rs or not walls:
                continue
            x, xs = mean_sd(walls)
            y, ys = mean_sd([100 * r[m] for r in rs])
            rnd = is_random(rs[0])
            ax.errorbar(x, y, yerr=ys or 0, xerr=xs or 0, fmt="s" if rnd else "o", color="grey" if rnd else None,
                        capsize=3, label=arm)
            ax.annotate(arm, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            if rnd:
                random_pts.append((x, y))
        if random_pts:
            ax.plot(*zip(*sorted(random_pts)), color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("training wall time, s (selection included)")
        ax.set_ylabel(f"{title} accuracy, %")
        ax.set_title(f"{title} against compute: the dashed line is random subsets")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--time-seeds", default="", help="seeds whose wall times count (the runs that ran alone)")
    ap.add_argument("--untimed", default="", help="runs (ARM-sSEED) whose wall times do not count: they ran "
                                                  "beside other work")
    args = ap.parse_args()
    time_seeds = [int(s) for s in args.time_seeds.split(",") if s] or None
    untimed = {u for u in args.untimed.split(",") if u}
    rows = load_rows(args.results)
    unknown = untimed - {f"{r['arm']}-s{r['seed']}" for r in rows}
    if unknown:
        ap.error(f"--untimed names runs the results do not have: {', '.join(sorted(unknown))}")
    mark_timed(rows, time_seeds, untimed)
    timing = ", ".join(filter(None, [f"seeds {','.join(map(str, time_seeds))}" if time_seeds else "",
                                      f"less {', '.join(sorted(untimed))}" if untimed else ""]))
    timing += "; † marks the wall times not counted" if timing else ""
    print(markdown(rows, timing))
    if args.figure:
        figure(rows, args.figure)


if __name__ == "__main__":
    main()
