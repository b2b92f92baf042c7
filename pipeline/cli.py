"""The `pipeline` command line. Thin: parse, call the stage, print. Errors are one line and a non-zero exit.

Each command imports its stage inside its function, for start-up time: `pipeline --version`, every `--help`,
argument errors and `prepare` start without torch. Help texts that list names ("{methods}") are filled when a
command's help is shown (`fill_help`): from pipeline/help_catalogue.json (written from the registries by
scripts/help_catalogue.py, kept current by a test), or from the registries themselves when PIPELINE_PLUGINS
registers parts of its own, so those are listed too.
"""

from __future__ import annotations

import errno
import json
import sys
import time
from inspect import signature
from pathlib import Path
from typing import Optional

import click
import typer
from rich.markup import escape

from pipeline import __version__
from pipeline.errors import PipelineError, WriteError
from pipeline.redact import is_redacted, redact
from pipeline.registry import load_plugins
from pipeline.progress import console, progress_bar
from pipeline.runlayout import RunLayout
from pipeline.runtime import Interrupted, interrupt, signals_seen
from pipeline.validate import parse_json

try:  # typer 0.2x carries its own copy of click, whose exceptions are not click's
    from typer._click import exceptions as _click_exceptions
except ImportError:
    _click_exceptions = click.exceptions
_USAGE_ERRORS = (click.UsageError, _click_exceptions.UsageError)
_NO_ARGS = (click.exceptions.NoArgsIsHelpError, _click_exceptions.NoArgsIsHelpError)
_ABORT = (click.exceptions.Abort, getattr(typer, "Abort", click.exceptions.Abort))

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Streaming data selection for affordable adversarially robust pre-training.")


def _version(value: bool):
    if value:
        print(f"pipeline {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version.")):
    pass


@app.command()
def prepare(
    source: str = typer.Argument(..., help="{sources}"),
    out: Optional[Path] = typer.Option(None, help="Output folder [default: shards/<name>]."),
    formats: str = typer.Option("wds", help="Comma-separated: wds (always) and ffcv."),
    image_size: Optional[int] = typer.Option(None, help="Resize the shorter side to N and centre-crop to N x N."),
    jpeg_quality: int = typer.Option(90, help="Quality of the JPEGs re-encoded when resizing (1-100)."),
    shard_size: int = typer.Option(5000, help="Samples per tar shard."),
    workers: int = typer.Option(1, help="Encoding processes."),
    test_fraction: float = typer.Option(0.2, help="Held-out test share for data without its own test split."),
    seed: int = typer.Option(0, help="Seed of the held-out split and of the sample order."),
    overwrite: bool = typer.Option(False, help="Replace a shard set prepared with other settings."),
    follow_symlinks: bool = typer.Option(False, help="folder: read links whose target is outside the source folder "
                                         "(skipped and listed by default)."),
    per_class: Optional[str] = typer.Option(None, help="Keep a seeded random N samples of each class in a split: "
                                            "SPLIT=N[,SPLIT=N], e.g. train=1000 (a fixed, class-balanced subset)."),
    splits: Optional[str] = typer.Option(None, help="Keep only these splits, comma-separated (e.g. train,test: "
                                         "STL-10 without its 100,000 unlabeled images) [default: all]."),
):
    """Convert a data set into a shard set (WebDataset tar shards with offset indexes, optionally FFCV)."""
    from pipeline.shards.describe import shardset_table
    from pipeline.shards.prepare import PrepareOptions, parse_per_class
    from pipeline.shards.prepare import prepare as run_prepare
    from pipeline.shards.shardset import ShardSet

    _interrupt_hint(f"finished shards are kept (journaled in {out or 'shards/<name>'}); run the same command again "
                    "to resume")
    opts = PrepareOptions(out=out, formats=tuple(f.strip() for f in formats.split(",") if f.strip()),
                          image_size=image_size, jpeg_quality=jpeg_quality, shard_size=shard_size, workers=workers,
                          test_fraction=test_fraction, seed=seed, overwrite=overwrite,
                          follow_symlinks=follow_symlinks, per_class=parse_per_class(per_class),
                          splits=tuple(x.strip() for x in (splits or "").split(",") if x.strip()))
    result = run_prepare(source, opts)
    console.print(shardset_table(ShardSet(result.out, result.index)))
    if result.written:
        console.print(f"encoded {result.written:,} images in {result.seconds:.1f} s ({result.images_per_s:,.0f} images/s)")
    else:
        console.print("nothing to do: the shard set was already complete")
    skipped = result.index.get("skipped", [])
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} source files[/] (listed under 'skipped' in "
                      f"{escape(str(result.out / 'index.json'))}), e.g. {escape(skipped[0]['source'])}: "
                      f"{escape(skipped[0]['reason'])}")


