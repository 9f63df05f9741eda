"""QDoRA: a Llama-3-8B-shaped stack over an NF4 base, PEFT eager vs dora_fx, forward + backward time and
peak memory, and the transient memory of the norm of one 4096 x 14336 NF4 layer.

    python benchmarks/bench_qdora.py [--layers 4] [--rank 384] [--seq 4096] [--base nf4] [--out ...]
    python benchmarks/bench_qdora.py --quick          # 1 layer, 1024 tokens: a minute
    python benchmarks/bench_qdora.py --device cpu     # smoke run at tiny sizes

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` with random weights (hidden 4096, intermediate
14336, 32 heads, 8 KV heads, vocabulary 1024), cast to bf16; q, k, v, o, gate, up and down replaced
by bitsandbytes ``Linear4bit`` (``--base``: nf4 by default; fp4, "-dq" double quantization, int8)
quantized on the device, as ``BitsAndBytesConfig`` loading leaves them; PEFT DoRA (``lora_alpha = 2r``,
dropout 0) on all seven, adapters in bf16, LoRA ``B`` drawn with std ``--b-std``. Input: batch 1 x
``--seq`` random token ids.

- forward + backward: ``model.train()``, the causal-LM loss on random labels, ``loss.backward()``;
  median step time after the compiling first call (``_common.median_ms``), and ``peak`` =
  ``max_memory_allocated`` during one step (weights included).
- forward: ``model.eval()`` under ``torch.no_grad()`` (information).
- accuracy: the loss and every LoRA / magnitude gradient of dora_fx against PEFT eager's (largest
  relative error).
- norm: one DoRA layer d_out = 4096, d_in = 14336 (``down_proj``), r = ``--rank``: PEFT's norm as its
  eager code computes it (dequantize W, ``lora_B(lora_A(eye))``, ``linalg.norm``) vs
  ``dora_fx::weight_norm_4bit``; time and transient memory (peak less what was allocated before, less
  the result).
"""

from __future__ import annotations

import argparse
import warnings

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch
from torch import nn

import dora_fx
from dora_fx import norm_cache, quantized
from dora_fx.examples import models
from dora_fx.examples.models import LLAMA_TARGETS

PEAK_MEMORY_TARGET = 0.70  # dora_fx fwd+bwd peak over PEFT eager's, at most
SPEEDUP_TARGET = 1.5  # fwd+bwd, PEFT eager time over dora_fx's, at least
NORM_TRANSIENT_TARGET_MIB = 64.0
QLORA_TARGET = 1.10  # dora_fx fwd+bwd time and memory over QLoRA + Inductor's, at most (issue #13)


