"""A Llama-3-8B-shaped decoder stack with DoRA on all seven projections: PEFT eager vs PEFT + Inductor
vs dora_fx, forward and forward + backward.

    python benchmarks/bench_model.py [--layers 4] [--ranks 384 16] [--out benchmarks/results/model.json]
    python benchmarks/bench_model.py --device cpu          # smoke run: hidden 64, 2 layers, 64 tokens

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` with random weights (hidden 4096, intermediate
14336, 32 heads, 8 KV heads, 4 layers, vocabulary 1024 by default: the real 128256-entry head and
embedding would only add the same time and memory to every contender), PEFT DoRA (``lora_alpha = 2r``,
dropout 0) on q, k, v, o, gate, up and down, LoRA ``B`` drawn with std ``--b-std``; built in float32,
then cast to bf16. Input: batch 1 x 4096 random token ids (``--batch``, ``--seq``). Contenders: see
``_common.contenders`` (PEFT eager, PEFT + Inductor, dora_fx with the norm recomputed every call, and
dora_fx reusing its cached norm in eval, forward only).

- forward: ``model.eval()`` under ``torch.no_grad()``, logits of every position.
- forward + backward: ``model.train()``, the causal-LM loss on random labels, ``loss.backward()``.
- time: median step (see ``_common.median_ms``) after the compiling first call.
- compile: wall time of the first call minus the median step, in a fresh Inductor/Triton cache,
  after one throw-away compile has paid the process's one-time costs.
- memory: ``peak`` = ``max_memory_allocated`` during one step (weights included); ``transient`` =
  that peak less what was allocated before the step and less the logits it returns; ``saved`` (forward
  + backward, on any device) = the activations autograd keeps for the backward (``_common.saved_bytes``).
- accuracy: cosine similarity and relative error of the final logits against PEFT eager in float32
  on an upcast copy of the same bf16 weights (DESIGN.md §8: RoPE's ``inv_freq`` is bf16-rounded in
  both, so the comparison measures arithmetic, not a different cast); forward + backward compares the
  loss and every LoRA/magnitude gradient with PEFT eager's, the largest relative error.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import warnings

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch
from torch import nn

import dora_fx
from dora_fx.models import LLAMA_TARGETS, dora_config, randomize_adapters

SPEEDUP_TARGETS = {"fwd": (1.9, 1.3), "fwd+bwd": (1.8, 1.3)}  # at r = 384: vs eager, vs inductor
TARGET_RANK = 384
PEAK_MEMORY_TARGET = 0.75  # fwd+bwd peak over PEFT + Inductor's, at most
COSINE_FLOOR = 0.999
COMPILE_TIME_TARGET = 1.2  # dora_fx compile time over plain torch.compile's, at most


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False, use_cache=False,
    )


def build_model(args: argparse.Namespace, r: int, device: torch.device, seed: int) -> nn.Module:
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = get_peft_model(LlamaForCausalLM(llama_config(args)), dora_config(LLAMA_TARGETS, r, dropout=0.0))
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_std=args.b_std)
    return model.to(getattr(torch, args.dtype))


def warm_up_compiler(device: torch.device) -> None:
    """Compile and run a small function with Inductor once, forward and backward, so that the
    process's one-time costs (imports, compile workers) are not charged to the first contender."""
    from torch._inductor.utils import fresh_cache

    x = torch.randn(64, 64, device=device, requires_grad=True)
    with fresh_cache():
        torch.compile(lambda t: torch.nn.functional.silu(t @ t).sum(), backend="inductor")(x).backward()
    torch._dynamo.reset()


def compiled_first_call(fn, device: torch.device) -> tuple[object, float]:
    """The first call of a compiled contender, in a fresh Inductor/Triton cache: ``(output, seconds)``."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        return C.timed_call(fn, device)


def run_contender(name: str, fn, model: nn.Module, batch: dict, reference: torch.Tensor,
                  eager_grads: list[torch.Tensor] | None, device: torch.device, rep_ms: float) -> tuple[dict, list]:
    """Forward and forward + backward of one contender; returns its results and PEFT eager's
    loss and gradients (on the CPU), taken from this contender's first step when ``eager_grads`` is None."""
    first_call = compiled_first_call if name in ("inductor", "dora_fx") else C.timed_call

    forward = C.lm_forward(fn, batch)
    model.eval()
    with torch.no_grad():
        logits, first_s = first_call(forward, device)
        fwd = {"first_call_s": first_s, "ms": C.median_ms(forward, device, rep_ms),
               "logit_cosine_vs_fp32": C.cosine(logits, reference),
               "logit_err_vs_fp32": C.relative_error(logits, reference)}
        del logits
        fwd["peak_bytes"], fwd["transient_bytes"] = C.memory(forward, device)

    results = {"fwd": fwd}
    if name not in C.FORWARD_ONLY:
        results["fwd+bwd"], eager_grads = train_contender(fn, model, batch, eager_grads, first_call, device, rep_ms)
    if name not in ("eager", *C.FORWARD_ONLY):
        for res in results.values():
            res["compile_s"] = res["first_call_s"] - res["ms"] / 1e3
    return results, eager_grads


