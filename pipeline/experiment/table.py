"""An experiment's tables: one line per arm (mean and sample standard deviation over seeds) and one per run,
with a column per registered measure; OUT/results.md, results.json and the report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_path, write_json
from pipeline.errors import PipelineError
from pipeline.evaluation.measures import list_measures, measure_title, robust_measures
from pipeline.experiment.spec import CERTIFIED_COLUMNS, Experiment
from pipeline.experiment.transfer import transfer_groups, transfer_markdown
from pipeline.report import build_report, figures
from pipeline.validate import parse_json


def _mean_std(values) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def measure_columns() -> list[str]:
    """Every registered measure, in registration order, then the certified accuracies."""
    return [*list_measures(), *(f"certified@{r}" for r in CERTIFIED_COLUMNS)]


def summarize(rows: list[dict]) -> list[dict]:
    """One line per arm: mean and sample standard deviation (n-1) over its seeds."""
    measures = [k for k in measure_columns() if any(r.get(k) is not None for r in rows)]
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        rs = [r for r in rows if r["arm"] == arm]
        selector = rs[0]["selector"]
        if selector != "-" and not any(r.get("rounds") for r in rs):  # every round finished after training ended
            selector = f"{selector} (no round used: all data)"
        line = {"arm": arm, "method": rs[0].get("method", "-"), "selector": selector, "fraction": rs[0]["fraction"], "seeds": [r["seed"] for r in rs]}
        for key in (*measures, "train_s", "wall_s", "images", "images_attacked", "selection_s", "stall_s"):
            line[key], line[f"{key}_std"] = _mean_std(r.get(key) for r in rs)
        out.append(line)
    return out


def paired_against_random(rows: list[dict]) -> list[dict]:
    """For every selector arm with a random arm of the same method and fraction: per measure, the per-seed
    differences (arm - random, seeds both ran), their mean and sample standard deviation, and whether the
    difference is beyond the noise: the same sign on every seed and a mean of more than twice its standard
    error (sd / sqrt(seeds)); with fewer than 3 seeds it is never beyond."""
    measures = [k for k in measure_columns() if any(r.get(k) is not None for r in rows)]
    by = {}
    for r in rows:
        by.setdefault((r["arm"]), {})[r["seed"]] = r
    baselines = {(r["method"], r["fraction"]): r["arm"] for r in rows if r["selector"] == "random"}
    out = []
    for arm, seeds in by.items():
        first = next(iter(seeds.values()))
        base = baselines.get((first["method"], first["fraction"]))
        if first["selector"] in ("-", "random") or base is None:
            continue
        common = sorted(set(seeds) & set(by[base]))
        line = {"arm": arm, "baseline": base, "seeds": common}
        for m in (*measures, "wall_s"):
            d = [seeds[s][m] - by[base][s][m] for s in common
                 if seeds[s].get(m) is not None and by[base][s].get(m) is not None]
            mean, std = _mean_std(d)
            beyond = (len(d) >= 3 and std is not None and (all(x > 0 for x in d) or all(x < 0 for x in d))
                      and abs(mean) > 2 * std / np.sqrt(len(d)))
            line[m] = {"diffs": d, "mean": mean, "std": std, "beyond_noise": bool(beyond)}
        out.append(line)
    return out


def _paired_markdown(rows: list[dict]) -> list[str]:
    paired = paired_against_random(rows)
    if not paired:
        return []
    measures = [k for k in measure_columns() if any(k in p for p in paired)]
    lines = ["", "Paired against random at the same budget (arm - random, same seed; accuracies in points, wall time "
             "in s): per seed, then mean ± sd; **bold** where the difference is beyond the noise (the same sign on "
             "every seed and a mean over twice its standard error), else it is inside it.", "",
             "| arm | vs | " + " | ".join(measures) + " | wall s |", "| --- | --- | " + " | ".join("---" for _ in measures)
             + " | --- |"]
    for p in paired:
        cells = []
        for m in (*measures, "wall_s"):
            c = p.get(m) or {}
            if not c.get("diffs"):
                cells.append("-")
                continue
            scale = 1 if m == "wall_s" else 100
            text = (" / ".join(f"{scale * x:+.2f}" for x in c["diffs"]) + f" ({scale * c['mean']:+.2f}"
                    + (f" ± {scale * c['std']:.2f})" if c["std"] is not None else ")"))
            cells.append(f"**{text}**" if c["beyond_noise"] else text)
        lines.append(f"| {p['arm']} | {p['baseline']} | " + " | ".join(cells) + " |")
    return lines


def tradeoff_points(groups: list[dict], ev: dict | None = None) -> list[dict]:
    """What the trade-off figure plots: each arm's strongest robust measure (AutoAttack where measured), one
    measure for all arms, with the number of test images it was measured on (`ev`: the evaluation's record)."""
    robust = [m for m in robust_measures() if any(g.get(m) is not None for g in groups)]
    if not robust:
        return []
    measure = "autoattack" if "autoattack" in robust else robust[0]
    n = ((ev or {}).get("measure_samples") or {}).get(measure, (ev or {}).get("samples"))
    return [{"label": g["arm"], "selector": g["selector"], "fraction": g["fraction"], "x": g["wall_s"],
             "x_std": g["wall_s_std"], "y": g[measure], "y_std": g[f"{measure}_std"],
             "measure": measure_title(measure), "images": n}
            for g in groups if g.get(measure) is not None and g.get("wall_s") is not None]


def _pm(mean, std, pct: bool = False, digits: int = 1) -> str:
    if mean is None:
        return "-"
    if pct:
        return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")
    return f"{mean:,.{digits}f}" + (f" ± {std:,.{digits}f}" if std is not None else "")


def _samples_text(ev: dict) -> str:
    """"1000 test samples", or per measure where they differ ("clean, PGD-20 on 10000 test samples, AutoAttack
    on 1000")."""
    per = ev.get("measure_samples") or {}
    if len(set(per.values())) <= 1:
        return f"{ev.get('samples')} test samples"
    by: dict = {}
    for name, n in per.items():
        by.setdefault(n, []).append(measure_title(name))
    parts = [f"{', '.join(names)} on {n}" for n, names in sorted(by.items(), reverse=True)]
    return parts[0] + " test samples, " + ", ".join(parts[1:])


def results_markdown(exp: Experiment, rows: list[dict], transfer: list[dict] = ()) -> str:
    groups = summarize(rows)
    measures = [k for k in measure_columns() if any(g.get(k) is not None for g in groups)]
    ev = rows[0]["eval"] if rows else {}
    lines = [f"# Experiment {exp.path.name}", "",
             f"{len(rows)} runs; evaluation {str(ev.get('protocol', '-')).upper()} ({ev.get('recipe')} recipe), "
             f"eps {ev.get('eps', 0):.4g}, {_samples_text(ev)}. Accuracies in %, mean ± sample standard "
             "deviation over seeds; times in seconds of training epochs (selection overlapped).", ""]
    for arm in dict.fromkeys(r["arm"] for r in rows):  # arms measured otherwise say how
        ev_arm = next(r["eval"] for r in rows if r["arm"] == arm)
        if ev_arm.get("smoothing") or ev_arm.get("noise_sigma") or ev_arm.get("samples") != ev.get("samples"):
            sm, c = ev_arm.get("smoothing") or {}, ev_arm.get("certify") or {}
            lines.append(f"- {arm}: {ev_arm.get('samples')} test samples; finetuned with noise sigma "
                         f"{ev_arm.get('noise_sigma') or 0:g}" + (f"; smoothed classifier sigma {sm['sigma']:g}, n "
                         f"{sm['n']}, alpha {sm['alpha']:g}, EOT draws {sm['eot']} (abstentions are errors)" if sm else "")
                         + (f"; certified on {c['samples']} samples" if c else ""))
    lines += ["",
             "| arm | method | selector | fraction | seeds | " + " | ".join(measures) +
             " | train s | wall s | images trained on | images attacked | selection s | stall s |",
             "| --- | --- | --- | ---: | ---: | " + " | ".join("---:" for _ in measures)
             + " | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g in groups:
        lines.append(f"| {g['arm']} | {g['method']} | {g['selector']} | {'-' if g['fraction'] is None else format(g['fraction'], 'g')} | "
                     f"{len(g['seeds'])} | "
                     + " | ".join(_pm(g[m], g[f"{m}_std"], True) for m in measures)
                     + f" | {_pm(g['train_s'], g['train_s_std'])} | {_pm(g['wall_s'], g['wall_s_std'])} | "
                     f"{_pm(g['images'], None, digits=0)} | {_pm(g['images_attacked'], None, digits=0)} | "
                     + (f"{_pm(g['selection_s'], g['selection_s_std'])} | {_pm(g['stall_s'], None, digits=2)} |"
                        if g["selector"] != "-" else "- | - |"))
    lines += _paired_markdown(rows)
    lines += transfer_markdown(list(transfer))
    if tradeoff_points(groups):
        lines += ["", "![robust accuracy against training wall time, every arm](tradeoff.png)"]
    lines += ["", "Every run:", "", "| run | " + " | ".join(measures) + " | train s | wall s | images | attacked | "
              "rounds | selection s | selection process s | stall s |", "| --- | " + " | ".join("---:" for _ in measures) +
              " | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        wall = r.get("wall_s")
        lines.append(f"| {r['arm']}-s{r['seed']} | " + " | ".join(
            "-" if r.get(m) is None else f"{100 * r[m]:.2f}" for m in measures) +
            f" | {r['train_s']:.1f} | {'-' if wall is None else f'{wall:.1f}'} | {r['images']:,} | "
            f"{r.get('images_attacked', r['images']):,} | {r['rounds']} | "
            f"{r['selection_s']:.1f} | "
            f"{r['selection_process_s']:.1f} | {r['stall_s']:.2f} |")
    return "\n".join(lines) + "\n"


def check_outputs(exp: Experiment) -> None:
    """Before anything runs: OUT/results.md and results.json, if there, must be an experiment's of ours."""
    md, js = exp.out / "results.md", exp.out / "results.json"
    if md.exists():
        try:
            ours = md.read_text(errors="replace").startswith("# Experiment ")
        except OSError:
            ours = False
        if not ours:
            raise PipelineError(f"{md}: exists and is not an experiment table of this tool; refusing to replace it "
                                "(choose another experiment out)")
    fig = exp.out / "tradeoff.png"
    if fig.exists() and not figures.is_our_figure(fig):
        raise PipelineError(f"{fig}: exists and is not a figure of this tool; refusing to replace it (choose another "
                            "experiment out)")
    if js.exists():
        try:
            record = parse_json(js.read_text())
            ours = isinstance(record, dict) and {"experiment", "rows", "arms"} <= set(record)
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise PipelineError(f"{js}: exists and is not an experiment's results of this tool; refusing to replace "
                                "it (choose another experiment out)")


def write_results(exp: Experiment, rows: list[dict], transfer: list[dict] = ()) -> list[Path]:
    """OUT/results.md and results.json (with the transfer evaluations' rows, when there are any); OUT/report/
    (figures, the trade-off plot) through `pipeline report`."""
    if not rows:
        return []
    md = exp.out / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text(results_markdown(exp, rows, transfer))
    groups = summarize(rows)
    write_json(exp.out / "results.json", {"experiment": str(exp.path), "rows": rows, "arms": groups,
                                          "paired_against_random": paired_against_random(rows),
                                          **({"transfer": list(transfer), "transfer_arms": transfer_groups(list(transfer))}
                                             if transfer else {})})
    figures.arms_tradeoff(tradeoff_points(groups, rows[0].get("eval")), exp.out / "tradeoff.png")

    report, _ = build_report([r["run"] for r in rows], exp.out / "report")
    return [md, exp.out / "results.json", report]


__all__ = ["measure_columns", "paired_against_random", "results_markdown", "summarize", "tradeoff_points",
           "write_results"]
