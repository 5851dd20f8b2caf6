"""Feature maps of linear attention: FAVOR+ random features (Choromanski et al., 2020), the ReLU
kernel, and learned Hedgehog maps (Zhang et al., 2024).

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
|q'|^2/2) cancel between the numerator and the normaliser of attention and are left out. When
linear attention is combined with an exact local window they no longer cancel:
``queries_with_log_scale`` also returns the log of the factor removed from each query, so that
phi(q).phi(k) * exp(log_scale + stabiliser) is the unbiased estimate of exp(q.k / sqrt(D)).
Maps whose ``calibrated`` is False (ReLU, Hedgehog) estimate no absolute scale; a learned
per-head weight sets their share against the window instead.

``feature_weights`` (W above) is what the map multiplies by: the random projection [M, D] for
FAVOR+ and ReLU, the learned query and key maps ([H, D, F], [H_kv, D, F], or one [2, H, D, F]
tensor) for Hedgehog (M = 2F features). Every method takes it second.
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
        return torch.randn(num_features, head_dim, generator=generator, dtype=torch.float32)
    blocks = []
    for _ in range(math.ceil(num_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float32)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T)
    directions = torch.cat(blocks, dim=0)[:num_features]
    norms = torch.randn(num_features, head_dim, generator=generator, dtype=torch.float32).norm(dim=1)
    return directions * norms.unsqueeze(1)


def _scaled_projection(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """x: [..., D] -> x' W^T: [..., M] in fp32, with x' = x * D^-1/4."""
    head_dim = x.shape[-1]
    # Scaling W (M x D) instead of x (T x D) saves a pass over the sequence.
    return x.float() @ (projection.float() * head_dim**-0.25).T


class SoftmaxFeatureMap:
    """Positive random features of the softmax kernel (FAVOR+)."""

    name = "softmax"
    calibrated = True
    # Padded keys get this logit: exp(-inf) = 0 keeps them out of the state and the stabiliser.
    padding_logit = float("-inf")

    @staticmethod
    def num_features(projection: torch.Tensor) -> int:
        return projection.shape[0]

    @staticmethod
    def queries_with_log_scale(q: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (phi(q) as `queries` returns it: [B, H, T, M], log of the factor it lacks: [B, H, T]).
        The row maximum is detached (it cancels against the features); |q'|^2 / 2 keeps its gradient."""
        head_dim = q.shape[-1]
        logits = _scaled_projection(q, projection)
        row_max = logits.amax(dim=-1, keepdim=True).detach()
        log_scale = row_max[..., 0] - q.float().pow(2).sum(dim=-1) * head_dim**-0.5 / 2 - math.log(projection.shape[0])
        return torch.exp(logits - row_max), log_scale

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