def build_model(args: argparse.Namespace, device: torch.device, use_dora: bool = True) -> nn.Module:
    """The stack; ``use_dora=False`` gives QLoRA over the same quantized base with the same A and B."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype)
    models.quantize_linears(base, LLAMA_TARGETS, args.base, compute_dtype=dtype, device=device)
    config = models.dora_config(LLAMA_TARGETS, args.rank, dropout=0.0)
    config.use_dora = use_dora
    model = get_peft_model(base, config)
    models.randomize_adapters(model, torch.Generator().manual_seed(args.seed + 1), b_std=args.b_std)
    models.cast_adapters(model, dtype)
    return model


def train_cell(fn, model: nn.Module, batch: dict, device: torch.device, rep_ms: float):
    """``(results, [loss, *grads])`` of the forward + backward of ``fn``."""
    params = [p for p in model.parameters() if p.requires_grad]

    train_step = C.lm_train_step(fn, batch)
    model.train()
    for p in params:
        p.grad = None
    loss, first_s = C.timed_call(train_step, device)
    observed = [loss.float().cpu(), *(p.grad.float().cpu() for p in params)]
    results = {"first_call_s": first_s, "loss": loss.item()}
    results["ms"] = C.median_ms(train_step, device, rep_ms, grad_to_none=params)
    for p in params:
        p.grad = None
    results["peak_bytes"], results["transient_bytes"] = C.memory(train_step, device)
    for p in params:
        p.grad = None
    return results, observed


def forward_cell(fn, model: nn.Module, batch: dict, device: torch.device, rep_ms: float) -> dict:
    forward = C.lm_forward(fn, batch)
    model.eval()
    with torch.no_grad():
        _, first_s = C.timed_call(forward, device)
        results = {"first_call_s": first_s, "ms": C.median_ms(forward, device, rep_ms)}
        results["peak_bytes"], results["transient_bytes"] = C.memory(forward, device)
    return results


def run_stack(args: argparse.Namespace, device: torch.device) -> list[dict]:
    model = build_model(args, device)
    gen = torch.Generator().manual_seed(args.seed + 2)
    shape = (args.batch, args.seq)
    batch = {"input_ids": torch.randint(0, args.vocab, shape, generator=gen).to(device),
             "labels": torch.randint(0, args.vocab, shape, generator=gen).to(device)}
    contenders = {"peft eager": model, "dora_fx": torch.compile(model, backend=dora_fx.dora_backend)}
    if args.inductor:
        contenders["inductor"] = torch.compile(model, backend="inductor")
    rows, eager_observed = [], None
    for name, fn in contenders.items():
        print(f"  {name}", flush=True)
        dora_fx.reset_report()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                train, observed = train_cell(fn, model, batch, device, args.rep_ms)
                if eager_observed is None:
                    eager_observed = observed
                train["err_vs_eager"] = max(C.relative_error(a, e) for a, e in zip(observed, eager_observed))
                fwd = forward_cell(fn, model, batch, device, args.rep_ms)
            except Exception as exc:  # noqa: BLE001  (keep the other contender's numbers; say what failed)
                print(f"  {name} failed: {type(exc).__name__}: {exc}", flush=True)
                train = fwd = {"ms": None, "peak_bytes": None, "error": f"{type(exc).__name__}: {exc}"}
        extra = {"warnings": sorted({str(w.message) for w in caught if "dora_fx" in str(w.message)})}
        if name == "dora_fx":
            report = dora_fx.last_report()
            extra |= {"rewrites": len(report.rewrites), "near_misses": len(report.near_misses),
                      "graph_breaks": report.graph_breaks,
                      "variants": sorted({r.variant for r in report.rewrites})}
        rows += [{"mode": "fwd+bwd", "contender": name, **train, **extra},
                 {"mode": "fwd", "contender": name, **fwd, **extra}]
        C.free(device)
    del model, contenders
    C.free(device)
    rows += qlora_rows(args, batch, device)
    return rows


def qlora_rows(args: argparse.Namespace, batch: dict, device: torch.device) -> list[dict]:
    """The floor: plain LoRA over the same quantized base (QLoRA), + Inductor."""
    print("  qlora_inductor", flush=True)
    model = build_model(args, device, use_dora=False)
    fn = torch.compile(model, backend="inductor")
    try:
        train, _ = train_cell(fn, model, batch, device, args.rep_ms)
        fwd = forward_cell(fn, model, batch, device, args.rep_ms)
    except Exception as exc:  # noqa: BLE001  (keep the other contenders' numbers; say what failed)
        print(f"  qlora_inductor failed: {type(exc).__name__}: {exc}", flush=True)
        train = fwd = {"ms": None, "peak_bytes": None, "error": f"{type(exc).__name__}: {exc}"}
    del model, fn
    C.free(device)
    return [{"mode": "fwd+bwd", "contender": "qlora_inductor", **train},
            {"mode": "fwd", "contender": "qlora_inductor", **fwd}]


def peft_norm(layer, adapter: str = "default") -> torch.Tensor:
    """The norm as PEFT's eager DoRA forward computes it (``DoraLinearLayer.forward``)."""
    from peft.utils.integrations import dequantize_module_weight

    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
    lora_weight = lora_B(lora_A(eye)).T
    weight = dequantize_module_weight(layer.get_base_layer()).to(lora_weight.dtype)
    return torch.linalg.norm(weight + layer.scaling[adapter] * lora_weight, dim=1)


