"""The factored norm of one projection (``dora_fx.kernels.norm.weight_norm``, ``||W||²`` given) at the
Llama-3-8B projections' shapes, against other revisions' norm modules on the same tensors.

    python benchmarks/bench_norm.py [--rank 384] [--compare OTHER.py ...] [--out norm.json]

``--compare`` takes copies of ``dora_fx/kernels/norm.py`` from other revisions
(``git show REV:dora_fx/kernels/norm.py > OTHER.py``), each imported as a module of its own. Each form is timed in a CUDA graph (GPU time, no launch gaps). ``layer`` adds the seven
projections of one decoder layer (q, k, v, o, gate, up, down). Errors are the largest relative error of
the squared norm against a float64 evaluation, over ``||W_i||² + s²||(BA)_i||²``.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch
from triton.testing import do_bench_cudagraph

from dora_fx.kernels import norm as norm_kernels

# (name, d_out, d_in, projections of that shape in a layer)
PROJECTIONS = (("q/o", 4096, 4096, 2), ("k/v", 1024, 4096, 2), ("gate/up", 14336, 4096, 2), ("down", 4096, 14336, 1))


def load_module(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(f"norm_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def relative_error(got, weight, lora_A, lora_B, scaling) -> float:
    w, a, b = weight.double(), lora_A.double(), lora_B.double()
    exact = (w + scaling * b @ a).square().sum(1)
    size = w.square().sum(1) + scaling**2 * (b @ a).square().sum(1)
    return ((got.double().square() - exact).abs() / size).max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=384)
    parser.add_argument("--compare", type=pathlib.Path, nargs="*", default=[],
                        help="other revisions' dora_fx/kernels/norm.py")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    forms = {"this checkout": norm_kernels} | {path.name: load_module(path) for path in args.compare}
    scaling = 2.0
    rows = []
    for name, d_out, d_in, count in PROJECTIONS:
        weight = (torch.randn(d_out, d_in, device=device, generator=gen) / d_in**0.5).to(torch.bfloat16)
        lora_A = (torch.randn(args.rank, d_in, device=device, generator=gen) / d_in**0.5).to(torch.bfloat16)
        lora_B = (torch.randn(d_out, args.rank, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        squares = weight.float().square().sum(1)
        for form, module in forms.items():

            def fn(module=module):
                return module.weight_norm(weight, lora_A, lora_B, scaling, False, squares)

            error = relative_error(fn(), weight, lora_A, lora_B, scaling)
            rows.append({"projection": name, "d_out": d_out, "d_in": d_in, "r": args.rank, "count": count,
                         "form": form, "us": do_bench_cudagraph(fn, rep=50) * 1e3,
                         "relative_error": error})
    for form in forms:
        mine = [r for r in rows if r["form"] == form]
        rows.append({"projection": "layer", "form": form,
                     "us": sum(r["us"] * r["count"] for r in mine),
                     "relative_error": max(r["relative_error"] for r in mine)})
    print(f"factored norm, r = {args.rank}, bf16, ||W||² given; GPU time in a CUDA graph")
    print(C.table(["projection", "form", "us", "rel. error"],
                  [[r["projection"], r["form"], C.fmt(r["us"], ".1f"), C.fmt(r["relative_error"], ".1e")] for r in rows]))
    if args.out:
        C.write_json(args.out, {"env": C.environment(device), "rows": rows})


if __name__ == "__main__":
    main()
