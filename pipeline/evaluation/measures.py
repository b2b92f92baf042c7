"""Robustness measures, registered by name: each counts the correct predictions of a classifier on a batch.

- `clean`: no attack.
- `pgd20`: PGD (l_inf, random start, 20 steps of eps / 4 by default) on the cross-entropy, eval mode.
- `autoattack`: the standard AutoAttack of Croce and Hein (APGD-CE, APGD-T with 9 target classes, FAB-T with 9,
  Square with 5,000 queries; 100 iterations), from the authors' code (`pyautoattack`, the `attacks` extra).
- `autoattack-rand`: its version for randomized models (APGD-CE and APGD-DLR, each averaging 20 EOT draws).
- `eot-pgd20`: PGD-20 on the log of the softmax averaged over m noise draws, fresh noise at every step (a
  smoothed classifier only).

With smoothing (`Smoothing`), every attack targets the randomized model f(x + noise) (`pgd20`: one draw per
step, no EOT: what a claim measured without EOT would see) and every count is the smoothed classifier's
prediction (Cohen's PREDICT), abstentions counted as errors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.attacks import PGD, Budget
from pipeline.augment import to_float
from pipeline.errors import PipelineError
from pipeline.progress import progress_bar
from pipeline.registry import Registry
from pipeline.evaluation.smoothing import EOTClassifier, RandomizedClassifier, Smoothing, smoothed_predict

INSTALL = ("AutoAttack needs the attacks extra: pip install 'pipeline[attacks]' (install it together with "
           "torch==2.13.0, or pip may pull a CUDA build of torch)")


MEASURES: Registry[type[Measure]] = Registry("measure", flag="--attack")


def register_measure(cls: type[Measure]) -> type[Measure]:
    return MEASURES.register(cls)


def list_measures() -> list[str]:
    return MEASURES.names()


def robust_measures() -> list[str]:
    return [n for n, m in MEASURES.items() if m.robust]


def measure_title(name: str) -> str:
    return (MEASURES[name].title or name) if name in MEASURES else name


class Measure:
    """`self.model`: what the attack targets (the classifier, or with smoothing the randomized model);
    `self.classifier`: the deterministic base classifier. Display metadata, read by `pipeline report`, the
    experiment table and the figures: `title` (a column's heading) and `robust` (an attack: counted in "the
    strongest attack a result holds"); columns follow registration order."""

    name = "base"
    title = ""
    robust = True
    needs_smoothing = False

    def __init__(self, model, b: Budget, n_classes: int, seed: int, device, smoothing: Smoothing | None = None):
        if self.needs_smoothing and smoothing is None:
            raise PipelineError(f"--attack {self.name}: attacks a randomized classifier; give --smoothing "
                                "sigma=S,n=N,alpha=A (or use pgd20)")
        self.classifier, self.budget, self.n_classes, self.seed, self.device = model, b, n_classes, seed, device
        self.smoothing = smoothing
        self.noise_gen = torch.Generator(device).manual_seed(seed + 7919)
        self.model = model if smoothing is None else RandomizedClassifier(model, smoothing.sigma, self.noise_gen)
        self.abstained = 0

    def settings(self) -> dict:
        return {} if self.smoothing is None else {"smoothing": self.smoothing.as_dict(), "abstained": self.abstained}

    def correct(self, x: torch.Tensor, y: torch.Tensor) -> int:
        raise NotImplementedError

    def _count(self, x, y) -> int:
        with torch.no_grad():
            if self.smoothing is None:
                return int((self.classifier(x).argmax(1) == y).sum())
            pred = smoothed_predict(self.classifier, x, self.smoothing, self.n_classes, self.noise_gen)
            self.abstained += int((pred < 0).sum())
            return int((pred == y).sum())


@register_measure
class Clean(Measure):
    name = "clean"
    title = "clean"
    robust = False

    def correct(self, x, y):
        return self._count(x, y)


@register_measure
class PGD20(Measure):
    name = "pgd20"
    title = "PGD-20"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        b = self.budget
        self.attack = PGD(self.model, lambda out, t: F.cross_entropy(out.float(), t), b.eps, b.step, b.steps,
                          module=self.classifier, generator=torch.Generator(self.device).manual_seed(self.seed))

    def settings(self):
        return {"attack": "pgd", "loss": "ce", **self.attack.settings(), **super().settings()}

    def correct(self, x, y):
        return self._count(self.attack(x, y), y)


@register_measure
class EOTPGD20(PGD20):
    """PGD-20 on the EOT loss: cross-entropy of the softmax averaged over m draws (fresh noise every step)."""

    name = "eot-pgd20"
    title = "EOT-PGD-20"
    needs_smoothing = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        s = self.smoothing
        self.model = EOTClassifier(self.classifier, s.sigma, s.eot_draws, self.noise_gen)
        self.attack.forward_fn = self.model
        self.attack.loss = lambda log_probs, t: F.nll_loss(log_probs, t)

    def settings(self):
        return {**super().settings(), "loss": "nll of the mean softmax over draws", "eot": self.smoothing.eot_draws}


@register_measure
class AutoAttackStandard(Measure):
    name = "autoattack"
    title = "AutoAttack"
    version = "standard"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            import pyautoattack
        except ImportError as exc:
            raise PipelineError(INSTALL) from exc
        self.package_version = getattr(pyautoattack, "__version__", "?")
        self.attack = pyautoattack.AutoAttack(self.model, norm="Linf", eps=self.budget.eps, version=self.version,
                                              device=self.device, seed=self.seed)

    def settings(self):
        a = self.attack
        return {"attack": "autoattack", "package": "pyautoattack", "package_version": self.package_version,
                "version": self.version, "norm": "Linf", "eps": self.budget.eps, "attacks": list(a.attacks_to_run),
                "apgd_iterations": a.apgd.n_iter, "apgd_restarts": a.apgd.n_restarts, "apgd_eot": a.apgd.eot_iter,
                "apgd_t_target_classes": a.apgd_targeted.n_target_classes, "fab_t_target_classes": a.fab.n_target_classes,
                "square_queries": a.square.n_queries, "seed": self.seed, **super().settings()}

    def correct(self, x, y):
        # contiguous: pyautoattack views gradients flat, which a channels_last batch cannot be
        x_adv, _ = self.attack.run_standard_evaluation(x.contiguous(), y, batch_size=len(x))
        return self._count(x_adv, y)


@register_measure
class AutoAttackRand(AutoAttackStandard):
    name = "autoattack-rand"
    title = "AutoAttack rand"
    version = "rand"




def parse_measures(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]
    bad = [n for n in names if n not in MEASURES]
    if bad:
        raise PipelineError(f"--attack {bad[0]!r}: choose from {', '.join(MEASURES)} (comma-separated)")
    return ["clean"] + [n for n in names if n != "clean"]


def accuracies(model, loader, names: list[str], b: Budget, n_classes: int, device, seed: int = 0,
               smoothing: Smoothing | None = None, progress: bool = False) -> tuple[dict, dict]:
    """({measure: accuracy, "samples": n}, {measure: its settings}) over every sample of `loader`; with
    `smoothing`, of the smoothed classifier built on `model`."""
    model.eval()
    measures = [MEASURES[n](model, b, n_classes, seed, device, smoothing) for n in names]
    correct = dict.fromkeys(names, 0)
    total = 0
    with progress_bar(progress) as bar:  # AutoAttack on 1,000 images takes a quarter of an hour on a CPU
        task = bar.add_task(f"measure {', '.join(names)}", total=getattr(loader, "samples_per_epoch", None))
        for batch in loader:
            x, y = to_float(batch.images.to(device)), batch.labels.to(device)
            for m in measures:
                correct[m.name] += m.correct(x, y)
            total += len(y)
            bar.advance(task, len(y))
    acc = {n: c / max(total, 1) for n, c in correct.items()}
    return {**acc, "samples": total}, {m.name: m.settings() for m in measures}
