"""Where the first call of the compiled train step spends its time (issue #13's compile target), per
contender: Dynamo's and Inductor's own phase timers, dora_fx's pass, and the rest of the call.

    python benchmarks/compile_breakdown.py [--seq 4096] [--out compile_breakdown.json]

The stacks of ``bench_model.py`` (plain LoRA and PEFT DoRA, the same base), one train step (forward and
backward) per contender, each in a fresh Inductor cache after a compiler warm-up: plain LoRA + Inductor,
PEFT DoRA + Inductor, dora_fx. For each: ``first_call_s`` (the whole first call), ``second_call_s``, and
the phases of ``torch._dynamo.utils.compile_times`` that take the most time. The phases nest (Inductor's
code generation runs inside Dynamo's call of the backend), so they do not add up.
"""

from __future__ import annotations

import argparse

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch

import bench_model

CONTENDERS = ("lora_inductor", "inductor", "dora_fx")
PHASES = 14  # the longest phases kept per contender


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_step_arguments(parser, rank=bench_model.TARGET_RANK)
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--out", default="benchmarks/results/compile_breakdown.json")
    return parser.parse_args(argv)


def phase_totals() -> dict[str, float]:
    """Dynamo's per-phase totals so far in this process (``dynamo_timed`` sections)."""
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    return {name: float(value) for name, value in zip(names, values)}


def longest_since(before: dict[str, float]) -> dict[str, float]:
    """The phases' time since ``before`` (:func:`phase_totals`), the longest first."""
    spent = {name: total - before.get(name, 0.0) for name, total in phase_totals().items()}
    return dict(sorted(spent.items(), key=lambda kv: -kv[1])[:PHASES])


def measure(name: str, model, batch: dict, device: torch.device) -> dict:
    import dora_fx

    torch._dynamo.reset()
    dora_fx.reset_report()
    before = phase_totals()
    backend = "dora" if name == "dora_fx" else "inductor"
    step = C.lm_train_step(torch.compile(model, backend=backend), batch)
    _, first = bench_model.compiled_first_call(step, device)
    _, second = C.timed_call(step, device)
    row = {"contender": name, "first_call_s": first, "second_call_s": second, "phases_s": longest_since(before)}
    if name == "dora_fx":
        report = dora_fx.last_report()
        row["dora_fx_pass_s"] = sum(graph.pass_seconds for graph in report.graphs)
        row["rewrites"] = len(report.rewrites)
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    device = C.step_device(args)
    bench_model.warm_up_compiler(device)
    dora = bench_model.build_model(args, args.rank, device, seed=0)
    lora = bench_model.build_model(args, args.rank, device, seed=0, adapters=bench_model.lora_adapters(dora))
    batch = bench_model.make_batches(args, 0, device)[0]
    rows = []
    for name in args.contenders:
        rows.append(measure(name, lora if name == "lora_inductor" else dora, batch, device))
        C.write_json(args.out, {"environment": C.environment(device), "seq": args.seq, "rank": args.rank, "rows": rows})
    print(C.table(["contender", "first call s", "second call s", "dora_fx pass s"],
                  [[r["contender"], f"{r['first_call_s']:.1f}", f"{r['second_call_s']:.2f}",
                    C.fmt(r.get("dora_fx_pass_s"), ".2f") or "-"] for r in rows]))
    for row in rows:
        print(f"\n{row['contender']}: longest phases (s; nested)")
        for phase, seconds in row["phases_s"].items():
            print(f"  {seconds:8.2f}  {phase}")


if __name__ == "__main__":
    main()
