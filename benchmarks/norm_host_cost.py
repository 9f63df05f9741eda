"""Where the time of a recomputed norm goes on the host: CPU microseconds per call of each piece of the
norm over the seven projection shapes of a Llama-3-8B layer (r = 384, bf16), against its GPU time.
With ``--zero-magnitude``, the same for the ``m = 0`` gradient that the training backward calls per
layer (``dora_fx::zero_magnitude_grad`` at ``--tokens`` tokens, no ``m = 0``): the op as Inductor's
code calls it, its entry point without the op dispatch, and the kernel launcher alone.

Host time is measured with the GPU kept busy (``torch.cuda._sleep`` first), so that the calls only
enqueue work and the clock sees the host's own cost; GPU time is the CUDA-event time of the same calls
after a synchronisation. Prints a table and writes JSON (``--out``). CUDA only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

import dora_fx  # noqa: E402,F401  (registers the ops)
from dora_fx.kernels import dispatch, reference  # noqa: E402

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
          "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}


def host_us(fn, calls: int) -> float:
    """Host microseconds per call of ``fn`` while the GPU is busy with an earlier sleep kernel."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second on an H200: the calls below only enqueue
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def gpu_us(fn, calls: int) -> float:
    fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / calls * 1e3


def layer_tensors(r: int, dtype: torch.dtype) -> list[tuple]:
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for d_out, d_in in SHAPES.values():
        w = torch.randn(d_out, d_in, device="cuda", dtype=dtype, generator=g) * 0.02
        a = torch.randn(r, d_in, device="cuda", dtype=dtype, generator=g) * 0.02
        b = torch.randn(d_out, r, device="cuda", dtype=dtype, generator=g) * 0.02
        sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).square()
        out.append((w, a, b, sq))
    return out


def zero_magnitude_rows(layer: list[tuple], tokens: int, s: float, calls: int) -> list[dict]:
    """Host and GPU time per layer of the three ways into the ``m = 0`` gradient's kernel."""
    from dora_fx.kernels import compose

    g = torch.Generator(device="cuda").manual_seed(1)
    inputs = []
    for w, a, b, _ in layer:
        d_out, d_in = w.shape
        grad_out = torch.randn(tokens, d_out, device="cuda", dtype=w.dtype, generator=g)
        x = torch.randn(tokens, d_in, device="cuda", dtype=w.dtype, generator=g)
        magnitude = torch.rand(d_out, device="cuda", dtype=w.dtype, generator=g) + 0.5
        norm = torch.rand(d_out, device="cuda", dtype=torch.float32, generator=g) + 0.5
        inputs.append((torch.zeros_like(norm), grad_out, x, w, a, b, s, magnitude, norm, False))
    ways = {
        "zero_magnitude_grad op": torch.ops.dora_fx.zero_magnitude_grad,
        "its entry point (no op dispatch)": dispatch.zero_magnitude_grad,
        "its launcher (no fallback wrapper)": compose.zero_magnitude_grad,
    }
    rows = []
    for name, way in ways.items():
        fn = lambda way=way: [way(*i) for i in inputs]  # noqa: E731
        rows.append({"piece": name, "tokens": tokens, "host_us_per_layer": host_us(fn, calls),
                     "gpu_us_per_layer": gpu_us(fn, calls)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--calls", type=int, default=4,
                        help="calls per measurement (few: the launches must fit in CUDA's queue)")
    parser.add_argument("--kernels", action="store_true", help="also print the GPU kernels of the GEMM-path norm")
    parser.add_argument("--cprofile", action="store_true", help="also print the host profile of the GEMM-path norm")
    parser.add_argument("--zero-magnitude", action="store_true", help="also time the m = 0 gradient's call")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the m = 0 gradient's inputs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    layer = layer_tensors(args.rank, torch.bfloat16)
    s = 2.0

    def over_layer(piece):
        return lambda: [piece(w, a, b, sq) for w, a, b, sq in layer]

    pieces = {
        "mm bf16 W·Aᵀ": lambda w, a, b, sq: w @ a.T,
        "mm.dtype W·Aᵀ (fp32 out)": lambda w, a, b, sq: reference.matmul_float32(w, a.T),
        "GEMM-path norm (W² given)": lambda w, a, b, sq: dispatch.weight_norm(w, a, b, s, False, sq),
        "cached_weight_norm op, hit": lambda w, a, b, sq: torch.ops.dora_fx.cached_weight_norm(w, a, b, s, False),
    }
    rows = []
    for name, piece in pieces.items():
        fn = over_layer(piece)
        rows.append({"piece": name, "host_us_per_layer": host_us(fn, args.calls),
                     "gpu_us_per_layer": gpu_us(fn, args.calls)})

    if args.zero_magnitude:
        rows += zero_magnitude_rows(layer, args.tokens, s, args.calls)

    if args.cprofile:
        import cProfile
        import pstats

        fn = over_layer(pieces["GEMM-path norm (W² given)"])
        torch.cuda._sleep(2_000_000_000)
        with cProfile.Profile() as profile:
            for _ in range(args.calls):
                fn()
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("tottime").print_stats(18)

    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        name = "GEMM-path norm (W² given)"
        fn = over_layer(pieces[name])
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
        print(f"GPU kernels of {name}, {args.calls} calls over the 7 shapes:")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))

    def refresh(ws, as_, bs, sqs):
        return [reference.weight_norm(w, a, b, s, False, sq) for w, a, b, sq in zip(ws, as_, bs, sqs)]

    compiled = torch.compile(refresh, backend="inductor", fullgraph=True)
    lists = [list(t) for t in zip(*layer)]
    fn = lambda: compiled(*lists)  # noqa: E731
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    rows.append({"piece": "compiled reference norm, 7 at once", "host_us_per_layer": host_us(fn, args.calls),
                 "gpu_us_per_layer": gpu_us(fn, args.calls), "compile_s": time.perf_counter() - start})
    print(f"host and GPU microseconds per layer (7 projections, r={args.rank}, bf16), {torch.cuda.get_device_name()}")
    print(f"{'piece':>38} {'host us':>9} {'GPU us':>9}")
    for row in rows:
        print(f"{row['piece']:>38} {row['host_us_per_layer']:9.1f} {row['gpu_us_per_layer']:9.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**C.environment(torch.device("cuda")), "rank": args.rank, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
