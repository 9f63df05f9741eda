"""How many kernels each compiled graph of a train step launches: plain LoRA + Inductor, dora_fx and
PEFT + Inductor on a small Llama stack. Where the host sets the pace (the 512-token step on the H200),
every launch costs host time.

    python benchmarks/kernel_counts.py [--layers 1] [--device cpu] [--out kernel_counts.json]

For each contender, one ``loss.backward()`` step is compiled and the generated code of its forward and
backward graphs read (``torch._inductor.utils.run_and_get_code``): ``fused`` counts the calls of
Inductor's own kernels (C++ on the CPU, Triton on CUDA), ``extern`` the library calls
(``extern_kernels.*``: the GEMMs), ``ops`` the ops called as they are (custom ops, attention), named
in ``op_names``. The counts follow the graph's structure, not its sizes, but fusion differs between
Inductor's C++ and Triton back ends: a small model on the CPU shows the structure, the GPU's own
counts need ``--device cuda``. Per layer: divide by ``--layers``.
"""

from __future__ import annotations

import argparse
import re

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch

import dora_fx
from dora_fx.examples import models

_FUSED = re.compile(r"^\s+(?:cpp_fused\w*|triton_\w+\.run)\(", re.M)
_EXTERN = re.compile(r"extern_kernels\.\w+\(")
_OPS = re.compile(r"torch\.ops\.(\w+\.\w+)\.\w+\(")
CONTENDERS = {"lora_inductor": (False, "inductor"), "dora_fx": (True, dora_fx.dora_backend),
              "inductor": (True, "inductor")}


def build(use_dora: bool, layers: int, device: torch.device) -> torch.nn.Module:
    example = models.build("llama", rank=8, hidden=64, layers=layers, use_dora=use_dora)
    return example.model.to(device).train()


def count(code: str) -> dict:
    """Launches in the ``call`` function of one graph's generated code."""
    body = code[code.index("def call("):]
    ops = _OPS.findall(body)
    return {"fused": len(_FUSED.findall(body)), "extern": len(_EXTERN.findall(body)), "ops": len(ops),
            "op_names": sorted(set(ops))}


def main() -> None:
    from torch._inductor.utils import run_and_get_code

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    ids = torch.randint(0, 128, (1, args.tokens), generator=torch.Generator().manual_seed(2)).to(device)
    rows = []
    for name, (use_dora, backend) in CONTENDERS.items():
        torch._dynamo.reset()
        compiled = torch.compile(build(use_dora, args.layers, device), backend=backend)
        _, codes = run_and_get_code(lambda: compiled(input_ids=ids, labels=ids).loss.backward())
        for graph, code in zip(("forward", "backward"), codes):
            rows.append({"contender": name, "graph": graph, **count(code)})
    print(f"kernel launches per compiled graph, {args.layers}-layer Llama, DoRA/LoRA on {len(models.LLAMA_TARGETS)} "
          f"projections, {device.type}")
    print(C.table(("contender", "graph", "fused", "extern", "ops", "op names"),
                  [(r["contender"], r["graph"], r["fused"], r["extern"], r["ops"], " ".join(r["op_names"]))
                   for r in rows]))
    if args.out:
        C.write_json(args.out, {**C.environment(device), "layers": args.layers, "rows": rows})


if __name__ == "__main__":
    main()
