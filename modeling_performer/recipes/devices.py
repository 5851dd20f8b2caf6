"""Where and in which precision the scripts compute: `--device` and `--bf16` / `--fp16` / `--fp32`.

The GPU is used when there is one; `--device cpu` keeps a run on the CPU. Precision `auto` means
bf16 autocast on a GPU that supports it and fp32 elsewhere; weights stay fp32 (autocast), the
linear-attention states accumulate in fp32 in every precision.
"""

from __future__ import annotations

import contextlib

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_device_arguments(parser, training: bool = False, checkpointing: bool = True):
    group = parser.add_argument_group("device and precision")
    group.add_argument("--device", default="auto",
                       help="auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N, mps, xpu")
    precision = group.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="precision", action="store_const", const="bf16",
                           help="bf16 autocast (the default on GPUs that support it)")
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16", help="fp16 autocast")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                           help="no autocast (the default on the CPU)")
    parser.set_defaults(precision="auto")
    if training:
        group.add_argument("--gradient-accumulation-steps", type=int, default=1,
                           help="micro-batches per optimizer step (the batch size is per device and micro-batch)")
    if training and checkpointing:
        group.add_argument("--gradient-checkpointing", action="store_true",
                           help="recompute layer activations in the backward pass: less memory, more time")
    return group


def resolve_device(name: str = "auto"):
    """A torch.device that exists on this machine; a clear error for one that does not."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a device name (auto, cpu, cuda, cuda:N, mps, xpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: this machine has no CUDA GPU (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {name}: MPS is not available here")
    elif device.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise SystemExit(f"--device {name}: no XPU is available here")
    elif device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise SystemExit(f"--device {name}: unsupported device type {device.type!r}")
    return device


def resolve_precision(precision: str, device) -> str:
    """'fp32', 'bf16' or 'fp16' for this device; auto = bf16 on GPUs that support it."""
    import torch

    if precision not in PRECISIONS:
        raise SystemExit(f"unknown precision {precision!r} (one of {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise SystemExit("--fp16 needs a GPU: CPU autocast computes in bf16 (use --bf16)")
    return precision


def autocast(device, precision: str):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup(args):
    """(device, precision) from parsed --device / --bf16 / --fp16 / --fp32; prints one line."""
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    print(f"computing on {device} in {precision}" + (" autocast" if precision != "fp32" else ""), flush=True)
    return device, precision
