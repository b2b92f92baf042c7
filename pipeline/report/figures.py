"""PNG figures of runs (matplotlib, headless Agg backend)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError
from pipeline.evaluation.certify import read_rows
from pipeline.evaluation.measures import measure_title, robust_measures
from pipeline.report.runs import RunRecord


SOFTWARE = "pipeline report"  # in every figure's PNG text: the mark that this tool wrote it


DRAWING = 2  # raise when a figure's drawing changes: figures drawn before are drawn again


def _digest(kind: str, *inputs) -> str:
    """What a figure shows, as a digest: its kind, the drawing's version and the data it plots."""
    text = json.dumps([kind, DRAWING, *inputs], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _file_digest(path: Path) -> str | None:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest() if path.is_file() else None


def _save(fig, path: Path, digest: str) -> None:
    """Through a temporary file, as every artefact: a failed write leaves no half figure. The PNG's text says
    this tool drew it, from what, and what each panel shows."""
    panels = " || ".join(f"{ax.get_title()} | x: {ax.get_xlabel()} | y: {ax.get_ylabel()}" for ax in fig.get_axes())
    with atomic_path(path) as tmp:  # the panels' titles and axes in words: what a reader (or a test) can check
        fig.savefig(tmp, dpi=90, format="png", metadata={"Software": SOFTWARE, "Source": digest, "Description": panels})


def _png_text(path: Path) -> dict:
    try:
        from PIL import Image

        with Image.open(path) as img:
            return dict(img.info) if img.format == "PNG" else {}
    except Exception:  # noqa: BLE001  (anything unreadable is not provably ours)
        return {}


def is_our_figure(path: Path) -> bool:
    return _png_text(path).get("Software") == SOFTWARE


def _current(path: Path, digest: str) -> bool:
    """`path` is a figure this tool drew from exactly these inputs: drawing it again gives the same picture (an
    experiment writes its report after every arm, and each run's figures took half a second to draw)."""
    text = _png_text(path)
    return text.get("Software") == SOFTWARE and text.get("Source") == digest


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise PipelineError("pipeline report needs matplotlib: pip install 'pipeline[report]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training(run: RunRecord, path: Path) -> Path:
    """Loss terms, learning rate, images/s and the attack's share of step time, per epoch."""
    digest = _digest("training", run.label, run.epochs)
    if _current(path, digest):
        return path
    plt = _plt()
    ep = [e["epoch"] for e in run.epochs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    terms = sorted({k for e in run.epochs for k in e if k.startswith("loss")})
    for k in terms:
        axes[0].plot(ep, [e.get(k) for e in run.epochs], marker="o", label=k)
    axes[0].set(title="loss terms", xlabel="epoch")
    axes[0].legend(fontsize=8)
    axes[1].plot(ep, [e.get("lr") for e in run.epochs], marker="o", color="tab:purple")
    axes[1].set(title="learning rate (end of epoch)", xlabel="epoch")
    axes[2].plot(ep, [e.get("images_per_s") for e in run.epochs], marker="o", color="tab:green", label="images/s")
    axes[2].set(title="throughput and attack share", xlabel="epoch", ylabel="images/s")
    share = axes[2].twinx()
    share.plot(ep, [e.get("attack_s", 0) / e["seconds"] if e.get("seconds") else None for e in run.epochs],
               marker="s", color="tab:red", label="attack share of step time")
    share.set_ylim(0, 1)
    share.set_ylabel("attack share")
    fig.suptitle(run.label)
    fig.tight_layout()
    _save(fig, path, digest)
    plt.close(fig)
    return path


def selection_timeline(run: RunRecord, path: Path) -> Path:
    """Training epochs and selection rounds against wall-clock time since the run started."""
    digest = _digest("selection", run.label, run.start, run.epochs, run.rounds)
    if _current(path, digest):
        return path
    plt = _plt()
    t0 = run.start
    fig, ax = plt.subplots(figsize=(11, 3.2))
    for e in run.epochs:
        start = e["time"] - e["seconds"] - t0
        colour = "tab:blue" if e.get("subset_round") is None else "tab:cyan"
        ax.barh(1, e["seconds"], left=start, color=colour, edgecolor="white")
        ax.text(start + e["seconds"] / 2, 1, str(e["epoch"]), ha="center", va="center", fontsize=7)
    for r in run.rounds:
        begin, end = r.get("submitted_at", t0) - t0, r.get("ready_at", t0) - t0
        ax.barh(0, max(end - begin, 1e-3), left=begin, color="tab:orange", edgecolor="black")
        kept = r.get("kept_from_previous")
        ax.text(end, 0.35, f"r{r['round']}: {r.get('size')} ids" + (f", {kept:.0%} kept" if kept is not None else "")
                + (f", stall {r['stall_s']:.1f}s" if r.get("stall_s") else ""), fontsize=7)
    ax.set_yticks([0, 1], ["selection", "training"])
    ax.set_xlabel("wall-clock seconds since training started")
    ax.set_title(f"{run.label}: epochs (cyan on a selected subset) and selection rounds")
    fig.tight_layout()
    _save(fig, path, digest)
    plt.close(fig)
    return path


def warmup_trend(run: RunRecord) -> tuple[float, float] | None:
    """(slope, intercept) of RD(U) against epochs over the warm-up (the epochs before any subset): where RD(U)
    was heading on all data, the line the subset epochs are judged against. None with fewer than 2 points."""
    points = [(e, v) for e, v in run.divergence if e <= run.warmup_epochs]
    if len(points) < 2:
        return None
    import numpy as np

    slope, intercept = np.polyfit([p[0] for p in points], [p[1] for p in points], 1)
    return float(slope), float(intercept)


def divergence(run: RunRecord, path: Path) -> Path:
    """RD(U) per epoch, the warm-up trend extended over the run, subset epochs shaded."""
    digest = _digest("divergence", run.label, run.divergence, run.warmup_epochs, run.epochs)
    if _current(path, digest):
        return path
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs, ys = [p[0] for p in run.divergence], [p[1] for p in run.divergence]
    ax.plot(xs, ys, marker="o", color="tab:blue", label="RD(U)")
    trend = warmup_trend(run)
    if trend:
        end = max(xs)
        ax.plot([0, end], [trend[1], trend[1] + trend[0] * end], ls="--", color="grey", label="warm-up trend")
    for e in run.epochs:
        if e.get("subset_round") is not None:
            ax.axvspan(e["epoch"] - 1, e["epoch"], color="tab:cyan", alpha=0.15, lw=0)
    ax.set(xlabel="epochs done", ylabel="RD(U)", title=f"{run.label}: RD on the held-out U (shaded: subset epochs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, digest)
    plt.close(fig)
    return path


def tradeoff(runs: list[RunRecord], path: Path, test_data=lambda r: "-") -> Path | None:
    """Robust accuracy against training wall time, what selection buys: a panel per robust measure (two attacks
    never share an axis: the weaker one would make its runs look more robust), each titled with the test images
    it was measured on. `test_data(result)` names a result's test set."""
    points = []
    for run in runs:
        for res in run.results:
            for m in robust_measures():
                if res.get(m) is not None:
                    n = (res.get("measure_samples") or {}).get(m, res.get("samples"))
                    points.append((m, run.train_seconds, res[m], f"{run.label} {res['protocol']}", test_data(res), n))
    if not points:
        return None
    digest = _digest("tradeoff", points)
    if _current(path, digest):
        return path
    plt = _plt()
    measures = list(dict.fromkeys(p[0] for p in points))
    fig, axes = plt.subplots(1, len(measures), figsize=(6.5 * len(measures), 4), squeeze=False)
    for ax, m in zip(axes[0], measures):
        mine = [p for p in points if p[0] == m]
        sets = sorted({(data, n) for *_, data, n in mine}, key=str)
        for _, x, y, label, data, n in mine:
            ax.scatter(x, 100 * y, s=40)
            ax.annotate(label if len(sets) == 1 else f"{label} ({data}, {n})", (x, 100 * y), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        where = (f"{sets[0][1]:,} test images" + (f" of {sets[0][0]}" if sets[0][0] != "-" else "")
                 if len(sets) == 1 else "test images as labelled")
        ax.set(xlabel="training wall time, s (selection overlapped)", ylabel=f"{measure_title(m)} accuracy, %",
               title=f"{measure_title(m)} on {where}")
        ax.margins(0.2)
    fig.tight_layout()
    _save(fig, path, digest)
    plt.close(fig)
    return path


def certified_curve(tables: list[tuple[str, Path]], path: Path) -> Path:
    """Certified accuracy against l2 radius, one curve per certification TSV (`pipeline certify`)."""
    digest = _digest("certified", [(label, _file_digest(Path(tsv))) for label, tsv in tables])
    if _current(path, digest):
        return path
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, tsv in tables:
        rows = read_rows(Path(tsv))
        if not rows:
            continue
        radii = sorted(r["radius"] for r in rows if r["correct"])
        top = max(radii[-1] if radii else 0.0, 1.0)
        xs = [top * i / 200 for i in range(201)]
        ys = [100 * sum(r >= x for r in radii) / len(rows) for x in xs]
        ax.plot(xs, ys, label=f"{label} ({len(rows)} samples)")
    for r in (0.25, 0.5, 0.75, 1.0):
        ax.axvline(r, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="l2 radius", ylabel="certified accuracy, %", title="certified accuracy (randomized smoothing)",
           ylim=(0, 100))
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, digest)
    plt.close(fig)
    return path


def arms_tradeoff(points: list[dict], path: Path) -> Path | None:
    """An experiment's trade-off: each arm's mean robust accuracy against its mean training wall time (selection
    included), with the seeds' standard deviations as error bars; one colour per selector, one marker per
    budget. `points`: {"label", "selector", "fraction", "x", "x_std", "y", "y_std", "measure"}."""
    digest = _digest("arms_tradeoff", points)
    if _current(path, digest):
        return path
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    selectors = list(dict.fromkeys(p["selector"] for p in points))
    fractions = sorted({p["fraction"] for p in points if p["fraction"] is not None}, reverse=True)
    markers = dict(zip(fractions, "osD^v<>p*h"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for p in points:
        ax.errorbar(p["x"], 100 * p["y"], xerr=p["x_std"] or 0, yerr=100 * (p["y_std"] or 0),
                    fmt=markers.get(p["fraction"], "*"), color=colours[selectors.index(p["selector"]) % len(colours)],
                    ms=6, capsize=2, lw=0.8)
        ax.annotate(p["label"], (p["x"], 100 * p["y"]), fontsize=6, xytext=(4, 3), textcoords="offset points")
    measure, n = points[0]["measure"], points[0].get("images")
    ax.set(xlabel="training wall time, s (selection included)", ylabel=f"robust accuracy ({measure}), %",
           title=f"{measure} accuracy" + (f" on {n:,} test images" if isinstance(n, int) else "")
           + " against training time (mean and sd over seeds)")
    ax.margins(0.15)
    fig.tight_layout()
    _save(fig, path, digest)
    plt.close(fig)
    return path
