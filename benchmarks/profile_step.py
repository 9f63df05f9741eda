"""Where a train step (or an eval forward) of the Llama-3-8B-shaped stack spends its time, host and GPU:
plain LoRA + Inductor against dora_fx (issue #13's and #14's 512-token gaps).

    python benchmarks/profile_step.py [--seq 512] [--mode train] [--contenders lora_inductor dora_fx] [--steps 3] [--out DIR] [--with-stack]

The stacks and contenders of ``bench_model.py`` (the same base weights, A and B; in training dora_fx with
A's and B's versions moved on before each call, so that the norm is recomputed as after an optimizer
step; in eval, ``--mode eval``, the norm reused as it is by default). After the compiling first call and
a warm-up, ``--steps`` forward + backward steps (eval: forwards under ``no_grad``) run under
``torch.profiler`` (CPU and CUDA activities). Per contender and step:

- ``wall_ms``: host time of the steps, the device synchronised at both ends;
- ``kernel_ms`` and ``kernels``: the sum of the kernels' device time and their number; the GPU is idle
  for the rest of ``wall_ms`` (``idle_ms``): there the host sets the pace;
- ``forward_ms`` and ``backward_ms``: host time of the compiled forward and backward (train only)
  (``CompiledFunction`` and its backward, from the profiler's CPU events, children included; the
  backward's includes the wait for the GPU where it catches up);
- ``cpu_top`` and ``gpu_top``: the operators by self CPU time and the kernels by device time.

With ``--out`` the JSON and one Chrome trace per contender (``trace_<contender>.json.gz``) go there;
``--with-stack`` adds the Python frames to the traces (where the host's time goes between ops).
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import shutil
import tempfile
import time

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch

import bench_model

CONTENDERS = ("lora_inductor", "dora_fx")


def _events_ms(prof, name: str, steps: int) -> float:
    """Host milliseconds per step of the CPU events called ``name``, their children included."""
    return sum(e.cpu_time_total for e in prof.key_averages() if e.key == name) / 1e3 / steps


def profile_contender(fn, model, batch, device: torch.device, steps: int, trace: pathlib.Path | None,
                      train: bool = True, with_stack: bool = False) -> dict:
    from torch.profiler import ProfilerActivity, profile

    params = bench_model.trainable(model) if train else []
    step = C.lm_train_step(fn, batch) if train else C.lm_forward(fn, batch)
    model.train(train)
    grad_mode = torch.enable_grad() if train else torch.no_grad()
    with grad_mode:
        for _ in range(3):  # the compiling first call, then warm-up
            bench_model.clear_grads(params)
            step()
    C.synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with grad_mode, profile(activities=activities, with_stack=with_stack) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            bench_model.clear_grads(params)
            step()
        C.synchronize(device)
        wall = (time.perf_counter() - start) * 1e3 / steps
    bench_model.clear_grads(params)
    averages = prof.key_averages()
    kernels: dict[str, list[float]] = {}  # name -> [device ms, launches], per step
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0.0, 0.0])
            entry[0] += event.time_range.elapsed_us() / 1e3 / steps
            entry[1] += 1 / steps
    kernel_ms = sum(ms for ms, _ in kernels.values())
    row = {
        "wall_ms": wall, "kernel_ms": kernel_ms, "idle_ms": max(0.0, wall - kernel_ms),
        "kernels": sum(count for _, count in kernels.values()),
        "forward_ms": _events_ms(prof, "CompiledFunction", steps),
        "backward_ms": _events_ms(prof, "CompiledFunctionBackward", steps),
        "cpu_top": [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3 / steps, "count": e.count / steps}
                    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:30]],
        "gpu_top": [{"name": name, "ms": ms, "count": count}
                    for name, (ms, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]],
    }
    if trace is not None:
        with tempfile.TemporaryDirectory() as tmp:
            raw = pathlib.Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with raw.open("rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_step_arguments(parser, rank=bench_model.TARGET_RANK)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", choices=("train", "eval"), default="train")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--out", type=pathlib.Path, help="folder for profile_step.json and the traces")
    parser.add_argument("--with-stack", action="store_true",
                        help="record Python frames in the traces (host time the ops' events do not cover)")
    args = parser.parse_args()
    device = C.step_device(args)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    seed = 1000 + args.rank
    batch = bench_model.make_batches(args, seed, device)[0]
    rows = {}
    for name in args.contenders:
        model = bench_model.build_model(args, args.rank, device, seed)
        if name == "lora_inductor":
            adapters = bench_model.lora_adapters(model)
            del model
            C.free(device)
            model = bench_model.build_model(args, args.rank, device, seed, adapters)
            fn = C.lora_contenders(model)[name]
        else:
            fn = C.contenders(model)["dora_fx" if args.mode == "train" else "dora_fx_cached"]
        trace = args.out / f"trace_{name}.json.gz" if args.out else None
        rows[name] = profile_contender(fn, model, batch, device, args.steps, trace, train=args.mode == "train",
                                       with_stack=args.with_stack)
        del model, fn
        torch._dynamo.reset()
        C.free(device)

    print(f"{args.mode} step, {args.layers} layers, 1 x {args.seq} tokens, r = {args.rank}, {args.dtype}, {device}")
    header = ["contender", "wall ms", "kernel ms", "GPU idle ms", "kernels", "fwd host ms", "bwd host ms"]
    print(C.table(header, [[name, *(C.fmt(row[k], ".2f") for k in ("wall_ms", "kernel_ms", "idle_ms")),
                            C.fmt(row["kernels"], ".0f"), C.fmt(row["forward_ms"], ".2f"),
                            C.fmt(row["backward_ms"], ".2f")] for name, row in rows.items()]))
    for name, row in rows.items():
        for key, unit in (("cpu_top", "self_cpu_ms"), ("gpu_top", "ms")):
            print(f"\n{name}: {key}")
            for item in row[key][:20]:
                print(f"  {item[unit]:8.3f} ms  x{item['count']:6.1f}  {item['name'][:110]}")
    if args.out:
        record = {"env": C.environment(device), "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        (args.out / "profile_step.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
