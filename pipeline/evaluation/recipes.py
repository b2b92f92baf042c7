"""Finetuning settings of the RobustSSL benchmark's vanilla finetuning, by pre-training recipe and protocol
(GodXuxilie/RobustSSL_Benchmark, Finetuning_Methods/Vanilla_Finetuning; acl-and-eval.md).

SGD, momentum 0.9, no Nesterov, weight decay 2e-4; lr x0.1 at the milestones. SLF/ALF use lr 0.05 instead of
0.01 on 100-class data. A user's epochs override scales the milestones with it unless they are given too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import PipelineError

#            protocol: (batch size, lr, epochs, milestones)
RECIPES = {
    "acl": {"slf": (512, 0.01, 25, (10, 20)), "alf": (512, 0.01, 25, (10, 20)), "aff": (128, 0.1, 100, (40, 60))},
    "dynacl": {"slf": (512, 0.01, 25, (10, 20)), "alf": (512, 0.01, 25, (10, 20)), "aff": (128, 0.1, 25, (15, 20))},
    "advcl": {"slf": (512, 0.01, 25, (15, 20)), "alf": (512, 0.01, 25, (15, 20)), "aff": (128, 0.1, 25, (15, 20))},
}
DEFAULT_RECIPE = "acl"  # for methods the benchmark has no recipe of


@dataclass
class FinetuneSettings:
    recipe: str = DEFAULT_RECIPE
    protocol: str = "slf"
    epochs: int = 25
    lr: float = 0.01
    batch_size: int = 512
    milestones: list = field(default_factory=lambda: [10, 20])
    gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    train_steps: int = 10  # PGD-10 (ALF) / TRADES-10 (AFF)
    trades_beta: float = 6.0
    aff_start_std: float = 0.001  # AFF's attack starts at x + 0.001 N(0, 1), as TRADES
    aff_natural_branch: str = "natural"  # AFF: the branch role natural inputs pass (the eval one: "eval")
    epoch_choice: str = "last"  # never the epoch with the best test accuracy
    noise_sigma: float = 0.0  # > 0: every classifier input in finetuning gets N(0, sigma^2) noise (a smoothing base)
    seed: int = 0


def recipe_settings(recipe: str, protocol: str, n_classes: int, epochs: int | None = None, lr: float | None = None,
                    batch_size: int | None = None, milestones=None, seed: int = 0,
                    noise_sigma: float = 0.0) -> FinetuneSettings:
    if recipe not in RECIPES:
        raise PipelineError(f"--recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    if protocol not in RECIPES[recipe]:
        raise PipelineError(f"--protocol {protocol!r}: choose one of {', '.join(RECIPES[recipe])}")
    bs, base_lr, base_epochs, base_ms = RECIPES[recipe][protocol]
    if protocol in ("slf", "alf") and n_classes >= 100:
        base_lr = 0.05
    ep = epochs or base_epochs
    if milestones is None:
        milestones = [max(1, round(m * ep / base_epochs)) for m in base_ms] if ep != base_epochs else list(base_ms)
    return FinetuneSettings(recipe=recipe, protocol=protocol, epochs=ep, lr=lr or base_lr, batch_size=batch_size or bs,
                            milestones=list(milestones), seed=seed, noise_sigma=noise_sigma)
