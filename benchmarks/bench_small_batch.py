"""Small-batch eval, where the per-call cost sets the time: two DoRA layers, d = 4096, r = 64, 8 tokens,
under no_grad, with and without Inductor's CUDA graphs (``mode="reduce-overhead"``).

    python benchmarks/bench_small_batch.py [--d 4096] [--r 64] [--tokens 8] [--out results/small_batch.json]

Contenders: plain LoRA + Inductor, PEFT DoRA + Inductor and dora_fx, each compiled with and without
CUDA graphs; PEFT DoRA eager for reference. Each compiled DoRA contender is also checked after an
in-place update of ``lora_B`` between two calls (a replay must see it): its output against eager PEFT's
on the updated weights. Issue #14's target: dora_fx with CUDA graphs <= 1.3x plain LoRA's with CUDA graphs.
"""

from __future__ import annotations

import argparse
import pathlib

import torch
from torch import nn

import _common as C

import dora_fx  # noqa: F401  (registers the "dora" backend)

TARGET = 1.3


def _after_update_error(fn, model: nn.Module, x: torch.Tensor) -> float:
    """Relative error of ``fn(x)`` against eager ``model(x)`` after ``lora_B`` of the first layer moved."""
    lora_B = next(p for n, p in model.named_parameters() if "lora_B" in n)
    saved = lora_B.detach().clone()
    fn(x)
    lora_B.add_(0.05 * saved.abs().max())
    got = fn(x).clone()
    error = C.relative_error(got.float(), model(x).float())
    lora_B.copy_(saved)
    return error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--rep-ms", type=float, default=200.0)
    parser.add_argument("--out", type=pathlib.Path, default=C.REPO / "benchmarks/results/small_batch.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    x = torch.randn(1, args.tokens, args.d, device=device, dtype=torch.bfloat16)
    dora, lora = C.peft_linears(2, args.d, args.r, True, "cuda"), C.peft_linears(2, args.d, args.r, False, "cuda")
    contenders = {"PEFT DoRA eager": (dora, False)}
    for mode in ("reduce-overhead", "default"):
        graphs = " + CUDA graphs" if mode == "reduce-overhead" else ""
        contenders[f"plain LoRA + Inductor{graphs}"] = (torch.compile(lora, backend="inductor", mode=mode), False)
        contenders[f"PEFT DoRA + Inductor{graphs}"] = (torch.compile(dora, backend="inductor", mode=mode), True)
        contenders[f"dora_fx{graphs}"] = (torch.compile(dora, backend="dora", mode=mode), True)
    rows = []
    with torch.no_grad():
        for name, (fn, check) in contenders.items():
            row = {"contender": name}
            try:
                for _ in range(3):  # CUDA graph trees record on the third call
                    fn(x)
                row["ms"] = C.median_ms(lambda fn=fn: fn(x), device, args.rep_ms)
                if check:
                    row["rel_err_after_update"] = _after_update_error(fn, dora, x)
            except Exception as exc:  # a contender that fails is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(f"  {name:36} {row.get('ms', float('nan')):8.4f} ms  "
                  f"{row.get('rel_err_after_update', '')!s:>24} {row.get('error', '')}", flush=True)
    by_name = {row["contender"]: row for row in rows}
    ours, floor = by_name["dora_fx + CUDA graphs"].get("ms"), by_name["plain LoRA + Inductor + CUDA graphs"].get("ms")
    ratio = ours / floor if ours and floor else None
    print(f"small-batch eval, 2 layers, d={args.d} r={args.r} tokens={args.tokens}, bf16, {torch.cuda.get_device_name()}")
    print(C.target_line("dora_fx / plain LoRA, both with CUDA graphs", ratio, TARGET, at_least=False))
    C.write_json(args.out, {"env": C.environment(device), "config": vars(args) | {"out": str(args.out)},
                            "rows": rows, "ratio": ratio, "target": TARGET})


if __name__ == "__main__":
    main()