@app.command()
def index(
    shards: str = typer.Argument(..., help="The folder or URL prefix (s3://, gs://, http(s)://) of existing WebDataset "
                                 "tar shards, or a brace pattern of their names (URL/train-{{000000..000099}}.tar)."),
    out: Optional[Path] = typer.Option(None, help="Where index.json and the member tables go [default: the shards' "
                                       "own folder; a URL needs --out]."),
    split: list[str] = typer.Option([], help="NAME=PATTERN: the shards of a split (repeatable) [default: *train* "
                                    "train, *val* and *test* test]."),
    classes: Optional[Path] = typer.Option(None, help="A text file of class names, one a line in label order "
                                           "[default: the label numbers]."),
    name: Optional[str] = typer.Option(None, help="The shard set's name [default: the folder's]."),
    digests: bool = typer.Option(False, help="Read every byte once: record each image's digest and each shard's "
                                 "SHA-256, so reads are checked as a prepared set's [default: headers only]."),
    workers: int = typer.Option(8, help="Shards read at once."),
    overwrite: bool = typer.Option(False, help="Index again where `pipeline index` wrote an index before."),
):
    """Index existing WebDataset shards in place ({key}.jpg|.png|.webp + {key}.cls|.label|.json): they then stream,
    subset, verify and train like a prepared set, without a byte rewritten."""
    from pipeline.shards.describe import shardset_table
    from pipeline.shards.shardset import ShardSet
    from pipeline.shards.wds_index import index_shards

    result = index_shards(shards, out, split, str(classes) if classes else None, name, digests, workers, overwrite)
    console.print(shardset_table(ShardSet.open(result.out)))
    console.print(f"read {result.bytes_read:,} bytes in {result.requests:,} reads"
                  + (" (every byte: --digests)" if digests else " (tar headers and label members only)")
                  + f"; index written to {escape(str(result.out / 'index.json'))}")
    if result.skipped:
        s0 = result.skipped[0]
        console.print(f"[yellow]skipped {len(result.skipped)} samples[/] (listed under 'skipped' in index.json), "
                      f"e.g. {escape(s0['shard'])}: {escape(s0['key'])}: {escape(s0['reason'])}")


@app.command()
def verify(directory: str = typer.Argument(..., help="Shard-set folder or URL (s3://, gs://, http(s)://).")):
    """Re-read every shard against its index and decode every image. Exit 0 when healthy, else 1."""
    from pipeline.shards.verify import verify as run_verify

    problems = run_verify(directory)
    if problems:
        for p in problems:
            console.print(f"[red]problem:[/] {escape(p)}")
        console.print(f"{len(problems)} problem(s) in {escape(str(directory))}; prepare the shard set again "
                      "(finished shards that are intact are kept)")
        raise typer.Exit(1)
    console.print(f"[green]ok[/]: {escape(str(directory))} is healthy")


@app.command()
def upload(
    directory: Path = typer.Argument(..., help="A shard-set folder (verified before anything is sent)."),
    url: str = typer.Argument(..., help="s3://BUCKET/PREFIX or gs://BUCKET/PREFIX (an empty prefix, or this "
                              "set's unfinished upload)."),
):
    """Copy a verified shard set to object storage; index.json goes last. Run again to resume."""
    from pipeline.shards.upload import upload as run_upload

    r = run_upload(directory, url)
    kept = f", {r.kept} already there kept" if r.kept else ""
    console.print(f"[green]uploaded[/] {escape(str(directory))} to {escape(r.url)}: {r.uploaded} objects, "
                  f"{r.bytes / 1e6:,.1f} MB{kept}")


@app.command()
def inspect(
    path: str = typer.Argument(..., help="A shard-set folder or URL, or a manifest (.json)."),
    data: Optional[str] = typer.Option(None, help="Shard set (folder or URL) to check a manifest against."),
):
    """Summarise a shard set or a manifest."""
    from pipeline.shards.describe import manifest_table, shardset_table
    from pipeline.shards.manifest import Manifest
    from pipeline.shards.shardset import ShardSet
    from pipeline.shards.storage import is_url

    if is_url(path) or Path(path).is_dir():
        console.print(shardset_table(ShardSet.open(path)))
        return
    m = Manifest.load(Path(path))
    ss = None
    if data is not None:
        ss = ShardSet.open(data)
        m.check_against(ss)
    console.print(manifest_table(m, ss))


@app.command()
def stream(
    data: str = typer.Argument(..., help="Shard-set folder or URL (s3://, gs://, http(s)://)."),
    split: str = typer.Option("train"),
    manifest: Optional[Path] = typer.Option(None, help="Stream only this manifest's samples."),
    backend: str = typer.Option("auto", help="auto | stream | indexed | ffcv"),
    batch_size: int = typer.Option(256),
    workers: int = typer.Option(0, help="Decoding worker processes (0: in this process)."),
    epochs: int = typer.Option(1),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    seed: int = typer.Option(0),
):
    """Stream a split (or a manifest's subset) through the loader and report images/s."""
    import numpy as np
    import torch

    from pipeline.shards.manifest import Manifest
    from pipeline.shards.shardset import ShardSet

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ss = ShardSet.open(data)
    subset = Manifest.load(manifest) if manifest else None
    loader = ss.loader(split, subset, backend=backend, batch_size=batch_size, num_workers=workers,
                       device=device, seed=seed)
    for epoch in range(epochs):
        seen = 0
        label_counts = np.zeros(len(ss.classes), dtype=np.int64)
        start = time.perf_counter()
        with progress_bar() as bar:
            task = bar.add_task(f"epoch {epoch}", total=loader.samples_per_epoch if hasattr(loader, "samples_per_epoch") else None)
            for batch in loader:
                seen += len(batch.ids)
                labels = batch.labels.cpu().numpy()
                label_counts += np.bincount(labels[labels >= 0], minlength=len(ss.classes))
                bar.advance(task, len(batch.ids))
        secs = time.perf_counter() - start
        shape = "x".join(map(str, batch.images.shape[1:])) if seen else "-"
        classes = f"per class {label_counts.tolist()}" if ss.labelled(split) else "no labels"
        console.print(f"epoch {epoch}: {seen:,} images ({shape} {batch.images.dtype if seen else ''}) in {secs:.2f} s, "
                      f"{seen / secs:,.0f} images/s; {classes}")


