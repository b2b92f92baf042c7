"""Proxies for selection, computed in one streaming pass over the candidates with a model snapshot.

- features: encoder features of the natural images (natural branch), float16;
- per-sample head gradients of the checkpoint's method, in closed form. The method's objective says how its
  loss meets its selection head (`Objective.rows`, pipeline.objectives: ACL, 4 rows per sample, two views on
  the natural branch and their PGD views on the adversarial one; SimCLR 2; AdvCL 4; ASCL 2 at its
  classifier), each row's loss taken with the other rows of the batch held fixed. In eval mode every row passes the head independently, so for each
  linear layer l the per-sample weight gradient is sum over the sample's rows r of delta_lr a_lr^T (delta:
  loss gradient w.r.t. the layer's output, a: its input). Stored compressed as RCS does (each weight
  gradient averaged over its output dimension, each bias gradient to a scalar), plus the head input and
  output gradient of every row, from which the full gradient of any pick is rebuilt exactly;
- the representational-divergence (RD) gradient of a validation part U (given by the run, which holds it out
  once and never trains on it, or else drawn from the pool with a seed and excluded from the candidates), with
  U's virtual-adversarial views from PGD on RD, and U's encoder features for refreshing it. The gradient flows
  through both the natural and the adversarial pass of the head, as grad RD(U; theta) in the paper.

Branches are the model's roles (natural, adversarial) or the method's rows, never names: any method's model works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.attacks import PGD, Budget
from pipeline.augment import to_float
from pipeline.dist import gather_objects, gather_rows, rank_and_world
from pipeline.errors import PipelineError
from pipeline.losses import representational_divergence
from pipeline.models.multibn import use_branch
from pipeline.objectives import HeadRows, objective_of
from pipeline.selectors.base import draw_validation


def head_linears(head: nn.Module) -> list[nn.Linear]:
    return [m for m in head.modules() if isinstance(m, nn.Linear)]


def compress(grads_w: list[torch.Tensor], grads_b: list[torch.Tensor]) -> torch.Tensor:
    """RCS's compression of full head gradients: weights averaged over outputs, biases to scalars."""
    parts = []
    for gw, gb in zip(grads_w, grads_b):
        parts += [gw.mean(dim=-2), gb.mean(dim=-1, keepdim=True)]
    return torch.cat(parts, dim=-1)


def vjp_objective(z: torch.Tensor, grad_z: torch.Tensor) -> torch.Tensor:
    """sum(z * grad_z): its gradient is the vector-Jacobian product with `grad_z`, bit for bit (the product's
    backward multiplies grad_z by ones). Passing grad_outputs= instead makes torch import sympy for a shape
    check on the first call (0.44 s of a standalone round)."""
    return (z * grad_z).sum()


def head_rows_backward(head: nn.Module, feats: torch.Tensor, grad_out: torch.Tensor, branch: str):
    """Per-row (input a_l, output gradient delta_l) of each linear layer, for rows that pass independently."""
    inputs, outputs = [], []

    def record(module, args, output):  # returns None: the output is kept as is
        inputs.append(args[0])
        outputs.append(output)

    hooks = [lin.register_forward_hook(record) for lin in head_linears(head)]
    try:
        with use_branch(head, branch), torch.enable_grad():
            z = head(feats)
            deltas = torch.autograd.grad(vjp_objective(z, grad_out), outputs)
    finally:
        for h in hooks:
            h.remove()
    return [a.detach() for a in inputs], [d.detach() for d in deltas]


@dataclass
class Proxies:
    candidate_ids: np.ndarray
    validation_ids: np.ndarray
    features: np.ndarray  # (n, d) float16
    compressed_grads: np.ndarray | None = None  # (n, c) float32
    row_feats: torch.Tensor | None = None  # (n, R, d): head inputs of each sample's R rows
    row_grads: torch.Tensor | None = None  # (n, R, p): loss gradients at the head output of those rows
    val_feats: tuple | None = None  # (U natural features, U virtual-adversarial features)
    val_compressed: np.ndarray | None = None  # compressed RD gradient of U at the snapshot's head
    branches: tuple = ()  # (natural, adversarial) batch-norm branch names of the model
    row_branches: tuple = ()  # the batch-norm branch of each of the R rows
    divergence: str = "minmax_kl"  # RCS's RD at the selection head

    @property
    def alignment(self) -> np.ndarray:
        """<ACL gradient of each candidate, RD gradient of U>, compressed: RCS's first-order gain / eta."""
        return self.compressed_grads @ self.val_compressed


