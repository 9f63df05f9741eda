"""One PEFT DoRA Linear: PEFT eager vs PEFT + Inductor vs dora_fx, forward and forward + backward.

    python benchmarks/bench_layer.py [--quick] [--out benchmarks/results/layer.json]
    python benchmarks/bench_layer.py --device cpu          # smoke run: d=64, r=8, 32 tokens

Each cell builds a bias-free ``nn.Linear(d, d)`` wrapped in a tiny module, made a PEFT DoRA layer
(``use_dora=True``, ``lora_alpha = 2r``, dropout 0) with non-zero LoRA ``B``, cast to bf16. The contenders
share that module (``_common.contenders``): PEFT eager, ``torch.compile(backend="inductor")``,
``torch.compile(backend=dora_fx.dora_backend)`` with the norm recomputed every call, and the same
compiled model reusing its cached norm in eval (forward only). Inputs are ``[1, tokens, d]`` random
normals.

- forward: ``model.eval()`` under ``torch.no_grad()``; forward + backward: ``model.train()``, the
  input requires grad, ``out.backward(dy)`` with a fixed random ``dy``.
- time: median (see ``_common.median_ms``), after the compiling first call.
- memory: transient bytes of one call: the peak beyond what was allocated before it, less the output
  it returns (forward), or less nothing (forward + backward: the gradients it leaves are counted).
  Forward + backward also records ``saved_bytes``: the activations autograd keeps for the backward
  (``_common.saved_bytes``), printed as ``saved MiB``.
- error: relative error of the output (forward) or of output and every gradient, the largest
  (forward + backward), against PEFT eager in the same dtype; forward also against PEFT eager run in
  float32 on an upcast copy of the same weights.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import pathlib
import warnings

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch
from torch import nn

import dora_fx
from dora_fx.examples.models import dora_config, randomize_adapters

TARGETS = {  # (mode, d, r, tokens): (min speedup vs eager, min speedup vs inductor)
    ("fwd", 8192, 384, 4096): (1.8, 1.15),
    ("fwd", 8192, 384, 512): (3.5, 2.0),
    ("fwd+bwd", 8192, 384, 4096): (1.6, 1.2),
}
FWD_MEMORY_TARGET = 1 / 3  # dora_fx forward transient memory over PEFT + Inductor's, at most


class OneLinear(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build_layer(d: int, r: int, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A PEFT DoRA ``OneLinear`` built in float32 on ``device``, adapters randomised, cast to ``dtype``."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with torch.device(device):
        model = get_peft_model(OneLinear(d, d), dora_config(["proj"], r, dropout=0.0))
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1))
    return model.to(dtype)


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def forward_cell(model, fns, x, device, rep_ms) -> dict:
    model.eval()
    with torch.no_grad():
        reference = copy.deepcopy(model).float()(x.float())
        results, outputs = {}, {}
        for name, fn in fns.items():
            call = functools.partial(fn, x)
            outputs[name], first_s = C.timed_call(call, device)
            ms = C.median_ms(call, device, rep_ms)
            peak, transient = C.memory(call, device)
            results[name] = {"ms": ms, "first_call_s": first_s, "peak_bytes": peak, "transient_bytes": transient,
                             "err_vs_fp32": C.relative_error(outputs[name], reference)}
    for name, res in results.items():
        res["err_vs_eager"] = C.relative_error(outputs[name], outputs["eager"])
    return results


def train_cell(model, fns, x, dy, device, rep_ms) -> dict:
    model.train()
    x = x.detach().requires_grad_()
    params = trainable(model)
    results, observed = {}, {}
    for name, fn in fns.items():
        if name in C.FORWARD_ONLY:
            continue

        def step(fn=fn):
            fn(x).backward(dy)

        for t in [x, *params]:
            t.grad = None
        out, first_s = C.timed_call(functools.partial(fn, x), device)
        out.backward(dy)
        observed[name] = [out.detach(), x.grad, *(p.grad for p in params)]
        ms = C.median_ms(step, device, rep_ms, grad_to_none=[x, *params])
        for t in [x, *params]:
            t.grad = None
        peak, transient = C.memory(step, device)
        saved = C.saved_bytes(functools.partial(fn, x), exclude=[x, *model.parameters()])
        results[name] = {"ms": ms, "first_call_s": first_s, "peak_bytes": peak, "transient_bytes": transient,
                         "saved_bytes": saved}
    for name, res in results.items():
        res["err_vs_eager"] = max(C.relative_error(a, e) for a, e in zip(observed[name], observed["eager"]))
    return results


def run_cell(d: int, r: int, tokens: int, device: torch.device, dtype: torch.dtype, rep_ms: float) -> list[dict]:
    seed = d + 7 * r + 13 * tokens
    model = build_layer(d, r, device, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(1, tokens, d, generator=gen).to(device, dtype)
    dy = torch.randn(1, tokens, d, generator=gen).to(device, dtype)
    fns = C.contenders(model)
    dora_fx.reset_report()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        by_mode = {"fwd": forward_cell(model, fns, x, device, rep_ms),
                   "fwd+bwd": train_cell(model, fns, x, dy, device, rep_ms)}
    rewrites = len(dora_fx.last_report().rewrites)
    messages = sorted({str(w.message) for w in caught if "dora_fx" in str(w.message)})
    del model, fns, x, dy
    C.free(device)
    return [{"d": d, "r": r, "tokens": tokens, "mode": mode, "contenders": res, "dora_fx_rewrites": rewrites,
             "dora_fx_warnings": messages} for mode, res in by_mode.items()]


def speedups(cell: dict, contender: str = "dora_fx") -> tuple[float | None, float | None]:
    """``contender``'s speedups over PEFT eager and PEFT + Inductor (None where it was not run)."""
    res = cell["contenders"]
    if contender not in res:
        return None, None
    return res["eager"]["ms"] / res[contender]["ms"], res["inductor"]["ms"] / res[contender]["ms"]


