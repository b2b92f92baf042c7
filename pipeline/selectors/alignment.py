"""`alignment`: RCS's first-order score taken through the whole network, and the subset it ranks lowest.

Score of a candidate = <gradient of its training loss, gradient of RD(U)>, both with respect to every
parameter of the model (not only the selection head, as RCS's compressed proxies), exactly: the candidate's
loss is linearised at the head output (its rows' loss gradients, `Objective.rows`, held fixed), and its
directional derivative along U's RD gradient is one forward-mode product per batch (`torch.func.jvp`, eval
mode, so that rows are independent). No per-sample gradient is ever formed.

`order=lowest` (the default) keeps the candidates whose gradient most opposes lowering RD(U) at first order;
`order=highest` is RCS's rule (one-shot, no greedy). Measured with benchmarks/bench_selection.py (16 px
CIFAR-10, 3 seeds): with a 5,000-image pool `highest` raises RD(U) far more than random subsets do and
`lowest` lowers it far more (two snapshots, on test images too); with a 10,000-image pool `lowest` raises it
far more and `highest` is no better than random. The first-order score is a strong signal whose sign is not
stable: a research tool, not a default. Needs an objective that keeps its rows' images (ACL, DynACL, SimCLR);
one process (not spread over torchrun ranks).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.func import functional_call, jvp

from pipeline.attacks import Budget
from pipeline.augment import to_float
from pipeline.errors import PipelineError
from pipeline.losses import representational_divergence
from pipeline.selectors.base import Selection, SelectionContext, Selector, check_draws, register_selector


def rd_parameter_gradient(pc, val_ids: np.ndarray) -> dict:
    """Gradient of RD(U) (the mean over U) with respect to every parameter of `pc.model`, U's adversarial views
    from the proxies' PGD on RD (the same draws as `ProxyComputer.validation_state`), held fixed."""
    model, head = pc.model, pc.head_name
    b_nat, b_adv = pc.branches
    kind = pc.method.divergence
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    ids = np.sort(np.asarray(val_ids, dtype=np.int64))
    for k, b in enumerate(pc._batches(ids)):
        x = to_float(b.images)
        with torch.no_grad():
            z_nat = model(x, b_nat, heads=(head,))[head]
        x_adv = pc.virtual_adversarial(x, z_nat, k)
        with torch.enable_grad():
            rd = representational_divergence(model(x_adv, b_adv, heads=(head,))[head],
                                             model(x, b_nat, heads=(head,))[head], kind)
            grads = torch.autograd.grad(rd * len(b.ids) / len(ids), params, allow_unused=True)
        total = [t + (0 if g is None else g) for t, g in zip(total, grads)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return dict(zip(names, total))


def network_alignment(model, head: str, rows, tangent: dict) -> torch.Tensor:
    """Per sample: sum over its rows r of <g_r, J_r tangent>, J_r the Jacobian of the head output of row r's
    image with respect to the parameters: the directional derivative of the sample's linearised loss along
    `tangent`, i.e. <its loss gradient, tangent>, exactly."""
    if rows.inputs is None:
        raise PipelineError("this method's objective does not keep its rows' images; use --selector rcs")
    params = {k: v.detach() for k, v in model.named_parameters() if k in tangent}
    fixed = {**{k: v.detach() for k, v in model.named_parameters() if k not in tangent}, **dict(model.named_buffers())}
    n = len(rows.grads[0])
    total = torch.zeros(n, device=rows.grads[0].device)
    for branch in dict.fromkeys(rows.branches):  # the rows of one branch in one product
        cols = [r for r, b in enumerate(rows.branches) if b == branch]
        x = torch.cat([rows.inputs[r] for r in cols])
        g = torch.cat([rows.grads[r] for r in cols]).float()

        def head_out(p, x=x, branch=branch):
            return functional_call(model, {**p, **fixed}, (x, branch), {"heads": (head,)})[head]

        _, t_out = jvp(head_out, (params,), ({k: tangent[k] for k in params},))
        total += (g * t_out.float()).sum(1).reshape(len(cols), n).sum(0)
    return total


@register_selector
class AlignmentSelector(Selector):
    name = "alignment"
    needs_model = True
    takes_recorded_rows = False  # its score goes through every layer: it passes the candidates' images itself
    needs_validation = True  # type: ignore[assignment]
    defaults = {"order": "lowest", "draws": 1, "attack_steps": 1}

    def select(self, ctx: SelectionContext) -> Selection:
        p = self.params
        if p["order"] not in ("lowest", "highest"):
            raise PipelineError(f"--order {p['order']!r}: choose lowest or highest")
        check_draws(p["draws"])
        pc = ctx.proxies
        started = time.perf_counter()
        cand, val = pc.split_validation(np.asarray(ctx.pool_ids))
        tangent = rd_parameter_gradient(pc, val)
        budget = Budget(pc.eps, pc.step, pc.attack_steps)
        scores = np.zeros(len(cand))
        done = 0
        for k, b in enumerate(pc._batches(cand)):
            n = len(b.ids)
            for d in range(p["draws"]):
                rows = pc.method.rows(pc.model, b, pc._generator(2 + 10 * d, k), pc.settings, budget)
                scores[done:done + n] += network_alignment(pc.model, pc.head_name, rows, tangent).cpu().numpy()
            done += n
        scores /= p["draws"]
        order = np.argsort(scores if p["order"] == "lowest" else -scores, kind="stable")[:ctx.budget]
        return Selection(np.sort(cand[order]), None, float(scores[order].sum()),
                         {"alignment": time.perf_counter() - started},
                         {"validation_ids": val.tolist(), "score_range": [float(scores.min()), float(scores.max())]})