@app.command()
def train(
    # Options named by a setting's `flag` set that setting; "@KEY" help is the setting's declared help.
    data: Optional[str] = typer.Option(None, help="@data.path"),
    out: Optional[Path] = typer.Option(None, help="@run.out"),
    method: Optional[str] = typer.Option(None, help="Training method by name: {methods}."),
    config: Optional[Path] = typer.Option(None, help="TOML file with sections {sections} (docs/SETTINGS.md)."),
    manifest: Optional[Path] = typer.Option(None, help="@data.manifest"),
    manifests: Optional[Path] = typer.Option(None, help="@data.manifests"),
    epochs: Optional[int] = typer.Option(None, help="@optim.epochs"),
    batch_size: Optional[int] = typer.Option(None, help="@data.batch_size"),
    lr: Optional[float] = typer.Option(None, help="@optim.lr"),
    optimizer: Optional[str] = typer.Option(None, help="@optim.optimizer"),
    arch: Optional[str] = typer.Option(None, help="{archs}"),
    device: Optional[str] = typer.Option(None, help="@run.device"),
    seed: Optional[int] = typer.Option(None, help="@run.seed"),
    workers: Optional[int] = typer.Option(None, help="@data.workers"),
    selector: Optional[str] = typer.Option(None, help="Select subsets during training: {selectors} "
                                           "(background, from snapshots) or {pruners} (in process, from the steps' "
                                           "per-sample scores; --set select.params=order=lowest|stratified,anneal=N)."),
    fraction: Optional[float] = typer.Option(None, help="@select.fraction"),
    warmup: Optional[int] = typer.Option(None, help="@select.warmup"),
    select_every: Optional[int] = typer.Option(None, help="@select.every"),
    preset: Optional[str] = typer.Option(None, help="Selector preset, e.g. reference (RCS as the paper ran it)."),
    sync: Optional[bool] = typer.Option(None, "--sync/--overlap", help="@select.sync"),
    select_lag: Optional[int] = typer.Option(None, help="@select.lag"),
    attack_fraction: Optional[float] = typer.Option(None, help="@attack.fraction"),
    attack_select: Optional[str] = typer.Option(None, help="@attack.select ({attack_choices})."),
    set_: list[str] = typer.Option([], "--set", help="Any setting, SECTION.KEY=VALUE (repeatable)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder exactly where it stopped."),
    overwrite: bool = typer.Option(False, help="Start afresh in a run folder that already holds a run."),
    stop_after: Optional[int] = typer.Option(None, help="Stop after this many epochs (the schedule keeps its length)."),
):
    """Pre-train an encoder (ACL, DynACL, ...) on a shard set, a subset manifest, or a folder of manifests."""
    given = dict(locals())
    from pipeline.config import flagged_settings
    from pipeline.trainers import TrainConfig, create_trainer, load_config

    if resume is not None:
        if not RunLayout(resume).config.is_file():
            raise PipelineError(f"{resume}: not a run folder (no config.toml); start it with --out instead")
        cfg = load_config(RunLayout(resume).config)
        # Settings read from a file never send data anywhere: W&B goes online on a resume only when this
        # command asks (its flags below, --set, or WANDB_MODE), not because the run's config.toml says so.
        if cfg.run.wandb_mode != "offline" and "wandb" in cfg.run.loggers:
            console.print(f"{RunLayout(resume).config} asks for W&B mode {cfg.run.wandb_mode!r}; this resume logs "
                          "offline unless its command asks (--set run.wandb_mode=online or WANDB_MODE=online)")
        cfg.run.wandb_mode = "offline"
    else:
        cfg = load_config(config) if config else TrainConfig()
    flags = {flag: (key, given[flag.split("/")[0].lstrip("-").replace("-", "_")])
             for key, flag in flagged_settings(exclude=("eval",)).items()}
    flags["--preset"] = ("select.params", None if preset is None else
                         ",".join(filter(None, [f"preset={preset}", cfg.select.params])))
    for flag, (key, value) in flags.items():
        if value is not None:
            cfg.set(key, str(value), origin=flag)
    cfg.apply_overrides(set_)
    import os

    from pipeline import locks
    from pipeline.trainers.runfolder import start_fresh, started

    if resume is not None:
        cfg.run.out = str(resume)
        if is_redacted(cfg.data.path):
            raise PipelineError(f"{RunLayout(resume).config}: the data URL's credentials are not written down "
                                f"({cfg.data.path}); resume with --data and the full URL again (or credentials in "
                                "the environment)")
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank and cfg.run.out:  # lock first: nothing is checked or deleted under another writer
        locks.acquire(cfg.run.out, "pipeline train")
    if resume is not None and not started(Path(resume)):  # stopped before its first epoch ended
        console.print(f"{resume}: no epoch of it had finished (no checkpoint); starting it from the beginning with "
                      "its config.toml")
        resume, overwrite = None, True
    if resume is None and main_rank:
        start_fresh(Path(cfg.run.out) if cfg.run.out else None, overwrite)
    run_dir = Path(cfg.run.out) if cfg.run.out else None

    def kept() -> str:
        last = RunLayout(run_dir).last if run_dir else None
        if last is None or not last.is_file():
            return "no epoch had finished, so no checkpoint was kept; run the same command again to start it afresh"
        from pipeline.checkpoint import load_checkpoint

        return (f"the checkpoint of epoch {load_checkpoint(last).get('epoch')} is kept in {last}; continue with "
                f"`pipeline train --resume {run_dir}`")

    _interrupt_hint(kept)
    trainer = create_trainer(cfg, resume=resume is not None)
    try:
        summary = trainer.fit(stop_after=stop_after)
    finally:
        trainer.close()
    if trainer.is_main and summary:
        console.print(f"epoch {summary['epoch']}: loss {summary['loss']:.4f}, {summary['images_per_s']:,.0f} images/s; "
                      f"checkpoint {escape(str(Path(cfg.run.out) / 'checkpoints' / 'last.pt'))}")


