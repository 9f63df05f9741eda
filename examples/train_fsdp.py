"""Data-parallel training of a PEFT DoRA Llama under dora_fx: FSDP2 or DDP, against one eager process.

    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode fsdp2 --inner aot_eager --steps 20
    torchrun --nproc_per_node 2 examples/train_fsdp.py --mode ddp --inner aot_eager --steps 20
    python examples/train_fsdp.py --reference --steps 20          # one process, eager PEFT, full batch
    torchrun --nproc_per_node 2 examples/train_fsdp.py --device cuda --mode fsdp2 --steps 50 --out fsdp2.json

Every rank builds the same model (``dora_fx.examples.models.build("llama", ...)`` from ``--seed``), wraps it
with FSDP2 (``fully_shard`` on each decoder layer, then on the root) or DDP, compiles it with
``torch.compile(model, backend=...)`` and takes ``--steps`` AdamW steps on a causal-LM loss over
random token ids. Step ``k`` uses global batch ``k mod --batches`` (``--batch`` rows of ``--seq``
tokens, drawn from ``--seed + 1``); rank ``i`` of ``n`` takes rows ``[i*batch/n, (i+1)*batch/n)``.
Every row has the same number of label tokens, so the mean of the ranks' mean losses (and DDP's and
FSDP2's averaged gradients) are those of the whole global batch: ``--reference`` (one process, no
torchrun, eager PEFT, no compile) trains on the full global batch and must see the same losses.

Rank 0 prints each step's loss (averaged over ranks), the dora_fx report (rewrites, near-misses with
their reasons), Dynamo's graph-break count and, on CUDA, each rank's peak memory; ``--out`` writes
all of it as JSON. ``--backend inductor`` (plain ``torch.compile``) or ``eager`` (no compile) are
the baselines for the same distributed run.

Defaults: CPU: gloo, float32, hidden 32, 2 layers, r 4, 4 x 16 tokens, lr 1e-2.
CUDA: nccl, bfloat16, hidden 1024, 4 layers, r 16, 8 x 512 tokens, lr 1e-3.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout's dora_fx first

import dora_fx
from dora_fx.examples.models import build

DEFAULTS = {
    "cpu": dict(dtype="float32", hidden=32, layers=2, rank=4, batch=4, seq=16, lr=1e-2),
    "cuda": dict(dtype="bfloat16", hidden=1024, layers=4, rank=16, batch=8, seq=512, lr=1e-3),
}


def make_batches(vocab: int, count: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """``count`` global batches of token ids, the same on every rank and in the reference run."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen) for _ in range(count)]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Llama decoder layers inside a PEFT model (``base_model.model.model.layers``)."""
    return list(model.get_base_model().model.layers)


def wrap(model: torch.nn.Module, mode: str, device: torch.device, bucket_cap_mb: float | None):
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        kwargs = {} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    raise ValueError(f"unknown mode {mode!r}")


def make_backend(name: str, inner: str):
    if name == "dora":
        return dora_fx.dora_backend if inner == "inductor" else dora_fx.DoraBackend(inner=inner)
    return name  # "inductor" (plain torch.compile) or any Dynamo backend name


class RewriteCounter:
    """Wraps a backend; remembers how many DoRA regions dora_fx rewrote in each Dynamo compile id.

    The report counts rewrites per compiled graph, and one compiled graph can serve many layers (all
    decoder layers share one under FSDP2). With the profiler's "Torch-Compiled Region: <id>" events
    of one step this gives the DoRA layers that actually ran rewritten in that step.
    """

    def __init__(self, backend):
        self.backend = backend
        self.rewrites: dict[str, int] = {}

    def __call__(self, gm, example_inputs):
        before = len(dora_fx.last_report().rewrites)
        compiled = torch._dynamo.lookup_backend(self.backend)(gm, example_inputs) \
            if isinstance(self.backend, str) else self.backend(gm, example_inputs)
        compile_id = str(torch._guards.CompileContext.current_compile_id())
        self.rewrites[compile_id] = self.rewrites.get(compile_id, 0) + len(dora_fx.last_report().rewrites) - before
        return compiled


