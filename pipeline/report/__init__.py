"""`pipeline report RUN [RUN ...] --out DIR`: a Markdown report with PNG figures from run folders."""

from __future__ import annotations

import re
import time
from pathlib import Path

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError
from pipeline.evaluation.measures import list_measures, measure_title
from pipeline.evaluation.records import samples_text
from pipeline.evaluation.transfer import is_transfer
from pipeline.locks import folder_lock
from pipeline.report import figures
from pipeline.report.runs import RunRecord, load_run, robust_of
from pipeline.runlayout import RunLayout
from pipeline.shards.layout import INDEX_NAME


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _smoothing(r: dict) -> str:
    sm = r.get("smoothing")
    return "-" if not sm else f"sigma {sm['sigma']:g}, n {sm['n']}, EOT {sm['eot']}"


def _test_data(r: dict) -> str:
    """The data set an evaluation measured on, by folder name and fingerprint: a transfer evaluation is a row
    of its own, never mistaken for the in-domain one, and says what the encoder was pre-trained on."""
    name = Path(str(r.get("data") or "-")).name
    fp = r.get("dataset_fingerprint")
    text = f"{name} ({fp[:8]})" if isinstance(fp, str) else name
    if is_transfer(r):
        source = r["pretrained_on"]
        text += f"; pre-trained on {source.get('name') or source.get('fingerprint', '?')[:8]}"
    inp = r.get("input") or {}
    if inp.get("size") and inp.get("size") != inp.get("data_size"):
        text += f"; resized {inp.get('data_size') or 'varying'} -> {inp['size']} px"
    return text


def results_table(runs: list[RunRecord]) -> list[str]:
    """One row per evaluation; a column per registered measure (its title), in registration order."""
    measures = list_measures()
    lines = ["| run | checkpoint epoch | protocol | recipe | noise sigma | smoothed | "
             + " | ".join(measure_title(m) for m in measures)
             + " | eps | test data | test samples | train wall s | images trained on | images attacked |",
             "| --- | ---: | --- | --- | ---: | --- | " + " | ".join("---:" for _ in measures)
             + " | ---: | --- | ---: | ---: | ---: | ---: |"]
    seen = set()
    for run in runs:
        for r in run.results:
            key = (str(run.path), r["digest"], r["protocol"], r.get("branch_role"), r.get("date"),
                   r.get("dataset_fingerprint"), (r.get("input") or {}).get("size"), r.get("noise_sigma"))
            if key in seen:  # one evaluation is stored under each of its measures
                continue
            seen.add(key)
            lines.append(f"| {run.label} | {r.get('checkpoint_epoch')} | {r['protocol']} | {r.get('recipe', '-')} | "
                         f"{r.get('noise_sigma') or 0:g} | {_smoothing(r)} | "
                         + "".join(f"{_pct(r.get(m))} | " for m in measures)
                         + f"{r.get('eps', 0):.4g} | {_test_data(r)} | {samples_text(r)} | "
                         f"{run.train_seconds:.1f} | {run.images:,} | {run.images_attacked:,} |")
    return lines


