"""Naive O(T x S) references of the attention kernels in `attention.py`, in float64: every score
matrix written out, no chunks, no states, no stabiliser tricks. The tests hold the kernels to them;
nothing in the models uses them.
"""

import torch

from .attention_common import (
    repeat_key_heads,
    resolve_feature_map,
)
from .attention_softmax import build_attention_mask
from .feature_maps import KEY_SCALE_BOUND


def _decay_weights(log_decay, key_padding_mask, delay=0):
    """float64 [B, H_kv, T, T]: how much of key j's contribution is left at query t, exp(sum of the
    log gates of the steps j + delay < s <= t) (delay: the steps a key spends in an exact window
    before it enters the state), padded steps counted as 0. One loop over the pairs, no cumulative
    sums: every weight a product of its own gates."""
    gates = log_decay.double()
    if key_padding_mask is not None:
        gates = gates.masked_fill(~key_padding_mask.bool()[:, None, :], 0.0)
    length = gates.shape[-1]
    weights = torch.zeros(*gates.shape[:2], length, length, dtype=torch.float64)
    for t in range(length):
        for j in range(t + 1):
            weights[..., t, j] = torch.exp(gates[..., j + delay + 1:t + 1].sum(-1))
    return weights


def naive_linear_attention(q, k, v, feature_weights, feature_map="softmax", key_padding_mask=None, causal=False,
                           log_decay=None):
    """The T x S matrix phi(q) phi(k)^T written out, in float64, with one global key constant.
    log_decay (causal only): [B, H_kv, T] log gates, each score weighed by `_decay_weights`."""
    fmap = resolve_feature_map(feature_map)
    q, k, v, feature_weights = q.double(), k.double(), v.double(), _double(feature_weights)
    head_dim = q.shape[-1]
    qs, ks = q * head_dim**-0.25, k * head_dim**-0.25
    if fmap.name == "softmax":
        logits_q = qs @ feature_weights.T
        phi_q = torch.exp(logits_q - logits_q.amax(-1, keepdim=True))
        r = ks @ feature_weights.T - ks.pow(2).sum(-1, keepdim=True) / 2
        valid = r if key_padding_mask is None else r.masked_fill(~key_padding_mask.bool()[:, None, :, None], float("-inf"))
        phi_k = torch.exp(r - valid.amax(dim=(-1, -2), keepdim=True))
    else:
        phi_q, phi_k = _naive_features(fmap, q, k, feature_weights)
    scores = phi_q @ repeat_key_heads(phi_k, q.shape[1]).transpose(-1, -2)
    mask = build_attention_mask(q.shape[2], k.shape[2], key_padding_mask, causal, device=q.device)
    if mask is not None:
        scores = scores * mask
    if log_decay is not None:
        if not causal:
            raise ValueError("a decay is defined for causal attention only")
        scores = scores * repeat_key_heads(_decay_weights(log_decay, key_padding_mask), q.shape[1])
    return scores @ repeat_key_heads(v, q.shape[1]) / scores.sum(-1, keepdim=True).clamp_min(1e-300)


def _double(feature_weights):
    """float64 copy of a feature_weights or of a Hedgehog (query, key) pair."""
    if isinstance(feature_weights, (tuple, list)):
        return tuple(p.double() for p in feature_weights)
    return feature_weights.double()


def _naive_features(fmap, q, k, feature_weights):
    """float64 phi(q), phi(k) of the uncalibrated maps (ReLU, Hedgehog), written out."""
    if fmap.name == "hedgehog":
        def phi(x, w):
            logits = torch.einsum("bhtd,hdf->bhtf", x, w)
            return torch.cat([torch.softmax(logits, -1), torch.softmax(-logits, -1)], dim=-1)
        width = feature_weights[0].shape[-1]
        phi_k = phi(k, feature_weights[1][..., :width])
        if feature_weights[1].shape[-1] == width + 1:  # each key's features scaled by exp(B tanh(k.u / B))
            scale = torch.einsum("bhtd,hd->bht", k, feature_weights[1][..., width])
            phi_k = phi_k * torch.exp(KEY_SCALE_BOUND * torch.tanh(scale / KEY_SCALE_BOUND))[..., None]
        return phi(q, feature_weights[0]), phi_k
    head_dim = q.shape[-1]
    qs, ks = q * head_dim**-0.25, k * head_dim**-0.25
    return torch.relu(qs @ feature_weights.T) + fmap.epsilon, torch.relu(ks @ feature_weights.T) + fmap.epsilon


