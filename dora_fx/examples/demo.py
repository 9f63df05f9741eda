"""The dora_fx demo: compile a PEFT DoRA model with the dora backend, print the audit report, and
compare outputs and timings with eager PEFT.

    python -m dora_fx demo     # a tiny Llama on the CPU; a larger bf16 one when a GPU is present

Timings are medians of a few steps after warm-up; on the CPU they show that the rewrite works, not
how fast it is (the numbers that matter are GPU numbers: see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dora_fx
from dora_fx.examples import models


def add_arguments(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--model", choices=models.EXAMPLES, default="llama")
    parser.add_argument("--hidden", type=int, default=1024 if gpu else 64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64 if gpu else 8)
    parser.add_argument("--tokens", type=int, default=2048 if gpu else 64)
    parser.add_argument("--repeats", type=int, default=20 if gpu else 5)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and, for the compiled model, compilation)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _logits(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def run(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    example = models.build(args.model, rank=args.rank, hidden=args.hidden, layers=args.layers, dtype=dtype)
    model = example.model.to(args.device)
    gen = torch.Generator().manual_seed(0)
    inputs = {
        k: v.to(args.device) for k, v in example.make_inputs(gen).items()
    } if args.model == "mlp" else {"input_ids": torch.randint(0, 128, (1, args.tokens), generator=gen).to(args.device)}

    print(f"dora_fx demo: PEFT DoRA {args.model}, hidden {args.hidden}, {args.layers} layers, r={args.rank}, "
          f"{dtype}, on {args.device} (torch {torch.__version__})")
    print("compiling with backend=dora_fx.dora_backend (Inductor inside) ...", flush=True)
    dora_fx.reset_report()
    compiled = torch.compile(model, backend=dora_fx.dora_backend)

    def forward(m):
        with torch.no_grad():
            return _logits(m(**inputs))

    def train_step(m):
        model.zero_grad(set_to_none=True)
        _logits(m(**inputs)).float().square().mean().backward()

    model.eval()
    start = time.perf_counter()
    out = forward(compiled)
    compile_s = time.perf_counter() - start
    ref = forward(model)
    print()
    print(dora_fx.last_report().to_text())
    print()

    error = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    rows = [("forward (eval, no_grad)", _median_ms(lambda: forward(model), args.device, args.repeats),
             _median_ms(lambda: forward(compiled), args.device, args.repeats))]
    model.train()
    train_step(compiled)
    grad_compiled = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    train_step(model)
    grad_error = max(
        ((g.float() - p.grad.float()).norm() / p.grad.float().norm().clamp_min(1e-30)).item()
        for n, p in model.named_parameters() if n in grad_compiled for g in [grad_compiled[n]]
    )
    rows.append(("forward + backward (train)", _median_ms(lambda: train_step(model), args.device, args.repeats),
                 _median_ms(lambda: train_step(compiled), args.device, args.repeats)))

    print(f"outputs vs eager PEFT: relative error {error:.2e}; worst gradient relative error {grad_error:.2e} "
          f"over {len(grad_compiled)} trainable tensors")
    print(f"first compiled call (compilation included): {compile_s:.1f} s")
    print(f"\n{'':28}{'eager PEFT':>14}{'dora_fx':>14}{'speedup':>10}")
    for name, eager_ms, dora_ms in rows:
        print(f"{name:28}{eager_ms:>11.2f} ms{dora_ms:>11.2f} ms{eager_ms / dora_ms:>9.2f}x")
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if error > tolerance or grad_error > 10 * tolerance:
        raise SystemExit(f"dora_fx demo: outputs differ from eager PEFT beyond {tolerance:g}")


def main(argv: list[str] | None = None, prog: str = "python -m dora_fx.examples.demo") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