def dora_fx_norm(layer, adapter: str = "default") -> torch.Tensor:
    state = layer.get_base_layer().weight.quant_state
    return torch.ops.dora_fx.weight_norm_4bit(
        layer.get_base_layer().weight, quantized.absmax_float(state), state.blocksize, state.quant_type,
        list(state.shape), state.dtype, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
        layer.scaling[adapter],
    )


def run_norm(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """One d_out x d_in 4-bit DoRA layer: PEFT's norm against dora_fx's (recomputed and cached ||W||²)."""
    from peft import get_peft_model

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    with torch.device(device):
        base = nn.Sequential(nn.Linear(args.norm_d_in, args.norm_d_out, bias=False, dtype=dtype))
    models.quantize_linears(base, ["0"], args.base if args.base != "int8" else "nf4", compute_dtype=dtype,
                            device=device)
    model = get_peft_model(base, models.dora_config(["0"], args.rank, dropout=0.0))
    models.randomize_adapters(model, torch.Generator().manual_seed(args.seed + 1), b_std=args.b_std)
    models.cast_adapters(model, dtype)
    layer = model.base_model.model[0]
    exact = peft_norm(layer).float()
    rows = []
    with torch.no_grad():
        for name, fn, clear in (("peft eager", peft_norm, False), ("dora_fx", dora_fx_norm, True),
                                ("dora_fx, ||W||² cached", dora_fx_norm, False)):
            def call(fn=fn, clear=clear, layer=layer):
                if clear:
                    norm_cache.clear()
                return fn(layer)

            call()
            err = C.relative_error(call().float(), exact)
            peak, transient = C.memory(call, device)
            rows.append({"contender": name, "ms": C.median_ms(call, device, args.rep_ms), "peak_bytes": peak,
                         "transient_bytes": transient, "err_vs_peft": err})
    del model, layer, exact
    C.free(device)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def print_report(payload: dict) -> None:
    c = payload["config"]
    print(f"\nQDoRA Llama-shaped stack: {c['layers']} layers, hidden {c['hidden']}, intermediate "
          f"{c['intermediate']}, {c['base']} base, r = {c['rank']}, {c['batch']} x {c['seq']} tokens, {c['dtype']}, "
          f"{payload['env'].get('gpu', c['device'])}, {payload['env']['date']}")
    rows = payload["stack"]
    eager = {r["mode"]: r for r in rows if r["contender"] == "peft eager"}
    lines = []
    for r in rows:
        base = eager[r["mode"]]
        lines.append([r["mode"], r["contender"], C.fmt(r["ms"], ".2f"), C.fmt(_ratio(base["ms"], r["ms"]), ".2f"),
                      C.fmt(C.mib(r["peak_bytes"]), ".0f"), C.fmt(_ratio(r["peak_bytes"], base["peak_bytes"]), ".2f"),
                      C.fmt(r.get("err_vs_eager"), ".1e"), r.get("rewrites"), len(r.get("graph_breaks", {})) or None])
    print(C.table(["mode", "contender", "ms", "x eager", "peak MiB", "peak / eager", "grad err", "rewrites",
                   "break kinds"], lines))
    dora = next(r for r in rows if r["contender"] == "dora_fx" and r["mode"] == "fwd+bwd")
    for reason, count in dora.get("graph_breaks", {}).items():
        print(f"graph break ({count}x): {reason.splitlines()[0]}")
    for message in dora.get("warnings", ()):
        print(f"warning: {message}")
    n = payload["norm"]
    norm_base = "nf4" if c["base"] == "int8" else c["base"]  # the norm cell measures a 4-bit layer
    print(f"\nnorm of one {c['norm_d_out']} x {c['norm_d_in']} {norm_base} layer, r = {c['rank']}:")
    print(C.table(["contender", "ms", "transient MiB", "rel err vs PEFT"],
                  [[r["contender"], C.fmt(r["ms"], ".3f"), C.fmt(C.mib(r["transient_bytes"]), ".1f"),
                    C.fmt(r["err_vs_peft"], ".1e")] for r in n]))
    for r in rows:
        if "error" in r:
            print(f"{r['contender']} ({r['mode']}) failed: {r['error']}")
    print("targets:")
    print(C.target_line("fwd+bwd speed-up vs PEFT eager", _ratio(eager["fwd+bwd"]["ms"], dora["ms"]), SPEEDUP_TARGET))
    ratio = _ratio(dora["peak_bytes"], eager["fwd+bwd"]["peak_bytes"])
    print(C.target_line("fwd+bwd peak memory / PEFT eager's", ratio, PEAK_MEMORY_TARGET, at_least=False))
    qlora = next((r for r in rows if r["contender"] == "qlora_inductor" and r["mode"] == "fwd+bwd"), {})
    for what, key in (("time", "ms"), ("peak memory", "peak_bytes"), ("transient memory", "transient_bytes")):
        print(C.target_line(f"fwd+bwd {what} / QLoRA + Inductor's", _ratio(dora.get(key), qlora.get(key)),
                            QLORA_TARGET, at_least=False))
    if "norm_error" in payload:
        print(f"norm cell failed: {payload['norm_error']}")
    norm = next((r for r in n if r["contender"] == "dora_fx"), {})  # ||W||² recomputed: the first call's cost
    print(C.target_line("norm transient memory", C.mib(norm.get("transient_bytes")), NORM_TRANSIENT_TARGET_MIB,
                        at_least=False, unit=" MiB"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny smoke sizes)")
    parser.add_argument("--quick", action="store_true", help="1 layer, 1024 tokens, shorter timing")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--base", default="nf4", choices=models.QUANTIZED_BASES)
    parser.add_argument("--rank", type=int, help="LoRA rank (default 384; cpu: 8)")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; --quick 1; cpu: 2)")
    C.add_llama_shape_arguments(parser)
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 4096; --quick 1024; cpu: 64)")
    parser.add_argument("--norm-d-out", type=int, help="norm cell: d_out (default 4096; cpu: 64)")
    parser.add_argument("--norm-d-in", type=int, help="norm cell: d_in (default 14336; cpu: 224)")
    parser.add_argument("--inductor", action="store_true", help="also plain torch.compile (Inductor)")
    parser.add_argument("--rep-ms", type=float, help="time spent repeating each measurement (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/qdora.json")
    args = parser.parse_args(argv)
    defaults = dict(rank=384, layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=1024, seq=4096,
                    norm_d_out=4096, norm_d_in=14336, rep_ms=500.0)
    if args.quick:
        defaults |= dict(layers=1, seq=1024, rep_ms=200.0)
    if args.device == "cpu":
        defaults |= dict(rank=8, layers=2, hidden=64, intermediate=224, heads=4, kv_heads=2, vocab=128, seq=64,
                         norm_d_out=64, norm_d_in=224, rep_ms=100.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    payload = {"env": C.environment(device), "config": {**vars(args), "dora_targets": LLAMA_TARGETS},
               "targets": {"speedup_fwd_bwd": SPEEDUP_TARGET, "peak_ratio_fwd_bwd": PEAK_MEMORY_TARGET,
                           "norm_transient_mib": NORM_TRANSIENT_TARGET_MIB}}
    print("norm cell", flush=True)
    try:
        payload["norm"] = run_norm(args, device)
    except Exception as exc:  # noqa: BLE001  (the stack still runs; the report says what failed)
        print(f"  norm cell failed: {type(exc).__name__}: {exc}", flush=True)
        payload["norm"], payload["norm_error"] = [], f"{type(exc).__name__}: {exc}"
    C.write_json(args.out, payload)
    print("stack", flush=True)
    payload["stack"] = run_stack(args, device)
    C.write_json(args.out, payload)
    print(f"wrote {args.out}")
    print_report(payload)


if __name__ == "__main__":
    main()
