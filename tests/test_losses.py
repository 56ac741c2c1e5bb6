"""CLIP and SimCLR losses against hand-computed cases and naive references."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slip.losses import clip_loss, simclr_loss, slip_objective


def naive_simclr(z1, z2, t):
    """Loop over anchors: positive = partner view, negatives = every other embedding but itself."""
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    n = z1.shape[0]
    losses = []
    for a, b in ((z1, z2), (z2, z1)):
        total = 0.0
        for i in range(n):
            pos = torch.exp(a[i] @ b[i] / t)
            neg = sum(torch.exp(a[i] @ b[j] / t) for j in range(n) if j != i)
            neg = neg + sum(torch.exp(a[i] @ a[j] / t) for j in range(n) if j != i)
            total = total - torch.log(pos / (pos + neg))
        losses.append(total / n)
    return (losses[0] + losses[1]) / 2


def naive_clip(img, txt, scale):
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    n = img.shape[0]
    sim = scale * img @ txt.t()
    i2t = sum(-torch.log_softmax(sim[i], 0)[i] for i in range(n)) / n
    t2i = sum(-torch.log_softmax(sim[:, i], 0)[i] for i in range(n)) / n
    return (i2t + t2i) / 2


def test_clip_loss_hand_computed_orthogonal_pairs():
    # Matching pairs have similarity 1, mismatched 0: each row's CE is log(1 + e^-s) with s = scale.
    emb = torch.eye(2)
    out = clip_loss(emb, emb * 3.0, torch.tensor(2.0))  # scale of the inputs must not matter
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    assert out["clip_acc"].item() == 100.0


def test_simclr_loss_hand_computed():
    # B=2, z1 = z2 = basis vectors, t = 1: anchor logits are [1 (partner), 0 (other view), 0 (own view)].
    z = torch.eye(2)
    out = simclr_loss(z, z.clone(), temperature=1.0)
    assert out["loss"].item() == pytest.approx(math.log(1 + 2 / math.e), rel=1e-6)
    assert out["ssl_acc"].item() == 100.0


@pytest.mark.parametrize("batch", [2, 5])
@pytest.mark.parametrize("dim", [3, 16])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_loss_matches_naive_reference(batch, dim, temperature):
    g = torch.Generator().manual_seed(batch * dim)
    z1, z2 = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    ours = simclr_loss(z1, z2, temperature)["loss"]
    assert ours.item() == pytest.approx(naive_simclr(z1, z2, temperature).item(), rel=1e-5)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("scale", [1.0, 14.3])
def test_clip_loss_matches_naive_reference(batch, scale):
    g = torch.Generator().manual_seed(batch)
    img, txt = torch.randn(batch, 8, generator=g), torch.randn(batch, 8, generator=g)
    ours = clip_loss(img, txt, torch.tensor(scale))["loss"]
    assert ours.item() == pytest.approx(naive_clip(img, txt, scale).item(), rel=1e-5)


def test_loss_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: clip_loss(a, b, s)["loss"], (img, txt, scale))
    assert torch.autograd.gradcheck(lambda a, b: simclr_loss(a, b, 0.2)["loss"], (img, txt))


def test_gradients_equal_the_naive_reference_gradients():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(4, 6, generator=g, requires_grad=True)
    z2 = torch.randn(4, 6, generator=g, requires_grad=True)
    (a1, a2) = torch.autograd.grad(simclr_loss(z1, z2, 0.1)["loss"], (z1, z2))
    (b1, b2) = torch.autograd.grad(naive_simclr(z1, z2, 0.1), (z1, z2))
    assert torch.allclose(a1, b1, atol=1e-5) and torch.allclose(a2, b2, atol=1e-5)


def test_slip_objective_sums_clip_and_scaled_ssl():
    g = torch.Generator().manual_seed(2)
    outputs = {
        "image_embed": torch.randn(4, 8, generator=g), "text_embed": torch.randn(4, 8, generator=g),
        "logit_scale": torch.tensor(10.0),
        "ssl": {"embeds": [torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)]},
    }

    def ssl_loss(out):
        return simclr_loss(*out["embeds"], temperature=0.1)

    out = slip_objective(outputs, ssl_loss=ssl_loss, ssl_scale=0.5)
    assert set(out) == {"loss", "clip_loss", "clip_acc", "ssl_loss", "ssl_acc"}
    assert out["loss"].item() == pytest.approx((out["clip_loss"] + 0.5 * out["ssl_loss"]).item())
    assert slip_objective(outputs)["loss"].item() == pytest.approx(out["clip_loss"].item())
    assert set(slip_objective(outputs, clip=False, ssl_loss=ssl_loss)) == {"loss", "ssl_loss", "ssl_acc"}
    with pytest.raises(ValueError, match="at least one"):
        slip_objective(outputs, clip=False)
