"""Where the time of one PEFT DoRA Linear goes, and how accurate each gradient is.

    python benchmarks/profile_layer.py [--d 8192] [--r 384] [--tokens 512] [--out DIR]

Prints the profiler's per-op table (CPU and CUDA time) of a few forward + backward steps for PEFT +
Inductor and for dora_fx, and each gradient's relative error against a float64 copy of the same bf16
layer, for eager PEFT, PEFT + Inductor and dora_fx.
"""

from __future__ import annotations

import argparse
import copy
import pathlib

import torch

import _common as C  # noqa: F401  (puts the checkout on sys.path)

import dora_fx
from dora_fx import norm_cache
from dora_fx.examples.models import dora_config, randomize_adapters


def _layer(d: int, r: int, dtype: torch.dtype, device: str):
    from peft import get_peft_model

    base = torch.nn.Sequential(torch.nn.Linear(d, d, bias=False))
    model = get_peft_model(base, dora_config(["0"], r, 0.0))
    randomize_adapters(model, torch.Generator().manual_seed(0))
    return model.to(device=device, dtype=dtype)


def _step(model, x, dy):
    x = x.detach().requires_grad_()
    out = model(x)
    out.backward(dy)
    grads = {"x": x.grad} | {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return {k.removeprefix("_orig_mod."): v.detach().clone() for k, v in grads.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d", type=int, default=8192)
    parser.add_argument("--r", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--errors-only", action="store_true", help="skip the profiles")
    args = parser.parse_args()
    device = "cuda"
    model = _layer(args.d, args.r, torch.bfloat16, device).train()
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(1, args.tokens, args.d, device=device, generator=gen, dtype=torch.bfloat16)
    dy = torch.randn(1, args.tokens, args.d, device=device, generator=gen, dtype=torch.bfloat16)

    reference = copy.deepcopy(model).double()
    ref = _step(reference, x.double(), dy.double())
    del reference
    contenders = {
        "eager": model,
        "inductor": torch.compile(model, backend="inductor"),
        "dora_fx": torch.compile(model, backend=dora_fx.dora_backend),
    }
    print(f"relative error of each gradient against float64, d={args.d} r={args.r} tokens={args.tokens}")
    for name, fn in contenders.items():
        model.zero_grad(set_to_none=True)
        grads = _step(fn, x, dy)
        errors = {k: ((g.double() - ref[k]).norm() / ref[k].norm()).item() for k, g in grads.items()}
        print(f"  {name:9}", "  ".join(f"{k.split('.')[-3] if '.' in k else k}={e:.2e}" for k, e in errors.items()))

    for name in () if args.errors_only else ("inductor", "dora_fx"):
        fn = contenders[name]
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            norm_cache.clear()
            _step(fn, x, dy)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model.zero_grad(set_to_none=True)
                norm_cache.clear()
                _step(fn, x, dy)
            torch.cuda.synchronize()
        print(f"\n{name}: 5 forward + backward steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.out / f"trace_{name}.json"))


if __name__ == "__main__":
    main()
