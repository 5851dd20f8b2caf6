"""The feature maps (`feature_maps`): FAVOR+'s estimate of softmax attention improves with more
features, orthogonal features beat independent ones, the estimate beats the mean of V, and the
random projections are orthogonal in blocks and seeded."""

import pytest
import torch

from modeling_performer.attention import linear_attention
from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix
from modeling_performer.reference_attention import naive_softmax_attention


def favor_error(num_features, seed, orthogonal, length=128, head_dim=16, heads=4, scale=1.0):
    """Returns (|approx - exact| / |exact|, |approx - exact| / |v|) over the whole output."""
    g = torch.Generator().manual_seed(1000 + seed)
    q, k, v = [torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3)]
    q, k = q * scale, k * scale
    w = gaussian_orthogonal_random_matrix(num_features, head_dim, torch.Generator().manual_seed(seed), orthogonal)
    exact = naive_softmax_attention(q.double(), k.double(), v.double())
    error = (linear_attention(q, k, v, w, "softmax").double() - exact).norm()
    return (error / exact.norm()).item(), (error / v.double().norm()).item()


def mean_favor_error(num_features, seeds=range(6), orthogonal=True, **kwargs):
    return sum(favor_error(num_features, s, orthogonal, **kwargs)[0] for s in seeds) / len(seeds)


@pytest.mark.parametrize("scale", [0.5, 1.0], ids=["std0.5", "std1"])
def test_favor_error_falls_with_more_features(scale):
    errors = {m: mean_favor_error(m, scale=scale) for m in (16, 64, 256)}
    assert errors[16] > errors[64] > errors[256], errors
    if scale < 1:
        assert errors[256] < 0.5 * errors[16], errors


def test_orthogonal_features_beat_iid():
    seeds = range(12)
    orthogonal = mean_favor_error(64, seeds, True, scale=0.5)
    iid = mean_favor_error(64, seeds, False, scale=0.5)
    assert orthogonal < iid, (orthogonal, iid)


def test_favor_estimate_at_reference_size_converges_to_softmax_and_is_judged_against_mean_of_v():
    """D=64, M=256, T=1024, unit-variance inputs (the README's reference size). One draw is a noisy
    estimate, worse than the trivial answer (the mean of V, which ignores q and k) on such inputs;
    but it estimates softmax attention itself: averaging independent draws shrinks the error as
    1/sqrt(draws), which nothing that ignores q and k can do. At small logits (std 0.25) and
    D=16 one draw beats the mean of V."""
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, 1024, 64, generator=g) for _ in range(3)]
    exact = naive_softmax_attention(q.double(), k.double(), v.double())
    mean_of_v = (v.double().mean(2, keepdim=True) - exact).norm()
    draws = [linear_attention(q, k, v, gaussian_orthogonal_random_matrix(256, 64, torch.Generator().manual_seed(s)),
                              "softmax").double() for s in range(16)]
    one = (draws[0] - exact).norm()
    averaged = (sum(draws) / len(draws) - exact).norm()
    assert averaged < 0.35 * one, (averaged, one)
    assert averaged < 1.6 * mean_of_v, (averaged, mean_of_v)
    small, _ = favor_error(256, seed=0, orthogonal=True, scale=0.5)
    g = torch.Generator().manual_seed(1000)  # favor_error's inputs for seed 0
    q, k, v = [torch.randn(1, 4, 128, 16, generator=g) for _ in range(3)]
    exact = naive_softmax_attention(q.double() * 0.5, k.double() * 0.5, v.double())
    baseline = ((v.double().mean(2, keepdim=True) - exact).norm() / exact.norm()).item()
    assert small < 0.8 * baseline, (small, baseline)


def test_projection_rows_are_orthogonal_in_blocks_and_seeded():
    w = gaussian_orthogonal_random_matrix(40, 16, torch.Generator().manual_seed(0))
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(16), atol=1e-5)
    assert torch.equal(w, gaussian_orthogonal_random_matrix(40, 16, torch.Generator().manual_seed(0)))
    assert not torch.equal(w, gaussian_orthogonal_random_matrix(40, 16, torch.Generator().manual_seed(1)))
