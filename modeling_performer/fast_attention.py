"""The CUDA fast path of causal linear attention: flash-linear-attention's Triton kernels
(`pip install "modeling-performer[cuda]"`: fla-core, triton).

The causal sums of `attention.py` are a gated linear recurrence with one scalar log decay per
head and step. With r_t a key's logits and m_t the running maximum that stabilises FAVOR+,

    S_t = exp(m_{t-1} - m_t) S_{t-1} + exp(r_t - m_t) [v_t, 1]^T,     out_t = phi(q_t) . S_t,

which is fla's simple GLA with q = phi(q), k = exp(r - m), v = [v, 1], g_t = m_{t-1} - m_t <= 0
and scale 1: the normaliser comes back as the last output column, and the state is ours
(kvz [B, H, M, D + 1] at the scale exp(-m)), so a prefill on one path continues on the other.
Bounded maps (ReLU, Hedgehog) have no stabiliser and run without a decay, unless the layer learns
one (`linear_decay`): then g_t is that log gate, plus the stabiliser's change for FAVOR+. With a local window the
same kernel runs over the keys delayed by the window (`causal_windowed_attention`); the window's
exact part stays the PyTorch band. Decoding keeps the recurrent step.

`kernel_for(device)` says which path runs, once per process in the log: the fast one on a CUDA
device with fla importable, else the PyTorch kernels. `PerformerConfig(use_fast_kernels=False)`
forces the PyTorch path.
"""

import functools
import logging
from typing import Callable, Optional

import torch

from .attention_common import (
    LinearAttentionState,
    causal_sums,
    finite_stabiliser,
    head_mask,
    masked_key_features,
    repeat_key_heads,
    running_max,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "modeling-performer[cuda]" (fla-core and triton)'
_announced: set = set()


def _announce(key: str, level: int, message: str):
    if key not in _announced:
        _announced.add(key)
        logger.log(level, message)


@functools.lru_cache(maxsize=None)
def load_fla_kernel() -> Optional[Callable]:
    """fla's chunked simple-GLA kernel, or None when fla (or triton) cannot be imported. Asked once
    per process: every forward pass of a CUDA model asks, and a failed import is not cached by Python."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return chunk_simple_gla


def kernel_for(device: torch.device) -> Optional[Callable]:
    """The kernel causal linear attention runs on for tensors on `device`: fla's chunked kernel on
    CUDA when it imports, else None (the PyTorch kernels). Logs which, once per process."""
    if device.type != "cuda":
        _announce("cpu", logging.INFO, f"linear attention: PyTorch kernels on {device.type} (the Triton fast path "
                                       "needs a CUDA device)")
        return None
    kernel = load_fla_kernel()
    if kernel is None:
        _announce("missing", logging.WARNING, "linear attention: PyTorch kernels on CUDA; for the fast Triton path "
                                              f"(flash-linear-attention) run: {INSTALL_HINT}")
        return None
    _announce("fast", logging.INFO, "linear attention: flash-linear-attention Triton kernels (training and prefill)")
    return kernel


def causal_sums_on(kernel, fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state, chunk_size,
                   kernel_dtype=None, log_decay=None):
    """`attention_common.causal_sums` on `kernel` (a simple-GLA kernel in fla's signature, computing in
    kernel_dtype: `gla_causal_terms`), or on the PyTorch path where kernel is None. Same results."""
    if kernel is None:
        return causal_sums(fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state, chunk_size,
                           log_decay=log_decay)
    return gla_causal_terms(kernel, fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state,
                            kernel_dtype, log_decay=log_decay)


def gla_causal_terms(kernel, fmap, phi_q, logits, offset, token_max, v1, key_padding_mask, state, dtype=None,
                     log_decay=None):
    """`attention_common.causal_sums` on a simple-GLA kernel (fla's signature: q, k, v [B, T, H, X],
    g [B, T, H] or None, scale, initial_state [B, H, K, V], output_final_state). Same arguments and
    results: (sum_{j <= t} phi(q_t) phi(k_j) [v_j, 1] [B, H, T, D + 1] at scale exp(-stabiliser_t),
    stabiliser_t [B, H, T] (finite), the state after the last token). dtype: what the kernel
    computes in (the attention input's: bf16 under bf16 training); states stay fp32. log_decay:
    [B, H_kv, T] the learned log gates of decay-gated attention (padded steps 0), added to the
    stabiliser's decay: the kernel's g is their sum."""
    batch, heads, length, _ = phi_q.shape
    kv_heads = logits.shape[1]
    groups = heads // kv_heads
    # Running maximum after each token, the incoming state's first. Before the first real key
    # nothing has been summed, so any level serves there: the first finite one keeps every decay <= 0.
    running = running_max(torch.cat([state.stabiliser.unsqueeze(-1), token_max], dim=-1))
    first = running.masked_fill(torch.isinf(running), float("inf")).amin(dim=-1, keepdim=True)
    level = torch.where(torch.isinf(running), finite_stabiliser(first), running)  # [B, H_kv, T + 1]
    keep = None if key_padding_mask is None else head_mask(key_padding_mask)[..., None]
    phi_k = masked_key_features(fmap, logits, (offset + level[..., 1:]).unsqueeze(-1), keep)
    decay = None
    if fmap.calibrated:
        decay = level[..., :-1] - level[..., 1:]
    if log_decay is not None:
        decay = log_decay if decay is None else decay + log_decay
    if decay is not None:
        decay = repeat_key_heads(decay, heads).transpose(1, 2).float()  # [B, T, H]
    dtype = dtype or torch.float32

    def laid_out(x):  # [B, H, T, X] -> [B, T, H, X] in the kernel's dtype
        return x.transpose(1, 2).to(dtype)

    out, final = kernel(q=laid_out(phi_q), k=laid_out(repeat_key_heads(phi_k, heads)),
                        v=laid_out(repeat_key_heads(v1, heads)), g=decay, scale=1.0,
                        initial_state=repeat_key_heads(state.kvz, heads).float(), output_final_state=True)
    out = out.transpose(1, 2).float()
    per_token = repeat_key_heads(level[..., 1:], heads)
    # Every query head of a group carried the same state: keep one per key/value head.
    kvz = final.float()[:, ::groups]
    return out, per_token, LinearAttentionState(kvz, running[..., -1])
