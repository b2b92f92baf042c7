"""The training loop every method shares; methods are small subclasses overriding a few hooks.

Hooks: `on_epoch_start(epoch)` and `training_step(batch, epoch) -> (loss, logs)`. The base owns devices,
distribution (torchrun/DDP), subsets (a manifest, or the newest manifest of a folder at each epoch boundary),
the learning-rate schedule, checkpoints with exact resume, metrics and the progress bar.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from pipeline.attacks import PGD, default_budget
from pipeline.augment import ContrastiveAugment
from pipeline.checkpoint import load_checkpoint, load_weights, save_checkpoint
from pipeline.errors import PipelineError
from pipeline.models import create_model, model_spec
from pipeline.progress import console, progress_bar
from pipeline.shards.manifest import Manifest, newest_valid
from pipeline.shards.shardset import ShardSet
from pipeline.trainers.config import TrainConfig
from pipeline.trainers.optim import build_optimizer, lr_at


class BranchForward(nn.Module):
    """Runs the model once per (input, batch-norm branch) pair: one DDP forward for a whole ACL step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: list[torch.Tensor], branches: list[str]) -> list[torch.Tensor]:
        return [self.model(x, b) for x, b in zip(inputs, branches)]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError("--device cuda: no CUDA device is visible; use --device cpu or auto")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise PipelineError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device("cpu")


