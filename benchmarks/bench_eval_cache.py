"""Eval forward of one DoRA Linear with the norm reused, against the same layer as plain LoRA.

    python benchmarks/bench_eval_cache.py [--d 8192] [--r 384] [--tokens 512] [--out results/eval_cache.json]

Issue target: dora_fx's eval forward (no_grad, weights unchanged, so the norm is reused) within 1.15x
of the same layer compiled as plain LoRA (``use_dora=False``), both through Inductor, side by side.
PEFT's DoRA eager and compiled by plain Inductor are shown for reference.
"""

from __future__ import annotations

import argparse
import pathlib

import torch

import _common as C

import dora_fx

TARGET = 1.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d", type=int, default=8192)
    parser.add_argument("--r", type=int, default=384)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rep-ms", type=float, default=200.0)
    parser.add_argument("--out", type=pathlib.Path, default=C.REPO / "benchmarks/results/eval_cache.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    x = torch.randn(1, args.tokens, args.d, device=device, dtype=torch.bfloat16)
    dora, lora = C.peft_linears(1, args.d, args.r, True, "cuda"), C.peft_linears(1, args.d, args.r, False, "cuda")
    contenders = {
        "dora eager": dora,
        "dora + inductor": torch.compile(dora, backend="inductor"),
        "dora + dora_fx (norm reused)": torch.compile(dora, backend=dora_fx.dora_backend),
        "plain lora + inductor": torch.compile(lora, backend="inductor"),
    }
    rows = {}
    with torch.no_grad():
        for name, fn in contenders.items():
            fn(x)
            rows[name] = C.median_ms(lambda fn=fn: fn(x), device, args.rep_ms)
    ratio = rows["dora + dora_fx (norm reused)"] / rows["plain lora + inductor"]
    print(f"eval forward, d={args.d} r={args.r} tokens={args.tokens}, bf16, {torch.cuda.get_device_name()}")
    for name, ms in rows.items():
        print(f"  {name:30} {ms:8.3f} ms")
    print(f"dora_fx / plain LoRA: {ratio:.3f}x, target <= {TARGET}x: {'met' if ratio <= TARGET else 'MISSED'}")
    C.write_json(args.out, {"env": C.environment(device), "config": vars(args) | {"out": str(args.out)},
                            "ms": rows, "ratio": ratio, "target": TARGET})


if __name__ == "__main__":
    main()
