"""Unmerged DoRA generation: HF ``generate()`` on the Llama-3-8B-shaped stack, dora_fx against PEFT and
plain LoRA (issue #14).

    python benchmarks/bench_generate.py [--batches 1 8] [--prompt 256] [--new 128] [--modes default reduce-overhead]
    python benchmarks/bench_generate.py --device cpu       # smoke run: tiny stack, 8 + 4 tokens

The stacks of ``bench_model.py`` (random weights, 4 layers, DoRA r = 384 on all seven projections; the
LoRA stack with the same base, A and B), a static KV cache, greedy decoding. The forward of the
transformers model is compiled in place (``forward = torch.compile(forward, backend=..., mode=...)``;
transformers' own automatic compile is switched off with ``disable_compile=True``). Contenders:

- ``dora_eager``: PEFT DoRA as is; ``dora_caching``: the same under ``peft.helpers.DoraCaching``;
- ``lora_eager``; ``lora_compiled/<mode>``: plain LoRA, ``backend="inductor"``;
- ``dora_fx/<mode>``: PEFT DoRA, ``backend=dora_fx.dora_backend``.

Per contender and batch size: first-token latency (``max_new_tokens=1``, the prefill), tokens per
second over the whole generation (new tokens x batch / time), and the generated tokens against
``dora_eager``'s (the DoRA contenders) or ``lora_eager``'s (the LoRA ones): equal, or the first
position where they differ. A contender that fails records
its error and the run goes on. Times: median of ``--repeats`` calls after a warm-up call.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch
from transformers import StaticCache

import bench_model
import dora_fx

TARGETS = {"vs_lora_compiled": 0.9, "vs_dora_eager": 4.0}  # tokens/s ratios, CUDA graphs mode


def _generate(model, prompt: torch.Tensor, new: int, cache: StaticCache):
    """Greedy ``generate()`` into ``cache``, emptied first: the same cache tensors on every call, as a
    CUDA graph needs. ``use_cache`` is explicit: the stacks' configs switch the cache off for training,
    and ``generate()`` without it feeds the whole sequence at every step (no KV cache at all)."""
    cache.reset()
    return model.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
        do_sample=False, use_cache=True, past_key_values=cache, disable_compile=True, pad_token_id=0,
    )


def _timed(fn, device: torch.device, repeats: int) -> tuple[object, float]:
    """``(last output, median seconds)`` of ``repeats`` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        C.synchronize(device)
        start = time.perf_counter()
        out = fn()
        C.synchronize(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def _first_difference(tokens: torch.Tensor, reference: torch.Tensor) -> int | None:
    """The first generated position where ``tokens`` differ from ``reference`` in any row, or None."""
    differs = (tokens != reference).any(dim=0).nonzero()
    return None if differs.numel() == 0 else int(differs[0])


def _compiled_graphs() -> int:
    """Graphs Dynamo has compiled in this process: a static cache needs two per batch size (the prefill
    and the decoding step); more means shapes or guards changed from token to token."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _compiled_in_place(peft_model, backend, mode: str):
    """``peft_model`` with its transformers model's forward compiled; undo with ``_restore``.

    The logits are copied out of each call: under CUDA graphs an output lives in the graph's memory
    until the next replay, and ``generate()`` reads the last step's logits after it.
    """
    inner = peft_model.get_base_model()
    compiled = torch.compile(inner.forward, backend=backend, mode=None if mode == "default" else mode)

    def forward(*args, **kwargs):
        out = compiled(*args, **kwargs)
        out.logits = out.logits.clone()
        return out

    inner.forward = forward
    return peft_model


def _static_cache(peft_model, prompt: torch.Tensor, length: int) -> StaticCache:
    """A static cache of ``length`` tokens for ``prompt``'s batch, its tensors allocated by one eager
    forward (allocated inside a compiled prefill they would not be marked static, and every CUDA
    graph that writes them would be skipped)."""
    cache = StaticCache(config=peft_model.config, max_cache_len=length)
    inner = peft_model.get_base_model()
    with torch.no_grad():
        type(inner).forward(inner, input_ids=prompt[:, :1], past_key_values=cache, use_cache=True)
    return cache


def _restore(peft_model) -> None:
    inner = peft_model.get_base_model()
    vars(inner).pop("forward", None)
    torch._dynamo.reset()


def measure(name: str, model, prompts: dict[int, torch.Tensor], args, device, reference: dict, context=None) -> list:
    rows = []
    for batch, prompt in prompts.items():
        row = {"contender": name, "batch": batch}
        graphs_before = _compiled_graphs()
        try:
            cache = _static_cache(model, prompt, args.prompt + args.new)
            with context() if context else contextlib.nullcontext():
                _, prefill_s = _timed(lambda: _generate(model, prompt, 1, cache), device, args.repeats)
                tokens, total_s = _timed(lambda: _generate(model, prompt, args.new, cache), device, args.repeats)
            tokens = tokens[:, prompt.shape[1]:].cpu()
            reference.setdefault(batch, tokens)
            row |= {"first_token_ms": 1e3 * prefill_s, "tokens_per_s": args.new * batch / total_s,
                    "first_difference": _first_difference(tokens, reference[batch]),
                    "graphs_compiled": _compiled_graphs() - graphs_before}
        except Exception as exc:  # a contender that fails is a result, not the end of the run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(f"  {name} batch {batch}: {row}", flush=True)
        rows.append(row)
    return rows


def run(args, save=lambda rows: None) -> list[dict]:
    """Every contender's rows; ``save(rows so far)`` after each contender, so a run cut short keeps them."""
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(7)
    prompts = {b: torch.randint(1, args.vocab, (b, args.prompt), generator=gen).to(device) for b in args.batches}
    seed = 1000 + args.rank
    dora = bench_model.build_model(args, args.rank, device, seed).eval()
    adapters = bench_model.lora_adapters(dora)
    dora_reference: dict[int, torch.Tensor] = {}  # dora_eager's tokens per batch size
    reference = dora_reference
    rows = measure("dora_eager", dora, prompts, args, device, reference)
    save(rows)
    for mode in args.modes:
        rows += measure(f"dora_fx/{mode}", _compiled_in_place(dora, dora_fx.dora_backend, mode), prompts, args, device,
                        reference)
        _restore(dora)
        save(rows)
    del dora
    C.free(device)
    lora = bench_model.build_model(args, args.rank, device, seed, adapters).eval()
    reference = {}  # lora_eager's tokens per batch size
    rows += measure("lora_eager", lora, prompts, args, device, reference)
    save(rows)
    for mode in args.modes:
        rows += measure(f"lora_compiled/{mode}", _compiled_in_place(lora, "inductor", mode), prompts, args, device,
                        reference)
        _restore(lora)
        save(rows)
    del lora
    C.free(device)
    if args.caching:  # last: the slowest contender
        dora = bench_model.build_model(args, args.rank, device, seed).eval()
        from peft.helpers import DoraCaching

        rows += measure("dora_caching", dora, prompts, args, device, dora_reference, context=DoraCaching)
        save(rows)
    return rows


def _get(rows, contender, batch, key="tokens_per_s"):
    row = next((r for r in rows if r["contender"] == contender and r["batch"] == batch), None)
    return None if row is None else row.get(key)


def _difference(row: dict) -> str:
    if "error" in row:
        return "-"
    return "equal" if row["first_difference"] is None else f"at token {row['first_difference']}"


def print_report(rows: list[dict], args) -> None:
    header = ["contender", "batch", "first token ms", "tokens/s", "/ lora_compiled", "first difference", "graphs", "error"]
    lines = []
    for row in rows:
        mode = row["contender"].partition("/")[2] or args.modes[-1]
        floor = _get(rows, f"lora_compiled/{mode}", row["batch"])
        lines.append([row["contender"], row["batch"], C.fmt(row.get("first_token_ms"), ".2f"),
                      C.fmt(row.get("tokens_per_s"), ".1f"), C.fmt(bench_model._ratio(row.get("tokens_per_s"), floor), ".3f"),
                      _difference(row), row.get("graphs_compiled", "-"), row.get("error", "")])
    print(C.table(header, lines))
    mode = "reduce-overhead" if "reduce-overhead" in args.modes else args.modes[-1]
    for batch in args.batches:
        ours = _get(rows, f"dora_fx/{mode}", batch)
        print(C.target_line(f"batch {batch} ({mode}): tokens/s / lora_compiled's",
                            bench_model._ratio(ours, _get(rows, f"lora_compiled/{mode}", batch)),
                            TARGETS["vs_lora_compiled"]))
        print(C.target_line(f"batch {batch} ({mode}): tokens/s / dora_eager's",
                            bench_model._ratio(ours, _get(rows, "dora_eager", batch)), TARGETS["vs_dora_eager"]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rank", type=int, help="LoRA rank (default 384; cpu: 8)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; cpu: 2)")
    C.add_llama_shape_arguments(parser)
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8; cpu: 1 2)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 256; cpu: 8)")
    parser.add_argument("--new", type=int, help="new tokens (default 128; cpu: 4)")
    parser.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"],
                        help="torch.compile modes of the compiled contenders")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-caching", dest="caching", action="store_false",
                        help="leave out the PEFT DoRA + DoraCaching contender")
    parser.add_argument("--out", default="benchmarks/results/generate.json")
    args = parser.parse_args(argv)
    defaults = dict(rank=384, layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=1024,
                    batches=[1, 8], prompt=256, new=128)
    if args.device == "cpu":
        defaults |= dict(rank=8, layers=2, hidden=64, intermediate=224, heads=4, kv_heads=2, vocab=128,
                         batches=[1, 2], prompt=8, new=4)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.seq = args.prompt + args.new  # bench_model's config reads it for the position table
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    env = C.environment(torch.device(args.device))
    rows = run(args, save=lambda rows: C.write_json(args.out, {"env": env, "config": vars(args), "rows": rows,
                                                               "targets": TARGETS}))
    print(f"wrote {args.out}")
    print_report(rows, args)


if __name__ == "__main__":
    main()
