"""Random projections and feature maps for FAVOR+ (Choromanski et al., 2020).

Shapes: B batch, H heads, T query length, S key length, D head dim, M random features.

The softmax kernel exp(q.k / sqrt(D)) is the expectation of phi(q').phi(k') with
x' = x * D^-1/4 and phi(x) = exp(W x - |x|^2 / 2) / sqrt(M), W made of Gaussian rows.
Each feature map exposes the same three pieces so that the attention kernels can apply a key
stabiliser that gives identical results in one pass, chunk by chunk and token by token:

- ``queries(q, W)``: phi(q) with a per-row constant removed (it cancels in the ratio);
- ``key_logits(k, W)``: (W k', offset) with r = W k' - offset the exponent of the softmax kernel
  (offset = |k'|^2 / 2 per key); kept apart so that exp(r - m) costs one pass over [S, M];
- ``token_max(logits, offset)``: the per-token maximum of r that the running stabiliser tracks;
- ``keys(logits, shift)``: phi(k) with shift = offset + stabiliser subtracted in the exponent.

Constant factors common to all queries or to all keys (1/sqrt(M), the query's row maximum,
|q'|^2/2) cancel between the numerator and the normaliser of attention and are left out.
Everything is computed in fp32 whatever the input dtype.
"""

import math
from typing import Optional

import torch


def gaussian_orthogonal_random_matrix(
    num_features: int,
    head_dim: int,
    generator: Optional[torch.Generator] = None,
    orthogonal: bool = True,
) -> torch.Tensor:
    """Draws the projection W: [M, D], on the CPU in fp32 so every process gets the same bits.

    orthogonal=True: rows in blocks of D that are exactly orthogonal (QR of a Gaussian block,
    signs fixed by R's diagonal so the block is Haar distributed), each row rescaled to a norm
    drawn from chi(D) so that rows are marginally Gaussian. orthogonal=False: i.i.d. Gaussian rows.
    """
    if num_features < 1 or head_dim < 1:
        raise ValueError(f"num_features and head_dim must be positive, got {num_features}, {head_dim}")
    if not orthogonal:
        return torch.randn(num_features, head_dim, generator=generator)
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T)
    directions = torch.cat(blocks, dim=0)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=1)
    return directions * norms.unsqueeze(1)


def _scaled_projection(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """x: [..., D] -> x' W^T: [..., M] in fp32, with x' = x * D^-1/4."""
    head_dim = x.shape[-1]
    # Scaling W (M x D) instead of x (T x D) saves a pass over the sequence.
    return x.float() @ (projection.float() * head_dim**-0.25).T


class SoftmaxFeatureMap:
    """Positive random features of the softmax kernel (FAVOR+)."""

    name = "softmax"

    @staticmethod
    def queries(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        """q: [B, H, T, D] -> phi(q): [B, H, T, M]. The row maximum is removed: it and
        |q'|^2/2 are constant per query and cancel between numerator and normaliser."""
        logits = _scaled_projection(q, projection)
        return torch.exp(logits - logits.amax(dim=-1, keepdim=True).detach())

    @staticmethod
    def key_logits(k: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k: [B, H, S, D] -> (W k': [B, H, S, M], |k'|^2 / 2: [B, H, S])."""
        head_dim = k.shape[-1]
        offset = k.float().pow(2).sum(dim=-1) * head_dim**-0.5 / 2
        return _scaled_projection(k, projection), offset

    @staticmethod
    def token_max(logits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """-> max over features of r: [B, H, S]; detached: the stabiliser cancels, no gradient."""
        return logits.detach().amax(dim=-1) - offset.detach()

    @staticmethod
    def keys(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """logits: [..., S, M], shift: [..., S, 1] (offset + finite stabiliser) -> phi(k) * exp(-stabiliser)."""
        return torch.exp(logits - shift)


class ReluFeatureMap:
    """Generalised-kernel features relu(W x') + eps (no stabiliser needed)."""

    name = "relu"
    # Keeps every key's features positive so that the normaliser never vanishes.
    epsilon = 1e-3

    @staticmethod
    def queries(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        return torch.relu(_scaled_projection(q, projection)) + ReluFeatureMap.epsilon

    @staticmethod
    def key_logits(k: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _scaled_projection(k, projection)
        return logits, logits.new_zeros(logits.shape[:-1])

    @staticmethod
    def token_max(logits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(offset)

    @staticmethod
    def keys(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return torch.relu(logits) + ReluFeatureMap.epsilon


FEATURE_MAPS = {"softmax": SoftmaxFeatureMap, "relu": ReluFeatureMap}


def get_feature_map(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"Unknown feature_map {name!r}; valid values: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]
