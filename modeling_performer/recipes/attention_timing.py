"""One attention method timed forward and backward in a process of its own (what
scripts/bench_attention.py and scripts/bench_approximation.py measure): median seconds and peak
extra resident memory."""

import json
import os
import subprocess
import statistics
import sys
import time

from . import ROOT
from .bench_common import MALLOC_ENV, status_kib

METHODS = ["favor", "favor-causal", "sdpa", "sdpa-causal", "performer-pytorch", "performer-pytorch-causal"]
# Learned maps and the exact local window (not in the default sweep; scripts/bench_approximation.py runs them).
LINEAR_METHODS = [f"{m}{w}{c}" for m in ("favor", "hedgehog") for w in ("", "-window") for c in ("", "-causal")]
# Decay-gated linear attention (causal only): the same kernels with a learned log gate per step and head.
LINEAR_METHODS += [f"{m}{w}-decay-causal" for m in ("favor", "hedgehog") for w in ("", "-window")]


def measure(method, length, repeats, heads=8, head_dim=64, num_features=256, chunk_size=128, window=64):
    """Runs inside the worker process; returns seconds (median) and peak extra bytes. Hedgehog
    uses F = D (M = 2D features per head)."""
    import torch

    torch.manual_seed(0)
    q, k, v = [torch.randn(1, heads, length, head_dim, requires_grad=True) for _ in range(3)]
    if method.startswith(("favor", "hedgehog")):
        from modeling_performer import attention as kernels
        from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init

        causal = method.endswith("-causal")
        if method.startswith("hedgehog"):
            fmap, w = "hedgehog", hedgehog_init(heads, head_dim, head_dim).requires_grad_()
        else:
            fmap, w = "softmax", gaussian_orthogonal_random_matrix(num_features, head_dim, torch.Generator().manual_seed(0))
        # a gate that trains (its gradient is part of the cost), rates up to 1/100 per step
        gates = (-0.01 * torch.rand(1, heads, length)).requires_grad_() if "-decay" in method else None
        if "-window" in method and causal:
            fn = lambda: kernels.causal_windowed_attention(q, k, v, w, fmap, window, chunk_size=chunk_size,  # noqa: E731
                                                           log_decay=gates)[0]
        elif "-window" in method:
            fn = lambda: kernels.windowed_linear_attention(q, k, v, w, fmap, window)  # noqa: E731
        elif causal:
            fn = lambda: kernels.causal_linear_attention(q, k, v, w, fmap, chunk_size=chunk_size,  # noqa: E731
                                                         log_decay=gates)[0]
        else:
            fn = lambda: kernels.linear_attention(q, k, v, w, fmap)  # noqa: E731
    elif method.startswith("sdpa"):
        causal = method.endswith("causal")
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    else:
        from performer_pytorch import FastAttention

        attention = FastAttention(dim_heads=head_dim, nb_features=num_features, causal=method.endswith("causal"))
        fn = lambda: attention(q, k, v)  # noqa: E731

    baseline = status_kib("VmRSS:")
    times = []
    for _ in range(repeats + 1):  # the first run is a warm-up
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        fn().sum().backward()
        times.append(time.perf_counter() - start)
    peak = (status_kib("VmHWM:") - baseline) * 1024
    return {"seconds": statistics.median(times[1:]), "peak_bytes": peak}


def run_worker(method, length, repeats, timeout, window=64):
    env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_attention.py"), "--worker", method, str(length), "--repeats", str(repeats), "--window", str(window)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout>{timeout}s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:60]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def performer_pytorch_available():
    try:
        import performer_pytorch  # noqa: F401
    except ImportError:
        return False
    return True
