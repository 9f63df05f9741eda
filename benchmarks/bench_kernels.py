"""Benchmark the dora_fx Triton kernels against PEFT's ops, Inductor and the hardware ceilings.

    python benchmarks/bench_kernels.py [--quick] [--norm-only] [--variants] [--out benchmarks/results/kernels.json]

Norm: PEFT's dense norm (``lora_B(lora_A(eye)).T``, then ``linalg.norm``), an eager factored norm in
plain torch, the dora_fx kernel (also with one cancelled row, which its dense fallback recomputes),
and a plain ``W @ A.T`` GEMM as the reference point; with the GPU kernels each call runs (profiler).
Compose: PEFT's eager ops, Inductor's fusion of those ops, and the dora_fx kernels; forward, and
forward + backward (gradients for result, lora and magnitude, as in training).

Times are medians of ``triton.testing.do_bench`` (L2 flushed between runs), so they include the
Python launch overhead whenever the CPU cannot keep ahead of the GPU; "graph ms" replays the same
call from a CUDA graph (device time alone). GB/s counts each input read once and each output written
once, against a device-to-device copy measured here; transient memory is the peak allocation
during the call beyond its inputs and the outputs it returns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import platform
import sys

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dora_fx.kernels import compose as compose_k  # noqa: E402
from dora_fx.kernels import norm as norm_k  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"
SCALING = 2.0


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def bench_graph(fn) -> float | None:
    """Median time of ``fn`` replayed from a CUDA graph: device time without Python launch overhead
    (no L2 flush between replays: meaningful where the inputs are several times the L2)."""
    try:
        return do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception:  # not capturable, or an older Triton
        return None


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    return 0


def transient_bytes(fn) -> int:
    """Peak allocation during ``fn()`` beyond what was allocated before and what it returns."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    transient = peak - before - _nbytes(out)
    del out
    return max(0, transient)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus bytes written, in GB/s (1 GiB buffers)."""
    src = torch.randn(2**28, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE)
    ms = bench(lambda: a @ b)
    return 2 * 8192**3 / ms / 1e9


# ------------------------------------------------------------------------------------------ norm


def peft_dense_norm(weight, lora_A, lora_B, scaling):
    """PEFT 0.21 ``DoraLinearLayer``: ``lora_B(lora_A(eye)).T`` then ``get_weight_norm``."""
    x_eye = torch.eye(lora_A.shape[1], device=lora_A.device, dtype=weight.dtype)
    lora_weight = F.linear(F.linear(x_eye, lora_A), lora_B).T
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)


def eager_factored_norm(weight, lora_A, lora_B, scaling):
    """The factored norm as plain torch ops: 16-bit GEMMs, float32 row terms."""
    u = (weight @ lora_A.T).float()
    gram = (lora_A @ lora_A.T).float()
    b = lora_B.float()
    w_sq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    squared = w_sq + 2 * scaling * (b * u).sum(1) + scaling**2 * (b * (b @ gram)).sum(1)
    return squared.clamp_min(0).sqrt()


def norm_inputs(d, r, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = torch.randn(d, d, generator=gen, device=DEVICE).to(DTYPE)
    lora_A = (torch.randn(r, d, generator=gen, device=DEVICE) / math.sqrt(d)).to(DTYPE)
    lora_B = (torch.randn(d, r, generator=gen, device=DEVICE) * 0.1).to(DTYPE)
    return weight, lora_A, lora_B


def kernel_launches(fn) -> list[str]:
    """Names of the GPU kernels (and memsets/copies) one call of ``fn`` runs, from the profiler."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def with_cancelled_row(weight, lora_A, lora_B, row=0):
    """``weight`` with one row replaced by ``-s·B_i·A`` rounded to bf16: the factored sum cancels there,
    so ``dora_fx`` recomputes that row's block densely (the cost of the cancellation fallback)."""
    weight = weight.clone()
    weight[row] = (-SCALING * (lora_B[row].float() @ lora_A.float())).to(weight.dtype)
    return weight