def naive_windowed_attention(q, k, v, feature_weights, feature_map="softmax", window=64, linear_log_weight=None,
                             key_padding_mask=None, causal=False, sink_tokens=0, log_decay=None):
    """The combined window + linear formula (above `windowed_linear_attention`) with T x S matrices, in float64. FAVOR+
    features carry their exact constants, exp(W x' - |x'|^2 / 2) / sqrt(M). sink_tokens (non-causal): the first
    real keys of each row are exact for every query too, weighed like the window's (an uncalibrated map's linear
    part stays at the scale of the window's maximum score). log_decay (causal only): [B, H_kv, T] log gates of the
    linear part, which a key enters when it leaves the window (`_decay_weights` with a delay of the window)."""
    fmap = resolve_feature_map(feature_map)
    q, k, v, feature_weights = q.double(), k.double(), v.double(), _double(feature_weights)
    head_dim = q.shape[-1]
    heads = q.shape[1]
    scores = q @ repeat_key_heads(k, heads).transpose(-1, -2) / head_dim**0.5
    positions = torch.arange(q.shape[2], device=q.device)
    distance = positions[:, None] - positions[None, :]  # i - j
    in_window = (distance >= 0) & (distance < window) if causal else distance.abs() < window
    outside = distance >= window if causal else distance.abs() >= window
    real = (key_padding_mask.bool() if key_padding_mask is not None
            else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device))
    if causal and sink_tokens:
        raise ValueError("sink tokens are defined for non-causal attention only")
    sinks = torch.zeros(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
    for row in range(q.shape[0]):
        first = real[row].nonzero().flatten()[:sink_tokens]
        sinks[row, :, :, first] = True
    in_window, outside = in_window & real[:, None, None, :], outside & real[:, None, None, :] & ~sinks
    top = scores.masked_fill(~in_window, float("-inf")).amax(-1, keepdim=True)
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    exact = torch.exp(scores - top) * (in_window | sinks)
    if fmap.calibrated:
        qs, ks = q * head_dim**-0.25, k * head_dim**-0.25
        phi_q = torch.exp(qs @ feature_weights.T - qs.pow(2).sum(-1, keepdim=True) / 2) / feature_weights.shape[0] ** 0.5
        phi_k = torch.exp(ks @ feature_weights.T - ks.pow(2).sum(-1, keepdim=True) / 2) / feature_weights.shape[0] ** 0.5
        linear = (phi_q @ repeat_key_heads(phi_k, heads).transpose(-1, -2)) * torch.exp(-top)
    else:
        phi_q, phi_k = _naive_features(fmap, q, k, feature_weights)
        linear = phi_q @ repeat_key_heads(phi_k, heads).transpose(-1, -2)
    if linear_log_weight is not None:
        linear = linear * torch.exp(linear_log_weight.double()).view(1, -1, 1, 1)
    if log_decay is not None:
        if not causal:
            raise ValueError("a decay is defined for causal attention only")
        # key j enters the state at step j + W: only the gates of the steps after that weigh on it
        linear = linear * repeat_key_heads(_decay_weights(log_decay, key_padding_mask, delay=window), heads)
    weights = exact + linear * outside
    return weights @ repeat_key_heads(v, heads) / weights.sum(-1, keepdim=True).clamp_min(1e-300)


def _exact_features(fmap, q, k, feature_weights):
    """float64 phi(q), phi(k): FAVOR+ with its exact constants, the other maps as they are."""
    if not fmap.calibrated:
        return _naive_features(fmap, q, k, feature_weights)
    head_dim = q.shape[-1]

    def phi(x):
        xs = x * head_dim**-0.25
        return torch.exp(xs @ feature_weights.T - xs.pow(2).sum(-1, keepdim=True) / 2) / feature_weights.shape[0] ** 0.5
    return phi(q), phi(k)


def naive_sparse_windowed_attention(q, k, v, feature_weights, feature_map="softmax", window=64, cache_size=1,
                                    linear_log_weight=None, key_padding_mask=None):
    """Causal window + sparse cache + linear attention (above `SparseWindowState` in attention.py)
    token by token in float64, with explicit sets: a list of cached positions, a list of folded
    ones, every score and product written out. Uncalibrated maps' linear part is weighed against the
    window's maximum score, as without a cache."""
    fmap = resolve_feature_map(feature_map)
    q, k, v, feature_weights = q.double(), k.double(), v.double(), _double(feature_weights)
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    real = (key_padding_mask.bool() if key_padding_mask is not None
            else torch.ones(batch, length, dtype=torch.bool, device=q.device))
    phi_q, phi_k = _exact_features(fmap, q, k, feature_weights)
    weight = (torch.exp(linear_log_weight.double()) if linear_log_weight is not None
              else torch.ones(heads, dtype=torch.float64))
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(kv_heads):
            cache, folded, score = [], [], {}
            for t in range(length):
                leaving = t - window
                if leaving >= 0 and real[b, leaving]:
                    cache.append(leaving)
                    if len(cache) > cache_size:
                        lowest = min(cache, key=lambda j: (score[j], j))
                        cache.remove(lowest)
                        folded.append(lowest)
                if folded:
                    similarity = phi_k[b, h, folded] @ phi_k[b, h, t]
                    recalled = similarity @ v[b, h, folded] / similarity.sum()
                else:
                    recalled = torch.zeros_like(v[b, h, t])
                score[t] = float((v[b, h, t] - recalled).pow(2).sum().detach())
                in_window = [j for j in range(max(0, t - window + 1), t + 1) if real[b, j]]
                exact = in_window + cache
                for g in range(groups):
                    head = h * groups + g
                    logits = k[b, h, exact] @ q[b, head, t] / head_dim**0.5
                    top = logits.max() if exact else torch.zeros((), dtype=torch.float64)
                    exact_weights = torch.exp(logits - top)
                    linear = (phi_k[b, h, folded] @ phi_q[b, head, t]) * weight[head]
                    if fmap.calibrated:
                        linear = linear * torch.exp(-top)
                    elif in_window:  # weighed against the window's own maximum score
                        linear = linear * torch.exp(logits[:len(in_window)].max() - top)
                    numerator = exact_weights @ v[b, h, exact] + linear @ v[b, h, folded]
                    out[b, head, t] = numerator / (exact_weights.sum() + linear.sum()).clamp_min(1e-300)
    return out


def naive_softmax_attention(q, k, v, key_padding_mask=None, causal=False):
    """softmax(q k^T / sqrt(D)) v written out."""
    k, v = repeat_key_heads(k, q.shape[1]), repeat_key_heads(v, q.shape[1])
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = build_attention_mask(q.shape[2], k.shape[2], key_padding_mask, causal, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v