@app.command()
def select(
    data: str = typer.Option(..., help="Shard-set folder or URL."),
    selector: str = typer.Option("facility", help="{selectors} [default: facility, the one never far from or "
                                 "below random subsets in the validity benchmark: benchmarks/RESULTS.md]"),
    fraction: float = typer.Option(0.1, help="Share of the pool to select."),
    out: Optional[Path] = typer.Option(None, help="Manifest to write (.json; ids go beside it)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Model snapshot [default: a freshly initialised model]."),
    split: str = typer.Option("train"),
    pool: Optional[Path] = typer.Option(None, help="Select from this manifest's samples instead of the split."),
    seed: int = typer.Option(0, help="Seed of the selection (a whole number >= 0)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    arch: str = typer.Option("resnet18", help="Model for selection without --checkpoint."),
    batch_size: int = typer.Option(256, help="Proxy computation batch size."),
    workers: int = typer.Option(0, help="Loader worker processes of the proxy pass (per process under torchrun)."),
    attack_steps: Optional[int] = typer.Option(None, help="PGD steps for the candidates' adversarial views "
                                               "[default: the selector's, 1; 5 with --preset reference]."),
    preset: Optional[str] = typer.Option(None, help="rcs: reference (the paper's minibatch greedy)."),
    params: str = typer.Option("", help="Selector parameters as in select.params: KEY=VALUE,KEY=VALUE."),
    refreshes: Optional[int] = typer.Option(None, help="rcs: refreshes of U's gradient per greedy (0: every pick)"),
    unit: Optional[str] = typer.Option(None, help="rcs: sample | batch"),
    k: Optional[int] = typer.Option(None, help="facility: neighbours in the k-NN graph"),
    optimizer: Optional[str] = typer.Option(None, help="facility: lazy | stochastic | naive"),
    alignment_weight: Optional[float] = typer.Option(None, help="facility: weight of the RCS alignment term"),
    proxy: Optional[str] = typer.Option(None, help="facility: features | gradients"),
    per_class: bool = typer.Option(False, help="facility/random: budget per class"),
    knn_backend: Optional[str] = typer.Option(None, help="facility: auto | faiss-flat | faiss-ivf | faiss-gpu | torch"),
    recorded: Optional[Path] = typer.Option(None, help="Rows training recorded (RUN/snapshots/book.rows, "
                                            "select.proxies = recorded): no proxy pass for the samples they cover."),
    watch: Optional[Path] = typer.Option(None, help="Keep selecting for this training run, round after round."),
    every: int = typer.Option(1, help="--watch: select when the run's checkpoint is this many epochs newer."),
):
    """Select a subset with a model snapshot and write a manifest (or keep feeding a run with --watch).

    Under torchrun (`torchrun --nproc-per-node N -m pipeline select ...`) the processes share the proxy pass
    (RCS: whole chunks per process) and rank 0 runs the greedy and writes the manifest."""
    from pipeline.dist import init_distributed
    from pipeline.kv import parse_kv as parse_params
    from pipeline.selectors.run import run_selection

    flags = {"unit": unit, "k": k, "optimizer": optimizer, "alignment_weight": alignment_weight, "proxy": proxy,
             "knn_backend": knn_backend, "preset": preset, "refreshes": refreshes, "attack_steps": attack_steps,
             "per_class": True if per_class else None}
    params = {**parse_params(params, "--params"), **{k_: v for k_, v in flags.items() if v is not None}}
    dist_ctx = init_distributed(device)  # under torchrun: the ranks share the proxy pass, rank 0 writes
    dev = dist_ctx.device
    if watch is not None:
        from pipeline.selectors.watch import watch_run

        watch_run(watch, data, selector, fraction, params, seed, dev, every)
        return
    if out is None:
        raise PipelineError("--out: where to write the manifest (e.g. runs/sel/round-0001.json)")
    _interrupt_hint(f"no manifest was written ({out} and the pair it names are as before); run the same command "
                    "again")
    try:
        m = run_selection(data, selector, fraction, out, checkpoint, split, pool, seed, dev, params, arch, batch_size,
                          workers=workers, recorded=recorded)
    finally:
        dist_ctx.close()
    if not dist_ctx.is_main:
        return
    t = m.extra["timing"]
    console.print(f"selected {len(m):,} of {m.extra['pool_size']:,} ({selector}) in {t['total']:.1f} s "
                  f"({', '.join(f'{k_} {v:.1f} s' for k_, v in t.items() if isinstance(v, float) and k_ != 'total')}); "
                  f"wrote {escape(str(m.path))}")


@app.command("eval")
def eval_(
    data: str = typer.Option(..., help="Shard-set folder or URL with train and test splits."),
    checkpoint: Path = typer.Option(..., help="A checkpoint written by `pipeline train`."),
    protocol: Optional[str] = typer.Option(None, help="{protocols} (direct: the model's own classifier, no "
                                           "finetuning, as for ascl) [default: slf]"),
    recipe: Optional[str] = typer.Option(None, help="{recipes}: the RobustSSL benchmark's finetuning "
                                         "settings [default: the checkpoint's method]."),
    attack: Optional[str] = typer.Option(None, help="Comma-separated: {measures} [default: pgd20]."),
    epochs: Optional[int] = typer.Option(None, help="@eval.epochs"),
    lr: Optional[float] = typer.Option(None, help="@eval.lr"),
    batch_size: Optional[int] = typer.Option(None, help="@eval.batch_size"),
    limit: Optional[int] = typer.Option(None, help="@eval.limit"),
    limits: Optional[str] = typer.Option(None, help="@eval.limits"),
    test_batch_size: Optional[int] = typer.Option(None, help="@eval.test_batch_size"),
    eps: Optional[float] = typer.Option(None, help="@eval.eps"),
    step: Optional[float] = typer.Option(None, help="@eval.step"),
    steps: Optional[int] = typer.Option(None, help="@eval.steps"),
    config: Optional[Path] = typer.Option(None, help="TOML whose [eval] section gives defaults for these options."),
    branch: str = typer.Option("eval", help="Which batch-norm branch to deploy, by role: eval (the method's) or "
                               "natural (for scale)."),
    noise_sigma: Optional[float] = typer.Option(None, help="@eval.noise_sigma"),
    smoothing: Optional[str] = typer.Option(None, help="@eval.smoothing"),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(0),
    seed: Optional[int] = typer.Option(None, help="@eval.seed"),
    resize: Optional[str] = typer.Option(None, help="@eval.resize"),
):
    """Finetune a pre-trained encoder (SLF, ALF, AFF) and report clean, PGD-20 and AutoAttack accuracy.

    --data may be other data than the checkpoint was pre-trained on (transfer: other classes, another image size;
    the same channel count). The finetuned classifier is saved under RUN/classifiers/; give that file as
    --checkpoint to measure it again without finetuning (or to `pipeline certify`)."""
    from rich.table import Table

    from pipeline.dist import resolve_device
    from pipeline.evaluation import evaluate, results_path
    from pipeline.evaluation.records import samples_text
    from pipeline.evaluation.transfer import transfer_text
    from pipeline.trainers import TrainConfig, load_config

    e = (load_config(config) if config else TrainConfig()).eval
    pick = lambda flag, value: flag if flag is not None else (value or None)  # noqa: E731
    r = evaluate(data, checkpoint, pick(protocol, e.protocol) or "slf", pick(attack, e.attack) or "pgd20",
                 pick(recipe, e.recipe), pick(epochs, e.epochs), pick(lr, e.lr), pick(batch_size, e.batch_size),
                 limit=pick(limit, e.limit), eval_batch_size=pick(test_batch_size, e.test_batch_size) or 256,
                 device=resolve_device(device), workers=workers, eps=pick(eps, e.eps),
                 step=pick(step, e.step), steps=pick(steps, e.steps), seed=pick(seed, e.seed) or 0, branch=branch,
                 noise_sigma=pick(noise_sigma, e.noise_sigma) or 0.0, smoothing=pick(smoothing, e.smoothing),
                 limits=pick(limits, e.limits), resize=pick(resize, e.resize) or "auto")
    names = r["measures"]
    where = "" if branch == "eval" else f" ({branch} branch)"
    if r["smoothing"]:
        sm = r["smoothing"]
        where += f" smoothed: sigma {sm['sigma']:g}, n {sm['n']}, alpha {sm['alpha']:g}, EOT draws {sm['eot']}"
    t = Table(title=f"{r['protocol'].upper()} evaluation of {checkpoint}{where}", title_justify="left")
    for col in ("protocol", "recipe", *names, "test samples", "eps", "finetune"):
        t.add_column(col, justify="right")
    f = r["finetune"]
    t.add_row(r["protocol"], r["recipe"], *(f"{r[n]:.2%}" for n in names), samples_text(r), f"{r['eps']:.4g}",
              f"{f['epochs']} ep, bs {f['batch_size']}, lr {f['lr']:g}, {r['finetune_seconds']:.0f} s")
    console.print(t)
    if transfer_text(r):
        console.print(transfer_text(r))
    for n in names[1:]:
        st = r["attack_settings"][n]
        console.print(f"{n}: " + ", ".join(f"{k_}={v}" for k_, v in st.items()))
    if r["smoothing"]:
        console.print("abstentions (counted as errors): " + ", ".join(
            f"{n} {r['attack_settings'][n].get('abstained', 0)}" for n in names))
    if r["reused_classifier"]:
        console.print(f"a saved classifier ({r['protocol']}, noise {r['noise_sigma']:g}): measured as it is, no finetuning")
    elif r["classifier_path"]:
        console.print(f"finetuned classifier saved to {escape(r['classifier_path'])}")
    if r["results_path"] is None:  # the numbers are on the screen above; the record could not be kept
        raise WriteError(results_path(checkpoint), r["save_error"])
    console.print(f"written to {escape(r['results_path'])}")


@app.command()
def certify(
    data: str = typer.Option(..., help="Shard-set folder or URL with train and test splits."),
    checkpoint: Path = typer.Option(..., help="A classifier `pipeline eval` saved (RUN/classifiers/*.pt), or a "
                                    "pre-trained checkpoint: then a classifier is finetuned on it first, with noise "
                                    "at --sigma, by --protocol."),
    sigma: float = typer.Option(..., help="Noise standard deviation of the smoothed classifier (images in [0, 1])."),
    n0: int = typer.Option(100, help="Draws that choose the class."),
    n: int = typer.Option(100_000, help="Draws that bound its probability."),
    alpha: float = typer.Option(0.001, help="The certificate fails with probability at most alpha."),
    limit: Optional[int] = typer.Option(None, help="Certify the first N test samples only."),
    out: Optional[Path] = typer.Option(None, help="Folder for certify.tsv / certify.json / certified.png "
                                       "[default: RUN/certify/<classifier>-sigmaS-nN]."),
    protocol: str = typer.Option("slf", help="How an encoder is made a classifier: {protocols} (direct: its "
                                 "own classifier)."),
    recipe: Optional[str] = typer.Option(None, help="Finetuning recipe [default: the checkpoint's method]."),
    epochs: Optional[int] = typer.Option(None, help="Finetuning epochs [default: the recipe's]."),
    lr: Optional[float] = typer.Option(None, help="Finetuning learning rate [default: the recipe's]."),
    batch_size: Optional[int] = typer.Option(None, help="Finetuning batch size [default: the recipe's]."),
    batch: int = typer.Option(4096, help="Noisy images per forward pass."),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    workers: int = typer.Option(0),
):
    """Certified l2 robustness of the smoothed classifier (Cohen et al.'s CERTIFY), per sample, resumable."""
    from rich.table import Table

    from pipeline.dist import resolve_device
    from pipeline.evaluation.certify import certify as run_certify
    from pipeline.report.figures import certified_curve, is_our_figure

    r = run_certify(data, checkpoint, sigma, n0, n, alpha, limit, out, protocol, batch, seed, resolve_device(device),
                    recipe=recipe, epochs=epochs, lr=lr, batch_size=batch_size, workers=workers)
    png = Path(r["out"]) / "certified.png"
    try:  # the command draws; `certify` only computes and writes its rows
        if png.exists() and not is_our_figure(png):
            raise PipelineError(f"{png}: exists and was not drawn by this tool; the figure is not drawn over it")
        r["png"] = str(certified_curve([(r["name"], Path(r["tsv"]))], png))
    except PipelineError as exc:  # matplotlib missing, or a foreign file: the numbers stand without the figure
        console.print(str(exc))
    t = Table(title=f"certified accuracy, sigma {sigma:g}, n0 {n0}, n {n:,}, alpha {alpha:g}: {r['samples']:,} "
              f"samples, {r['abstained']:,} abstained", title_justify="left")
    for col in ("l2 radius", "certified accuracy", "l_inf radius it implies"):
        t.add_column(col, justify="right")
    for radius, acc in r["certified_accuracy"].items():
        t.add_row(radius, f"{acc:.2%}", f"{r['linf_radius'][radius]:.4f}")
    console.print(t)
    console.print(f"l_inf {r['linf_eps']:.4g} (the PGD budget) needs an l2 radius of {r['l2_radius_covering_linf_eps']:.3f} "
                  f"(x sqrt(d), d = {r['dims']:,}): certified for {r['certified_accuracy_at_linf_eps']:.2%}")
    console.print(f"wrote {escape(r['tsv'])}, {escape(r['json'])}" + (f", {escape(r['png'])}" if r.get("png") else ""))


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (written by `pipeline train`)."),
    out: Path = typer.Option(..., help="Folder for report.md and its PNG figures."),
):
    """Markdown report with PNG figures: training curves, selection timeline, evaluation, robustness vs time."""
    from rich.console import Console

    from pipeline.report import build_report, summary_table

    md, pngs = build_report(runs, out)
    Console(stderr=True, width=max(console.width, 150)).print(summary_table(runs))  # readable in logs too
    console.print(f"wrote {escape(str(md))} and {len(pngs)} figures: " + ", ".join(escape(p.name) for p in pngs))


