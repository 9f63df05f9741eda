"""Diagnose the norm kernel on a GPU: tile variants (time, accuracy against float64, run-to-run
determinism), its stages, and a bare Triton GEMM with the same tiles as the ceiling.

    python benchmarks/diag_norm.py [--out diag_norm.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dora_fx.kernels import norm as norm_k  # noqa: E402
from dora_fx.kernels import reference  # noqa: E402

NC = norm_k.NormConfig
S = 2.0


@triton.jit
def _bare_gemm_kernel(w_ptr, a_ptr, u_ptr, d_out, d_in, r, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``U = W Aᵀ`` with nothing else: the ceiling for the norm kernel's main loop."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(r, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + offs_m[:, None].to(tl.int64) * d_in + offs_k[None, :]
    a_ptrs = a_ptr + offs_n[None, :] * d_in + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, tl.cdiv(d_in, BLOCK_K)):
        acc = tl.dot(tl.load(w_ptrs), tl.load(a_ptrs, mask=(offs_n < r)[None, :], other=0.0), acc)
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    tl.store(u_ptr + offs_m[:, None] * r + offs_n[None, :], acc, mask=(offs_n < r)[None, :])


def inputs(d, r, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(d, d, generator=gen, device="cuda").to(torch.bfloat16)
    a = (torch.randn(r, d, generator=gen, device="cuda") / d**0.5).to(torch.bfloat16)
    b = (torch.randn(d, r, generator=gen, device="cuda") * 0.1).to(torch.bfloat16)
    return w, a, b


def check_variants(d, r, configs):
    w, a, b = inputs(d, r)
    wd, ad, bd = w.double(), a.double(), b.double()
    exact = reference.weight_norm(wd, ad, bd, S, False)
    size = wd.square().sum(1) + S**2 * (bd @ ad).square().sum(1)
    rows = []
    for cfg in configs:
        row = dict(d=d, r=r, config=str(cfg))
        try:
            fn = lambda: norm_k.weight_norm(w, a, b, S, False, config=cfg)  # noqa: E731
            outs = [fn() for _ in range(3)]
            row["deterministic"] = all(torch.equal(outs[0], o) for o in outs[1:])
            row["max_err_sq"] = max(((o.double().square() - exact.square()).abs() / size).max().item() for o in outs)
            row["ms"] = do_bench(fn, return_mode="median")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def stages(d, r):
    w, a, b = inputs(d, r)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = dict(d=d, r=r)
    out["gram_partials_ms"] = do_bench(lambda: norm_k._gram_partials(a, False, sms, False, 20), return_mode="median")
    try:
        g = torch.mm(a, a.T, out_dtype=torch.float32)
        out["gram_mm_out_dtype_ms"] = do_bench(lambda: torch.mm(a, a.T, out_dtype=torch.float32), return_mode="median")
        out["gram_mm_err"] = ((g.double() - a.double() @ a.double().T).norm() / g.norm()).item()
    except Exception as exc:
        out["gram_mm_out_dtype"] = f"{type(exc).__name__}: {exc}"[:200]
    out["cublas_W_At_ms"] = do_bench(lambda: w @ a.T, return_mode="median")
    u = torch.empty(d, r, device="cuda")
    for bm, bn, bk, warps, stages_ in [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 64, 64, 4, 4)]:
        key = f"bare_triton_gemm_{bm}x{bn}x{bk}_w{warps}_s{stages_}_ms"
        grid = (triton.cdiv(d, bm) * triton.cdiv(r, bn),)
        try:
            out[key] = do_bench(
                lambda: _bare_gemm_kernel[grid](w, a, u, d, d, r, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages_),
                return_mode="median",
            )
        except Exception as exc:
            out[key] = f"{type(exc).__name__}: {exc}"[:200]
    print(json.dumps(out), flush=True)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="diag_norm.json")
    args = parser.parse_args()
    rows = check_variants(8192, 384, [
        None,
        NC(128, 128, 64, 8, 3, split_k=2),
        NC(128, 128, 64, 8, 3, split_k=2, squares_own_load=True),
        NC(128, 128, 64, 8, 3, split_k=2, round_robin_squares=False),
        NC(128, 128, 64, 8, 1, split_k=2),
        NC(128, 128, 64, 4, 3, split_k=2),
        NC(128, 128, 64, 8, 4, split_k=2),
        NC(128, 128, 64, 8, 3, split_k=1),
        NC(128, 256, 64, 8, 2, split_k=2),
        NC(64, 128, 64, 4, 4, split_k=1),
    ])
    rows += check_variants(8192, 16, [None, NC(128, 16, 128, 4, 4, split_k=8), NC(64, 16, 64, 4, 4, split_k=8), NC(256, 16, 64, 8, 3, split_k=8)])
    rows += check_variants(8192, 64, [None, NC(128, 64, 64, 4, 3, split_k=4), NC(128, 64, 128, 4, 3, split_k=8)])
    st = [stages(8192, 384), stages(8192, 16)]
    pathlib.Path(args.out).write_text(json.dumps(dict(variants=rows, stages=st), indent=1))


if __name__ == "__main__":
    main()