class _BoundedFeatureMap:
    """Maps whose features are bounded by construction: no stabiliser, no absolute scale."""

    calibrated = False
    padding_logit = 0.0

    @classmethod
    def queries_with_log_scale(cls, q: torch.Tensor,
                               feature_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cls.queries(q, feature_weights), q.new_zeros(q.shape[:-1], dtype=torch.float32)

    @staticmethod
    def token_max(logits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(offset)

    @classmethod
    def key_features(cls, k: torch.Tensor, feature_weights) -> torch.Tensor:
        """phi(k): [B, H, S, M] directly (a bounded map needs no stabiliser in between)."""
        logits, offset = cls.key_logits(k, feature_weights)
        return cls.keys(logits, offset.unsqueeze(-1))


class ReluFeatureMap(_BoundedFeatureMap):
    """Generalised-kernel features relu(W x') + eps (no stabiliser needed)."""

    name = "relu"
    # Keeps every key's features positive so that the normaliser never vanishes.
    epsilon = 1e-3

    @staticmethod
    def num_features(projection: torch.Tensor) -> int:
        return projection.shape[0]

    @staticmethod
    def queries(q: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
        return torch.relu(_scaled_projection(q, projection)) + ReluFeatureMap.epsilon

    @staticmethod
    def key_logits(k: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _scaled_projection(k, projection)
        return logits, logits.new_zeros(logits.shape[:-1])

    @staticmethod
    def keys(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return torch.relu(logits) + ReluFeatureMap.epsilon


def _hedgehog_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D], weight: [H, D, F] -> x W per head: [B, H, T, F] in fp32."""
    return x.float() @ weight.float()  # broadcast over the batch: one batched product


def _hedgehog_features(logits: torch.Tensor) -> torch.Tensor:
    """[..., F] -> [softmax(l), softmax(-l)]: [..., 2F]. Every feature lies in (0, 1] and each half
    sums to 1, so phi(q).phi(k) is in (0, 2]: no stabiliser is needed, in any precision."""
    return torch.stack([logits, -logits], dim=-2).softmax(dim=-1).flatten(-2)


# A scaled key's log weight s(k) = B tanh(k.u / B) stays within +-B: features stay bounded (by e^B).
KEY_SCALE_BOUND = 16.0


class HedgehogFeatureMap(_BoundedFeatureMap):
    """Learned per-head maps phi(x) = [softmax(x W), softmax(-x W)] (Hedgehog, Zhang et al. 2024),
    with separate weights for queries and keys. maps: (query maps [H, D, F], key maps [H_kv, D, F])
    or one [2, H, D, F] tensor when H_kv = H; M = 2F features per head. The two signs let phi(q).phi(k) grow both where x W agree in
    their largest and in their smallest coordinates, as exp(q.k) does; softmax keeps every feature
    positive and bounded.

    Softmax gives every key the same total mass, whereas softmax attention lets some keys draw far
    more weight than others. Key maps of F + 1 columns [H_kv, D, F + 1] (`hedgehog_key_scale`) give
    it back: the last column u scales each key's features by exp(B tanh(k.u / B)) (1 at u = 0; B =
    KEY_SCALE_BOUND), passed to `keys` as the key's offset."""

    name = "hedgehog"

    @staticmethod
    def num_features(maps) -> int:
        return 2 * maps[0].shape[-1]

    @staticmethod
    def queries(q: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        return _hedgehog_features(_hedgehog_logits(q, maps[0]))

    @staticmethod
    def key_logits(k: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _hedgehog_logits(k, maps[1])
        if logits.shape[-1] == maps[0].shape[-1] + 1:  # key maps with a scale column
            scale = logits[..., -1]
            return logits[..., :-1], -KEY_SCALE_BOUND * torch.tanh(scale / KEY_SCALE_BOUND)
        return logits, logits.new_zeros(logits.shape[:-1])

    @staticmethod
    def keys(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        # shift = offset (the stabiliser of a bounded map is 0): -log of the key's scale, 0 without one
        return _hedgehog_features(logits) * torch.exp(-shift)

    @staticmethod
    def key_features(k: torch.Tensor, maps) -> torch.Tensor:
        """As `keys(*key_logits(k))`, the same values, without the all-zero offset of unscaled maps."""
        logits = _hedgehog_logits(k, maps[1])
        if logits.shape[-1] == maps[0].shape[-1] + 1:  # the scale column: exp(B tanh(k.u / B))
            scale = torch.exp(KEY_SCALE_BOUND * torch.tanh(logits[..., -1:] / KEY_SCALE_BOUND))
            return _hedgehog_features(logits[..., :-1]) * scale
        return _hedgehog_features(logits)


def hedgehog_init(heads: int, head_dim: int, width: int) -> torch.Tensor:
    """Initial Hedgehog weights [2, H, D, F]: the identity on the first min(D, F) coordinates
    (phi(x) starts as the softmax of x itself, a map that already favours aligned q and k), zero
    elsewhere."""
    eye = torch.eye(head_dim, width)
    return eye.expand(2, heads, head_dim, width).clone()


def hedgehog_key_init(heads: int, head_dim: int, width: int, key_scale: bool = False) -> torch.Tensor:
    """Initial key maps [H, D, F] as `hedgehog_init`, with a zero scale column [H, D, F + 1] when
    key_scale (every key's scale starts at 1: the same map as without the column)."""
    weight = hedgehog_init(heads, head_dim, width)[1]
    return torch.cat([weight, weight.new_zeros(heads, head_dim, 1)], dim=-1) if key_scale else weight


FEATURE_MAPS = {"softmax": SoftmaxFeatureMap, "relu": ReluFeatureMap, "hedgehog": HedgehogFeatureMap}


def get_feature_map(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"Unknown feature_map {name!r}; valid values: {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]
