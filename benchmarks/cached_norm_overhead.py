"""CPU cost of one cache hit of ``dora_fx::cached_weight_norm`` (the eval path, issue #5).

    python benchmarks/cached_norm_overhead.py [--calls 20000]

Times the op's overload called on unchanged CPU tensors (every call after the first is a cache hit;
Inductor's generated code calls it the same way), the whole call of a graph that holds only this op
compiled by Inductor (adds Dynamo's guards and the compiled wrapper), and a bare ``tensor.clone()``
of the norm as the floor. Microseconds per call, median of 5 repeats, without grad.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import dora_fx  # noqa: E402,F401  registers torch.ops.dora_fx


def per_call_us(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    weight, lora_A, lora_B = (torch.randn(*s, generator=gen) for s in ((256, 128), (16, 128), (256, 16)))
    lora_A.requires_grad_(), lora_B.requires_grad_()  # trainable, as in a PEFT model in eval
    op = torch.ops.dora_fx.cached_weight_norm.default
    compiled = torch.compile(lambda w, a, b: op(w, a, b, 2.0, False), backend="inductor", fullgraph=True)
    with torch.no_grad():
        norm = op(weight, lora_A, lora_B, 2.0, False)
        rows = {
            "floor: norm.clone()": per_call_us(lambda: norm.clone(), args.calls),
            "cached_weight_norm.default, cache hit": per_call_us(lambda: op(weight, lora_A, lora_B, 2.0, False), args.calls),
            "compiled graph of that op (Inductor)": per_call_us(lambda: compiled(weight, lora_A, lora_B), args.calls),
        }
    for name, us in rows.items():
        print(f"{name:45s} {us:7.2f} us/call")


if __name__ == "__main__":
    main()