def certification_table(run: RunRecord) -> list[str]:
    radii = list(run.certifications[0]["certified_accuracy"])
    lines = ["| certification | sigma | n0 | n | alpha | samples | abstained | "
             + " | ".join(f"r = {r}" for r in radii) + " | s per sample |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in radii) + " | ---: |"]
    for c in run.certifications:
        st = c["settings"]
        lines.append(f"| {c['name']} | {st['sigma']:g} | {st['n0']} | {st['n']:,} | {st['alpha']:g} | {c['samples']} | "
                     f"{c['abstained']} | " + " | ".join(_pct(c["certified_accuracy"].get(r)) for r in radii)
                     + f" | {c['seconds_per_sample']:.2f} |")
    c = run.certifications[0]
    lines += ["", f"An l2 certificate of radius r also holds against l_inf perturbations up to r / sqrt(d), d = "
              f"{c['dims']} here: " + ", ".join(f"r = {r} -> {v:.4f}" for r, v in c["linf_radius"].items())
              + f". Covering the l_inf ball of {c['linf_eps']:.4g} needs r = {c['l2_radius_covering_linf_eps']:.3f}, "
              f"certified for {_pct(c['certified_accuracy_at_linf_eps'])} of the samples."]
    return lines


REPORT_MARK = "by `pipeline report` from each run's"  # in report.md's third line: the mark that we wrote it


def _is_our_report(path: Path) -> bool:
    try:
        head = path.read_text(errors="replace").splitlines()[:3]
    except OSError:
        return False
    return len(head) == 3 and head[0].startswith("# Report: ") and REPORT_MARK in head[2]


def _slugs(runs: list[RunRecord]) -> list[str]:
    """A figure-name stem per run, distinct even where run folders share a name (a/run, b/run): the parent
    folder's name is added, then a number."""
    plain = [_slug(r.name) for r in runs]
    out = [s if plain.count(s) == 1 else f"{_slug(r.path.resolve().parent.name)}-{s}" for r, s in zip(runs, plain)]
    seen: dict[str, int] = {}
    for i, s in enumerate(out):
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            out[i] = f"{s}-{seen[s]}"
    return out


def _check_out(out: Path, runs: list[RunRecord], slugs: list[str]) -> None:
    """Refuse to write where the report would replace files it did not write, into a run folder it reads, or
    into a folder that is a shard set or a run."""
    real = out.resolve()
    for run in runs:
        if real == run.path.resolve() or run.path.resolve() in real.parents:
            raise PipelineError(f"--out {out}: is inside the run folder {run.path}, which the report reads; choose a "
                                "folder outside the runs")
    if (out / INDEX_NAME).exists() or RunLayout(out).config.is_file():
        what = "a shard set (index.json)" if (out / INDEX_NAME).exists() else "a run folder (config.toml)"
        raise PipelineError(f"--out {out}: is {what}; a report goes into a folder of its own (choose another --out)")
    names = ["tradeoff.png", *(f"{slug}-{kind}.png" for slug in slugs for kind in
                               ("training", "divergence", "certified", "selection"))]
    foreign = [n for n in names if (out / n).exists() and not figures.is_our_figure(out / n)]
    if (out / "report.md").exists() and not _is_our_report(out / "report.md"):
        foreign.insert(0, "report.md")
    if foreign:
        raise PipelineError(f"--out {out}: holds {', '.join(foreign[:3])}, which `pipeline report` did not write; "
                            "refusing to replace them (choose another --out)")


def build_report(run_paths: list[str | Path], out: str | Path) -> tuple[Path, list[Path]]:
    """Write OUT/report.md and its figures; returns (markdown path, figure paths). Replaces only a report and
    figures it wrote before (their marks say so)."""
    runs = [load_run(p) for p in run_paths]
    out = Path(out)
    slugs = _slugs(runs)
    _check_out(out, runs, slugs)
    with folder_lock(out, "pipeline report"):
        pngs: list[Path] = []
        md = [f"# Report: {', '.join(r.name for r in runs)}", "", f"Written {time.strftime('%Y-%m-%d %H:%M')} "
              f"{REPORT_MARK} metrics.jsonl, config.toml, manifests and results.json.", ""]
        md += ["## Evaluation", ""] + (results_table(runs) if any(r.results for r in runs) else
                                        ["No run has been evaluated yet (`pipeline eval`)."]) + [""]
        noise = noise_line(runs)
        if noise:
            md += [noise, ""]
        trade = figures.tradeoff(runs, out / "tradeoff.png", _test_data)
        if trade:
            pngs.append(trade)
            md += ["![robust accuracy against training time, a panel per measure](tradeoff.png)", ""]
        for run, slug in zip(runs, slugs):
            cfg = run.config
            md += [f"## {run.label}", "", f"Trained on {run.train_data}: method {cfg.get('method', {}).get('name')}, "
                   f"{cfg.get('model', {}).get('arch')}, {len(run.epochs)} epochs, {run.images:,} images trained on "
                   f"({run.images_attacked:,} attacked) in {run.train_seconds:.1f} s of epochs ({run.wall_seconds:.1f} s wall).", ""]
            pngs.append(figures.training(run, out / f"{slug}-training.png"))
            md += [f"![training]({slug}-training.png)", "",
                   "| epoch | loss | lr | images/s | attack share | subset round | subset size |",
                   "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for e in run.epochs:
                share = e.get("attack_s", 0) / e["seconds"] if e.get("seconds") else 0
                md.append(f"| {e['epoch']} | {e['loss']:.4f} | {e.get('lr') or 0:.4g} | {e.get('images_per_s', 0):,.0f} | "
                          f"{share:.0%} | {e.get('subset_round') if e.get('subset_round') is not None else '-'} | "
                          f"{e.get('subset_size')} |")
            md.append("")
            sel = cfg.get("select", {})
            if sel.get("selector") and run.warmup_epochs == len(run.epochs):
                md += [f"This run never trained on a subset: no round of {sel['selector']} was used in its "
                       f"{len(run.epochs)} epochs (select.warmup {sel.get('warmup')}, every {sel.get('every')}, "
                       f"lag {0 if sel.get('sync') else sel.get('lag', 1)}); its numbers are those of all data.", ""]
            if len(run.divergence) > 1:
                pngs.append(figures.divergence(run, out / f"{slug}-divergence.png"))
                md += [_divergence_line(run), "", f"![RD(U)]({slug}-divergence.png)", ""]
            if run.accounting:
                a = run.accounting[-1]
                md += [f"Selection accounting: {len(run.rounds)} rounds took {a['selection_s_total']:.1f} s (wall, "
                       f"process start included); epochs on subsets left {a['images_not_attacked_total']:,} images "
                       f"unattacked, about {a['saved_s_total']:.1f} s of training (at the full-data epoch's cost "
                       f"per image): net {a['net_s']:+.1f} s.", ""]
            for w in run.warnings:
                md += [f"Round {w['round']} cost {w['selection_s']:.1f} s, more than the {w['expected_saving_s']:.1f} s "
                       "its subset saves" + (f"; the run fell back to {w['fallback']} subsets." if w.get("fallback")
                                             else "."), ""]
            if run.certifications:
                pngs.append(figures.certified_curve([(c["name"], Path(c["tsv"])) for c in run.certifications],
                                                    out / f"{slug}-certified.png"))
                md += ["### Certified accuracy (`pipeline certify`)", ""] + certification_table(run) + [
                    "", f"![certified accuracy]({slug}-certified.png)", ""]
            if run.rounds:
                pngs.append(figures.selection_timeline(run, out / f"{slug}-selection.png"))
                md += [f"![selection timeline]({slug}-selection.png)", "",
                       "| round | snapshot at epoch | used from epoch | selection s | stall s | size | kept from previous |",
                       "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
                for r in run.rounds:
                    kept = r.get("kept_from_previous")
                    md.append(f"| {r['round']} | {r.get('epoch')} | {r.get('used_from_epoch')} | "
                              f"{r.get('selection_s') or 0:.1f} | {r.get('stall_s') or 0:.2f} | {r.get('size')} | "
                              f"{'-' if kept is None else f'{kept:.0%}'} |")
                md.append("")
        path = out / "report.md"
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(md) + "\n")
    return path, pngs


def _divergence_line(run: RunRecord) -> str:
    """What RD(U) did, against where the warm-up was taking it."""
    (e0, v0), (e1, v1) = run.divergence[0], run.divergence[-1]
    line = f"RD(U), RCS's divergence on the held-out U: {v0:.5f} after {e0} epochs, {v1:.5f} after {e1}"
    trend = figures.warmup_trend(run)
    if trend and run.warmup_epochs < len(run.epochs):
        expected = trend[1] + trend[0] * e1
        line += (f"; the warm-up's linear trend ({trend[0]:+.5f} per epoch) would give {expected:.5f} "
                 f"({v1 - expected:+.5f}). The trend is a guide only (RD(U) also moves with the learning-rate "
                 "schedule and flattens as training goes on): a random-subset run of the same schedule is the "
                 "comparison that tells whether the subsets lowered it")
    return line + "."


def _deployed(run: RunRecord) -> tuple[dict, dict]:
    """(the evaluation of the deployed branch with PGD-20, the natural branch's), each {} when absent; on the
    data the run trained on where it was measured there (a transfer evaluation is not the run's own number)."""
    own = sorted(run.results, key=is_transfer)
    adv = next((r for r in own if r.get("branch_role", "eval") == "eval" and r.get("pgd20") is not None), {})
    nat = next((r for r in own if r.get("branch_role") == "natural"), {})
    return adv, nat


def noise_line(runs: list[RunRecord]) -> str | None:
    """Which differences between these runs one seed cannot tell apart: two standard errors of the difference
    of two accuracies measured on the same n test images, sqrt(2 p (1 - p) / n) each, at those runs' mean
    accuracy p, per measure. Runs are compared only with runs measured on the same images (data set and count):
    each such group gets its own numbers. The spread between seeds, which one seed cannot show, comes on top."""
    groups: dict[tuple[str, int], list[str]] = {}
    for key, title in (("clean", "clean"), ("pgd20", "PGD-20")):
        by_images: dict[tuple[str, int], list[float]] = {}
        for r in (_deployed(run)[0] for run in runs):
            n = (r.get("measure_samples") or {}).get(key, r.get("samples"))
            if r.get(key) is not None and n:
                by_images.setdefault((_test_data(r), n), []).append(r[key])
        for (data, n), vals in by_images.items():
            if len(vals) > 1:
                p = sum(vals) / len(vals)
                groups.setdefault((data, n), []).append(f"{200 * (2 * p * (1 - p) / n) ** 0.5:.1f} points ({title})")
    if not groups:
        return None
    said = "; ".join(f"on the same {n:,} test images" + (f" of {data}" if data != "-" else "")
                     + f", differences below {' and '.join(parts)}" for (data, n), parts in groups.items())
    return (f"One seed: between runs measured {said} are within two standard errors of the test sample "
            "alone, and the spread between seeds comes on top; telling selectors apart takes several seeds "
            "(configs/experiments/).")


def summary_table(run_paths):
    """One rich table, a row per run: what it cost and what it reached (the demo's table), with the line
    saying which of its differences one seed cannot tell apart."""
    from rich.table import Table

    runs = [load_run(p) for p in run_paths]
    t = Table(title="runs side by side", title_justify="left", caption=noise_line(runs), caption_justify="left")
    for col in ("run", "train wall s", "images attacked", "selection s", "stall s", "clean", "PGD-20",
                "natural-branch clean", "chance"):
        t.add_column(col, justify="right")
    for run in runs:
        adv, nat = _deployed(run)
        chance = adv.get("chance") or nat.get("chance")
        t.add_row(run.label, f"{run.wall_seconds:.1f}", f"{run.images_attacked:,}",
                  f"{sum(r.get('wall_s') or r.get('selection_s') or 0 for r in run.rounds):.1f}" if run.rounds else "-",
                  f"{sum(r.get('stall_s') or 0 for r in run.rounds):.2f}" if run.rounds else "-",
                  _pct(adv.get("clean")), _pct(adv.get("pgd20")), _pct(nat.get("clean")),
                  _pct(chance))
    return t


__all__ = ["build_report", "load_run", "robust_of", "summary_table"]