class ProxyComputer:
    """`method`: the checkpoint's training method by name (its objective's `rows`, `head` and `divergence`);
    `settings`: what its step looked like at the snapshot (Trainer.selection_settings)."""

    def __init__(self, model, shardset, split: str, device="cpu", batch_size: int = 256, eps: float = 8 / 255,
                 step: float = 2 / 255, attack_steps: int = 1, temperature: float = 0.5,
                 validation_fraction: float = 0.01, seed: int = 0, min_crop_scale: float = 0.08,
                 strength: float = 1.0, validation_ids: np.ndarray | None = None, method: str = "acl",
                 settings: dict | None = None, workers: int = 0, recorded=None):
        torch.set_flush_denormal(True)  # denormal floats in trained weights slow CPU math down ~10x
        self.method = objective_of(method)
        self.model = model.to(device).eval()
        self.head_name = self.method.head
        self.head = model.heads[self.head_name]
        self.branches = (model.branch("natural"), model.branch("adversarial"))
        self.shardset, self.split, self.device = shardset, split, torch.device(device)
        self.batch_size, self.eps, self.step, self.attack_steps = batch_size, eps, step, attack_steps
        self.validation_fraction, self.seed, self.workers = validation_fraction, seed, workers
        self.validation_ids = None if validation_ids is None else np.sort(np.asarray(validation_ids, dtype=np.int64))
        self.recorded, self.fresh_count = recorded, None  # rows training recorded (selectors.recorded)
        self._validation_cache: dict = {}
        self.settings = {"temperature": temperature, "min_crop_scale": min_crop_scale, "strength": strength,
                         **(settings or {})}

    @property
    def device_name(self) -> str:
        return self.device.type

    def _batches(self, ids: np.ndarray):
        # rank 0 of 1: this computer splits work across ranks itself (`_share`), the loader must not split again
        return self.shardset.loader(self.split, np.sort(ids), backend="indexed", batch_size=self.batch_size,
                                    shuffle=False, device=self.device, num_workers=self.workers, rank=0, world_size=1)

    def _share(self, ids: np.ndarray, spread: bool) -> tuple[np.ndarray, int]:
        """(this rank's ids, index of its first batch): whole batches of the sorted ids, in contiguous blocks by
        rank, so that every batch is the batch one process would form, and gathering in rank order restores
        the one-process order."""
        ids = np.sort(ids)
        rank, world = rank_and_world() if spread else (0, 1)
        n_batches = -(-len(ids) // self.batch_size)
        first, last = n_batches * rank // world, n_batches * (rank + 1) // world
        return ids[first * self.batch_size:last * self.batch_size], first

    def _generator(self, salt: int, batch_no: int) -> torch.Generator:
        """Randomness of one batch (augmentation, attack starts), the same whichever rank computes it."""
        return torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + salt * 100_003 + batch_no)

    @torch.no_grad()
    def _features(self, images: torch.Tensor, branch: str) -> torch.Tensor:
        with use_branch(self.model, branch):
            return self.model.encoder(images)

    def _rows(self, batch, batch_no: int, budget: Budget, draws: int) -> HeadRows:
        return _mean_of_draws([self.method.rows(self.model, batch, self._generator(2 + 10 * d, batch_no), self.settings,
                                                budget) for d in range(draws)])

    def split_validation(self, pool_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(candidates, U): the run's U when it gave one, else a seeded part of the pool."""
        if self.validation_ids is not None:
            return np.setdiff1d(pool_ids, self.validation_ids), self.validation_ids
        val = draw_validation(pool_ids, self.validation_fraction, self.seed)
        return np.setdiff1d(pool_ids, val), val

    def validation_state(self, val_ids: np.ndarray, spread: bool = True, draws: int = 1):
        """U's natural and virtual-adversarial encoder features (PGD on RD: 3 steps, step 1.25 eps / 3). With
        `draws` > 1, that many attacks from other random starts, each adversarial view beside its natural one:
        RD over the rows is then the mean of the draws' RDs (RD is a mean over samples)."""
        key = (np.asarray(val_ids, dtype=np.int64).tobytes(), spread, draws)
        if key not in self._validation_cache:  # one U for every chunk of a pool: its pass is made once
            self._validation_cache = {key: self._validation_state(val_ids, spread, draws)}
        return self._validation_cache[key]

    def virtual_adversarial(self, x: torch.Tensor, z_nat: torch.Tensor, batch_no: int, draw: int = 0) -> torch.Tensor:
        """U's views for RD: PGD on RD at the selection head (3 steps, step 1.25 eps / 3), its random start drawn
        from (batch, draw), the same whichever rank or selector asks."""
        head, kind = self.head_name, self.method.divergence
        attack = PGD(lambda xx: self.model(xx, self.branches[1], heads=(head,))[head],
                     lambda z, zn: representational_divergence(z, zn, kind), self.eps, 1.25 * self.eps / 3, 3,
                     module=self.model, generator=self._generator(1 + 10 * draw, batch_no))
        return attack(x, z_nat)

    def _validation_state(self, val_ids: np.ndarray, spread: bool, draws: int):
        b_nat, b_adv = self.branches
        head = self.head_name
        mine, first = self._share(val_ids, spread)
        nat, adv = [], []
        for k, b in enumerate(self._batches(mine) if len(mine) else []):
            x = to_float(b.images)
            with torch.no_grad():
                z_nat = self.model(x, b_nat, heads=(head,))[head]
                f_nat = self._features(x, b_nat)
            for draw in range(draws):
                nat.append(f_nat)
                adv.append(self._features(self.virtual_adversarial(x, z_nat, first + k, draw), b_adv))
        d = self.model.encoder.feature_dim
        empty = torch.zeros(0, d, device=self.device)
        nat, adv = (torch.cat(nat) if nat else empty), (torch.cat(adv) if adv else empty)
        return (gather_rows(nat), gather_rows(adv)) if spread else (nat, adv)

    def compute(self, pool_ids: np.ndarray, need_gradients: bool = True, need_features: bool = True,
                spread: bool = True, draws: int = 1, recorded=None, validation: bool = True) -> Proxies:
        """Proxies of the pool; `need_features=False` skips the encoder pass on the plain images (RCS uses
        only gradients: about a tenth of the pass). Under torch.distributed with `spread`, each rank computes
        whole batches of its own block of the pool and every rank gets all of them: the same proxies as one
        process (per-batch randomness, the same batches).

        `draws` > 1: every gradient is the mean over that many augmentation and attack draws (a sample's rows
        are those of all its draws, their loss gradients divided by `draws`), and U's RD over as many attack
        draws. Draw 0 is the single-draw proxy: `draws=1` is unchanged.

        `recorded` (selectors.recorded.RecordedRows): rows training recorded; candidates that have them are not
        passed through the model again (their compressed gradients are rebuilt at this snapshot's head), the
        others are computed fresh (one draw, as recorded rows are; U's attack too); U is always fresh.
        `self.fresh_count` says how many were fresh.
        `validation=False`: no U is held out (a selector that scores nothing against U: every candidate stays)."""
        pool_ids = np.asarray(pool_ids, dtype=np.int64)
        b_nat, b_adv = self.branches
        recorded = self.recorded if recorded is None else recorded
        if not need_gradients:
            return Proxies(np.sort(pool_ids), np.zeros(0, np.int64), self._natural_features(pool_ids, spread, recorded),
                           branches=self.branches)
        if recorded is not None and len(recorded.ids):
            draws = 1  # a recorded row is one draw: fresh rows and U's attack match it (as measured)
        if validation:
            cand, val = self.split_validation(pool_ids)
            val_feats = self.validation_state(val, spread, draws)
        else:
            cand, val, val_feats = np.sort(pool_ids), np.zeros(0, np.int64), None
        budget = Budget(self.eps, self.step, self.attack_steps)
        head = self.head
        fresh, taken = cand, None
        if recorded is not None and len(recorded.ids):
            pos = np.minimum(np.searchsorted(recorded.ids, cand), len(recorded.ids) - 1)
            have = recorded.ids[pos] == cand
            fresh, taken = cand[~have], pos[have]
        self.fresh_count = len(fresh)
        mine, first = self._share(fresh, spread)
        feats, comp, row_feats, row_grads, row_branches = [], [], [], [], None
        for k, b in enumerate(self._batches(mine) if len(mine) else []):
            if need_features:
                feats.append(self._features(to_float(b.images), b_nat).half().cpu())
            rows = self._rows(b, first + k, budget, draws)
            row_branches = tuple(rows.branches)
            comp.append(compressed_rows(head, rows).cpu())
            row_feats.append(torch.stack(rows.feats, 1).half().cpu())
            row_grads.append(torch.stack(rows.grads, 1).float().cpu())
        local = [torch.cat(t) if t else None for t in (feats, comp, row_feats, row_grads)]
        if spread:  # a rank with no batch (more ranks than batches) still takes part, with empty parts
            metas = gather_objects(None if local[1] is None else
                                   (row_branches, [None if t is None else (t.shape[1:], t.dtype) for t in local]))
            meta = next((m for m in metas if m is not None), None)
            if meta is not None:
                row_branches = meta[0]
                local = [t if t is not None or m is None else torch.zeros((0, *m[0]), dtype=m[1])
                         for t, m in zip(local, meta[1])]
            local = [None if t is None else gather_rows(t) for t in local]
        feats, comp, row_feats, row_grads = local
        if taken is not None:
            feats, comp, row_feats, row_grads, row_branches = self._merge_recorded(
                cand, fresh, taken, recorded, (feats, comp, row_feats, row_grads), row_branches, need_features, spread)
        features = feats.numpy() if feats is not None else np.zeros((len(cand), 0), np.float16)
        comp = comp.numpy() if comp is not None else np.zeros((0, 0), np.float32)
        val_comp = (None if val_feats is None else
                    rd_gradient(head, *val_feats, branches=self.branches, kind=self.method.divergence))
        return Proxies(np.sort(cand), val, features, comp, row_feats, row_grads, val_feats, val_comp,
                       self.branches, row_branches, self.method.divergence)


    def _natural_features(self, ids: np.ndarray, spread: bool, recorded=None) -> np.ndarray:
        """(len(ids), d) float16 encoder features of the natural images, in sorted-id order: from the recorded
        rows where a sample has them (its natural views' features in the steps that recorded it), else by a
        pass through the snapshot."""
        ids = np.sort(ids)
        d = self.model.encoder.feature_dim
        taken = None
        if recorded is not None and len(recorded.ids):
            pos = np.minimum(np.searchsorted(recorded.ids, ids), len(recorded.ids) - 1)
            have = recorded.ids[pos] == ids
            taken = (have, pos[have])
        fresh = ids if taken is None else ids[~taken[0]]
        self.fresh_count = len(fresh)
        mine, _ = self._share(fresh, spread)
        feats = [self._features(to_float(b.images), self.branches[0]).half().cpu() for b in self._batches(mine)] \
            if len(mine) else []
        local = torch.cat(feats) if feats else torch.zeros(0, d, dtype=torch.float16)
        out = (gather_rows(local) if spread else local).numpy()
        if taken is None:
            return out
        merged = np.zeros((len(ids), d), np.float16)
        merged[~taken[0]] = out
        merged[taken[0]] = recorded.natural_features(taken[1], self.branches[0])
        return merged

    def _merge_recorded(self, cand, fresh, taken, recorded, fresh_parts, row_branches, need_features, spread):
        """The fresh candidates' parts and the recorded ones', in the order of `cand` (sorted ids). Recorded rows
        hold K records of R rows; a fresh sample's R rows are one record, its other K - 1 slots zero rows (which
        add nothing to a rebuilt gradient)."""
        slots = recorded.slots
        if row_branches is not None and tuple(row_branches) * slots != tuple(recorded.branches):
            raise PipelineError(f"recorded rows have branches {recorded.branches}, fresh ones {row_branches}: "
                                "they come from another method or attack; use select.proxies = fresh")
        if slots > 1:
            fresh_parts = [*fresh_parts[:2], *(None if t is None else torch.cat([t, t.new_zeros(
                (len(t), t.shape[1] * (slots - 1), t.shape[2]))], 1) for t in fresh_parts[2:])]
        comp = []
        step = 16 * self.batch_size  # no model pass here: large batches, few calls
        for lo in range(0, len(taken), step):
            rows = recorded.rows(taken[lo:lo + step])
            rows = HeadRows([f.to(self.device) for f in rows.feats], [g.to(self.device) for g in rows.grads],
                            rows.branches)
            comp.append(compressed_rows(self.head, rows).cpu())
        rec = [torch.cat(comp), torch.from_numpy(recorded.feats[taken]), torch.from_numpy(recorded.grads[taken]).float()]
        feats = None
        if need_features:  # encoder features of the natural views, from the same records
            feats = torch.from_numpy(recorded.natural_features(taken, self.branches[0]))
        order = np.argsort(np.concatenate([fresh, cand[np.isin(cand, fresh, invert=True)]]), kind="stable")
        merged = []
        for f_part, r_part in zip(fresh_parts, [feats, *rec]):
            if r_part is None:
                merged.append(None)
                continue
            both = r_part if f_part is None else torch.cat([f_part.to(r_part.dtype), r_part])
            merged.append(both[torch.from_numpy(order)])
        return (*merged, tuple(recorded.branches))


def _mean_of_draws(draws: list) -> HeadRows:
    """One sample's rows over several draws: all of them, each loss gradient divided by the draw count, so
    that the rebuilt gradient is the mean of the draws' gradients."""
    if len(draws) == 1:
        return draws[0]
    return HeadRows([f for d in draws for f in d.feats], [g / len(draws) for d in draws for g in d.grads],
                    [b for d in draws for b in d.branches])


def compressed_rows(head: nn.Module, rows) -> torch.Tensor:
    """Each sample's compressed head gradient: per linear layer, sum over its rows of mean(delta) a (the
    weight gradient averaged over outputs) and mean(delta) (the bias gradient's mean), one pass per branch."""
    n = len(rows.feats[0])
    total = 0
    for branch in dict.fromkeys(rows.branches):
        idx = [r for r, b in enumerate(rows.branches) if b == branch]
        f = torch.cat([rows.feats[r] for r in idx])
        g = torch.cat([rows.grads[r] for r in idx]).float()
        a_list, d_list = head_rows_backward(head, f, g, branch)
        parts = []
        for a, d in zip(a_list, d_list):
            dm = d.reshape(len(idx), n, -1).mean(2, keepdim=True)
            parts += [(dm * a.reshape(len(idx), n, -1)).sum(0), dm.sum(0)]
        total = total + torch.cat(parts, 1)
    return total


def rd_gradient(head: nn.Module, f_nat: torch.Tensor, f_adv: torch.Tensor, branches: tuple,
                kind: str = "minmax_kl") -> np.ndarray:
    """Compressed gradient of RD(U) = d(g(f(x~)), g(f(x))) with respect to the head's linear layers, at the
    head's current weights, through both passes (the natural one is not a constant: it moves with theta)."""
    lins = head_linears(head)
    params = [p for lin in lins for p in (lin.weight, lin.bias)]
    b_nat, b_adv = branches
    with torch.enable_grad():
        with use_branch(head, b_nat):
            z_nat = head(f_nat)
        with use_branch(head, b_adv):
            z_adv = head(f_adv)
        grads = torch.autograd.grad(representational_divergence(z_adv, z_nat, kind), params)
    return compress(list(grads[0::2]), list(grads[1::2])).cpu().numpy().astype(np.float64)


def pick_gradient(head: nn.Module, row_feats: torch.Tensor, row_grads: torch.Tensor, row_branches: tuple) -> list[torch.Tensor]:
    """Full (uncompressed) head gradient of the samples whose rows are given, summed: rebuilt at the current
    head from each row's head input and loss gradient at the head output (both fixed at the snapshot)."""
    lins = head_linears(head)
    params = [p for lin in lins for p in (lin.weight, lin.bias)]
    total = [torch.zeros_like(p) for p in params]
    with torch.enable_grad():
        for branch in dict.fromkeys(row_branches):  # rows of one branch in one pass: in eval mode rows are independent
            cols = [r for r, b in enumerate(row_branches) if b == branch]
            feats = row_feats[:, cols].reshape(-1, row_feats.shape[-1]).float()
            with use_branch(head, branch):
                z = head(feats)
            grads = torch.autograd.grad(vjp_objective(z, row_grads[:, cols].reshape(len(z), -1).float()), params)
            total = [t + g for t, g in zip(total, grads)]
    return total


def head_gradient_norms(head: nn.Module, row_feats: torch.Tensor, row_grads: torch.Tensor, row_branches: tuple,
                        batch: int = 1024) -> np.ndarray:
    """Per-sample norm of the full head gradient (all linear layers' weights and biases), exactly, from each
    row's head input and loss gradient: ||sum_r d_r a_r^T||^2 = sum_rs (d_r . d_s)(a_r . a_s) per layer, so no
    per-sample outer product is formed. A sample's difficulty in the sense of EL2N / gradient-norm pruning."""
    n = len(row_feats)
    out = np.zeros(n)
    for lo in range(0, n, batch):
        rf, rg = row_feats[lo:lo + batch].float(), row_grads[lo:lo + batch].float()
        m = len(rf)
        per_layer_a, per_layer_d = None, None
        for branch in dict.fromkeys(row_branches):  # each branch's rows through the head in one pass
            cols = [r for r, b in enumerate(row_branches) if b == branch]
            a_list, d_list = head_rows_backward(head, rf[:, cols].reshape(-1, rf.shape[-1]),
                                                rg[:, cols].reshape(-1, rg.shape[-1]), branch)
            a_list = [a.reshape(m, len(cols), -1) for a in a_list]
            d_list = [d.reshape(m, len(cols), -1) for d in d_list]
            per_layer_a = a_list if per_layer_a is None else [torch.cat(x, 1) for x in zip(per_layer_a, a_list)]
            per_layer_d = d_list if per_layer_d is None else [torch.cat(x, 1) for x in zip(per_layer_d, d_list)]
        sq = torch.zeros(m)
        for a, d in zip(per_layer_a, per_layer_d):
            dd = d @ d.transpose(1, 2)
            sq += (dd * (a @ a.transpose(1, 2))).sum((1, 2)) + dd.sum((1, 2))  # weight and bias parts
        out[lo:lo + m] = sq.clamp_min(0).sqrt().double().numpy()
    return out


def divergence_on(model, shardset, split: str, ids: np.ndarray, method: str, eps: float, device="cpu",
                  batch_size: int = 256, seed: int = 123) -> float:
    """RD(U): RCS's representational divergence between the natural and the PGD-on-RD views of `ids` at the
    method's selection head (3 steps, as the proxies' U), averaged over U; what RCS promises to lower. Leaves
    the model in eval mode (a trainer puts it back in train mode itself)."""
    pc = ProxyComputer(model, shardset, split, device, batch_size, eps, eps / 4, 1, seed=seed, method=method)
    nat, adv = pc.validation_state(np.sort(np.asarray(ids, dtype=np.int64)), spread=False)
    head = pc.head
    with torch.no_grad():
        with use_branch(head, pc.branches[0]):
            z_nat = head(nat)
        with use_branch(head, pc.branches[1]):
            z_adv = head(adv)
        return float(representational_divergence(z_adv, z_nat, pc.method.divergence))
