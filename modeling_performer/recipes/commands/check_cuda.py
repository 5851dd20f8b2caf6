"""CUDA checks: kernel equivalence on the GPU (FAVOR+, Hedgehog maps, the local window), mixed
precision, cached generation, and speed / peak memory against SDPA (forward+backward, B=1, H=8,
D=64, FAVOR+ M=256, Hedgehog F=64, window W=64).

    python scripts/check_cuda.py [--lengths 4096 16384 65536]
"""

import argparse

import torch


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def correctness(device):
    from modeling_performer.attention import causal_linear_attention, linear_attention, recurrent_linear_attention
    from modeling_performer.reference_attention import naive_linear_attention
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


def windowed(device):
    from modeling_performer.attention import (
        causal_windowed_attention,
        recurrent_windowed_attention,
        windowed_linear_attention,
    )
    from modeling_performer.reference_attention import naive_windowed_attention
    from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init

    torch.manual_seed(0)
    q, k, v = [torch.randn(2, 4, 97, 32, device=device) for _ in range(3)]
    mask = torch.ones(2, 97, dtype=torch.bool, device=device)
    mask[1, :9] = False
    weight = torch.randn(4, device=device) * 0.5
    for fmap in ("softmax", "hedgehog"):
        w = (hedgehog_init(4, 32, 16) + 0.3 * torch.randn(2, 4, 32, 16) if fmap == "hedgehog"
             else gaussian_orthogonal_random_matrix(64, 32, torch.Generator().manual_seed(0))).to(device)
        ref = naive_windowed_attention(q, k, v, w, fmap, 16, weight, mask, causal=False)
        out = windowed_linear_attention(q, k, v, w, fmap, 16, weight, mask)
        ref_c = naive_windowed_attention(q, k, v, w, fmap, 16, weight, mask, causal=True)
        chunked, _ = causal_windowed_attention(q, k, v, w, fmap, 16, weight, mask, chunk_size=32)
        state, steps = None, []
        for t in range(q.shape[2]):
            step, state = recurrent_windowed_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], w, fmap,
                                                       16, weight, mask[:, t:t + 1], state)
            steps.append(step)
        real = mask[:, None, :, None]
        print(f"cuda {fmap} + window 16: non-causal vs naive {relative_error(out, ref):.2e}, chunked vs naive "
              f"{relative_error(chunked * real, ref_c * real):.2e}, recurrent vs chunked "
              f"{relative_error(torch.cat(steps, 2) * real, chunked * real):.2e}")


def generation(device):
    from modeling_performer import PerformerConfig, PerformerForCausalLM

    config = PerformerConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, num_random_features=32, eos_token_id=None,
                             attention_type=["favor", "softmax"])
    ids = torch.randint(3, 99, (3, 9), device=device)
    for name, extra in (("favor/softmax hybrid", {}), ("hedgehog + window 4", dict(feature_map="hedgehog", local_window=4,
                                                                                    attention_type="favor"))):
        model = PerformerForCausalLM(PerformerConfig(**{**config.to_diff_dict(), **extra})).to(device).eval()
        for mode in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
            a = model.generate(ids, max_new_tokens=12, use_cache=True, pad_token_id=0, **mode)
            b = model.generate(ids, max_new_tokens=12, use_cache=False, pad_token_id=0, **mode)
            print(f"cuda generate {name} {mode}: cached == uncached: {torch.equal(a, b)}")


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
    from modeling_performer.attention import (
        causal_linear_attention,
        causal_windowed_attention,
        linear_attention,
        windowed_linear_attention,
    )
    from modeling_performer.feature_maps import gaussian_orthogonal_random_matrix, hedgehog_init

    w = gaussian_orthogonal_random_matrix(256, 64, torch.Generator().manual_seed(0)).to(device)
    hh = hedgehog_init(8, 64, 64).to(device).requires_grad_()
    names = ["favor", "favor-causal", "hh-causal", "hh-W64-causal", "hh", "hh-W64", "sdpa", "sdpa-causal"]
    print(f"\nforward+backward on {torch.cuda.get_device_name()} ({dtype}): median ms / peak MiB")
    print(f"{'T':>7} " + " ".join(f"{n:>18}" for n in names))
    for length in lengths:
        q, k, v = [torch.randn(1, 8, length, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        fns = {
            "favor": lambda: linear_attention(q, k, v, w).float().sum().backward(),
            "favor-causal": lambda: causal_linear_attention(q, k, v, w, chunk_size=128)[0].float().sum().backward(),
            "hh-causal": lambda: causal_linear_attention(q, k, v, hh, "hedgehog")[0].float().sum().backward(),
            "hh-W64-causal": lambda: causal_windowed_attention(q, k, v, hh, "hedgehog", 64)[0].float().sum().backward(),
            "hh": lambda: linear_attention(q, k, v, hh, "hedgehog").float().sum().backward(),
            "hh-W64": lambda: windowed_linear_attention(q, k, v, hh, "hedgehog", 64).float().sum().backward(),
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
    windowed(device)
    generation(device)
    speed(device, args.lengths, torch.float32)
    speed(device, args.lengths, torch.bfloat16)


if __name__ == "__main__":
    main()