class Trainer:
    name = "base"

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        if not cfg.run.out:
            raise PipelineError("no run folder: pass --out RUN")
        if not cfg.data.path:
            raise PipelineError("no data: pass --data SHARDSET")
        self.run_dir = Path(cfg.run.out)
        self._init_distributed()
        self.device = resolve_device(cfg.run.device, self.local_rank)
        self.cuda = self.device.type == "cuda"
        torch.manual_seed(cfg.run.seed)
        torch.set_flush_denormal(True)  # denormal floats in trained weights slow CPU math down ~10x
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
        self.shardset = ShardSet.open(cfg.data.path)
        if self.shardset.image_size is None:
            raise PipelineError(f"{cfg.data.path}: images vary in size; prepare it with --image-size N for training")
        self.image_size, self.channels = self.shardset.image_size, self.shardset.channels
        eps, step = default_budget(self.channels)
        self.eps = cfg.attack.eps or eps
        self.step = cfg.attack.step or (self.eps / 4 if cfg.attack.eps else step)
        self.spec = model_spec(cfg.model.arch, self.channels, self.image_size, cfg.model.head,
                               cfg.model.head_width, cfg.model.proj_dim)
        self.model = create_model(self.spec).to(self.device)
        if self.cuda and self.world_size > 1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.memory_format = torch.channels_last if (self.cuda and cfg.run.channels_last) else torch.contiguous_format
        self.model.to(memory_format=self.memory_format)
        self.autocast = torch.bfloat16 if (self.cuda and cfg.run.bf16) else None
        self.optimizer = build_optimizer(self.model, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum,
                                         cfg.optim.weight_decay)
        # One generator for augmentation and attack starts, seeded per rank; its state is checkpointed.
        self.gen = torch.Generator(self.device).manual_seed(cfg.run.seed * 1000 + self.rank)
        self.augment = ContrastiveAugment(self.image_size, min_scale=cfg.method.min_crop_scale)
        self.attack = PGD(self.model, "ntxent", self.eps, self.step, cfg.attack.steps, generator=self.gen,
                          autocast_dtype=self.autocast)
        forward = BranchForward(self.model)
        if self.world_size > 1:
            forward = nn.parallel.DistributedDataParallel(forward, device_ids=[self.device] if self.cuda else None)
        self.forward = torch.compile(forward) if cfg.run.compile else forward
        self.start_epoch, self.global_step = 0, 0
        self.subset_key, self.loader, self.subset = None, None, None
        if cfg.data.manifest:
            self.fixed_manifest = Manifest.load(cfg.data.manifest)
            self.fixed_manifest.check_against(self.shardset)
        self.scheduler, self.rounds, self.last_selection_epoch = None, {}, -1
        if cfg.select.selector:
            self._init_selection()
        if resume:
            self._load_state(self.run_dir / "checkpoints" / "last.pt")

    def _init_selection(self) -> None:
        from pipeline.overlap import SelectionScheduler, parse_params
        from pipeline.selectors import create_selector

        cfg = self.cfg
        if cfg.data.manifest or (cfg.data.manifests and Path(cfg.data.manifests) != self.run_dir / "manifests"):
            raise PipelineError("choose either --selector (the run selects its own subsets) or --manifest/--manifests")
        if not 0 < cfg.select.fraction <= 1:
            raise PipelineError(f"--fraction {cfg.select.fraction}: must be in (0, 1]")
        create_selector(cfg.select.selector, **parse_params(cfg.select.params))  # fail now, not in a background process
        cfg.data.manifests = str(self.run_dir / "manifests")
        if self.is_main:
            self.scheduler = SelectionScheduler(self.run_dir, cfg.data.path, cfg.data.split, cfg.select,
                                                str(self.device), cfg.run.seed)

    def _snapshot(self, epoch: int) -> dict:
        return {"model_spec": self.spec, "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "config": self.cfg.to_dict(), "epoch": epoch, "dataset_fingerprint": self.shardset.fingerprint,
                "method": self.name}

    def _selection_point(self, epoch: int) -> None:
        """Rank 0: start this epoch's selection (if it is one); all ranks then agree on the subset."""
        if self.scheduler is None:
            return
        last_epoch = epoch == self.cfg.optim.epochs - 1  # an overlapped round started now could never be used
        if (self.scheduler.is_selection_epoch(epoch) and epoch > self.last_selection_epoch
                and (self.cfg.select.sync or not last_epoch)):
            rnd = self.scheduler.submit(epoch, self._snapshot(epoch))
            self.rounds[rnd.number] = rnd
            self.last_selection_epoch = epoch
        self.scheduler.poll()

    def _note_subset_change(self, epoch: int, before) -> None:
        if self.scheduler is None or self.subset is None or self.subset.round == before:
            return
        rnd = self.rounds.get(self.subset.round)
        if rnd is not None:
            self._log(self.scheduler.record(rnd, epoch))

    # -- hooks ------------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        pass

    def training_step(self, batch, epoch: int):
        raise NotImplementedError

    # -- distribution -----------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if (self.cfg.run.device != "cpu" and torch.cuda.is_available()) else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend)
        self.is_main = self.rank == 0

    def _agree(self, obj):
        """Rank 0's value, on every rank (which manifest to use, whether to stop)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- subsets and loaders ----------------------------------------------------------------------------
    def _subset_for(self, epoch: int) -> Manifest | None:
        if self.cfg.data.manifest:
            return self.fixed_manifest
        if self.cfg.data.manifests:
            path = None
            if self.is_main:
                m = newest_valid(self.cfg.data.manifests, self.shardset, self.cfg.data.split)
                path = str(m.path) if m is not None else None
            path = self._agree(path)
            return Manifest.load(path) if path else None
        return None

    def _loader_for(self, epoch: int):
        subset = self._subset_for(epoch)
        key = None if subset is None else (str(subset.path), subset.round)
        if key != self.subset_key or self.loader is None:
            n = len(subset) if subset is not None else self.shardset.count(self.cfg.data.split)
            per_rank = n // self.world_size
            if per_rank == 0:
                raise PipelineError(f"the subset has {n} samples, fewer than the {self.world_size} processes")
            self.loader = self.shardset.loader(
                self.cfg.data.split, subset, backend=self.cfg.data.backend, batch_size=self.cfg.data.batch_size,
                shuffle=True, seed=self.cfg.run.seed, drop_last=per_rank >= self.cfg.data.batch_size,
                device=self.device, num_workers=self.cfg.data.workers)
            self.subset, self.subset_key = subset, key
        self.loader.set_epoch(epoch)
        return self.loader

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        """Train from the current epoch to the configured end (or for `stop_after` epochs of this call)."""
        cfg = self.cfg
        if self.is_main:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.toml")
        summary = {}
        end = cfg.optim.epochs if stop_after is None else min(cfg.optim.epochs, self.start_epoch + stop_after)
        for epoch in range(self.start_epoch, end):
            if self.is_main:
                self._selection_point(epoch)
            if self.world_size > 1:
                dist.barrier()
            before = getattr(self.subset, "round", None)
            summary = self._train_epoch(epoch)
            if self.is_main:
                self._note_subset_change(epoch, before)
            self.start_epoch = epoch + 1
            if self.is_main:
                state = self._state(epoch + 1, summary)
                save_checkpoint(self.run_dir / "checkpoints" / "last.pt", state)
                if cfg.run.checkpoint_every and (epoch + 1) % cfg.run.checkpoint_every == 0:
                    save_checkpoint(self.run_dir / "checkpoints" / f"epoch-{epoch + 1:04d}.pt", state)
                self._log({"kind": "epoch", **summary})
            if self.world_size > 1:
                dist.barrier()
        if self.scheduler is not None:
            for rnd in self.scheduler.pending:  # the run is over: a selection still running would go unused
                rnd.process.terminate()
        return summary

    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.on_epoch_start(epoch)
        loader = self._loader_for(epoch)
        steps = len(loader)
        self.model.train()
        totals = {"loss": 0.0, "images": 0, "attack_s": 0.0}
        parts: dict[str, float] = {}  # per-sample means of the loss terms a method logs (loss_nat, loss_adv)
        started = time.perf_counter()
        with progress_bar(self.progress and self.is_main) as bar:
            task = bar.add_task(f"{self.name} epoch {epoch + 1}/{cfg.optim.epochs}",
                                total=loader.samples_per_epoch if hasattr(loader, "samples_per_epoch") else None)
            for i, batch in enumerate(loader):
                lr = lr_at(epoch + i / max(steps, 1), cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup_epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_start = time.perf_counter()
                loss, logs = self.training_step(batch, epoch)
                self._check_finite(loss, epoch, i)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.global_step += 1
                n = len(batch.ids)
                value = float(loss.detach())
                totals["loss"] += value * n
                totals["images"] += n
                totals["attack_s"] += logs.get("attack_s", 0.0)
                for k, v in logs.items():
                    if k.startswith("loss_"):
                        parts[k] = parts.get(k, 0.0) + v * n
                bar.update(task, advance=n, description=f"{self.name} epoch {epoch + 1}/{cfg.optim.epochs} loss {value:.3f}")
                if self.is_main and cfg.run.log_every and self.global_step % cfg.run.log_every == 0:
                    secs = time.perf_counter() - step_start
                    self._log({"kind": "step", "epoch": epoch, "step": self.global_step, "loss": value, "lr": lr,
                               "images_per_s": n * self.world_size / secs, **logs})
        secs = time.perf_counter() - started
        images = totals["images"] * self.world_size
        means = {k: v / max(totals["images"], 1) for k, v in parts.items()}
        return {"epoch": epoch + 1, "loss": totals["loss"] / max(totals["images"], 1), **means,
                "lr": lr if steps else None,
                "images": images, "seconds": secs, "images_per_s": images / secs if secs > 0 else 0.0,
                "attack_s": totals["attack_s"], "steps": steps,
                "subset_round": getattr(self.subset, "round", None), "subset_size": len(self.subset) if self.subset
                is not None else self.shardset.count(cfg.data.split), "subset": str(self.subset.path) if self.subset
                is not None else None}

    def _check_finite(self, loss: torch.Tensor, epoch: int, step: int) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).item() else 1.0, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            last = self.run_dir / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last} (epoch {self.start_epoch})" if last.exists() else \
                "no checkpoint was written yet"
            raise PipelineError(f"non-finite loss at epoch {epoch + 1}, step {step + 1}: training stopped; {kept}. "
                                "Lower optim.lr or check the data, then --resume")

    def _log(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**record, "time": time.time()}, default=float) + "\n")

    # -- checkpoints ------------------------------------------------------------------------------------
    def _state(self, epochs_done: int, summary: dict) -> dict:
        rng = {"torch": torch.get_rng_state(), "generator": self.gen.get_state()}
        if self.cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "method": self.name, "model_spec": self.spec, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "epoch": epochs_done, "global_step": self.global_step,
            "rng": rng, "config": self.cfg.to_dict(), "dataset_fingerprint": self.shardset.fingerprint,
            "attack": {"eps": self.eps, "step": self.step, "steps": self.cfg.attack.steps},
            "subset": {"manifest": str(self.subset.path) if self.subset is not None else "",
                       "round": self.subset.round if self.subset is not None and self.subset.round is not None else -1},
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float)) and v is not None},
            "selection": {**(self.scheduler.state() if self.scheduler else {}),
                          "last_selection_epoch": self.last_selection_epoch},
        }

    def _load_state(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        if ckpt.get("dataset_fingerprint") != self.shardset.fingerprint:
            raise PipelineError(f"{path}: was trained on data with fingerprint {ckpt.get('dataset_fingerprint')}, "
                                f"but {self.cfg.data.path} has {self.shardset.fingerprint}; resume on the same data")
        load_weights(self.model, ckpt["model"], path)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.start_epoch, self.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        self.gen.set_state(ckpt["rng"]["generator"].cpu())
        sel = ckpt.get("selection") or {}
        self.last_selection_epoch = int(sel.get("last_selection_epoch", -1))
        if self.scheduler is not None:
            self.scheduler.restore(sel)
        if self.cuda and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), self.device)
        if self.is_main:  # drop metrics of work after the checkpoint: it is about to be redone
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():
                keep = [ln for ln in metrics.read_text().splitlines()
                        if ln.strip() and json.loads(ln).get("epoch", 0) < self.start_epoch + (json.loads(ln)["kind"] == "epoch")]
                metrics.write_text("".join(k + "\n" for k in keep))
            console.print(f"resuming {self.run_dir} after epoch {self.start_epoch}")

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