def train(forward, params, batches, steps: int, lr: float, rank: int, world: int, device,
          backward_context=contextlib.nullcontext) -> dict:
    """``steps`` AdamW steps; each rank's shard of each global batch; losses averaged over ranks.

    The last step runs under the profiler, which counts how often each compiled graph ran in one
    training step (that step is left out of the step times).
    """
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses, seconds, regions = [], [], {}
    for step in range(steps):
        ids = batches[step % len(batches)]
        rows = ids.shape[0] // world
        ids = ids[rank * rows : (rank + 1) * rows].to(device)
        profiled = step == steps - 1
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else None
        start = time.perf_counter()
        with profiler or contextlib.nullcontext():
            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss  # no KV cache: it guards per layer
            with backward_context():
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = loss.detach().float()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            losses.append(value.item())  # synchronizes
        seconds.append(time.perf_counter() - start)
        if profiled:
            prefix = "Torch-Compiled Region: "
            for event in profiler.events():
                if event.name.startswith(prefix):
                    compile_id = event.name[len(prefix):]
                    regions[compile_id] = regions.get(compile_id, 0) + 1
    steady = seconds[1:-1] or seconds
    return {"losses": losses, "first_step_s": seconds[0], "median_step_ms": 1e3 * statistics.median(steady),
            "compiled_region_runs_last_step": regions}


