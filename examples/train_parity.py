"""Training parity: one PEFT DoRA Llama trained eagerly and compiled with dora_fx, step by step.

    python examples/train_parity.py                        # CPU, float32, dora_fx over aot_eager
    python examples/train_parity.py --inner inductor       # the same, dora_fx over Inductor
    python examples/train_parity.py --device cuda --compare-inductor --out parity.json

Both runs start from the same weights (a deep copy of one ``dora_fx.examples.models.build("llama", ...)``
model, LoRA ``B`` non-zero), see the same batches (random token ids from a fixed seed, cycled, with
the causal-LM loss on the ids themselves) and take ``--steps`` AdamW steps, dropout 0. Prints the
mean and the largest per-step difference of the losses. ``--compare-inductor`` also trains plain
``torch.compile(backend="inductor")`` against eager, the yardstick for low-precision runs.

Defaults: CPU: float32, hidden 32, 2 layers, r 4, 4 x 32 tokens, lr 1e-2, dora_fx over ``aot_eager``.
CUDA: bfloat16, hidden 512, 2 layers, r 16, 8 x 256 tokens, lr 1e-3, dora_fx over Inductor.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # a checkout's dora_fx first

import dora_fx
from dora_fx.examples.models import build

DEFAULTS = {
    "cpu": dict(dtype="float32", inner="aot_eager", hidden=32, layers=2, rank=4, batch=4, seq=32, lr=1e-2),
    "cuda": dict(dtype="bfloat16", inner="inductor", hidden=512, layers=2, rank=16, batch=8, seq=256, lr=1e-3),
}


def make_batches(vocab: int, count: int, batch: int, seq: int, seed: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=gen).to(device) for _ in range(count)]


def train(model: torch.nn.Module, forward, batches: list[torch.Tensor], steps: int, lr: float) -> dict:
    """``steps`` AdamW steps of ``forward`` (the model or a compiled wrapper of it): losses and times."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, seconds = [], []
    for step in range(steps):
        ids = batches[step % len(batches)]
        start = time.perf_counter()
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronizes
        seconds.append(time.perf_counter() - start)
    steady = seconds[1:] or seconds
    return {"losses": losses, "first_step_s": seconds[0], "median_step_ms": 1e3 * statistics.median(steady)}


def loss_differences(losses: list[float], reference: list[float]) -> dict:
    diffs = [abs(a - b) for a, b in zip(losses, reference)]
    return {"mean_abs_loss_diff": statistics.fmean(diffs), "max_abs_loss_diff": max(diffs)}


def run(steps: int = 200, device: str = "cpu", dtype: str | None = None, inner: str | None = None,
        hidden: int | None = None, layers: int | None = None, rank: int | None = None, batch: int | None = None,
        seq: int | None = None, lr: float | None = None, batches: int = 8, seed: int = 0,
        compare_inductor: bool = False) -> dict:
    """Train eagerly and with dora_fx (and, if asked, with plain Inductor); return the comparison."""
    given = dict(dtype=dtype, inner=inner, hidden=hidden, layers=layers, rank=rank, batch=batch, seq=seq, lr=lr)
    config = {k: v if v is not None else DEFAULTS[torch.device(device).type][k] for k, v in given.items()}
    config |= dict(steps=steps, device=device, batches=batches, seed=seed, dropout=0.0, optimizer="AdamW")

    example = build("llama", rank=config["rank"], hidden=config["hidden"], layers=config["layers"], seed=seed,
                    dtype=getattr(torch, config["dtype"]))
    initial = example.model.to(device)
    data = make_batches(initial.config.vocab_size, batches, config["batch"], config["seq"], seed + 1, device)

    def run_one(make_forward) -> dict:
        model = copy.deepcopy(initial)
        torch._dynamo.reset()
        return train(model, make_forward(model), data, steps, config["lr"])

    backend = dora_fx.DoraBackend(inner=config["inner"])
    runs = {"eager": run_one(lambda m: m), "dora_fx": run_one(lambda m: torch.compile(m, backend=backend))}
    if compare_inductor:
        runs["inductor"] = run_one(lambda m: torch.compile(m, backend="inductor"))
    result = {"config": config, "torch": torch.__version__, "dora_fx_rewrites": len(backend.report.rewrites)}
    for name, res in runs.items():
        if name != "eager":
            res |= loss_differences(res["losses"], runs["eager"]["losses"])
        result[name] = res
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--inner", help="dora_fx's inner compiler (default: aot_eager on cpu, inductor on cuda)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-2 on cpu, 1e-3 on cuda)")
    parser.add_argument("--batches", type=int, default=8, help="distinct batches, cycled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-inductor", action="store_true", help="also train with plain Inductor")
    parser.add_argument("--out", help="write the result as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = args.out
    if torch.device(args.device).type == "cpu":
        # Tiny ops: one thread is faster, and does not stall when other processes load the cores.
        torch.set_num_threads(1)
    result = run(**{k: v for k, v in vars(args).items() if k != "out"})
    cfg = result["config"]
    print(f"{cfg['steps']} AdamW steps, {cfg['device']}, {cfg['dtype']}, hidden {cfg['hidden']}, {cfg['layers']} "
          f"layers, r {cfg['rank']}, {cfg['batch']} x {cfg['seq']} tokens, dora_fx over {cfg['inner']}, "
          f"{result['dora_fx_rewrites']} regions rewritten")
    eager = result["eager"]["losses"]
    print(f"eager loss: first {eager[0]:.4f}, last {eager[-1]:.4f}")
    for name in ("dora_fx", "inductor"):
        if name in result:
            res = result[name]
            print(f"{name} vs eager: mean |loss diff| {res['mean_abs_loss_diff']:.3g}, "
                  f"max {res['max_abs_loss_diff']:.3g}; step {res['median_step_ms']:.2f} ms "
                  f"(eager {result['eager']['median_step_ms']:.2f} ms), first step {res['first_step_s']:.1f} s")
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
