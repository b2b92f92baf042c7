"""The training loop every method shares; a method is a small subclass overriding a few hooks.

Hooks (solo-learn style):
    model_spec()                 -> the heads and batch-norm branches the method needs
    setup()                      -> build the method's augmentation, attacks, extra state (after the model)
    on_epoch_start(epoch)        -> schedules inside the method (DynACL's strength, ...)
    training_step(batch, epoch)  -> StepRecord(per-sample losses, logs, per-sample values)
    selection_settings()         -> what a selector needs to mimic the method's step (temperature, strength, ...)
    extra_state() / load_extra_state(state)  -> state beyond the model and optimiser (an EMA teacher, a queue),
                                    saved with every checkpoint and restored on resume
How selection sees the method's loss (its rows at a head, RCS's divergence there) is the method's `Objective`
(pipeline.objectives), registered under the same name: the selection process needs no trainer.
A method's reference optimiser and schedule go in `config_defaults` ({"optim.lr": 0.5, ...}): applied to the
settings the user did not set.
The loop owns the rest: device and torchrun (pipeline.dist), where subsets come from (`SubsetSource`), the
weighted reduction of per-sample losses, the learning-rate schedule, checkpoints with exact resume, metrics and
the progress bar.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import locks
from pipeline.atomic import appending, atomic_path
from pipeline.attacks import budget
from pipeline.checkpoint import load_checkpoint, load_weights, save_checkpoint
from pipeline.dist import init_distributed
from pipeline.errors import PipelineError
from pipeline.loggers import RunLoggers, check_loggers
from pipeline.losses import rescaled_mean, representational_divergence, weighted_mean
from pipeline.models import create_model, trust
from pipeline.progress import console, progress_bar
from pipeline.registry import Registry
from pipeline.runlayout import RunLayout
from pipeline.shards.crops import parse_crop
from pipeline.shards.manifest import Manifest
from pipeline.shards.shardset import ShardSet
from pipeline.config import METHOD_SECTIONS, TrainConfig, declare_choices
from pipeline.objectives import OBJECTIVES
from pipeline.trainers.optim import build_optimizer, lr_at
from pipeline.trainers.selective import create_selective_attack
from pipeline.trainers.subsets import create_subset_source
from pipeline.validate import parse_json


@dataclass
class StepRecord:
    """What a training step reports. `losses`: one loss per sample of the batch (the loop averages them with
    the manifest's weights) or a scalar; `logs`: floats for the metrics (loss terms as `loss_*`); `values`:
    per-sample tensors aligned with `batch.ids` (scores a subset source may use; "loss" is added)."""

    losses: torch.Tensor
    logs: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)


class BranchForward(nn.Module):
    """Runs the model once per (input, batch-norm branch) pair: one DDP forward for a whole step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # select.proxies = recorded: the selection head's inputs of every pass, (features, branch), are
        # appended to `captured` (what a step already computed, for selection rows)
        self.capture_head: nn.Module | None = None
        self.captured: list = []

    def forward(self, inputs: list[torch.Tensor], branches: list[str], heads: list | None = None) -> list[dict]:
        """`heads`: per input, the heads to run (None: all), so a pass touches only the heads its loss uses."""
        heads = heads or [None] * len(inputs)
        if self.capture_head is None:
            return [self.model(x, b, heads=h) for x, b, h in zip(inputs, branches, heads)]
        out = []
        for x, b, h in zip(inputs, branches, heads):
            hook = self.capture_head.register_forward_pre_hook(
                lambda _m, args, b=b: self.captured.append((args[0].detach(), b)))
            try:
                out.append(self.model(x, b, heads=h))
            finally:
                hook.remove()
        return out


class Trainer:
    name = "base"
    sections: tuple[str, ...] = ()  # config sections the method reads, besides the fixed ones
    config_defaults: dict = {}  # the method's reference settings, for what the user left unset
    needs_labels = False  # whether its loss reads the labels: a split without them is refused at start
    selective_attack = False  # whether its step attacks only the samples `attack_positions` names (attack.fraction)

    @classmethod
    def complete_config(cls, cfg) -> None:
        """Fill what the user left unset with the method's reference settings, before anything reads the
        config: `pipeline train` and `pipeline experiment` then write and compare the same config.toml."""
        cfg.apply_defaults(cls.config_defaults)

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        if not cfg.run.out:
            raise PipelineError("no run folder: pass --out RUN")
        if not cfg.data.path:
            raise PipelineError("no data: pass --data SHARDSET")
        self.layout = RunLayout(cfg.run.out)
        self.run_dir = self.layout.root
        self.dist = init_distributed(cfg.run.device)
        self.device, self.is_main = self.dist.device, self.dist.is_main
        check_loggers(cfg.run.loggers)  # a missing library is said before the run folder is touched
        if self.is_main:  # one writer per run folder
            locks.acquire(self.run_dir, "pipeline train")
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(cfg.run.seed)
        torch.set_flush_denormal(True)  # denormal floats in trained weights slow CPU math down ~10x
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.shardset = ShardSet.open(cfg.data.source())
        if self.needs_labels and not self.shardset.labelled(cfg.data.split):
            raise PipelineError(f"{cfg.data.path}: split {cfg.data.split!r} has no labels, and method {self.name!r} "
                                "trains on labels; choose a labelled split (data.split) or a method that needs none "
                                "(acl, dynacl, simclr; advcl with pseudo-labels)")
        self.crop = parse_crop(cfg.data.crop)  # taken while decoding: the model sees crop.size images
        if self.shardset.image_size is None and self.crop is None:
            raise PipelineError(f"{cfg.data.path}: images vary in size; prepare it with --image-size N for training "
                                "(or crop while decoding: data.crop = \"random-resized:SIZE\")")
        self.image_size = self.crop.size if self.crop else self.shardset.image_size
        self.channels = self.shardset.channels
        self.budget = budget(self.channels, cfg.attack.eps, cfg.attack.step, cfg.attack.steps)
        trust(cfg.model.arch)  # a model module the user named: importable here and in the rounds this run starts
        self.spec = self.model_spec()
        self.model = create_model(self.spec).to(self.device)
        if self.cuda and self.dist.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.memory_format = torch.channels_last if (self.cuda and cfg.run.channels_last) else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.autocast = torch.bfloat16 if (self.cuda and cfg.run.bf16) else None
        o = cfg.optim
        self.optimizer = build_optimizer(self.model, o.optimizer, o.lr, o.momentum, o.weight_decay, o.lars_eta,
                                         o.lars_exclude_1d)
        # One generator for augmentation and attack starts, seeded per rank; its state is checkpointed.
        self.gen = torch.Generator(self.device).manual_seed(cfg.run.seed * 1000 + self.dist.rank)
        self.setup()
        forward = self.branch_forward = BranchForward(self.model)
        if self.dist.distributed:
            forward = nn.parallel.DistributedDataParallel(forward, device_ids=[self.device] if self.cuda else None)
        self.forward = torch.compile(forward) if cfg.run.compile else forward
        self.start_epoch, self.global_step = 0, 0
        self.resume_step, self._resumed_epoch = 0, None  # a checkpoint from inside an epoch: where it was
        self._wall_mark = time.time()
        self._metrics_lines = 0  # records this run has logged: a checkpoint keeps the count, a resume cuts back to it
        self.subset, self.loader, self._loader_key = None, None, None
        self.subsets = create_subset_source(self)
        self.selective = create_selective_attack(self, [n for n in TRAINERS.names() if TRAINERS[n].selective_attack])
        self._attacked, self._attacked_pos = 0, None  # this step's attacked samples (count, positions or None: all)
        if resume:
            self._load_state(self.layout.last)
        # after the resume: a resumed run's loggers hide what the stopped run logged past its checkpoint
        self.loggers = RunLoggers(self.run_dir, cfg.to_record(), cfg.run.loggers if self.is_main else [],
                                  resume_step=self.global_step if resume else None)

    # -- hooks ------------------------------------------------------------------------------------------
    def model_spec(self) -> dict:
        raise NotImplementedError

    def setup(self) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def training_step(self, batch, epoch: int) -> StepRecord:
        raise NotImplementedError

    def selection_settings(self) -> dict:
        return {"attack": self.budget.as_dict()}

    def extra_state(self) -> dict:
        """Tensors and plain values beyond the model and optimiser that training depends on (solo-learn's
        momentum encoder, a queue, an EMA teacher): saved in every checkpoint, given back on resume."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        if state:
            raise PipelineError(f"the checkpoint holds state of method {self.name!r} that this trainer does not "
                                f"restore ({', '.join(state)})")

    # -- helpers for methods ----------------------------------------------------------------------------
    def attack_positions(self, batch) -> torch.Tensor | None:
        """The positions in `batch` whose adversarial views this step crafts (None: every sample): every
        attacking method asks, so that the run counts the images it attacked (`images_attacked`)."""
        n = len(batch.ids)
        if self.selective is None:
            self._attacked, self._attacked_pos = n, None
            return None
        ids = batch.ids.cpu().numpy() if hasattr(batch.ids, "cpu") else np.asarray(batch.ids)
        pos = self.selective.choose(ids, self.global_step)
        self._attacked, self._attacked_pos = (n if pos is None else len(pos)), pos
        return None if pos is None else torch.as_tensor(pos, device=self.device)

    def wants(self, value: str) -> bool:
        """Whether a per-sample value the step may skip computing is read (by the selective attack's rule)."""
        return self.selective is not None and self.selective.score == value

    def sample_divergence(self, z_adv: torch.Tensor, z_nat: torch.Tensor, views: int = 1) -> torch.Tensor:
        """Per sample, RCS's representational divergence between its adversarial and natural outputs at the
        method's selection head (the objective's kind), the mean over its `views` stacked rows."""
        kind = OBJECTIVES[self.name].divergence if self.name in OBJECTIVES else "kl"
        with torch.no_grad():
            rd = representational_divergence(z_adv.detach(), z_nat.detach(), kind, reduction="none")
        return rd.view(views, -1).mean(0)

    def autocast_ctx(self):
        return torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)

    def timed(self, fn, *args, **kwargs):
        """(fn's result, seconds), synchronising CUDA so the time is the work's."""
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return out, time.perf_counter() - t0

    def snapshot(self, epoch: int) -> dict:
        """The model as a selector sees it: weights, spec, and what the method's step looks like now."""
        return {"model_spec": self.spec, "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "config": self.cfg.to_record(), "epoch": epoch, "dataset_fingerprint": self.shardset.fingerprint,
                "method": self.name, "selection_settings": self.selection_settings()}

    # -- subsets and loaders ----------------------------------------------------------------------------
    def _loader_for(self, epoch: int, skip: int = 0):
        """The loader of `epoch`, from its batch `skip` on (a resumed epoch: on the subset it had begun with)."""
        if self.is_main and skip:
            path = self._resumed_epoch["subset"]
            subset = Manifest.load(path) if path else None
            if subset is not None:
                subset.check_against(self.shardset)
        else:
            subset = self.subsets.current(epoch) if self.is_main else None
        path = self.dist.agree(None if subset is None else str(subset.path))
        if not self.is_main:  # the other ranks follow rank 0's choice
            same = self.subset is not None and str(self.subset.path) == path
            subset = None if path is None else (self.subset if same else Manifest.load(path))
        key = None if subset is None else (str(subset.path), subset.round)
        if key != self._loader_key or self.loader is None:
            n = len(subset) if subset is not None else self.shardset.count(self.cfg.data.split)
            per_rank = n // self.dist.world_size
            if per_rank == 0:
                raise PipelineError(f"the subset has {n} samples, fewer than the {self.dist.world_size} processes")
            self.loader = self.shardset.loader(
                self.cfg.data.split, subset, backend=self.cfg.data.backend, batch_size=self.cfg.data.batch_size,
                shuffle=True, seed=self.cfg.run.seed, drop_last=per_rank >= self.cfg.data.batch_size,
                device=self.device, num_workers=self.cfg.data.workers, use_weights=self.cfg.data.use_weights,
                crop=self.crop, decode=self.cfg.data.decode, worker_kind=self.cfg.data.worker_kind)
            self.subset, self._loader_key = subset, key
            self._warn_dropped(n, per_rank)
        if skip and not hasattr(self.loader, "skip"):
            raise PipelineError(f"{self.run_dir}: its last checkpoint is from inside an epoch, and the "
                                f"{self.cfg.data.backend} loader cannot start an epoch part-way; resume with "
                                "data.backend = stream or indexed")
        if skip:
            self.loader.set_epoch(epoch, skip)
        else:
            self.loader.set_epoch(epoch)
        return self.loader

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        """Train from the current epoch to the configured end (or for `stop_after` epochs of this call)."""
        cfg = self.cfg
        if self.is_main:
            self.layout.checkpoints.mkdir(parents=True, exist_ok=True)
            self.layout.marker.write_text(json.dumps({"method": self.name, "tool": "pipeline"}) + "\n")
            cfg.save(self.layout.config)
        summary = {}
        end = cfg.optim.epochs if stop_after is None else min(cfg.optim.epochs, self.start_epoch + stop_after)
        # an epoch's wall time runs from here or the previous epoch's end (a resumed epoch: less what it had run)
        self._wall_mark = time.time() - (self._resumed_epoch.get("wall_s", 0.0) if self.resume_step else 0.0)
        try:
            for epoch in range(self.start_epoch, end):
                self.on_epoch_start(epoch)  # first: a snapshot taken now sees this epoch's schedule (strength)
                if self.is_main and not (epoch == self.start_epoch and self.resume_step):  # done before the stop
                    self.subsets.epoch_start(epoch)
                self.dist.barrier()
                summary = self._train_epoch(epoch)
                now = time.time()
                # selection, stalls and checkpoints included; time a stopped run spent stopped is not
                summary["wall_s"] = now - self._wall_mark
                self._wall_mark = now
                self.subsets.epoch_end(epoch, summary)
                self.start_epoch = epoch + 1
                if self.is_main:  # the epoch's records first: the checkpoint counts them (`metrics_lines`)
                    for rec in self.subsets.records():
                        self._log(rec)
                    self._log({"kind": "epoch", **summary})
                    state = self._state(epoch + 1, summary)
                    save_checkpoint(self.layout.last, state)
                    if cfg.run.checkpoint_every and (epoch + 1) % cfg.run.checkpoint_every == 0:
                        save_checkpoint(self.layout.epoch_checkpoint(epoch + 1), state)
                self.dist.barrier()
        except BaseException:
            self.subsets.close()  # interrupted or failed: end a running round now (--resume starts it again)
            raise
        finally:
            if self.start_epoch >= cfg.optim.epochs:
                self.subsets.close()  # the run is over: a selection still running would go unused
        return summary

    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        skip, self.resume_step = self.resume_step, 0
        loader = self._loader_for(epoch, skip)
        steps = len(loader)
        self.model.train()
        totals = {"loss": 0.0, "images": 0, "attack_s": 0.0}
        parts: dict[str, float] = {}  # per-sample means of what a method logs (loss terms, fractions kept, ...)
        started, lr, before = time.perf_counter(), None, 0.0
        if skip:  # the epoch's sums up to the checkpoint
            totals, parts = self._resumed_epoch["totals"], self._resumed_epoch["parts"]
            before, lr = self._resumed_epoch["seconds"], self._resumed_epoch["lr"]
        o = cfg.optim
        every = cfg.run.checkpoint_every_steps
        with progress_bar(self.progress and self.is_main) as bar:
            task = bar.add_task(f"{self.name} epoch {epoch + 1}/{o.epochs}",
                                total=loader.samples_per_epoch if hasattr(loader, "samples_per_epoch") else None,
                                completed=totals["images"])
            for i, batch in enumerate(loader, start=skip):
                lr = lr_at(epoch + i / max(steps, 1), o.lr, o.epochs, o.warmup_epochs, o.schedule, o.milestones,
                           o.gamma)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.perf_counter()
                self._attacked, self._attacked_pos = 0, None
                record = self.training_step(batch, epoch)
                loss = self._reduce(record.losses, batch.weights if cfg.data.use_weights else None)
                self._check_finite(loss, epoch, i)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.global_step += 1
                if record.losses.ndim == 1:
                    record.values.setdefault("loss", record.losses.detach())
                self.subsets.observe(batch, record)
                if self.selective is not None:
                    self.selective.observe(batch.ids.cpu().numpy(), self._attacked_pos, record.values)
                n = len(batch.ids)
                totals["attacked"] = totals.get("attacked", 0) + self._attacked
                value, logs = float(loss.detach()), record.logs
                totals["loss"] += value * n
                totals["images"] += n
                totals["attack_s"] += logs.get("attack_s", 0.0)
                for k, v in logs.items():
                    if k != "attack_s":  # summed on its own
                        parts[k] = parts.get(k, 0.0) + v * n
                bar.update(task, advance=n, description=f"{self.name} epoch {epoch + 1}/{o.epochs} loss {value:.3f}")
                if self.is_main and cfg.run.log_every and self.global_step % cfg.run.log_every == 0:
                    secs = time.perf_counter() - step_start
                    self._log({"kind": "step", "epoch": epoch, "step": self.global_step, "loss": value, "lr": lr,
                               "images_per_s": n * self.dist.world_size / secs,
                               "attack_share": logs.get("attack_s", 0.0) / secs if secs > 0 else 0.0, **logs})
                if self.is_main and every and (i + 1) % every == 0 and i + 1 < steps:
                    partial = {"totals": totals, "parts": parts, "lr": lr,
                               "seconds": before + time.perf_counter() - started,
                               "wall_s": time.time() - self._wall_mark,
                               "subset": str(self.subset.path) if self.subset is not None else ""}
                    save_checkpoint(self.layout.last, {**self._state(epoch, {}), "step_in_epoch": i + 1,
                                                       "partial_epoch": json.dumps(partial)})
        secs = before + time.perf_counter() - started
        images = totals["images"] * self.dist.world_size
        attacked = totals.get("attacked", 0) * self.dist.world_size
        means = {k: v / max(totals["images"], 1) for k, v in parts.items()}
        sub = self.subset
        return {"epoch": epoch + 1, "loss": totals["loss"] / max(totals["images"], 1), **means, "lr": lr,
                "images": images, "images_attacked": attacked, "seconds": secs, "images_per_s": images / secs if secs > 0 else 0.0,
                "attack_s": totals["attack_s"], "attack_share": totals["attack_s"] / secs if secs > 0 else 0.0,
                "steps": steps, "threads": torch.get_num_threads(),  # images/s depends on it (runtime.prepare_threads)
                "subset_round": getattr(sub, "round", None),
                "subset_size": len(sub) if sub is not None else self.shardset.count(cfg.data.split),
                "subset": str(sub.path) if sub is not None else None}

    def _reduce(self, losses: torch.Tensor, weights) -> torch.Tensor:
        """The step's loss from per-sample losses: a manifest's weights count as duplicates (sum w l / sum w),
        except a subset that rescales (InfoBatch: sum w l / n, its code's `loss.mul(weights).mean()`, which keeps
        an epoch's expected gradient)."""
        sub = self.subset
        if weights is not None and sub is not None and sub.extra.get("weighting") == "rescale":
            return rescaled_mean(losses, weights)
        return weighted_mean(losses, weights)

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        if self.dist.any(not bool(torch.isfinite(loss.detach()).item())):
            last = self.layout.last
            if last.exists():
                kept = (f"the last good checkpoint is {last} (epoch {self.start_epoch}). Lower optim.lr or check "
                        f"the data, then --resume {self.run_dir}")
            else:
                kept = "no checkpoint was written yet. Lower optim.lr or check the data, then start again"
            raise PipelineError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}: training stopped; {kept}")

    DROP_WARN = 0.05

    def _warn_dropped(self, n: int, per_rank: int) -> None:
        """One line when dropping the last partial batch leaves out more than 5% of an epoch's samples (a batch
        of 512 trains on 2,560 of 3,000 images, and on 512 of a 600-image subset). Said once a run."""
        bs = self.cfg.data.batch_size
        kept = per_rank - per_rank % bs if per_rank >= bs else per_rank
        if getattr(self, "_dropped_warned", False):
            return  # once a run: every round's subset would say it again
        if self.is_main and per_rank and (per_rank - kept) / per_rank > self.DROP_WARN:
            self._dropped_warned = True
            whose = "the subset's" if self.subset is not None else "the split's"
            console.print(f"[yellow]warning:[/] data.batch_size = {bs} trains on {kept * self.dist.world_size:,} of "
                          f"{whose} {n:,} samples an epoch ({1 - kept / per_rank:.0%} left out: the last partial "
                          "batch is dropped, in a new order each epoch); a batch size that divides it keeps more")

    def _log(self, record: dict) -> None:
        record = {**record, "time": time.time()}
        with appending(self.layout.metrics) as f:
            f.write(json.dumps(record, default=float) + "\n")
        self._metrics_lines += 1
        self.loggers.log(record, self.global_step)

    # -- checkpoints ------------------------------------------------------------------------------------
    def _state(self, epochs_done: int, summary: dict) -> dict:
        rng = {"torch": torch.get_rng_state(), "generator": self.gen.get_state()}
        if self.cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        sub = self.subset
        return {
            "method": self.name, "model_spec": self.spec, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "epoch": epochs_done, "global_step": self.global_step,
            "rng": rng, "config": self.cfg.to_record(), "dataset_fingerprint": self.shardset.fingerprint,
            "dataset_name": self.shardset.name, "attack": self.budget.as_dict(),
            "subset": {"manifest": str(sub.path) if sub is not None else "",
                       "round": sub.round if sub is not None and sub.round is not None else -1},
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None},
            "selection": self._selection_state(),
            "attack_selection": self.selective.state() if self.selective is not None else {},
            "method_state": self.extra_state(),
            "metrics_lines": self._metrics_lines,
        }

    def _selection_state(self) -> dict:
        """The subset source's state: plain values as JSON, its per-sample arrays ("tensors") as tensors."""
        state = dict(self.subsets.state())
        tensors = state.pop("tensors", {})
        return {"kind": self.subsets.kind, "state": json.dumps(state), "tensors": tensors}

    def _load_state(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.get("dataset_fingerprint") != self.shardset.fingerprint:
            raise PipelineError(f"{path}: was trained on data with fingerprint {ckpt.get('dataset_fingerprint')}, "
                                f"but {self.cfg.data.path} has {self.shardset.fingerprint}; resume on the same data")
        load_weights(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        self.resume_step = int(ckpt.get("step_in_epoch") or 0)
        self._resumed_epoch = parse_json(ckpt["partial_epoch"]) if self.resume_step else None
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        self.gen.set_state(ckpt["rng"]["generator"].cpu())
        self.load_extra_state(ckpt.get("method_state") or {})
        sel = ckpt.get("selection") or {}
        if self.is_main and sel.get("kind") == self.subsets.kind:
            self.subsets.restore({**parse_json(sel.get("state") or "{}"), "tensors": sel.get("tensors") or {}})
        if self.selective is not None:
            self.selective.restore(ckpt.get("attack_selection") or {})
        if self.cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)
        if self.is_main:  # drop metrics of work after the checkpoint: it is about to be redone
            self._metrics_lines = cut_metrics(self.layout.metrics, ckpt.get("metrics_lines"), self.start_epoch)
            where = f", step {self.resume_step}" if self.resume_step else ""
            console.print(f"resuming {self.run_dir} after epoch {self.start_epoch}{where}")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """End running selection rounds (a resume starts them again from their snapshots), release the run
        folder (its lock) and the process group."""
        self.subsets.close()
        self.loggers.close()
        if self.is_main:
            locks.release(self.run_dir)
        self.dist.close()


TRAINERS: Registry[type[Trainer]] = Registry("method", flag="--method")


def register_trainer(cls: type[Trainer]) -> type[Trainer]:
    """Register a method by its `name`, with the config sections it reads (written to RUN/config.toml)."""
    METHOD_SECTIONS[cls.name] = cls.sections
    return TRAINERS.register(cls)


def list_trainers() -> list[str]:
    return TRAINERS.names()


declare_choices("method.name", TRAINERS.names)


def cut_metrics(path: Path, lines: int | None, epochs_done: int) -> int:
    """metrics.jsonl as it was at the checkpoint: its first `lines` records (what the checkpoint counted, so a
    selection or accounting record of the last finished epoch stays); a torn last line (a crash mid-write) or
    records of work after the checkpoint go. Checkpoints of older versions carry no count: their records are
    kept by epoch. Returns the records kept."""
    if not path.exists():
        return 0
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            records.append((line, parse_json(line)))
        except ValueError:
            continue  # torn or blank
    if lines is not None:
        keep = [ln for ln, _ in records[:int(lines)]]
    else:
        keep = [ln for ln, rec in records
                if isinstance(rec, dict) and rec.get("epoch", 0) < epochs_done + (rec.get("kind") == "epoch")]
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(ln + b"\n" for ln in keep))
    return len(keep)
