"""GPU time per kind of kernel, forward and backward apart, from the Chrome traces of ``profile_step.py``
(train mode): where one contender's step spends more device time than another's.

    python benchmarks/trace_breakdown.py DIR [--contenders lora_inductor dora_fx] [--out breakdown.json]

``DIR`` holds ``trace_<contender>.json.gz`` and ``profile_step.json`` (for the number of profiled steps).
Kinds: cuBLAS GEMMs with a bf16 output (``gemm``) and with a float32 one (``gemm_fp32_out``: nvjet
``tss`` kernels, the factored norm's), attention (cuDNN), Inductor's pointwise and reduction kernels,
and every other kernel by its own name (dora_fx's Triton kernels). A kernel belongs to the backward
from the loss's backward kernel (``log_softmax_backward``) until the next step's first kernel. Times
are milliseconds per step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib

import _common as C


def kind(name: str) -> str:
    if name.startswith(("triton_red", "triton_per")):
        return "inductor_reduction"
    if name.startswith("triton_poi"):
        return "inductor_pointwise"
    if name.startswith("nvjet") or "gemm" in name.lower() or "splitK" in name:
        return "gemm_fp32_out" if "_tss_" in name else "gemm"
    if "sdpa" in name or "cudnn" in name:
        return "attention"
    return name.split("(")[0][:48]


def breakdown(trace: pathlib.Path, steps: int) -> dict[str, dict[str, float]]:
    """``{phase: {kind: ms per step}}`` of one trace."""
    events = json.load(gzip.open(trace))["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    first = kernels[0]["name"]
    times: dict[str, dict[str, float]] = {"forward": collections.defaultdict(float),
                                          "backward": collections.defaultdict(float)}
    phase = "forward"
    for event in kernels:
        name = event["name"]
        if "log_softmax_backward" in name:
            phase = "backward"
        elif name == first:
            phase = "forward"
        times[phase][kind(name)] += event["dur"] / 1e3 / steps
    return {p: dict(t) for p, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=pathlib.Path)
    parser.add_argument("--contenders", nargs=2, default=["lora_inductor", "dora_fx"])
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    steps = int(json.loads((args.dir / "profile_step.json").read_text())["config"]["steps"])
    base, other = args.contenders
    result = {c: breakdown(args.dir / f"trace_{c}.json.gz", steps) for c in (base, other)}
    rows = []
    for phase in ("forward", "backward"):
        times_a, times_b = result[base][phase], result[other][phase]
        pairs = [(k, times_a.get(k, 0.0), times_b.get(k, 0.0)) for k in sorted(set(times_a) | set(times_b))]
        pairs.append(("all", sum(times_a.values()), sum(times_b.values())))
        rows += [(phase, k, f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}") for k, a, b in pairs]
    print(C.table(("phase", "kernels", f"{base} ms", f"{other} ms", "difference"), rows))
    if args.out:
        C.write_json(args.out, {"steps": steps, "ms_per_step": result})


if __name__ == "__main__":
    main()
