"""The factored norm's Gram matrix ``G = A·Aᵀ`` (``[r, r]``, float32 sums of bf16 products): one cuBLAS
GEMM against split-K forms, at the Llama-3-8B projections' ``d_in`` and r = 384.

    python benchmarks/bench_gram.py [--rank 384] [--out gram.json]

An ``[r, r]`` output is few tiles for a GPU of 132 multiprocessors (9 of 128 x 128 at r = 384), so one
GEMM over ``d_in`` leaves most of it idle. The split-K form views ``A [r, d_in]`` as ``c`` chunks of
``d_in / c`` columns, ``[c, r, d_in / c]`` without a copy, takes one batched GEMM (``bmm`` with float32
output) and sums the ``c`` partial Grams. Each form is timed in a CUDA graph (GPU time only, no launch
gaps), and its result compared with the float64 Gram. Also timed for scale: the whole factored norm
of one projection (``dora_fx.kernels.norm.weight_norm``, ``||W||²`` given) and its ``U = W·Aᵀ``.
"""

from __future__ import annotations

import argparse
import pathlib

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch
from triton.testing import do_bench_cudagraph

from dora_fx.kernels import norm as norm_kernels

# (name, d_out, d_in) of a Llama-3-8B layer's projections.
PROJECTIONS = (("q/o", 4096, 4096), ("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336))


def gram_split_k(lora_A: torch.Tensor, chunks: int) -> torch.Tensor:
    r, d_in = lora_A.shape
    parts = lora_A.view(r, chunks, d_in // chunks).transpose(0, 1)
    return torch.ops.aten.bmm.dtype(parts, parts.transpose(1, 2), torch.float32).sum(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, d_out, d_in in PROJECTIONS:
        lora_A = (torch.randn(args.rank, d_in, device=device, generator=gen) / d_in**0.5).to(torch.bfloat16)
        lora_B = (torch.randn(d_out, args.rank, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        weight = (torch.randn(d_out, d_in, device=device, generator=gen) / d_in**0.5).to(torch.bfloat16)
        exact = lora_A.double() @ lora_A.double().T
        forms = {"mm.dtype": lambda: torch.ops.aten.mm.dtype(lora_A, lora_A.T, torch.float32)}
        for chunks in (2, 4, 8, 16, 32):
            forms[f"split-K {chunks}"] = lambda chunks=chunks: gram_split_k(lora_A, chunks)
        squares = weight.float().square().sum(1)
        forms["(U = W·Aᵀ)"] = lambda: torch.ops.aten.mm.dtype(weight, lora_A.T, torch.float32)
        forms["(whole norm)"] = lambda: norm_kernels.weight_norm(weight, lora_A, lora_B, 2.0, False, squares)
        for form, fn in forms.items():
            error = None
            if not form.startswith("("):
                error = ((fn().double() - exact).norm() / exact.norm()).item()
            rows.append({"projection": name, "d_out": d_out, "d_in": d_in, "r": args.rank, "form": form,
                         "us": do_bench_cudagraph(fn, rep=50) * 1e3, "relative_error": error})
    print(f"G = A·Aᵀ, r = {args.rank}, bf16 in, float32 out; GPU time in a CUDA graph")
    print(C.table(["projection", "form", "us", "rel. error"],
                  [[r["projection"], r["form"], C.fmt(r["us"], ".1f"), C.fmt(r["relative_error"], ".1e")] for r in rows]))
    if args.out:
        C.write_json(args.out, {"env": C.environment(device), "rows": rows})


if __name__ == "__main__":
    main()
