"""The budget experiment's three-seed table (issue 24), from per-seed records kept in different places.

The seeds ran in different sessions, whose machines, and run folders, are gone: what is left of each is its
per-seed table in benchmarks/RESULTS.md (`| arm (seed N) |`; accuracies to 0.1 point, which is exact on 1,000
test images), and for a seed still running, its experiment's results.json (its rows replace that seed's table
rows). The rows are combined and passed through the experiment's own table functions, so the mean, spread,
paired differences and the "beyond the noise" rule are the ones `pipeline experiment` applies.

    python scripts/combine_budget_seeds.py benchmarks/RESULTS.md [EXP/results.json or EXP/experiment.json ...]
        [--figure OUT.png] [--time-seeds 0,1]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from pipeline.experiment.table import _paired_markdown, _pm, summarize, tradeoff_points
from pipeline.report import figures

COLUMNS = ("clean", "pgd20", "autoattack", "wall_s", "images", "selection_s", "rounds", "stall_s")


def _selector(arm: str) -> tuple[str, float | None]:
    if arm == "full":
        return "-", None
    name, fraction = arm.rsplit("-", 1)
    return ("rcs" if name.startswith("rcs") else name), float(fraction)


def table_rows(text: str, seed: int) -> list[dict]:
    """The rows of the markdown table headed `| arm (seed N) |`."""
    head = text.index(f"| arm (seed {seed}) |")
    rows = []
    for line in text[head:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        arm = cells[0].replace("\\*", "")
        sel_s, rounds = re.match(r"([\d.]+) \((\d+)\)", cells[6]).groups()
        selector, fraction = _selector(arm)
        rows.append({"arm": arm, "seed": seed, "method": "acl", "selector": selector, "fraction": fraction,
                     "clean": float(cells[1]) / 100, "pgd20": float(cells[2]) / 100,
                     "autoattack": float(cells[3]) / 100, "wall_s": float(cells[4].split()[0].replace(",", "")),
                     "images": int(cells[5].replace(",", "")), "selection_s": float(sel_s), "rounds": int(rounds),
                     "stall_s": float(cells[7]), "train_s": None})
    return rows


def _rows(record: dict) -> list[dict]:
    """The rows of results.json, or of experiment.json (the experiment's state: finished runs carry a row)."""
    if "rows" in record:
        return record["rows"]
    return [run["row"] for run in record["runs"].values() if run.get("row")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_md", type=Path)
    ap.add_argument("results_json", type=Path, nargs="*")
    ap.add_argument("--figure", type=Path)
    ap.add_argument("--time-seeds", help="take wall, selection and stall times from these seeds only (comma-"
                                         "separated): seeds that ran on a machine of another speed keep their "
                                         "accuracies and drop their times")
    args = ap.parse_args()
    text = args.results_md.read_text()
    fresh = [{k: r.get(k) for k in ("arm", "seed", "method", "selector", "fraction", "train_s", *COLUMNS)}
             for path in args.results_json for r in _rows(json.loads(path.read_text()))]
    tabled = [int(s) for s in re.findall(r"^\| arm \(seed (\d+)\) \|", text, flags=re.M)]
    rows = [r for s in tabled for r in table_rows(text, s)
            if (r["arm"], r["seed"]) not in {(f["arm"], f["seed"]) for f in fresh}] + fresh
    if args.time_seeds:
        timed = {int(x) for x in args.time_seeds.split(",")}
        for r in rows:
            if r["seed"] not in timed:
                r.update(wall_s=None, selection_s=None, stall_s=None)
    order = list(dict.fromkeys(r["arm"] for r in rows))
    rows.sort(key=lambda r: (order.index(r["arm"]), r["seed"]))
    groups = summarize(rows)
    print("| arm | seeds | SLF clean | PGD-20 | AutoAttack | wall s | images trained on | selection s | stall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for g in groups:
        print(f"| {g['arm']} | {len(g['seeds'])} | {_pm(g['clean'], g['clean_std'], True)} | "
              f"{_pm(g['pgd20'], g['pgd20_std'], True)} | {_pm(g['autoattack'], g['autoattack_std'], True)} | "
              f"{_pm(g['wall_s'], g['wall_s_std'], digits=0)} | {_pm(g['images'], None, digits=0)} | "
              f"{_pm(g['selection_s'], g['selection_s_std'], digits=0)} | {_pm(g['stall_s'], g['stall_s_std'], digits=0)} |")
    print("\n".join(_paired_markdown(rows)))
    if args.figure:
        figures.arms_tradeoff(tradeoff_points(groups), args.figure)
        print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