def bench_norm(d, r):
    weight, lora_A, lora_B = norm_inputs(d, r)
    cancelled = with_cancelled_row(weight, lora_A, lora_B)
    squares = weight.float().square().sum(1)  # ||W||² of a frozen W, kept between calls (norm_cache)
    fns = {
        "peft_dense": lambda: peft_dense_norm(weight, lora_A, lora_B, SCALING),
        "eager_factored": lambda: eager_factored_norm(weight, lora_A, lora_B, SCALING),
        "dora_fx": lambda: norm_k.weight_norm(weight, lora_A, lora_B, SCALING, False),
        "dora_fx_w2_kept": lambda: norm_k.weight_norm(weight, lora_A, lora_B, SCALING, False, squares),
        "dora_fx_1_cancel": lambda: norm_k.weight_norm(cancelled, lora_A, lora_B, SCALING, False),
        "gemm_W_At": lambda: weight @ lora_A.T,
    }
    ref = peft_dense_norm(weight.float(), lora_A.float(), lora_B.float(), SCALING)
    err = ((fns["dora_fx"]() - ref).norm() / ref.norm()).item()
    ref_cancelled = peft_dense_norm(cancelled.double(), lora_A.double(), lora_B.double(), SCALING)
    err_cancelled_row = (fns["dora_fx_1_cancel"]()[0].double() - ref_cancelled[0]).abs().item() / ref_cancelled[0].item()
    rows = []
    for name, fn in fns.items():
        ms = bench(fn)
        launches = kernel_launches(fn)
        rows.append(
            dict(
                op="norm", impl=name, d=d, r=r, ms=ms, graph_ms=bench_graph(fn), transient_mib=transient_bytes(fn) / 2**20,
                gbps=_nbytes((weight, lora_A, lora_B)) / ms / 1e6,
                tflops=2 * d * d * r / ms / 1e9,
                launches=len(launches), kernels=launches,
                rel_err_vs_fp32_dense=err if name == "dora_fx" else None,
                rel_err_cancelled_row_vs_fp64=err_cancelled_row if name == "dora_fx_1_cancel" else None,
            )
        )
    return rows


# --------------------------------------------------------------------------------------- compose


def peft_compose(result, lora, magnitude, norm, scaling):
    """PEFT's DoRA body after the norm (no bias: ``base_result = result``)."""
    mag_norm_scale = (magnitude / norm).view(1, -1)
    result_dora = (mag_norm_scale - 1) * result + (mag_norm_scale * lora) * scaling
    return result + result_dora


