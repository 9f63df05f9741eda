"""Where the host's time goes in a train step that the host paces (issue #13's 512-token gap): the
forward's and the backward's enqueue time per contender, and whether the process's pace per launch
moves between contenders.

    python benchmarks/host_pace.py [--seq 512] [--out host_pace.json]

The stacks of ``bench_model.py`` in one process, in this order: plain LoRA + Inductor, dora_fx (norm
recomputed every step, as after an optimizer step), dora_fx reusing its norm (no refresh: the
difference is the refresh's cost), then plain LoRA + Inductor once more (compiled again, the DoRA stack
still alive). For each, with no profiler attached:

- ``train_ms``: the median forward + backward (``_common.median_ms``);
- ``forward_host_ms`` and ``backward_host_ms``: median host time to enqueue the forward (the loss
  returned) and the backward (``loss.backward()`` returned), the device synchronised before each
  step; where the host paces the step these add up to it;
- ``eval_ms``: the median eval forward under ``no_grad`` (norm reused for dora_fx);
- ``launch_us``: a probe of the host's pace, microseconds per launch of a one-element ``add_``, taken
  right after the contender's runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch

import bench_model


def launch_us(device: torch.device, launches: int = 2000) -> float:
    """Host microseconds per launch of a tiny kernel, the median of five rounds."""
    x = torch.zeros(1, device=device)
    rounds = []
    for _ in range(5):
        C.synchronize(device)
        start = time.perf_counter()
        for _ in range(launches):
            x.add_(1)
        rounds.append((time.perf_counter() - start) * 1e6 / launches)
    C.synchronize(device)
    return statistics.median(rounds)


def host_split(fn, batch: dict, params, device: torch.device, steps: int = 20) -> tuple[float, float]:
    """Median host milliseconds to enqueue the forward and the backward of a train step."""
    forward, backward = [], []
    for _ in range(steps):
        bench_model.clear_grads(params)
        C.synchronize(device)
        start = time.perf_counter()
        loss = fn(**batch).loss
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        forward.append((middle - start) * 1e3)
        backward.append((end - middle) * 1e3)
    C.synchronize(device)
    return statistics.median(forward), statistics.median(backward)


def measure(fn, model, batch: dict, device: torch.device, rep_ms: float) -> dict:
    params = bench_model.trainable(model)
    step = C.lm_train_step(fn, batch)
    model.train()
    for _ in range(2):  # the compiling first call, then a warm-up
        bench_model.clear_grads(params)
        step()
    row = {"train_ms": C.median_ms(step, device, rep_ms, grad_to_none=params)}
    row["forward_host_ms"], row["backward_host_ms"] = host_split(fn, batch, params, device)
    bench_model.clear_grads(params)
    model.eval()
    with torch.no_grad():
        forward = C.lm_forward(fn, batch)
        forward()
        row["eval_ms"] = C.median_ms(forward, device, rep_ms)
    row["launch_us"] = launch_us(device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_step_arguments(parser, rank=bench_model.TARGET_RANK)
    parser.add_argument("--rep-ms", type=float, default=300.0)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    device = C.step_device(args)
    seed = 1000 + args.rank
    batch = bench_model.make_batches(args, seed, device)[0]
    bench_model.warm_up_compiler(device)

    rows = {"before": {"launch_us": launch_us(device)}}
    dora = bench_model.build_model(args, args.rank, device, seed)
    adapters = bench_model.lora_adapters(dora)

    def lora_row() -> dict:
        lora = bench_model.build_model(args, args.rank, device, seed, adapters)
        row = measure(C.lora_contenders(lora)["lora_inductor"], lora, batch, device, args.rep_ms)
        del lora
        C.free(device)
        return row

    rows["lora_inductor"] = lora_row()
    fns = C.contenders(dora)
    rows["dora_fx"] = measure(fns["dora_fx"], dora, batch, device, args.rep_ms)
    rows["dora_fx_norm_reused"] = measure(fns["dora_fx_cached"], dora, batch, device, args.rep_ms)
    rows["lora_inductor_again"] = lora_row()

    print(f"host pace, {args.layers} layers, 1 x {args.seq} tokens, r = {args.rank}, {args.dtype}, {device}")
    keys = ("train_ms", "forward_host_ms", "backward_host_ms", "eval_ms", "launch_us")
    print(C.table(["contender", *keys], [[name, *(C.fmt(row.get(k), ".3f") for k in keys)] for name, row in rows.items()]))
    if args.out:
        record = {"env": C.environment(device), "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        C.write_json(args.out, record)


if __name__ == "__main__":
    main()
