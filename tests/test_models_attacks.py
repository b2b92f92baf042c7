"""Losses, dual batch norm, augmentation and PGD: the numbers they must produce."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.attacks import PGD
from pipeline.augment import ContrastiveAugment, random_crop_flip
from pipeline.losses import nt_xent, representational_divergence, trades_kl
from pipeline.models import create_model, model_spec, use_branch


def test_nt_xent_equals_a_direct_loop():
    torch.manual_seed(0)
    b, t = 6, 0.5
    z = torch.randn(2 * b, 16)
    zn = F.normalize(z, dim=1)
    total = 0.0
    for i in range(2 * b):
        j = (i + b) % (2 * b)
        num = math.exp(float(zn[i] @ zn[j]) / t)
        den = sum(math.exp(float(zn[i] @ zn[k]) / t) for k in range(2 * b) if k != i)
        total += -math.log(num / den)
    assert nt_xent(z, t).item() == pytest.approx(total / (2 * b), rel=1e-5)


def test_representational_divergence_is_zero_on_equal_inputs_and_positive_otherwise():
    z = torch.randn(5, 8)
    assert representational_divergence(z, z).item() == pytest.approx(0.0, abs=1e-6)
    assert representational_divergence(z + torch.randn(5, 8), z).item() > 0
    assert representational_divergence(z, z + 1, kind="kl", reduction="none").shape == (5,)


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
def test_dual_batch_norm_keeps_separate_statistics(arch):
    torch.manual_seed(0)
    model = create_model(model_spec(arch, 3, 32, heads={"proj": {"kind": "mlp3", "width": 64, "out": 32}})).train()
    model(torch.rand(8, 3, 32, 32), "nat")
    model(torch.rand(8, 3, 32, 32) * 0.1 + 0.9, "adv")
    bn = model.encoder.normalize  # first multi-BN follows the normaliser
    first = next(m for m in model.modules() if m.__class__.__name__ == "MultiBatchNorm")
    nat, adv = first.bns["nat"].running_mean, first.bns["adv"].running_mean
    assert not torch.allclose(nat, adv)
    before = nat.clone()
    model(torch.rand(8, 3, 32, 32), "adv")  # an adversarial pass leaves natural statistics alone
    assert torch.equal(first.bns["nat"].running_mean, before)
    assert bn is not None


def _spec(arch, channels, size):
    return model_spec(arch, channels, size, heads={"proj": {"kind": "mlp3", "width": 32, "out": 16}})


def test_use_branch_restores_the_previous_branch():
    model = create_model(_spec("smallcnn", 1, 16))
    with use_branch(model, "adv"):
        assert all(m.branch == "adv" for m in model.modules() if hasattr(m, "bns"))
    assert all(m.branch == "nat" for m in model.modules() if hasattr(m, "bns"))
    with pytest.raises(KeyError):
        model(torch.rand(2, 1, 16, 16), "pgd")


def test_augmentation_is_deterministic_under_a_seed():
    x = (torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)
    aug = ContrastiveAugment(32)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (16, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    # strength 0 (DynACL's end point) leaves only flips: every view is the image or its mirror
    plain = ContrastiveAugment(32, strength=0.0)(x, torch.Generator().manual_seed(0))
    xf = x.float() / 255
    same = [torch.allclose(v, o, atol=1e-4) or torch.allclose(v, o.flip(-1), atol=1e-4) for v, o in zip(plain, xf)]
    assert all(same)


def test_random_crop_flip_moves_pixels_without_changing_them():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert y.shape == x.shape
    assert set(y.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def _tiny_classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))


@pytest.mark.parametrize("loss", ["ce", "trades"])
def test_pgd_raises_the_loss_and_stays_in_the_ball(loss):
    model = _tiny_classifier()
    x = torch.rand(32, 3, 8, 8)
    y = torch.randint(0, 10, (32,))
    target = y if loss == "ce" else model(x).detach()
    eps = 8 / 255
    fn = (lambda out, t: F.cross_entropy(out, t)) if loss == "ce" else trades_kl
    adv = PGD(model, fn, eps=eps, step=2 / 255, steps=10, generator=torch.Generator().manual_seed(0))(x, target)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    if loss == "ce":
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y) + 0.05
    else:
        assert F.kl_div(F.log_softmax(model(adv), 1), F.softmax(target, 1), reduction="batchmean") > 1e-4


def test_pgd_contrastive_attacks_the_adversarial_branch_in_eval_mode():
    torch.manual_seed(0)
    model = create_model(_spec("smallcnn", 3, 16)).train()
    views = torch.rand(16, 3, 16, 16)
    adv_branch = model.branch("adversarial")
    adv = PGD(lambda x: model(x, adv_branch)["proj"], lambda z, _: nt_xent(z), eps=8 / 255, step=2 / 255, steps=5,
              module=model, generator=torch.Generator().manual_seed(1))(views)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        assert nt_xent(model(adv, adv_branch)["proj"]) > nt_xent(model(views, adv_branch)["proj"])


def test_pgd_perturbs_several_inputs_jointly_and_sets_the_mode_it_is_given():
    modes = []

    class Probe(torch.nn.Module):
        def forward(self, a, b):
            modes.append(self.training)
            return ((a - b) ** 2).sum()

    probe = Probe().eval()
    a, b = torch.full((2, 3), 0.5), torch.full((2, 3), 0.5)
    a[0, 0] = 0.6  # the loss pulls a and b apart where they differ
    adv_a, adv_b = PGD(probe, lambda out, _: out, eps=0.05, step=0.01, steps=1, start="none", module=probe,
                       train_mode=True)([a, b])
    # d/da = 2 (a - b), d/db = -2 (a - b): one signed step each, in opposite directions, where a != b
    assert adv_a[0, 0].item() == pytest.approx(0.61) and adv_b[0, 0].item() == pytest.approx(0.49)
    assert torch.equal(adv_a[1], a[1]) and torch.equal(adv_b[1], b[1])  # sign(0) = 0: no move
    assert modes == [True] and not probe.training  # attacked in train mode, mode restored


def test_pgd_eot_averages_the_gradient_of_a_randomized_model():
    torch.manual_seed(0)
    calls = []

    def noisy(x):  # a randomized model: each call draws its own noise
        calls.append(1)
        return x * (1 + 0.1 * torch.randn_like(x))

    x = torch.rand(4, 3)
    PGD(noisy, lambda out, _: out.sum(), eps=0.1, step=0.01, steps=3, eot=5)(x)
    assert len(calls) == 15  # 5 samples of the loss per step
    with pytest.raises(ValueError):
        PGD(noisy, lambda out, _: out.sum(), eps=0.1, step=0.01, steps=3, eot=0)
