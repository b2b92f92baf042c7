"""Two-view NT-Xent objectives: ACL and DynACL (views and their PGD views), SimCLR (views only)."""

from __future__ import annotations

import torch

from pipeline.attacks import PGD
from pipeline.augment import ContrastiveAugment
from pipeline.losses import multiview_contrastive, nt_xent, row_gradients
from pipeline.models.multibn import use_branch
from pipeline.objectives.base import HeadRows, Objective, register_objective


def contrastive_rows(model, images, settings: dict, attack, gen) -> HeadRows:
    """Selection rows of a two-view NT-Xent method: the two views on the natural branch and, with an attack,
    their PGD views (eval mode, adversarial branch): 4 rows per sample for ACL, 2 for SimCLR."""
    t = settings.get("temperature", 0.5)
    augment = ContrastiveAugment(images.shape[-1], settings.get("strength", 1.0), settings.get("min_crop_scale", 0.08))
    views = torch.cat([augment(images, gen), augment(images, gen)])
    nat, adv = model.branch("natural"), model.branch("adversarial")
    with torch.no_grad():
        passes = [(model.features(views, nat), nat)]
    inputs = [views]
    if attack is not None and attack.steps > 0:
        pgd = PGD(lambda x: model(x, adv, heads=("proj",))["proj"], lambda z, _: nt_xent(z, t),
                  attack.eps, attack.step, attack.steps, module=model, generator=gen)
        x_adv = pgd(views)
        with torch.no_grad():
            passes.append((model.features(x_adv, adv), adv))
        inputs.append(x_adv)
    rows = contrastive_head_rows(model.heads["proj"], passes, len(images), settings)
    rows.inputs = [x for pass_images in inputs for x in pass_images.split(len(images))]
    return rows


def contrastive_head_rows(head, passes: list, n: int, settings: dict) -> HeadRows:
    """The rows of given head inputs (each pass: the 2n features of both views and its branch), the head in
    eval mode: each row's NT-Xent term taken against the batch held fixed, divided by the row count (a
    sample's loss is its rows' mean)."""
    t = settings.get("temperature", 0.5)
    feats, grads, branches = [], [], []
    for f, branch in passes:
        with torch.no_grad(), use_branch(head, branch):
            z = head(f)
        g = row_gradients(z, lambda zz: multiview_contrastive(zz, 2, t, reduction="rows", detach_others=True))
        feats += list(f.split(n))
        grads += list(g.split(n))
        branches += [branch, branch]
    return HeadRows(feats, [g / len(feats) for g in grads], branches)


@register_objective
class ACLObjective(Objective):
    """4 rows per sample: the two views (natural branch) and their PGD views (adversarial branch)."""

    name = "acl"

    @classmethod
    def rows(cls, model, batch, gen, settings, attack) -> HeadRows:
        return contrastive_rows(model, batch.images, settings, attack, gen)

    @classmethod
    def rows_from_step(cls, head, passes, n, settings) -> HeadRows:
        return contrastive_head_rows(head, passes, n, settings)


@register_objective
class DynACLObjective(ACLObjective):
    name = "dynacl"  # ACL's loss; the annealed strength and weight reach it through the snapshot's settings


@register_objective
class SimCLRObjective(Objective):
    """2 rows per sample, its two views; no attack: SimCLR's step has none."""

    name = "simclr"

    @classmethod
    def rows(cls, model, batch, gen, settings, attack) -> HeadRows:
        return contrastive_rows(model, batch.images, settings, None, gen)

    @classmethod
    def rows_from_step(cls, head, passes, n, settings) -> HeadRows:
        return contrastive_head_rows(head, passes, n, settings)
