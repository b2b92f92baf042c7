"""AdvCL's objective at its projection head: x_cl and the three natural views (Fan et al. 2021)."""

from __future__ import annotations

import torch

from pipeline.attacks import PGD
from pipeline.augment import ContrastiveAugment, high_pass, random_crop_flip, to_float
from pipeline.losses import multiview_contrastive, row_gradients
from pipeline.models.multibn import use_branch
from pipeline.objectives.base import HeadRows, Objective, register_objective


def advcl_views(images: torch.Tensor, gen, augment: ContrastiveAugment, radius: float):
    """(view 1, view 2, the weakly augmented image, its high-frequency view)."""
    x1, x2 = augment(images, gen), augment(images, gen)
    x = random_crop_flip(to_float(images), gen, padding=max(1, images.shape[-1] // 8))
    return x1, x2, x, high_pass(x, radius)


@register_objective
class AdvCLObjective(Objective):
    name = "advcl"

    @classmethod
    def rows(cls, model, batch, gen, settings, attack) -> HeadRows:
        """4 rows per sample at the projection head: x_cl (PGD on the contrastive term, eval mode, `pgd`
        branch), the two views and the high-frequency view (`normal`). The pseudo-label term does not reach
        the projection head (its gradient there is zero), so these rows are the whole loss's head gradient."""
        t, scale = settings.get("temperature", 0.5), settings.get("scale", 0.5 / 0.07)
        augment = ContrastiveAugment(batch.images.shape[-1], min_scale=settings.get("min_crop_scale", 0.2))
        radius = settings.get("hf_radius") or 8 * batch.images.shape[-1] / 32
        x1, x2, x, hf = advcl_views(batch.images, gen, augment, radius)
        adv, nat = model.branch("adversarial"), model.branch("natural")
        head = model.heads["proj"]
        with torch.no_grad():
            z_views = [model(v, nat, heads=("proj",))["proj"] for v in (x1, x2, hf)]

        def contrastive(z_cl, _):
            return multiview_contrastive(torch.cat([z_cl, *z_views]), 4, t, scale)

        x_cl = PGD(lambda v: model(v, adv, heads=("proj",))["proj"], contrastive, attack.eps, attack.step,
                   attack.steps, module=model, generator=gen)(x)
        with torch.no_grad():
            feats = [model.features(x_cl, adv)] + [model.features(v, nat) for v in (x1, x2, hf)]
            with use_branch(head, adv):
                z = head(torch.cat(feats))
        g = row_gradients(z, lambda zz: multiview_contrastive(zz, 4, t, scale, reduction="rows", detach_others=True))
        return HeadRows(feats, list((g / 4).split(len(x))), [adv, nat, nat, nat])