def memory_ratio(cell: dict) -> float | None:
    """dora_fx's transient memory over PEFT + Inductor's (None off CUDA)."""
    res = cell["contenders"]
    mine, theirs = res["dora_fx"]["transient_bytes"], res["inductor"]["transient_bytes"]
    return None if mine is None or not theirs else mine / theirs


def print_table(cells: list[dict]) -> None:
    header = ["d", "r", "tokens", "mode", *(f"{n} ms" for n in C.CONTENDERS), "x eager", "x inductor",
              "cached x eager", "cached x inductor", *(f"{n} MiB" for n in C.CONTENDERS[:3]),
              *(f"{n} saved MiB" for n in C.CONTENDERS[:3]), "err inductor",
              "err dora_fx", "fp32err eager", "fp32err dora_fx", "rewrites"]
    rows = []
    for cell in cells:
        res = cell["contenders"]
        rows.append([
            cell["d"], cell["r"], cell["tokens"], cell["mode"],
            *(C.fmt(res[n]["ms"], ".3f") if n in res else None for n in C.CONTENDERS),
            *(C.fmt(v, ".2f") for v in speedups(cell) + speedups(cell, "dora_fx_cached")),
            *(C.fmt(C.mib(res[n]["transient_bytes"]), ".1f") for n in C.CONTENDERS[:3]),
            *(C.fmt(C.mib(res[n].get("saved_bytes")), ".1f") for n in C.CONTENDERS[:3]),
            C.fmt(res["inductor"]["err_vs_eager"], ".1e"), C.fmt(res["dora_fx"]["err_vs_eager"], ".1e"),
            C.fmt(res["eager"].get("err_vs_fp32"), ".1e"), C.fmt(res["dora_fx"].get("err_vs_fp32"), ".1e"),
            cell["dora_fx_rewrites"],
        ])
    print(C.table(header, rows))
    for cell in cells:
        for message in cell["dora_fx_warnings"]:
            print(f"warning (d={cell['d']} r={cell['r']} tokens={cell['tokens']}): {message}")


def print_targets(cells: list[dict]) -> None:
    index = {(c["mode"], c["d"], c["r"], c["tokens"]): c for c in cells}
    if not index.keys() & TARGETS.keys():
        print("targets are for d=8192, r=384, 512 and 4096 tokens: not measured")
        return
    print("targets (dora_fx):")
    for (mode, d, r, tokens), (min_eager, min_inductor) in TARGETS.items():
        cell = index.get((mode, d, r, tokens))
        vs_eager, vs_inductor = speedups(cell) if cell else (None, None)
        where = f"{mode} d={d} r={r} tokens={tokens}"
        print(C.target_line(f"{where} vs eager", vs_eager, min_eager))
        print(C.target_line(f"{where} vs inductor", vs_inductor, min_inductor))
        if mode == "fwd":
            vs_eager, vs_inductor = speedups(cell, "dora_fx_cached") if cell else (None, None)
            print(C.target_line(f"{where}, norm cached, vs eager", vs_eager, min_eager) + " (info)")
            print(C.target_line(f"{where}, norm cached, vs inductor", vs_inductor, min_inductor) + " (info)")
    for (mode, d, r, tokens), cell in index.items():
        if mode == "fwd" and (d, r) == (8192, 384):
            label = f"fwd transient memory / inductor's, d={d} r={r} tokens={tokens}"
            print(C.target_line(label, memory_ratio(cell), FWD_MEMORY_TARGET, at_least=False))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny smoke sizes)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--d", type=int, nargs="+", help="d_in = d_out, in this order (default 8192 4096; cpu: 64)")
    parser.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks, in this order (default 384 16; cpu: 8)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts (default 512 4096; cpu: 32)")
    parser.add_argument("--quick", action="store_true", help="only the target cells: d=8192, r=384")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="time spent repeating each measurement")
    parser.add_argument("--out", default="benchmarks/results/layer.json")
    parser.add_argument("--print-only", action="store_true", help="print the tables of the JSON at --out; run nothing")
    args = parser.parse_args(argv)
    cpu = args.device == "cpu"
    args.d = args.d or ([64] if cpu else [8192] if args.quick else [8192, 4096])
    args.ranks = args.ranks or ([8] if cpu else [384] if args.quick else [384, 16])
    args.tokens = args.tokens or ([32] if cpu else [512, 4096])
    return args


def print_report(payload: dict) -> None:
    config = payload["config"]
    print(f"\nPEFT DoRA Linear, {config['dtype']}, {payload['env'].get('gpu', config['device'])}, "
          f"{payload['env']['date']}; ms = median, MiB = transient, err = relative error vs PEFT eager")
    print_table(payload["cells"])
    print_targets(payload["cells"])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.print_only:
        print_report(json.loads(pathlib.Path(args.out).read_text()))
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    payload = {"env": C.environment(device), "config": {**vars(args), "bias": False, "dropout": 0.0,
                                                         "lora_alpha": "2r", "input_shape": "[1, tokens, d]"},
               "targets": [{"mode": m, "d": d, "r": r, "tokens": t, "vs_eager": e, "vs_inductor": i}
                           for (m, d, r, t), (e, i) in TARGETS.items()],
               "cells": []}
    for d in args.d:
        for r in args.ranks:
            for tokens in args.tokens:
                print(f"cell d={d} r={r} tokens={tokens}", flush=True)
                payload["cells"] += run_cell(d, r, tokens, device, dtype, args.rep_ms)
                C.write_json(args.out, payload)
    print(f"wrote {args.out}")
    print_report(payload)


if __name__ == "__main__":
    main()