@app.command("pseudo-labels")
def pseudo_labels(
    data: str = typer.Option(..., help="Shard-set folder or URL."),
    checkpoint: Path = typer.Option(..., help="Encoder checkpoint (e.g. a `--method simclr` run's last.pt)."),
    out: Path = typer.Option(..., help="File to write: OUT.json beside its content-named arrays OUT.DIGEST.ids.npy and "
                             "OUT.DIGEST.labels.npy."),
    clusters: str = typer.Option("2,10,50,100,500", help="Cluster counts, one labelling each (AdvCL's five)."),
    split: str = typer.Option("train"),
    seed: int = typer.Option(0, help="k-means seed: the same seed gives the same labels."),
    branch: str = typer.Option("eval", help="Batch-norm branch by role whose features are clustered."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
):
    """k-means pseudo-labels of every training sample from an encoder's features (for AdvCL)."""
    from pipeline.dist import resolve_device
    from pipeline.pseudolabels import make_pseudo_labels

    try:
        counts = [int(c) for c in clusters.split(",") if c.strip()]
    except ValueError:
        raise PipelineError(f"--clusters {clusters!r}: expected whole numbers, e.g. 2,10,50,100,500") from None
    pl = make_pseudo_labels(data, checkpoint, counts, split, seed, resolve_device(device), branch)
    header = pl.save(out)
    sizes = ", ".join(f"{k}: {len(set(pl.labels[:, i].tolist()))} clusters" for i, k in enumerate(pl.counts))
    console.print(f"wrote {escape(str(header))}: {len(pl.ids):,} samples; {sizes}")


@app.command()
def experiment(
    config: Path = typer.Argument(..., help="Experiment TOML: [experiment], [prepare], shared training sections, "
                                  "[[arm]] tables (see configs/experiments/)."),
    out: Optional[Path] = typer.Option(None, help="Experiment folder [default: the file's experiment.out]."),
    only: Optional[str] = typer.Option(None, help="Run only these arms (comma-separated names)."),
    seeds: Optional[str] = typer.Option(None, help="Run only these seeds (comma-separated), e.g. one seed of every "
                                        "arm first."),
    dry_run: bool = typer.Option(False, help="List the runs and whether each is done; run nothing."),
    set_: list[str] = typer.Option([], "--set", help="Any setting of the file, SECTION.KEY=VALUE (repeatable; over "
                                   "the profile and every arm), e.g. experiment.profile=cpu for a file's small size."),
):
    """Train and evaluate a grid of arms the same way; resumable; a results table and a report."""
    from pipeline.experiment import STATE, load_experiment, results_markdown, run_experiment

    exp = load_experiment(config, out, set_)
    if dry_run:
        state = parse_json((exp.out / STATE).read_text()) if (exp.out / STATE).is_file() else {"runs": {}}
        for arm, seed, run_id in exp.runs():
            done = "done" if run_id in state["runs"] else "to run"
            console.print(f"{run_id}: {done}  {escape(json.dumps(arm.overrides))}")
        return
    _interrupt_hint(f"finished arms are kept in {exp.out / STATE}, and the arm in flight keeps its last epoch; run "
                    "the same command again to go on")
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else None
    except ValueError:
        raise PipelineError(f"--seeds {seeds!r}: comma-separated whole numbers, e.g. --seeds 0 or 0,1") from None
    rows = run_experiment(exp, only=[a.strip() for a in only.split(",")] if only else None, seeds=seed_list)
    console.print(escape(results_markdown(exp, rows)))
    console.print(f"wrote {escape(str(exp.out / 'results.md'))}, results.json and report/report.md")


def _registry_names() -> dict:
    from pipeline.config import all_sections
    from pipeline.evaluation.measures import MEASURES
    from pipeline.evaluation.protocols import PROTOCOLS
    from pipeline.evaluation.recipes import RECIPES
    from pipeline.models import arch_choices
    from pipeline.selectors import SELECTORS
    from pipeline.shards.sources import source_forms
    from pipeline.trainers import TRAINERS
    from pipeline.trainers.selective import ATTACK_CHOICES
    from pipeline.trainers.subsets import PRUNERS

    return {"methods": TRAINERS.choices(), "selectors": SELECTORS.choices(), "pruners": PRUNERS.choices(),
            "attack_choices": ATTACK_CHOICES.choices(),
            "measures": MEASURES.choices(", "), "protocols": PROTOCOLS.choices(), "archs": arch_choices().replace(", ", " | "),
            "recipes": " | ".join(RECIPES), "sources": source_forms(),
            "sections": " ".join(f"[{s}]" for s in all_sections())}


HELP_CATALOGUE = Path(__file__).with_name("help_catalogue.json")


def _help_templates():
    """(option info, its help template) of every command's options."""
    for command in app.registered_commands:
        for param in signature(command.callback).parameters.values():
            info = param.default
            template = getattr(info, "help_template", None) or getattr(info, "help", None)
            if isinstance(template, str):
                info.help_template = template
                yield info, template


def help_catalogue() -> dict:
    """What the commands' help lists, from the live registries and settings declarations: importing them imports
    every stage (torch included), so help reads a copy written by scripts/help_catalogue.py (a test keeps it
    equal to this) unless plugins add names."""
    from pipeline.config import setting_help

    keys = sorted({t[1:] for _, t in _help_templates() if t.startswith("@")})
    return {"names": _registry_names(), "settings": {k: setting_help(k) for k in keys}}


def fill_help(live: bool = False) -> None:
    """Fill the help texts that list registered names (kept as templates, so a later call lists later parts):
    from the catalogue, or (`live`: plugins registered parts of their own) from the registries."""
    catalogue = help_catalogue() if live or not HELP_CATALOGUE.is_file() else json.loads(HELP_CATALOGUE.read_text())
    names, settings = catalogue["names"], catalogue["settings"]
    for info, template in _help_templates():  # escaped: help is rich markup, where "[default: x]" would vanish
        info.help = escape(settings.get(template[1:], "") if template.startswith("@") else
                           template.format_map(names) if "{" in template else template)


# What an interrupted command kept, and how to go on: set by each command before its long work.
_on_interrupt = {"hint": "nothing was left half-written; run the same command again"}


def _interrupt_hint(text) -> None:
    _on_interrupt["hint"] = text


def _shown(text: str, limit: int = 2000) -> str:
    """An error line as printed: secrets in URLs redacted, and a value pasted into it (a 20 MB config value)
    cut to a readable length."""
    text = redact(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit:,} more characters)"