def compose_inputs(tokens, d, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    result = torch.randn(tokens, d, generator=gen, device=DEVICE).to(DTYPE)
    lora = torch.randn(tokens, d, generator=gen, device=DEVICE).to(DTYPE)
    magnitude = (torch.rand(d, generator=gen, device=DEVICE) + 0.5).to(DTYPE)
    norm = magnitude.float() * (1 + 0.05 * torch.randn(d, generator=gen, device=DEVICE))
    grad = torch.randn(tokens, d, generator=gen, device=DEVICE).to(DTYPE)
    return result, lora, magnitude, norm, grad


def bench_compose(tokens, d, with_inductor=True, ops_available=True):
    result, lora, magnitude, norm, grad = compose_inputs(tokens, d)
    tensor_bytes = tokens * d * result.element_size()
    rows = []

    def add(kind, impl, fn, n_tensors):
        ms = bench(fn)
        graph_ms = bench_graph(fn) if tokens * d >= 2**24 else None  # inputs well beyond L2 only
        rows.append(
            dict(op=f"compose_{kind}", impl=impl, d=d, tokens=tokens, elements=tokens * d, ms=ms, graph_ms=graph_ms,
                 gbps=n_tensors * tensor_bytes / ms / 1e6, transient_mib=transient_bytes(fn) / 2**20)
        )

    fwd = {
        "peft_eager": lambda: peft_compose(result, lora, magnitude, norm, SCALING),
        "dora_fx": lambda: compose_k.compose(result, None, None, lora, magnitude, norm, SCALING),
    }
    if with_inductor:
        # One function compiled for many shapes and grad modes would hit Dynamo's recompile limit (8)
        # and silently run eagerly: start from fresh caches for every shape.
        torch._dynamo.reset()
        compiled = torch.compile(peft_compose, dynamic=False)
        fwd["inductor"] = lambda: compiled(result, lora, magnitude, norm, SCALING)
    for impl, fn in fwd.items():
        add("fwd", impl, fn, 3)
    # the training forward: also writes adapted = base + s·lora for the backward (2 reads + 2 writes)
    add("fwd", "dora_fx_adapted", lambda: compose_k.compose_with_adapted(result, None, None, lora, magnitude, norm, SCALING), 4)

    r_ = result.detach().requires_grad_()
    l_ = lora.detach().requires_grad_()
    m_ = magnitude.detach().requires_grad_()

    def train_step(fwd_fn):
        def step():
            out = fwd_fn(r_, l_, m_)
            return torch.autograd.grad(out, (r_, l_, m_), grad)

        return step

    train = {"peft_eager": train_step(lambda r, l, m: peft_compose(r, l, m, norm, SCALING))}
    if with_inductor:
        compiled_train = torch.compile(peft_compose, dynamic=False)
        train["inductor"] = train_step(lambda r, l, m: compiled_train(r, l, m, norm, SCALING))
    if ops_available:
        train["dora_fx_op"] = train_step(
            lambda r, l, m: torch.ops.dora_fx.compose_with_adapted(r, None, None, l, m, norm, SCALING)[0])
    adapted = compose_k.compose_with_adapted(result, None, None, lora, magnitude, norm, SCALING)[1]
    backward_form = (SCALING, False, result.dtype, lora.dtype)

    def kernels_fwd_bwd():
        out, kept = compose_k.compose_with_adapted(result, None, None, lora, magnitude, norm, SCALING)
        return out, compose_k.compose_backward(grad, kept, magnitude, norm, *backward_form)

    train["dora_fx"] = kernels_fwd_bwd
    for impl, fn in train.items():
        add("fwd_bwd", impl, fn, 8)  # fwd: 2 reads + 2 writes (out, adapted); bwd: 2 reads + 2 writes
    add("bwd", "dora_fx", lambda: compose_k.compose_backward(grad, adapted, magnitude, norm, *backward_form), 4)

    ref = compose_k.compose(result, None, None, lora, magnitude, norm, SCALING)
    exp = peft_compose(result.float(), lora.float(), magnitude.float(), norm, SCALING)
    rows[-1]["rel_err_fwd_vs_fp32"] = ((ref.float() - exp).norm() / exp.norm()).item()
    return rows


def compose_variants(tokens, d, configs):
    result, lora, magnitude, norm, grad = compose_inputs(tokens, d)
    tensor_bytes = tokens * d * result.element_size()
    rows = []
    for cfg in configs:
        ms_f = bench(lambda: compose_k.compose(result, None, None, lora, magnitude, norm, SCALING, config=cfg))
        adapted = compose_k.compose_with_adapted(result, None, None, lora, magnitude, norm, SCALING)[1]
        backward_form = (SCALING, False, result.dtype, lora.dtype)
        ms_b = bench(lambda: compose_k.compose_backward(grad, adapted, magnitude, norm, *backward_form, config=cfg))
        rows.append(dict(op="compose_variant", d=d, tokens=tokens, config=str(cfg), fwd_ms=ms_f,
                         fwd_gbps=3 * tensor_bytes / ms_f / 1e6, bwd_ms=ms_b, bwd_gbps=4 * tensor_bytes / ms_b / 1e6))
    return rows


# ------------------------------------------------------------------------------------------ main


def _table(rows, copy_gbps):
    lines = []
    norm_rows = [r for r in rows if r["op"] == "norm"]
    if norm_rows:
        lines.append(
            f"{'norm d':>8} {'r':>4} {'impl':>16} {'ms':>8} {'graph ms':>8} {'TFLOP/s':>8} {'MiB':>8} {'launches':>8} {'x W@At':>7}"
        )
        gemm = {(r["d"], r["r"]): r["ms"] for r in norm_rows if r["impl"] == "gemm_W_At"}
        for r in norm_rows:
            graph = f"{r['graph_ms']:>8.4f}" if r["graph_ms"] is not None else f"{'-':>8}"
            lines.append(
                f"{r['d']:>8} {r['r']:>4} {r['impl']:>16} {r['ms']:>8.4f} {graph} {r['tflops']:>8.1f} {r['transient_mib']:>8.1f}"
                f" {r['launches']:>8} {r['ms'] / gemm[r['d'], r['r']]:>7.2f}"
            )
    comp = [r for r in rows if r["op"].startswith("compose_") and "impl" in r]
    if comp:
        lines.append(
            f"{'compose':>8} {'d':>6} {'tokens':>6} {'impl':>12} {'ms':>8} {'graph ms':>8} {'GB/s':>7} {'%copy':>6} {'MiB':>7}"
        )
        for r in comp:
            graph = f"{r['graph_ms']:>8.4f}" if r.get("graph_ms") is not None else f"{'-':>8}"
            lines.append(
                f"{r['op'][8:]:>8} {r['d']:>6} {r['tokens']:>6} {r['impl']:>12} {r['ms']:>8.4f} {graph} {r['gbps']:>7.0f} "
                f"{100 * r['gbps'] / copy_gbps:>6.1f} {r['transient_mib']:>7.1f}"
            )
    for r in rows:
        if r["op"] == "compose_variant":
            lines.append(json.dumps(r))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid: d=8192, r in {16, 384}, tokens 4096")
    parser.add_argument("--variants", action="store_true", help="also time alternative compose tile configs")
    parser.add_argument("--no-inductor", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--norm-only", action="store_true", help="only the norm rows (no compose)")
    parser.add_argument("--out", default="benchmarks/results/kernels.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    try:
        import dora_fx.ops  # noqa: F401

        ops_available = True
    except Exception as exc:  # the op layer is not needed for the kernel numbers
        print(f"dora_fx.ops unavailable ({exc}); skipping op-level rows", file=sys.stderr)
        ops_available = False

    ds = [8192] if args.quick else [4096, 8192, 14336]
    ranks = [16, 384] if args.quick else [16, 64, 384]
    token_counts = [4096] if args.quick else [512, 4096]
    env = dict(
        card=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), date=datetime.date.today().isoformat(), dtype=str(DTYPE),
    )
    env["copy_gbps"] = copy_bandwidth()
    env["bf16_gemm_tflops_8192"] = gemm_tflops()
    print(json.dumps(env), flush=True)

    rows = []
    for d in ds:
        for r in ranks:
            rows += bench_norm(d, r)
            print(json.dumps([row for row in rows[-5:] if row["impl"].startswith("dora_fx")]), flush=True)
    for d in ds if not args.norm_only else []:
        for tokens in token_counts:
            rows += bench_compose(tokens, d, with_inductor=not args.no_inductor, ops_available=ops_available)
    if args.variants and not args.norm_only:
        CC = compose_k.ComposeConfig
        rows += compose_variants(4096, 8192, [
            CC(16, 256, 4, 2), CC(16, 256, 4, 4), CC(16, 256, 4, 8), CC(16, 256, 4, 16), CC(32, 256, 8, 4), CC(8, 512, 4, 4),
        ])

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(env=env, rows=rows), indent=1))
    print(_table(rows, env["copy_gbps"]))
    print(json.dumps(env))


if __name__ == "__main__":
    main()
