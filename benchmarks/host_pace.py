"""Where the host's time goes in a train step that the host paces (issue #13's 512-token gap): the
forward's and the backward's enqueue time per contender, in interleaved rounds, and optionally the
Python functions that take it (cProfile).

    python benchmarks/host_pace.py [--seq 512] [--rounds 3] [--dora-options '{"split_reductions": false}']
                                   [--cprofile 10] [--out host_pace.json]

The stacks of ``bench_model.py``, both on the device: plain LoRA + Inductor, dora_fx (norm recomputed
every step, as after an optimizer step), dora_fx reusing its norm (no refresh: the difference is the
refresh's cost), and for each ``--dora-options`` a dora_fx compiled with those Inductor options (norm
recomputed). Every contender is compiled and warmed up first; then in each of ``--rounds`` rounds
(the order rotated each round), with no profiler attached:

- ``train_ms``: the median forward + backward (``_common.median_ms``);
- ``forward_host_ms`` and ``backward_host_ms``: median host time to enqueue the forward (the loss
  returned) and the backward (``loss.backward()`` returned), the device synchronised before each
  step; where the host paces the step these add up to it;
- ``launch_us``: a probe of the host's pace, microseconds per launch of a one-element ``add_``.

Each figure is the median over the rounds (``rounds`` keeps them all). Then, once per contender:
``eval_ms`` (the eval forward under ``no_grad``; dora_fx's norm reused) and, with ``--cprofile N``,
the Python functions with the most own time over ``N`` train steps (``cprofile``: microseconds and
calls per step; the profiler itself slows every Python call, so compare contenders, not absolutes).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pathlib
import pstats
import statistics
import time

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch

import bench_model
import dora_fx


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


class Contender:
    """One compiled stack's train step, warmed up, and what was measured of it."""

    def __init__(self, fn, model, batch: dict):
        self.fn, self.model, self.batch = fn, model, batch
        self.params = bench_model.trainable(model)
        self.step = C.lm_train_step(fn, batch)
        self.rounds: list[dict] = []
        model.train()
        for _ in range(2):  # the compiling first call, then a warm-up
            bench_model.clear_grads(self.params)
            self.step()
        bench_model.clear_grads(self.params)

    def measure_round(self, device: torch.device, rep_ms: float) -> None:
        self.model.train()
        row = {"train_ms": C.median_ms(self.step, device, rep_ms, grad_to_none=self.params)}
        row["forward_host_ms"], row["backward_host_ms"] = host_split(self.fn, self.batch, self.params, device)
        bench_model.clear_grads(self.params)
        row["launch_us"] = launch_us(device)
        self.rounds.append(row)

    def summary(self, device: torch.device, rep_ms: float, cprofile_steps: int) -> dict:
        row = {key: statistics.median(r[key] for r in self.rounds) for key in self.rounds[0]}
        row["rounds"] = self.rounds
        if cprofile_steps:
            row["cprofile"] = self.python_profile(device, cprofile_steps)
        self.model.eval()
        with torch.no_grad():
            forward = C.lm_forward(self.fn, self.batch)
            forward()
            row["eval_ms"] = C.median_ms(forward, device, rep_ms)
        return row

    def python_profile(self, device: torch.device, steps: int, top: int = 30) -> list[dict]:
        """The functions with the most own time over ``steps`` train steps, per step."""
        self.model.train()
        profiler = cProfile.Profile()
        C.synchronize(device)
        for _ in range(steps):
            bench_model.clear_grads(self.params)
            profiler.enable()
            self.step()
            profiler.disable()
            C.synchronize(device)
        bench_model.clear_grads(self.params)
        stats = pstats.Stats(profiler).stats
        ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
        return [
            {"function": f"{pathlib.Path(file).name}:{line}({name})", "own_us": own * 1e6 / steps,
             "cumulative_us": cumulative * 1e6 / steps, "calls": calls / steps}
            for (file, line, name), (_, calls, own, cumulative, _) in ranked
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_step_arguments(parser, rank=bench_model.TARGET_RANK)
    parser.add_argument("--rep-ms", type=float, default=300.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dora-options", type=json.loads, action="append", default=[],
                        help="Inductor options (JSON) for one more dora_fx contender; may repeat")
    parser.add_argument("--cprofile", type=int, default=0, metavar="STEPS")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    device = C.step_device(args)
    seed = 1000 + args.rank
    batch = bench_model.make_batches(args, seed, device)[0]
    bench_model.warm_up_compiler(device)
    # Every contender's train and eval steps stay compiled against the same code objects.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16 + 4 * len(args.dora_options))

    before = launch_us(device)
    dora = bench_model.build_model(args, args.rank, device, seed)
    lora = bench_model.build_model(args, args.rank, device, seed, bench_model.lora_adapters(dora))
    fns = {"lora_inductor": (C.lora_contenders(lora)["lora_inductor"], lora)}
    dora_fns = C.contenders(dora)
    fns["dora_fx"] = (dora_fns["dora_fx"], dora)
    fns["dora_fx_norm_reused"] = (dora_fns["dora_fx_cached"], dora)
    for options in args.dora_options:
        compiled = torch.compile(dora, backend=dora_fx.DoraBackend(options=options))
        fns[f"dora_fx {json.dumps(options)}"] = (C.recomputing_norm(compiled, dora), dora)
    contenders = {name: Contender(fn, model, batch) for name, (fn, model) in fns.items()}
    names = list(contenders)
    for k in range(args.rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            contenders[name].measure_round(device, args.rep_ms)
    rows = {"before": {"launch_us": before}}
    rows |= {name: c.summary(device, args.rep_ms, args.cprofile) for name, c in contenders.items()}

    print(f"host pace, {args.layers} layers, 1 x {args.seq} tokens, r = {args.rank}, {args.dtype}, {device}, "
          f"medians of {args.rounds} interleaved rounds")
    keys = ("train_ms", "forward_host_ms", "backward_host_ms", "eval_ms", "launch_us")
    print(C.table(["contender", *keys], [[name, *(C.fmt(row.get(k), ".3f") for k in keys)] for name, row in rows.items()]))
    for name, row in rows.items():
        for entry in row.get("cprofile", [])[:12]:
            print(f"{name}: {entry['own_us']:9.1f} us own {entry['cumulative_us']:9.1f} cum "
                  f"{entry['calls']:6.1f} calls  {entry['function']}")
    if args.out:
        record = {"env": C.environment(device), "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        C.write_json(args.out, record)


if __name__ == "__main__":
    main()