def train_contender(fn, model: nn.Module, batch: dict, eager_grads: list[torch.Tensor] | None, first_call,
                    device: torch.device, rep_ms: float) -> tuple[dict, list]:
    params = [p for p in model.parameters() if p.requires_grad]

    train_step = C.lm_train_step(fn, batch)
    model.train()
    loss, first_s = first_call(train_step, device)
    observed = [loss, *(p.grad for p in params)]
    if eager_grads is None:
        eager_grads = [t.to("cpu", copy=True) for t in observed]
    train = {"first_call_s": first_s, "loss": loss.item(),
             "err_vs_eager": max(C.relative_error(a, e.to(a.device)) for a, e in zip(observed, eager_grads))}
    del loss, observed
    train["ms"] = C.median_ms(train_step, device, rep_ms, grad_to_none=params)
    for p in params:
        p.grad = None
    train["peak_bytes"], train["transient_bytes"] = C.memory(train_step, device)
    train["saved_bytes"] = C.saved_bytes(lambda: fn(**batch).loss, exclude=[*model.parameters(), *model.buffers()])
    for p in params:
        p.grad = None
    return train, eager_grads


def run_rank(args: argparse.Namespace, r: int, device: torch.device) -> list[dict]:
    """All contenders at rank ``r``: one row per (mode, contender)."""
    seed = 1000 + r
    model = build_model(args, r, device, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    shape = (args.batch, args.seq)
    batch = {"input_ids": torch.randint(0, args.vocab, shape, generator=gen).to(device),
             "labels": torch.randint(0, args.vocab, shape, generator=gen).to(device)}
    with torch.no_grad():
        reference = copy.deepcopy(model).float().eval()(input_ids=batch["input_ids"]).logits
    C.free(device)

    fns = C.contenders(model)
    rows, eager_grads = [], None
    for name, fn in fns.items():
        print(f"  {name}", flush=True)
        dora_fx.reset_report()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results, eager_grads = run_contender(name, fn, model, batch, reference, eager_grads, device, args.rep_ms)
        extra = {"warnings": sorted({str(w.message) for w in caught if "dora_fx" in str(w.message)})}
        if name == "dora_fx":
            extra["rewrites"] = len(dora_fx.last_report().rewrites)
        rows += [{"r": r, "mode": mode, "contender": name, **res, **extra} for mode, res in results.items()]
    del model, fns, batch, reference, eager_grads
    C.free(device)
    return rows


def _row(rows: list[dict], r: int, mode: str, contender: str) -> dict | None:
    return next((x for x in rows if (x["r"], x["mode"], x["contender"]) == (r, mode, contender)), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def print_table(rows: list[dict]) -> None:
    header = ["r", "mode", "contender", "ms", "x eager", "x inductor", "peak GiB", "transient GiB", "saved GiB", "compile s",
              "logit cos", "logit err", "loss", "grad err", "rewrites"]
    lines = []
    for row in rows:
        eager, inductor = (_row(rows, row["r"], row["mode"], c) for c in ("eager", "inductor"))
        lines.append([
            row["r"], row["mode"], row["contender"], C.fmt(row["ms"], ".2f"),
            C.fmt(_ratio(eager["ms"], row["ms"]), ".2f"), C.fmt(_ratio(inductor and inductor["ms"], row["ms"]), ".2f"),
            C.fmt(_ratio(row["peak_bytes"], C.GiB), ".2f"), C.fmt(_ratio(row["transient_bytes"], C.GiB), ".2f"),
            C.fmt(_ratio(row.get("saved_bytes"), C.GiB), ".2f"), C.fmt(row.get("compile_s"), ".1f"),
            C.fmt(row.get("logit_cosine_vs_fp32"), ".6f"), C.fmt(row.get("logit_err_vs_fp32"), ".1e"), C.fmt(row.get("loss"), ".4f"),
            C.fmt(row.get("err_vs_eager"), ".1e"),
            row.get("rewrites"),
        ])
    print(C.table(header, lines))
    for row in rows:
        for message in row.get("warnings", ()):
            print(f"warning (r={row['r']} {row['mode']}): {message}")


def print_targets(rows: list[dict], r: int = TARGET_RANK) -> None:
    def get(mode, contender, key):
        row = _row(rows, r, mode, contender)
        return None if row is None else row.get(key)

    if not any(row["r"] == r for row in rows):
        print(f"targets are for r={r}: not measured")
        return
    print(f"targets (dora_fx, r={r}):")
    for mode, (min_eager, min_inductor) in SPEEDUP_TARGETS.items():
        mine = get(mode, "dora_fx", "ms")
        print(C.target_line(f"{mode} vs eager", _ratio(get(mode, "eager", "ms"), mine), min_eager))
        print(C.target_line(f"{mode} vs inductor", _ratio(get(mode, "inductor", "ms"), mine), min_inductor))
    cached = get("fwd", "dora_fx_cached", "ms")
    min_eager, min_inductor = SPEEDUP_TARGETS["fwd"]
    print(C.target_line("fwd, norm cached, vs eager", _ratio(get("fwd", "eager", "ms"), cached), min_eager) + " (info)")
    print(C.target_line("fwd, norm cached, vs inductor", _ratio(get("fwd", "inductor", "ms"), cached), min_inductor)
          + " (info)")
    for key in ("peak_bytes", "transient_bytes"):
        ratio = _ratio(get("fwd+bwd", "dora_fx", key), get("fwd+bwd", "inductor", key))
        label = f"fwd+bwd {key.removesuffix('_bytes')} memory / inductor's"
        info = "" if key == "peak_bytes" else " (info)"
        print(C.target_line(label, ratio, PEAK_MEMORY_TARGET, at_least=False) + info)
    cosine, theirs = get("fwd", "dora_fx", "logit_cosine_vs_fp32"), get("fwd", "inductor", "logit_cosine_vs_fp32")
    print(C.target_line("logit cosine vs fp32", cosine, COSINE_FLOOR, unit=""))
    print(C.target_line("logit cosine minus inductor's", None if cosine is None or theirs is None else cosine - theirs,
                        0.0, unit=""))
    for mode in SPEEDUP_TARGETS:
        ratio = _ratio(get(mode, "dora_fx", "compile_s"), get(mode, "inductor", "compile_s"))
        print(C.target_line(f"{mode} compile time / inductor's", ratio, COMPILE_TIME_TARGET, at_least=False))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny smoke sizes)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks, run in this order (default 384 16; cpu: 8)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; cpu: 2)")
    C.add_llama_shape_arguments(parser)
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 4096; cpu: 64)")
    parser.add_argument("--rep-ms", type=float, help="time spent repeating each measurement (default 500; cpu: 200)")
    parser.add_argument("--out", default="benchmarks/results/model.json")
    parser.add_argument("--print-only", action="store_true", help="print the tables of the JSON at --out; run nothing")
    args = parser.parse_args(argv)
    defaults = dict(ranks=[384, 16], layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=1024,
                    seq=4096, rep_ms=500.0)
    if args.device == "cpu":
        defaults |= dict(ranks=[8], layers=2, hidden=64, intermediate=224, heads=4, kv_heads=2, vocab=128, seq=64,
                         rep_ms=200.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def print_report(payload: dict) -> None:
    c = payload["config"]
    print(f"\nLlama-shaped stack: {c['layers']} layers, hidden {c['hidden']}, intermediate {c['intermediate']}, "
          f"vocab {c['vocab']}, {c['batch']} x {c['seq']} tokens, {c['dtype']}, "
          f"{payload['env'].get('gpu', c['device'])}, {payload['env']['date']}")
    print("ms = median step; compile s = first call - median step; logit cos/err vs eager fp32 on upcast weights; "
          "grad err = loss and LoRA gradients vs eager")
    print_table(payload["rows"])
    print_targets(payload["rows"])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.print_only:
        print_report(json.loads(pathlib.Path(args.out).read_text()))
        return
    device = torch.device(args.device)
    payload = {"env": C.environment(device),
               "config": {**vars(args), "dora_targets": LLAMA_TARGETS, "dropout": 0.0, "lora_alpha": "2r"},
               "targets": {"r": TARGET_RANK, **{mode: {"vs_eager": e, "vs_inductor": i}
                                                for mode, (e, i) in SPEEDUP_TARGETS.items()}},
               "rows": []}
    warm_up_compiler(device)
    for r in args.ranks:
        print(f"rank {r}", flush=True)
        payload["rows"] += run_rank(args, r, device)
        C.write_json(args.out, payload)
    print(f"wrote {args.out}")
    print_report(payload)


if __name__ == "__main__":
    main()