def main() -> None:
    import signal

    from pipeline.runtime import tune_allocator

    tune_allocator()
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    default_hook = sys.unraisablehook

    def quiet_lost_interrupts(info) -> None:  # swallowed where it landed; raised again at the next step
        if not isinstance(info.exc_value, Interrupted):
            default_hook(info)

    sys.unraisablehook = quiet_lost_interrupts
    try:
        plugins = load_plugins()
        commands = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
        if "--help" in sys.argv[1:] and sys.argv[1] in commands:  # a command's help: its options' texts
            fill_help(live=bool(plugins))
        code = app(standalone_mode=False)  # --help and --version print and return; usage errors come here
        sys.exit(code if isinstance(code, int) else 0)
    except _NO_ARGS as exc:  # `pipeline` alone: the list of commands
        console.print(exc.ctx.get_help() if exc.ctx else "")
        sys.exit(0)
    except _USAGE_ERRORS as exc:  # a mistyped flag, a missing argument: one line, not click's box
        where = exc.ctx.command_path if exc.ctx else "pipeline"
        console.print(f"[red]error:[/] {escape(exc.format_message())} (see `{escape(where)} --help`)")
        sys.exit(exc.exit_code)
    except _ABORT:  # end of input at a prompt
        sys.exit(1)
    except PipelineError as exc:
        console.print(f"[red]error:[/] {escape(_shown(str(exc)))}")
        sys.exit(exc.exit_code)
    except OSError as exc:  # a read or write the stage did not turn into a message of its own: still one line
        where = exc.filename or "a file"
        fix = ("choose a shorter name" if exc.errno == errno.ENAMETOOLONG else
               "check that the path exists, is readable and writable, and that its disk has space")
        console.print(f"[red]error:[/] {escape(_shown(str(where)))}: {escape(_shown(exc.strerror or str(exc)))}; {fix}")
        sys.exit(1)
    except (KeyboardInterrupt, Interrupted, Exception) as exc:
        if not isinstance(exc, (KeyboardInterrupt, Interrupted)) and not signals_seen():
            raise  # a real failure: its traceback is the report
        # an interrupt that landed inside torch's DataLoader can come out as its RuntimeError ("worker exited
        # unexpectedly"): still the interruption, said as one
        term = (exc.signum if isinstance(exc, Interrupted) else signals_seen()[-1] if signals_seen()
                else signal.SIGINT) == signal.SIGTERM
        name, code = ("SIGTERM", 143) if term else ("SIGINT", 130)
        hint = _on_interrupt["hint"]
        console.print(f"interrupted ({name}): {escape(hint() if callable(hint) else hint)}")
        # what was cut off half-built (a loader's workers starting) complains as it is collected: not the user's
        sys.unraisablehook = lambda *_: None
        sys.exit(code)
