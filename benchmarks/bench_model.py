"""A Llama-3-8B-shaped decoder stack with DoRA on all seven projections: dora_fx against plain LoRA +
Inductor (the floor, issue #13), PEFT eager and PEFT + Inductor; eval forward, forward + backward and
gradient accumulation.

    python benchmarks/bench_model.py [--seq 4096] [--ranks 384] [--contenders ...] [--modes ...] [--out ...]
    python benchmarks/bench_model.py --device cpu --accum 2   # smoke run: hidden 64, 2 layers, 64 tokens

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` with random weights (hidden 4096, intermediate
14336, 32 heads, 8 KV heads, 4 layers, vocabulary 1024 by default: the real 128256-entry head and
embedding would only add the same time and memory to every contender), PEFT DoRA (``lora_alpha = 2r``,
dropout 0) on q, k, v, o, gate, up and down, LoRA ``B`` drawn with std ``--b-std``; built in float32,
then cast to bf16. The plain-LoRA stack (``use_dora=False``) has the same base weights and the DoRA
stack's A and B; one stack is on the device at a time. Input: batch 1 x 4096 random token ids
(``--batch``, ``--seq``). Contenders: ``_common.lora_contenders`` (plain LoRA eager and + Inductor) and
``_common.contenders`` (PEFT eager, PEFT + Inductor, dora_fx with the norm recomputed every call, and
dora_fx reusing its cached norm in eval, forward only).

- fwd: ``model.eval()`` under ``torch.no_grad()``, logits of every position.
- fwd+bwd: ``model.train()``, the causal-LM loss on random labels, ``loss.backward()``.
- accum: ``--accum`` micro-batches, each forward + backward, then AdamW's step and ``zero_grad()``;
  time per micro-batch, the optimizer step included; dora_fx keeps its norm cache across the step.
- time: median step (see ``_common.median_ms``) after the compiling first call; ratios to plain LoRA +
  Inductor, PEFT eager and PEFT + Inductor (``rows[].vs``). With ``--interleave K`` both stacks stay on
  the device and, after every contender has run, each fwd and fwd+bwd step is timed once per round in
  ``K`` rounds, every contender in turn (the order rotated each round): ``ms`` is then the median of the
  rounds (``ms_rounds``), ``ms_sequential`` the figure from the contender's own run. The host's pace
  drifts by tens of percent over minutes, and at 512 tokens the host paces the step, so only
  interleaved times compare there.
- compile: wall time of the first call minus the median step, in a fresh Inductor/Triton cache,
  after one throw-away compile has paid the process's one-time costs.
- memory: ``peak`` = ``max_memory_allocated`` during one step (the stack's weights included, the other
  stack's, resident with ``--interleave``, left out); ``transient`` =
  that peak less what was allocated before the step and less the logits it returns; ``saved`` (forward
  + backward, on any device) = the activations autograd keeps for the backward (``_common.saved_bytes``).
- kernels: the profiler's time per kernel name of the fwd+bwd step (``_common.kernel_times``).
- accuracy: cosine similarity and relative error of the final logits against PEFT eager in float32
  on an upcast copy of the same bf16 weights (DESIGN.md §8: RoPE's ``inv_freq`` is bf16-rounded in
  both, so the comparison measures arithmetic, not a different cast); forward + backward compares the
  loss and every LoRA/magnitude gradient with the same stack's PEFT eager, the largest relative error;
  accum the losses of the micro-batches.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import pathlib
import statistics
import warnings

import _common as C  # first: it puts this checkout on sys.path, ahead of any installed dora_fx
import torch
from torch import nn

import dora_fx
from dora_fx.examples.models import LLAMA_TARGETS, dora_config, randomize_adapters

TARGET_RANK = 384
# Issue #13's targets: (label, mode, contender, key, reference contender, at most: a ratio, or {tokens: ratio},
# the one for the nearest token count applying). The figure is dora_fx's key over the reference's.
TARGETS = (
    ("train fwd+bwd time", "fwd+bwd", "dora_fx", "ms", "lora_inductor", {4096: 1.05, 512: 1.15}),
    ("accum time per micro-batch", "accum", "dora_fx", "ms", "lora_inductor", {4096: 1.04}),
    ("train transient memory", "fwd+bwd", "dora_fx", "transient_bytes", "lora_inductor", {4096: 1.10}),
    ("eval fwd time, norm cached", "fwd", "dora_fx_cached", "ms", "lora_inductor", {4096: 1.03, 512: 1.15}),
    ("train compile time", "fwd+bwd", "dora_fx", "compile_s", "inductor", 1.15),
)
COSINE_FLOOR = 0.999
# The default order of the runs: the floor first, then dora_fx, so that a run cut short keeps what matters.
ALL_CONTENDERS = ("lora_eager", "lora_inductor", "dora_fx", "dora_fx_cached", "inductor", "eager")
assert set(ALL_CONTENDERS) == {*C.CONTENDERS, *C.LORA_CONTENDERS}
MODES = ("fwd", "fwd+bwd", "accum")
COMPILED = ("inductor", "dora_fx", "lora_inductor")  # first call in a fresh Inductor cache; compile_s
PROFILED = COMPILED  # kernel-time breakdown of the train step
REFERENCES = ("lora_inductor", "eager", "inductor")  # every row's ratios to these rows of its (r, mode)
RATIO_KEYS = ("ms", "transient_bytes", "compile_s")
LEARNING_RATE = 1e-5  # AdamW in the accum mode: small, so that the values stay sane over many steps


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq, 2048), tie_word_embeddings=False, use_cache=False,
    )


def build_model(args: argparse.Namespace, r: int, device: torch.device, seed: int,
                adapters: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The PEFT DoRA stack; with ``adapters`` (the LoRA A and B of the DoRA stack of the same seed) the
    plain-LoRA stack (``use_dora=False``) with the same base weights (same seed), A and B."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    config = dora_config(LLAMA_TARGETS, r, dropout=0.0)
    if adapters is not None:
        config = dataclasses.replace(config, use_dora=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = get_peft_model(LlamaForCausalLM(llama_config(args)), config)
    if adapters is None:
        randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_std=args.b_std)
    model = model.to(getattr(torch, args.dtype))
    if adapters is not None:
        unexpected = model.load_state_dict(adapters, strict=False).unexpected_keys
        assert not unexpected, f"LoRA stack lacks {unexpected[:3]}"
    return model


def lora_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the LoRA A and B of ``model``."""
    return {k: v.to("cpu", copy=True) for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def make_batches(args: argparse.Namespace, seed: int, device: torch.device) -> list[dict]:
    """``max(1, --accum)`` batches of random token ids and labels; the first is the fwd and fwd+bwd input."""
    gen = torch.Generator().manual_seed(seed + 2)
    shape = (args.batch, args.seq)
    return [{"input_ids": torch.randint(0, args.vocab, shape, generator=gen).to(device),
             "labels": torch.randint(0, args.vocab, shape, generator=gen).to(device)}
            for _ in range(max(1, args.accum))]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def clear_grads(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


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


def references(model: nn.Module, batches: list[dict], device: torch.device) -> dict:
    """What every contender of ``model`` is checked against, from PEFT eager: the float32 logits on an upcast
    copy of the weights (fwd), the loss and gradients (fwd+bwd, on the CPU) and the losses of the micro-batches
    (accum: the first step's, before its optimizer step changes anything)."""
    batch = batches[0]
    with torch.no_grad():
        logits = copy.deepcopy(model).float().eval()(input_ids=batch["input_ids"]).logits
    C.free(device)
    params = trainable(model)
    model.train()
    loss = C.lm_train_step(model, batch)()
    grads = [t.to("cpu", copy=True) for t in (loss, *(p.grad for p in params))]
    clear_grads(params)
    with torch.no_grad():
        losses = torch.stack([model(**b).loss for b in batches])
    return {"logits": logits, "grads": grads, "accum_losses": losses}


@dataclasses.dataclass
class Timer:
    """A contender's step of one mode, to time again in ``--interleave`` rounds."""

    model: nn.Module
    step: object
    train: bool

    def median_ms(self, device: torch.device, rep_ms: float) -> float:
        if self.train:
            self.model.train()
            return C.median_ms(self.step, device, rep_ms, grad_to_none=trainable(self.model))
        self.model.eval()
        with torch.no_grad():
            return C.median_ms(self.step, device, rep_ms)


def eval_contender(fn, model: nn.Module, batch: dict, ref: dict, first_call, device: torch.device,
                   rep_ms: float) -> dict:
    forward = C.lm_forward(fn, batch)
    model.eval()
    with torch.no_grad():
        logits, first_s = first_call(forward, device)
        fwd = {"first_call_s": first_s, "ms": C.median_ms(forward, device, rep_ms),
               "logit_cosine_vs_fp32": C.cosine(logits, ref["logits"]),
               "logit_err_vs_fp32": C.relative_error(logits, ref["logits"])}
        del logits
        fwd["peak_bytes"], fwd["transient_bytes"] = C.memory(forward, device)
    fwd["timer"] = Timer(model, forward, train=False)
    return fwd


def train_contender(fn, model: nn.Module, batch: dict, ref: dict, first_call, device: torch.device,
                    args: argparse.Namespace, profile: bool) -> dict:
    params = trainable(model)
    train_step = C.lm_train_step(fn, batch)
    model.train()
    loss, first_s = first_call(train_step, device)
    observed = [loss, *(p.grad for p in params)]
    train = {"first_call_s": first_s, "loss": loss.item(),
             "err_vs_eager": max(C.relative_error(a, e.to(a.device)) for a, e in zip(observed, ref["grads"]))}
    del loss, observed
    train["ms"] = C.median_ms(train_step, device, args.rep_ms, grad_to_none=params)
    clear_grads(params)
    train["peak_bytes"], train["transient_bytes"] = C.memory(train_step, device)
    clear_grads(params)
    train["saved_bytes"] = C.saved_bytes(lambda: fn(**batch).loss, exclude=[*model.parameters(), *model.buffers()])
    if profile and args.profile_steps:
        try:  # the profiler is an extra: its failure must not cost the run's other figures
            train["kernels"] = C.kernel_times(lambda: (clear_grads(params), train_step()), device, args.profile_steps)
        except RuntimeError as error:
            train["kernels"] = {"error": str(error)}
        clear_grads(params)
    train["timer"] = Timer(model, train_step, train=True)
    return train


def accum_contender(fn, model: nn.Module, batches: list[dict], ref: dict, device: torch.device, rep_ms: float) -> dict:
    """Gradient accumulation (``_common.lm_accumulation_step``) with AdamW: ``ms`` per micro-batch, the
    optimizer step included; ``optimizer_ms`` that step alone. The parameters are put back afterwards, so
    that every contender starts from the same values."""
    params = trainable(model)
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    step = C.lm_accumulation_step(fn, batches, optimizer)
    model.train()
    losses, first_s = C.timed_call(step, device)
    accum = {"micro_batches": len(batches), "first_call_s": first_s, "loss": losses.mean().item(),
             "err_vs_eager": C.relative_error(losses, ref["accum_losses"])}
    del losses
    accum["step_ms"] = C.median_ms(step, device, rep_ms * len(batches))  # as many repetitions as fwd+bwd
    accum["ms"] = accum["step_ms"] / len(batches)
    accum["peak_bytes"], accum["transient_bytes"] = C.memory(step, device)
    C.lm_train_step(fn, batches[0])()  # gradients for the optimizer step alone
    accum["optimizer_ms"] = C.median_ms(optimizer.step, device, rep_ms / 4)
    optimizer.zero_grad()
    del optimizer
    with torch.no_grad():
        for p, value in zip(params, saved):
            p.copy_(value)
    return accum


def run_contender(name: str, fns: dict, model: nn.Module, batches: list[dict], ref: dict, args: argparse.Namespace,
                  device: torch.device) -> dict[str, dict]:
    """The selected modes of one contender: ``{mode: results}``."""
    fn = fns[name]
    first_call = compiled_first_call if name in COMPILED else C.timed_call
    results = {}
    if "fwd" in args.modes:
        results["fwd"] = eval_contender(fn, model, batches[0], ref, first_call, device, args.rep_ms)
    if name in C.FORWARD_ONLY:
        return results
    if "fwd+bwd" in args.modes:
        results["fwd+bwd"] = train_contender(fn, model, batches[0], ref, first_call, device, args, name in PROFILED)
    if name in COMPILED:
        for res in results.values():
            res["compile_s"] = res["first_call_s"] - res["ms"] / 1e3
    if "accum" in args.modes and args.accum:
        # dora_fx without clearing its norm cache: one norm may serve every micro-batch until the optimizer
        # step changes A and B.
        accum_fn = fns["dora_fx_cached"] if name == "dora_fx" else fn
        results["accum"] = accum_contender(accum_fn, model, batches, ref, device, args.rep_ms)
    return results


def run_group(args: argparse.Namespace, r: int, model: nn.Module, fns: dict, batches: list[dict],
              device: torch.device, timers: dict):
    """Yields the rows of each selected contender of ``fns`` (all on ``model``), one list per contender, in
    the order of ``--contenders``; ``timers[(contender, mode)]`` gets each fwd and fwd+bwd step."""
    selected = [name for name in args.contenders if name in fns]
    if not selected:
        return
    ref = references(model, batches, device)
    for name in selected:
        print(f"  {name}", flush=True)
        dora_fx.reset_report()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = run_contender(name, fns, model, batches, ref, args, device)
        for mode, res in results.items():
            if (timer := res.pop("timer", None)) is not None:
                timers[(name, mode)] = timer
        extra = {"warnings": sorted({str(w.message) for w in caught if "dora_fx" in str(w.message)})}
        if name == "dora_fx":
            extra["rewrites"] = len(dora_fx.last_report().rewrites)
        yield [{"r": r, "mode": mode, "contender": name, **res, **extra} for mode, res in results.items()]


def interleave(rows: list[dict], timers: dict, rounds: int, device: torch.device, rep_ms: float) -> None:
    """Time every step of ``timers`` once per round, all in turn, the order rotated each round; each row's
    ``ms`` becomes the median of its rounds (``ms_rounds``), its own run's figure ``ms_sequential``."""
    keys = list(timers)
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for k in range(rounds):
        for key in keys[k % len(keys):] + keys[:k % len(keys)]:
            times[key].append(timers[key].median_ms(device, rep_ms))
    for row in rows:
        if (key := (row["contender"], row["mode"])) in times:
            row["ms_sequential"], row["ms_rounds"] = row["ms"], times[key]
            row["ms"] = statistics.median(times[key])


def run_rank(args: argparse.Namespace, r: int, device: torch.device):
    """Yields the rows of each contender at rank ``r``: the plain-LoRA stack's (the same base weights, A
    and B as the DoRA stack's), then the DoRA stack's. One stack on the device at a time, except with
    ``--interleave``: then both stay, and a last (empty) yield follows the retiming of the rows above."""
    seed = 1000 + r
    batches = make_batches(args, seed, device)
    model = build_model(args, r, device, seed)
    timers: dict = {}
    rows: list[dict] = []
    resident = 0  # bytes the LoRA stack holds while the DoRA stack runs (--interleave)
    if set(C.LORA_CONTENDERS) & set(args.contenders):
        adapters = lora_adapters(model)
        del model
        C.free(device)
        lora = build_model(args, r, device, seed, adapters)
        for group in run_group(args, r, lora, C.lora_contenders(lora), batches, device, timers):
            rows += group
            yield group
        del adapters
        if args.interleave:
            C.synchronize(device)
            resident = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        else:
            del lora
            timers.clear()
            C.free(device)
        model = build_model(args, r, device, seed)
    for group in run_group(args, r, model, C.contenders(model), batches, device, timers):
        for row in group:
            if row.get("peak_bytes") is not None:
                row["peak_bytes"] -= resident
        rows += group
        yield group
    if args.interleave:
        interleave(rows, timers, args.interleave, device, args.rep_ms)
        yield []
    del model, timers
    C.free(device)


def _row(rows: list[dict], r: int, mode: str, contender: str) -> dict | None:
    return next((x for x in rows if (x["r"], x["mode"], x["contender"]) == (r, mode, contender)), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_ratios(rows: list[dict]) -> None:
    """``row["vs"][reference][key]``: the row's ``key`` over the reference contender's, same r and mode."""
    for row in rows:
        row["vs"] = {ref: {key: _ratio(row.get(key), other.get(key)) for key in RATIO_KEYS}
                     for ref in REFERENCES if (other := _row(rows, row["r"], row["mode"], ref))}


def _vs(row: dict, ref: str, key: str = "ms") -> float | None:
    return row.get("vs", {}).get(ref, {}).get(key)


def print_table(rows: list[dict]) -> None:
    header = ["r", "mode", "contender", "ms", "seq ms", "/lora_ind", "/eager", "/inductor", "peak GiB", "transient GiB",
              "tr/lora_ind", "saved GiB", "compile s", "comp/inductor", "opt ms", "logit cos", "logit err", "loss",
              "err vs eager", "rewrites"]
    lines = []
    for row in rows:
        lines.append([
            row["r"], row["mode"], row["contender"], C.fmt(row["ms"], ".2f"), C.fmt(row.get("ms_sequential"), ".2f"),
            *(C.fmt(_vs(row, ref), ".3f") for ref in REFERENCES),
            C.fmt(_ratio(row["peak_bytes"], C.GiB), ".2f"), C.fmt(_ratio(row["transient_bytes"], C.GiB), ".2f"),
            C.fmt(_vs(row, "lora_inductor", "transient_bytes"), ".3f"),
            C.fmt(_ratio(row.get("saved_bytes"), C.GiB), ".2f"), C.fmt(row.get("compile_s"), ".1f"),
            C.fmt(_vs(row, "inductor", "compile_s"), ".2f"), C.fmt(row.get("optimizer_ms"), ".2f"),
            C.fmt(row.get("logit_cosine_vs_fp32"), ".6f"), C.fmt(row.get("logit_err_vs_fp32"), ".1e"),
            C.fmt(row.get("loss"), ".4f"), C.fmt(row.get("err_vs_eager"), ".1e"), row.get("rewrites"),
        ])
    print(C.table(header, lines))
    for row in rows:
        for message in row.get("warnings", ()):
            print(f"warning (r={row['r']} {row['mode']}): {message}")


def print_kernels(rows: list[dict], top: int = 6) -> None:
    for row in rows:
        k = row.get("kernels")
        if k and "error" in k:
            print(f"kernels, r={row['r']} {row['mode']} {row['contender']}: profiler failed: {k['error']}")
        elif k:
            print(f"kernels, r={row['r']} {row['mode']} {row['contender']}: {k['total_ms']:.2f} ms per step; longest:")
            for entry in k["top"][:top]:
                print(f"  {entry['ms']:8.3f} ms  {entry['count']:6.1f} x  {entry['name'][:90]}")


def evaluate_targets(rows: list[dict], seq: int) -> list[dict]:
    """Issue #13's targets at the rank ``TARGET_RANK`` (else the first rank measured) and the threshold for
    the token count nearest ``seq``: ``[{"label", "r", "tokens", "value", "at_most", "met"}]``."""
    ranks = [row["r"] for row in rows]
    r = TARGET_RANK if TARGET_RANK in ranks or not ranks else ranks[0]
    out = []
    for label, mode, contender, key, ref, at_most in TARGETS:
        tokens = min(at_most, key=lambda t: abs(t - seq)) if isinstance(at_most, dict) else None
        row = _row(rows, r, mode, contender)
        value = None if row is None else _vs(row, ref, key)
        threshold = at_most[tokens] if tokens else at_most
        out.append({"label": f"{label} / {ref}'s", "r": r, "tokens": tokens, "value": value, "at_most": threshold,
                    "met": None if value is None else value <= threshold})
    return out


def print_targets(payload: dict) -> None:
    rows, seq = payload["rows"], payload["config"]["seq"]
    targets = evaluate_targets(rows, seq)
    if not targets or not rows:
        return
    r = targets[0]["r"]
    other_rank = "" if r == TARGET_RANK else f"; set for r={TARGET_RANK}"
    print(f"targets (issue #13; dora_fx, r={r}, {seq} tokens{other_rank}):")
    for t in targets:
        note = "" if t["tokens"] in (None, seq) else f" (set for {t['tokens']} tokens)"
        print(C.target_line(t["label"] + note, t["value"], t["at_most"], at_least=False))
    cosine, theirs = (None if row is None else row.get("logit_cosine_vs_fp32")
                      for row in (_row(rows, r, "fwd", "dora_fx"), _row(rows, r, "fwd", "inductor")))
    print(C.target_line("logit cosine vs fp32", cosine, COSINE_FLOOR, unit=""))
    print(C.target_line("logit cosine minus inductor's", None if cosine is None or theirs is None else cosine - theirs,
                        0.0, unit="") + " (info)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (tiny smoke sizes)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks, run in this order (default 384; cpu: 8)")
    parser.add_argument("--contenders", nargs="+", choices=ALL_CONTENDERS, default=list(ALL_CONTENDERS),
                        help="a subset to run (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="a subset to run (default: all)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step in the accum mode")
    parser.add_argument("--layers", type=int, help="decoder layers (default 4; cpu: 2)")
    C.add_llama_shape_arguments(parser)
    parser.add_argument("--seq", type=int, help="tokens per sequence (default 4096; cpu: 64)")
    parser.add_argument("--rep-ms", type=float, help="time spent repeating each measurement (default 200; cpu: 100)")
    parser.add_argument("--interleave", type=int, default=0, metavar="K",
                        help="time the fwd and fwd+bwd steps again in K rounds, every contender in turn (both stacks "
                        "on the device); ms is then the median of the rounds")
    parser.add_argument("--profile-steps", type=int, help="train steps profiled for the kernel times, 0: none "
                        "(default 3; cpu: 1, operators' CPU time)")
    parser.add_argument("--out", default="benchmarks/results/model.json")
    parser.add_argument("--print-only", action="store_true", help="print the tables of the JSON at --out; run nothing")
    args = parser.parse_args(argv)
    defaults = dict(ranks=[384], layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=1024,
                    seq=4096, rep_ms=200.0, profile_steps=3)
    if args.device == "cpu":
        defaults |= dict(ranks=[8], layers=2, hidden=64, intermediate=224, heads=4, kv_heads=2, vocab=128, seq=64,
                         rep_ms=100.0, profile_steps=1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def print_report(payload: dict) -> None:
    c = payload["config"]
    add_ratios(payload["rows"])  # also for a JSON written before the ratios were stored
    print(f"\nLlama-shaped stack: {c['layers']} layers, hidden {c['hidden']}, intermediate {c['intermediate']}, "
          f"vocab {c['vocab']}, {c['batch']} x {c['seq']} tokens, {c['dtype']}, "
          f"{payload['env'].get('gpu', c['device'])}, {payload['env']['date']}")
    print("ms = median step (accum: per micro-batch, the optimizer step included; with --interleave the median of "
          "the rounds, seq ms the contender's own run); /X = this row's figure over "
          "contender X's, same mode; compile s = first call - median step; logit cos/err vs eager fp32 on upcast "
          "weights; err vs eager = loss and LoRA gradients (accum: the micro-batch losses) vs eager")
    print_table(payload["rows"])
    print_kernels(payload["rows"])
    print_targets(payload)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.print_only:
        print_report(json.loads(pathlib.Path(args.out).read_text()))
        return
    device = torch.device(args.device)
    payload = {"env": C.environment(device),
               "config": {**vars(args), "dora_targets": LLAMA_TARGETS, "dropout": 0.0, "lora_alpha": "2r",
                          "learning_rate": LEARNING_RATE},
               "rows": []}
    warm_up_compiler(device)
    if args.interleave:  # both stacks' compiled steps stay: more entries per code object than one stack's
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
    for r in args.ranks:
        print(f"rank {r}", flush=True)
        for rows in run_rank(args, r, device):  # the JSON rewritten after each contender
            payload["rows"] += rows
            add_ratios(payload["rows"])
            payload["targets"] = evaluate_targets(payload["rows"], args.seq)
            C.write_json(args.out, payload)
    print(f"wrote {args.out}")
    print_report(payload)


if __name__ == "__main__":
    main()