def graph_breaks() -> dict[str, int]:
    """Dynamo's graph-break reasons (first line of each) and how often each occurred in this process."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        key = str(reason).strip().splitlines()[0][:200]
        reasons[key] = reasons.get(key, 0) + count
    return reasons


def run(args: argparse.Namespace) -> dict | None:
    device_type = torch.device(args.device).type
    config = {k: getattr(args, k) if getattr(args, k) is not None else DEFAULTS[device_type][k]
              for k in DEFAULTS[device_type]}
    distributed = not args.reference
    if distributed:
        if device_type == "cuda":
            # NVLink SHARP / multicast off: not every machine supports it (see the README).
            os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
            os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # tiny ops, one process per core
    if config["batch"] % world:
        raise SystemExit(f"--batch {config['batch']} is not divisible by {world} processes")

    example = build("llama", rank=config["rank"], hidden=config["hidden"], layers=config["layers"],
                    seed=args.seed, dtype=getattr(torch, config["dtype"]))
    model = example.model.to(device)
    model.train()
    batches = make_batches(model.config.vocab_size, args.batches, config["batch"], config["seq"], args.seed + 1)

    mode = "reference" if args.reference else args.mode
    backend_name = "eager" if args.reference else args.backend
    if args.optimize_ddp:
        torch._dynamo.config.optimize_ddp = args.optimize_ddp
    if distributed:
        model = wrap(model, args.mode, device, args.bucket_cap_mb)
    # AdamW over the trainable parameters after wrapping (FSDP2 swaps them for sharded DTensors).
    params = [p for p in model.parameters() if p.requires_grad]
    dora_fx.reset_report()
    torch._dynamo.utils.counters["graph_break"].clear()
    backend = None if backend_name == "eager" else RewriteCounter(make_backend(backend_name, args.inner))
    forward = model if backend is None else torch.compile(model, backend=backend)
    backward_context = contextlib.nullcontext
    if backend is not None and args.optimize_ddp == "python_reducer":
        # DDP's Python reducer is meant to be traced into the backward by compiled autograd.
        from torch._dynamo import compiled_autograd

        enable = getattr(compiled_autograd, "_enable", None) or compiled_autograd.enable
        backward_context = functools.partial(enable, torch.compile(backend=backend))
    if device_type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train(forward, params, batches, args.steps, config["lr"], rank, world, device, backward_context)

    report = dora_fx.last_report()
    breaks = graph_breaks()
    result = {
        "config": config | dict(steps=args.steps, batches=args.batches, seed=args.seed, device=args.device,
                                mode=mode, backend=backend_name, inner=args.inner if backend_name == "dora" else None,
                                world_size=world, bucket_cap_mb=args.bucket_cap_mb,
                                optimize_ddp=str(torch._dynamo.config.optimize_ddp)),
        "torch": torch.__version__,
        "dora_layers": example.dora_layers,
        "graphs_compiled": len(report.graphs),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": breaks,
        "rewrites": len(report.rewrites),
        "rewritten_modules": [r.module for r in report.rewrites],
        "near_misses": [{"where": m.where, "reason": m.reason} for m in report.near_misses],
        "rewrites_per_graph": [len(g.rewrites) for g in report.graphs],
    } | result
    runs = result.pop("compiled_region_runs_last_step")
    if backend is not None:
        result["rewrites_by_compile_id"] = backend.rewrites
        result["compiled_region_runs_last_step"] = runs
        # DoRA layers that ran through a rewritten graph in the last step (forward; the backward of a
        # rewritten region is the custom ops' own backward).
        result["rewritten_layer_runs_last_step"] = sum(n * backend.rewrites.get(cid, 0) for cid, n in runs.items())
    if device_type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        peaks = [peak] * world
        if distributed:
            dist.all_gather_object(peaks, peak)
        result["peak_memory_gib_per_rank"] = [p / 2**30 for p in peaks]
    if distributed:
        # Free the compiled wrapper and DDP's reducer (which hold the process group) on every rank
        # before leaving together: with gloo, a rank whose DDP outlived the group hung in teardown.
        del forward, model, params, example
        torch._dynamo.reset()
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return result if rank == 0 else None


def compare(result: dict, reference_path: str) -> dict:
    reference = json.loads(pathlib.Path(reference_path).read_text())["losses"]
    diffs = [abs(a - b) for a, b in zip(result["losses"], reference)]
    return {"reference": reference_path, "mean_abs_loss_diff": statistics.fmean(diffs),
            "max_abs_loss_diff": max(diffs)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["fsdp2", "ddp"], default="fsdp2")
    parser.add_argument("--reference", action="store_true",
                        help="one process, no torchrun: eager PEFT on the full global batch")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--backend", choices=["dora", "inductor", "aot_eager", "eager"], default="dora",
                        help="dora: dora_fx; inductor: plain torch.compile; eager: no compile")
    parser.add_argument("--inner", default="inductor",
                        help="dora_fx's inner compiler (aot_eager is much faster to compile on the CPU)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--rank", type=int, help="LoRA rank r")
    parser.add_argument("--batch", type=int, help="global batch (rows), split evenly over the processes")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batches", type=int, default=8, help="distinct global batches, cycled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bucket-cap-mb", type=float, help="DDP bucket size (DDP's default: 25)")
    parser.add_argument("--optimize-ddp", choices=["ddp_optimizer", "no_optimization", "python_reducer"],
                        help="torch._dynamo.config.optimize_ddp (PyTorch's default: ddp_optimizer, which splits the "
                             "graph at DDP bucket boundaries; python_reducer also turns on compiled autograd)")
    parser.add_argument("--compare", help="a --reference run's JSON: add the loss differences to it")
    parser.add_argument("--out", help="write the result as JSON here (rank 0)")
    parser.add_argument("--quiet", action="store_true", help="no per-step losses")
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    result = run(args)
    if result is None:  # not rank 0
        return None
    if args.compare:
        result |= compare(result, args.compare)
    cfg = result["config"]
    print(f"{cfg['mode']} x {cfg['world_size']}, {cfg['device']}, {cfg['dtype']}, backend {cfg['backend']}"
          f"{' over ' + cfg['inner'] if cfg['inner'] else ''}, hidden {cfg['hidden']}, {cfg['layers']} layers, "
          f"r {cfg['rank']}, global batch {cfg['batch']} x {cfg['seq']} tokens, {cfg['steps']} AdamW steps")
    if not args.quiet:
        for step, loss in enumerate(result["losses"]):
            print(f"step {step:3d}  loss {loss:.6f}")
    if cfg["backend"] == "dora":
        print(f"dora_fx: {result['rewrites']} DoRA region(s) rewritten in {result['graphs_compiled']} compiled "
              f"graph(s) (per graph: {result['rewrites_per_graph']}), {len(result['near_misses'])} near-miss(es); "
              f"{result['rewritten_layer_runs_last_step']} of {result['dora_layers']} DoRA layers ran rewritten "
              f"in the last step")
        for miss in result["near_misses"]:
            print(f"  near-miss {miss['where']}: {miss['reason']}")
    if cfg["backend"] != "eager":
        print(f"Dynamo graph breaks: {result['graph_breaks']} {result['graph_break_reasons']}")
    print(f"median step {result['median_step_ms']:.2f} ms, first step {result['first_step_s']:.1f} s")
    if "peak_memory_gib_per_rank" in result:
        print("peak memory per rank, GiB: " + ", ".join(f"{p:.3f}" for p in result["peak_memory_gib_per_rank"]))
    if "max_abs_loss_diff" in result:
        print(f"vs reference: mean |loss diff| {result['mean_abs_loss_diff']:.3g}, "
              f"max {result['max_abs_loss_diff']:.3g}")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
