#!/usr/bin/env python
"""CUDA checks: kernel equivalence on the GPU, mixed precision, cached generation, and speed /
peak memory of FAVOR+ against SDPA (forward+backward, B=1, H=8, D=64, M=256).

    python scripts/check_cuda.py [--lengths 4096 16384 65536]
"""

import argparse

import torch


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def correctness(device):
    from modeling_performer.attention import (
        causal_linear_attention,
        linear_attention,
        naive_linear_attention,
        recurrent_linear_attention,
    )
    from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix

    torch.manual_seed(0)
    w = gaussian_orthogonal_random_matrix(64, 32, torch.Generator().manual_seed(0)).to(device)
    q, k, v = [torch.randn(2, 4, 257, 32, device=device, requires_grad=True) for _ in range(3)]
    reference = naive_linear_attention(q, k, v, w, causal=True)
    chunked, _ = causal_linear_attention(q, k, v, w, chunk_size=64)
    state, steps = None, []
    for t in range(q.shape[2]):
        out, state = recurrent_linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], w, state=state)
        steps.append(out)
    print(f"cuda fp32 causal: chunked vs naive {relative_error(chunked, reference):.2e}, "
          f"recurrent vs naive {relative_error(torch.cat(steps, 2), reference):.2e}")
    grads = torch.autograd.grad(chunked.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    print("cuda grads chunked vs naive: " + ", ".join(f"{relative_error(a, b):.2e}" for a, b in zip(grads, ref_grads)))
    big = [(t / t.norm(dim=-1, keepdim=True) * 50).detach().requires_grad_() for t in (q, k)]
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            out, _ = causal_linear_attention(big[0], big[1], v, w)
            out2 = linear_attention(big[0], big[1], v, w)
        g = torch.autograd.grad((out.float().sum() + out2.float().sum()), big)
        finite = all(torch.isfinite(t).all().item() for t in (out, out2, *g))
        print(f"cuda {dtype} autocast, |q|=|k|=50: finite outputs and grads: {finite}")


def generation(device):
    from modeling_performer import PerformerConfig, PerformerForCausalLM

    config = PerformerConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, num_random_features=32, eos_token_id=None,
                             attention_type=["favor", "softmax"])
    model = PerformerForCausalLM(config).to(device).eval()
    ids = torch.randint(3, 99, (3, 9), device=device)
    for mode in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        a = model.generate(ids, max_new_tokens=12, use_cache=True, pad_token_id=0, **mode)
        b = model.generate(ids, max_new_tokens=12, use_cache=False, pad_token_id=0, **mode)
        print(f"cuda generate {mode}: cached == uncached: {torch.equal(a, b)}")


def timed(fn, repeats=5):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**20


def speed(device, lengths, dtype):
    from modeling_performer.attention import causal_linear_attention, linear_attention
    from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix

    w = gaussian_orthogonal_random_matrix(256, 64, torch.Generator().manual_seed(0)).to(device)
    print(f"\nforward+backward on {torch.cuda.get_device_name()} ({dtype}): median ms / peak MiB")
    print(f"{'T':>7} {'favor':>18} {'favor-causal':>18} {'sdpa':>18} {'sdpa-causal':>18}")
    for length in lengths:
        q, k, v = [torch.randn(1, 8, length, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        fns = {
            "favor": lambda: linear_attention(q, k, v, w).float().sum().backward(),
            "favor-causal": lambda: causal_linear_attention(q, k, v, w, chunk_size=128)[0].float().sum().backward(),
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).float().sum().backward(),
            "sdpa-causal": lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True).float().sum().backward(),
        }
        cells = []
        for fn in fns.values():
            ms, mib = timed(fn)
            cells.append(f"{ms:>9.2f} {mib:>7.0f}")
        print(f"{length:>7} " + " ".join(cells), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    device = torch.device("cuda")
    correctness(device)
    generation(device)
    speed(device, args.lengths, torch.float32)
    speed(device, args.lengths, torch.bfloat16)


if __name__ == "__main__":
    main()
