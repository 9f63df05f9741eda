"""Timing, memory, error and reporting helpers shared by the end-to-end benchmarks.

Times are medians: on CUDA of ``triton.testing.do_bench`` (device events, L2 flushed before each
run), on the CPU of ``time.perf_counter`` around synchronous calls. Memory is measured on CUDA only.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: import the dora_fx next to it
    sys.path.insert(0, str(REPO))

MiB = 2**20
GiB = 2**30

CONTENDERS = ("eager", "inductor", "dora_fx", "dora_fx_cached")
LORA_CONTENDERS = ("lora_eager", "lora_inductor")  # the floor: the same model with plain LoRA (use_dora=False)
FORWARD_ONLY = ("dora_fx_cached",)


def contenders(model: torch.nn.Module) -> dict[str, Callable]:
    """The contenders, sharing ``model``'s parameters.

    ``eager``: PEFT as is. ``inductor``: ``torch.compile(backend="inductor")``. ``dora_fx``:
    ``torch.compile(backend=dora_fx.dora_backend)`` with A's and B's version counters moved on before
    every call, as an optimizer step moves them, so the norm is computed each time, as in training
    (the frozen W's ||W||² is kept, as in training). ``dora_fx_cached`` (forward only): the same compiled model as it runs in eval by default,
    reusing the norm while W, A and B are unchanged (compare with ``peft.helpers.DoraCaching``).
    """
    import dora_fx

    compiled = torch.compile(model, backend=dora_fx.dora_backend)
    return {"eager": model, "inductor": torch.compile(model, backend="inductor"),
            "dora_fx": recomputing_norm(compiled, model), "dora_fx_cached": compiled}


def recomputing_norm(compiled: Callable, model: torch.nn.Module) -> Callable:
    """``compiled`` (``model`` compiled with dora_fx) called as after an optimizer step: A's and B's
    version counters move on before every call (no kernel launched for it), so the norm is computed
    each time; the frozen W's ||W||² stays valid, as in training."""
    adapters = [p for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n]

    def recompute_norm(*args, **kwargs):
        torch._C._autograd._unsafe_set_version_counter(tuple(adapters), tuple(p._version + 1 for p in adapters))
        return compiled(*args, **kwargs)

    return recompute_norm


def peft_linears(layers: int, d: int, r: int, use_dora: bool, device: str) -> torch.nn.Module:
    """``layers`` bias-free ``d x d`` Linears in a Sequential with PEFT DoRA (or, ``use_dora=False``,
    plain LoRA) of rank ``r`` on each, random non-zero adapters (seeded), bf16, in eval mode."""
    from peft import get_peft_model

    from dora_fx.examples.models import dora_config, randomize_adapters

    torch.manual_seed(0)
    with torch.device(device):
        config = dora_config([str(i) for i in range(layers)], r, dropout=0.0)
        config.use_dora = use_dora
        model = get_peft_model(torch.nn.Sequential(*(torch.nn.Linear(d, d, bias=False) for _ in range(layers))), config)
    randomize_adapters(model, torch.Generator().manual_seed(1))
    return model.to(torch.bfloat16).eval()


def lora_contenders(model: torch.nn.Module) -> dict[str, Callable]:
    """The plain-LoRA contenders on ``model`` (a PEFT model with ``use_dora=False``): eager and Inductor."""
    return {"lora_eager": model, "lora_inductor": torch.compile(model, backend="inductor")}


def add_llama_shape_arguments(parser) -> None:
    """The Llama-stack shape options shared by bench_model.py and bench_qdora.py (defaults: Llama-3-8B's
    layer shapes on CUDA, tiny ones on the CPU; each script fills them in)."""
    parser.add_argument("--hidden", type=int, help="hidden size (default 4096; cpu: 64)")
    parser.add_argument("--intermediate", type=int, help="MLP size (default 14336; cpu: 224)")
    parser.add_argument("--heads", type=int, help="attention heads (default 32; cpu: 4)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default 8; cpu: 2)")
    parser.add_argument("--vocab", type=int, help="vocabulary (default 1024; cpu: 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--b-std", type=float, default=0.02, help="std of the random LoRA B")


# (option, on CUDA, on the CPU): Llama-3-8B's layer shapes and 512 tokens on CUDA, tiny ones on the CPU.
_STEP_SHAPES = (("hidden", 4096, 64), ("intermediate", 14336, 224), ("heads", 32, 4), ("kv_heads", 8, 2),
                ("vocab", 1024, 128), ("seq", 512, 64))


def add_step_arguments(parser, rank: int) -> None:
    """The options of the scripts that look into one step of ``bench_model.py``'s stacks
    (``profile_step.py``, ``host_pace.py``); :func:`step_device` fills in their defaults."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seq", type=int, help="tokens (default 512; cpu: 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=rank)
    add_llama_shape_arguments(parser)


def step_device(args) -> torch.device:
    """The device of :func:`add_step_arguments`' options, with the unset shapes filled in for it and one
    batch (``args.accum = 1``)."""
    device = torch.device(args.device)
    for key, cuda, cpu in _STEP_SHAPES:
        if getattr(args, key) is None:
            setattr(args, key, cuda if device.type == "cuda" else cpu)
    args.accum = 1
    return device


def lm_forward(fn: Callable, batch: dict) -> Callable[[], torch.Tensor]:
    """A call of ``fn`` (a causal LM, eager or compiled) on ``batch``'s token ids: the logits."""
    return lambda: fn(input_ids=batch["input_ids"]).logits


def lm_train_step(fn: Callable, batch: dict) -> Callable[[], torch.Tensor]:
    """A forward + backward of ``fn``'s loss on ``batch`` (ids and labels): the detached loss."""

    def step() -> torch.Tensor:
        loss = fn(**batch).loss
        loss.backward()
        return loss.detach()

    return step


def lm_accumulation_step(fn: Callable, batches: list[dict], optimizer) -> Callable[[], torch.Tensor]:
    """Gradient accumulation: a forward + backward of ``fn``'s loss on each of ``batches`` (the gradients
    summed; AdamW is invariant to their scale), then ``optimizer.step()`` and ``zero_grad()``: the
    detached losses of the micro-batches."""
    micro_steps = [lm_train_step(fn, batch) for batch in batches]

    def step() -> torch.Tensor:
        losses = torch.stack([micro_step() for micro_step in micro_steps])
        optimizer.step()
        optimizer.zero_grad()
        return losses

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, rep_ms: float, grad_to_none=None) -> float:
    """Median time of ``fn()`` in milliseconds, after warm-up; ``rep_ms`` is the time spent repeating."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(1.0, rep_ms / 4), rep=rep_ms, grad_to_none=grad_to_none, return_mode="median")
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 4 or (time.perf_counter() < deadline and len(times) < 100):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])  # the first run is the warm-up


def timed_call(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``(fn(), wall seconds)`` with the device synchronized on both ends."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(nbytes(o) for o in obj)
    return 0


def memory(fn: Callable[[], object], device: torch.device) -> tuple[int | None, int | None]:
    """``(peak, transient)`` bytes of one call of ``fn()``; ``(None, None)`` off CUDA.

    ``peak`` is ``max_memory_allocated`` during the call (weights and inputs included). ``transient``
    is that peak minus what was allocated before the call and minus what the call returns, so the
    persistent weights, inputs and the output itself are excluded.
    """
    if device.type != "cuda":
        return None, None
    import gc

    gc.collect()  # tensors of earlier steps that only a reference cycle keeps must not count as "before"
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    transient = max(0, peak - before - nbytes(out))
    del out
    return peak, transient


def kernel_times(fn: Callable[[], object], device: torch.device, steps: int, top: int = 25) -> dict:
    """Where the time of ``fn()`` goes: ``torch.profiler`` over ``steps`` calls, the time grouped by
    name, per call: on CUDA the kernels' (and copies') device time, on the CPU the operators' self
    time. ``{"steps", "total_ms", "top": [{"name", "ms", "count"}, ...]}``, ``top`` names, longest first;
    ``total_ms`` sums every name."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        synchronize(device)
    names = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps, e.count / steps)
             for e in prof.key_averages()]
    names = sorted((n for n in names if n[1] > 0), key=lambda n: -n[1])
    return {"steps": steps, "total_ms": sum(ms for _, ms, _ in names),
            "top": [{"name": name, "ms": ms, "count": count} for name, ms, count in names[:top]]}


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()`` (a forward), other
    than those of ``exclude`` (weights, inputs): the activations the step holds until its backward.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``, which compiled graphs trigger too."""
    known = {t.untyped_storage().data_ptr() for t in exclude}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known and t.device.type != "meta":
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(kept.values())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def cosine(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(actual.double().flatten(), expected.double().flatten(), dim=0).item()


def free(device: torch.device) -> None:
    """Forget compiled code and cached blocks between cells, so each cell starts clean."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    import peft
    import transformers

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        import triton

        env |= {"gpu": torch.cuda.get_device_name(device), "triton": triton.__version__}
    else:
        env |= {"cpu_threads": torch.get_num_threads()}
    return env


def write_json(path: str | pathlib.Path, payload: dict) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def table(header: Iterable[str], rows: Iterable[Iterable]) -> str:
    cells = [list(map(str, header))] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def mib(n: int | None) -> float | None:
    return None if n is None else n / MiB


def fmt(value: float | None, spec: str) -> str | None:
    return None if value is None else format(value, spec)


def target_line(label: str, value: float | None, threshold: float, at_least: bool = True, unit: str = "x") -> str:
    """One line ``label: got value, target >= threshold: met / MISSED`` (``n/a`` when not measured)."""
    sign = ">=" if at_least else "<="
    if value is None:
        return f"  {label}: n/a (cell not measured), target {sign} {threshold:g}{unit}"
    met = value >= threshold if at_least else value <= threshold
    return f"  {label}: {value:.3g}{unit}, target {sign} {threshold:g}{unit}: {'met' if met else 'MISSED'}"
