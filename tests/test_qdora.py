"""QDoRA: PEFT DoRA over bitsandbytes 4-bit / 8-bit and torchao bases, compiled with dora_fx.

bitsandbytes 0.50 quantizes and runs these layers on the CPU, so the rewrite is checked here on tiny
models; the ``cuda`` tests at the end run the same checks at real sizes on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dora_fx import norm_cache, quantized
from dora_fx.examples import models
from dora_fx.kernels import reference
from tests.helpers import RecordingBackend, assert_close_all, differentiable_inputs, fresh, op_counts, relative_error, step

bnb = pytest.importorskip("bitsandbytes", reason="QDoRA tests need bitsandbytes (the `test` extra installs it)")

FOUR_BIT = ("nf4", "fp4", "nf4-dq", "fp4-dq")
CASES = [(base, "train") for base in FOUR_BIT] + [
    ("nf4-dq", "eval"), ("fp4", "train-dropout"), ("int8", "train"), ("int8", "train-dropout"), ("int8", "eval"),
]
MODES = {"eval": (0.0, False), "train": (0.0, True), "train-dropout": (0.1, True)}


def _compiled_and_eager(name: str, base: str, mode: str, **build):
    """One forward + backward of the compiled model and of eager PEFT, each on a fresh model from the
    same seed (bitsandbytes' 8-bit layer mutates its state in a forward)."""
    dropout, train = MODES[mode]
    example = models.build(name, quantized_base=base, dropout=dropout, **build)
    inputs = differentiable_inputs(example, torch.Generator().manual_seed(11))
    backend = RecordingBackend()
    compiled = torch.compile(example.model.train(train), backend=backend, fullgraph=True)
    out, grads = step(compiled, fresh(inputs), seed=3)
    reference_model = models.build(name, quantized_base=base, dropout=dropout, **build).model.train(train)
    ref_out, ref_grads = step(reference_model, fresh(inputs), seed=3)
    return backend, example, (out, grads), (ref_out, ref_grads)


@pytest.mark.parametrize(("base", "mode"), CASES)
def test_outputs_and_gradients_match_eager_peft(base, mode):
    backend, example, (out, grads), (ref_out, ref_grads) = _compiled_and_eager("mlp", base, mode)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert_close_all(grads, ref_grads, rtol=1e-4, atol=1e-5)
    assert len(backend.report.rewrites) == example.dora_layers
    assert backend.report.near_misses == [] and backend.report.graph_breaks == {}
    label = "int8 base" if base == "int8" else f"{base.removesuffix('-dq')} base"
    assert all(r.variant.endswith(label) for r in backend.report.rewrites)


def _dense_weight_nodes(gm, rewrites) -> list[str]:
    """Nodes producing a floating [d_out, d_in] tensor: a dequantized weight or a dense product."""
    shapes = {(r.d_out, r.d_in) for r in rewrites}
    found = []
    for node in gm.graph.nodes:
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor) and val.dtype.is_floating_point and tuple(val.shape) in shapes:
            found.append(node.name)
    return found


def test_llama_nf4_one_graph_without_dense_weights():
    """A 4-bit DoRA Llama traces as one graph (PEFT's and bitsandbytes' breaks removed), every
    projection is rewritten, and no node forms a dense weight: the norm reads the packed weight."""
    backend, example, (out, grads), (ref_out, ref_grads) = _compiled_and_eager("llama", "nf4-dq", "train")
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert_close_all(grads, ref_grads, rtol=1e-4, atol=1e-5)
    assert len(backend.graphs) == 1 and backend.report.graph_breaks == {}
    assert len(backend.report.rewrites) == example.dora_layers == 14
    assert _dense_weight_nodes(backend.graphs[0], backend.report.rewrites) == []
    # [0]: the outer graph (the graphs nested in it come after it)
    before, after = backend.before["quantized_norm"][0], backend.after["quantized_norm"][0]
    assert op_counts(before)[torch.ops.dora_fx.cached_weight_norm.default] == 14
    assert op_counts(after)[torch.ops.dora_fx.weight_norm_4bit.default] == 14
    assert op_counts(backend.after["dead_code"][0])[torch.ops.dora_fx.cached_weight_norm.default] == 0
    assert backend.report.graphs[0].pass_counts["quantized_norm"] == 14


def test_dropout_keeps_the_dequantized_weight_only_for_the_base_gemm():
    backend, *_ = _compiled_and_eager("mlp", "nf4", "train-dropout")
    gm = backend.graphs[0]
    dequantized = [n for n in gm.graph.nodes if n.target is torch.ops.bitsandbytes.dequantize_4bit.default]
    assert len(dequantized) == 2  # one per layer, for PEFT's second base GEMM on dropout(x)
    for node in dequantized:
        assert {u.target for u in node.users} <= {torch._C._nn.linear, "to"}


def _packed_weight(d_out: int, d_in: int, quant_type: str, double_quant: bool, dtype=torch.float32, device="cpu"):
    weight = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(d_out * d_in)).to(dtype)
    param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant)
    param = param.to(device)
    state = param.quant_state
    packed = quantized.Packed4bit(
        param.data, quantized.absmax_float(state), state.blocksize, state.quant_type, tuple(state.shape), state.dtype
    )
    return param, packed


def _lora(d_out: int, d_in: int, r: int):
    gen = torch.Generator().manual_seed(r)
    return torch.randn(r, d_in, generator=gen) * 0.1, torch.randn(d_out, r, generator=gen) * 0.1


@pytest.mark.parametrize("chunk_elements", [64, 1000, 1 << 22])
@pytest.mark.parametrize(("d_out", "d_in", "quant_type", "double_quant"), [
    (130, 37, "nf4", False),   # rows do not align with 64-element blocks: a chunk is 64 rows
    (96, 192, "fp4", True),
    (1, 64, "nf4", True),
])
def test_chunked_norm_equals_dense_norm_and_stays_in_bounded_chunks(
    monkeypatch, chunk_elements, d_out, d_in, quant_type, double_quant
):
    param, packed = _packed_weight(d_out, d_in, quant_type, double_quant)
    dense = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    lora_A, lora_B = _lora(d_out, d_in, r=5)
    monkeypatch.setattr(quantized, "CHUNK_ELEMENTS", chunk_elements)
    seen_rows = []
    rows = quantized.Packed4bit.rows
    monkeypatch.setattr(quantized.Packed4bit, "rows", lambda self, a, b: seen_rows.append(b - a) or rows(self, a, b))
    norm_cache.clear()
    norm = quantized.weight_norm(packed, lora_A, lora_B, scaling=1.5)
    torch.testing.assert_close(norm, reference.weight_norm(dense, lora_A, lora_B, 1.5, False), rtol=1e-5, atol=1e-6)
    step = packed.row_step()
    bound = max(step, chunk_elements // d_in // step * step)
    assert max(seen_rows) <= bound and sum(seen_rows) == 2 * d_out  # ||W||² once, then W·Aᵀ
    if bound < d_out:
        assert len(seen_rows) > 2


def test_int8_chunked_norm_equals_dense_norm(monkeypatch):
    layer = bnb.nn.Linear8bitLt(40, 24, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(torch.randn(24, 40), requires_grad=False, has_fp16_weights=False)
    layer = layer.to("cpu")
    lora_A, lora_B = _lora(24, 40, r=3)
    monkeypatch.setattr(quantized, "CHUNK_ELEMENTS", 100)
    weight = quantized.Int8Rows(layer.weight.data, layer.weight.SCB)
    dense = quantized.dequantize_bnb(layer)
    torch.testing.assert_close(
        quantized.weight_norm(weight, lora_A, lora_B, 2.0), reference.weight_norm(dense, lora_A, lora_B, 2.0, False)
    )


def test_norm_op_transient_memory_is_bounded(monkeypatch):
    """The op's largest allocation is a chunk, not the dense [d_out, d_in] weight (CPU profiler)."""
    d_out, d_in, r = 512, 256, 8
    param, packed = _packed_weight(d_out, d_in, "nf4", False)
    lora_A, lora_B = _lora(d_out, d_in, r)
    monkeypatch.setattr(quantized, "CHUNK_ELEMENTS", 64 * d_in)
    args = (param.data, packed.absmax, packed.blocksize, packed.quant_type, list(packed.shape), packed.dtype)
    norm_cache.clear()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.ops.dora_fx.weight_norm_4bit(*args, lora_A, lora_B, 1.0)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= 64 * d_in * 4  # one float32 chunk of 64 rows
    assert largest < d_out * d_in * 4 // 4


def test_row_squares_computed_once_and_recomputed_when_the_weight_changes(monkeypatch):
    param, packed = _packed_weight(64, 64, "nf4", True)
    lora_A, lora_B = _lora(64, 64, r=4)
    calls = []
    compute = quantized._compute_row_squares
    monkeypatch.setattr(quantized, "_compute_row_squares", lambda w: calls.append(1) or compute(w))
    norm_cache.clear()
    first = quantized.weight_norm(packed, lora_A, lora_B, 1.0)
    quantized.weight_norm(packed, lora_A * 2, lora_B - 1, 3.0)  # another adapter: the same ||W||²
    assert len(calls) == 1
    with torch.no_grad():
        packed.packed.bitwise_xor_(0x11)  # another 4-bit code in every element: a changed weight
    changed = quantized.weight_norm(packed, lora_A, lora_B, 1.0)
    assert len(calls) == 2
    dense = bnb.functional.dequantize_4bit(param.data, param.quant_state)
    torch.testing.assert_close(changed, reference.weight_norm(dense, lora_A, lora_B, 1.0, False))
    assert not torch.allclose(changed, first)


def test_eval_without_grad_reuses_the_whole_norm_until_an_adapter_changes(monkeypatch):
    example = models.build("mlp", quantized_base="nf4-dq")
    model = example.model.eval()
    inputs = example.make_inputs(torch.Generator().manual_seed(5))
    calls = []
    compute = quantized.weight_norm
    monkeypatch.setattr(quantized, "weight_norm", lambda *a: calls.append(1) or compute(*a))
    norm_cache.clear()
    compiled = torch.compile(model, backend=RecordingBackend(), fullgraph=True)
    with torch.no_grad():
        first = compiled(**inputs)
        torch.testing.assert_close(compiled(**inputs), first)
        assert len(calls) == example.dora_layers
        next(p for n, p in model.named_parameters() if "lora_B" in n).mul_(0.5)
        torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-5, atol=1e-5)
    assert len(calls) == example.dora_layers + 1


class _OwnQuantizedLinear(nn.Linear):
    """A base layer that PEFT dequantizes through ``module.dequantize()`` (its HQQ path), which
    dora_fx leaves to PEFT: a graph break inside the DoRA layer."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out)
        self.W_q = nn.Parameter(self.weight.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.W_q * 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantize(), self.bias)


def test_unsupported_base_is_a_near_miss_with_the_graph_break_listed():
    from peft import LoraConfig, get_peft_model

    def build():
        torch.manual_seed(0)
        model = get_peft_model(nn.Sequential(_OwnQuantizedLinear(32, 16)), LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False))
        return model

    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    backend = RecordingBackend()
    out = torch.compile(build(), backend=backend)(x)
    torch.testing.assert_close(out, build()(x))
    assert backend.report.rewrites == []
    assert any("graph break" in m.reason for m in backend.report.near_misses)  # dora_fx's own reason
    # Dynamo breaks the DoRA layer at PEFT's dequantize_module_weight, which dora_fx's stand-in hands
    # back to PEFT (torch._dynamo.disable): matched by the function's name, not Dynamo's wording.
    assert len(backend.graphs) > 1 and sum(backend.report.graph_breaks.values()) > 0
    assert any("dequantize_module_weight" in reason for reason in backend.report.graph_breaks)


def test_torchao_int8_weight_only_is_rewritten_on_its_dequantized_weight():
    torchao = pytest.importorskip("torchao.quantization", reason="needs torchao")
    from peft import LoraConfig, get_peft_model

    def build():
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(64, 48))
        torchao.quantize_(base, torchao.Int8WeightOnlyConfig())
        return get_peft_model(base, LoraConfig(r=4, target_modules=["0"], use_dora=True, init_lora_weights=False))

    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    backend = RecordingBackend()
    torch.testing.assert_close(torch.compile(build(), backend=backend, fullgraph=True)(x), build()(x))
    assert [r.variant for r in backend.report.rewrites] == ["reused base, bias, torchao base, norm on the dequantized weight"]


# ---- CUDA: the same checks at real sizes (bf16) ------------------------------------------------



@pytest.mark.cuda
@pytest.mark.parametrize("base", ["nf4", "nf4-dq", "fp4", "int8"])
def test_cuda_layer_matches_eager_peft_bf16(base):
    """One 4096 x 4096 DoRA layer (r = 64), bf16: dora_fx's output and gradients are within 2x of
    eager PEFT's error against a float32 run of the same quantized model."""
    from peft import get_peft_model

    def build(dtype):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16))
        models.quantize_linears(model, ["0"], base, compute_dtype=dtype, device="cuda")
        model = get_peft_model(model, models.dora_config(["0"], 64, 0.0))
        models.randomize_adapters(model, torch.Generator().manual_seed(1), b_std=0.02)
        models.cast_adapters(model, dtype)
        return model

    x = torch.randn(4, 512, 4096, generator=torch.Generator().manual_seed(2)).cuda()

    def run(model, dtype):
        inp = x.detach().to(dtype).requires_grad_()
        out = model(inp)
        out.float().square().mean().backward()
        return [out.float(), inp.grad.float(), *(p.grad.float() for p in model.parameters() if p.requires_grad)]

    exact = run(build(torch.float32), torch.float32)
    peft = run(build(torch.bfloat16), torch.bfloat16)
    backend = RecordingBackend()
    # bitsandbytes' 8-bit CUDA matmul is its own code path: a break there would be outside the DoRA region
    ours = run(torch.compile(build(torch.bfloat16), backend=backend, fullgraph=base != "int8"), torch.bfloat16)
    assert len(backend.report.rewrites) == 1, str(backend.report)
    for mine, theirs, want in zip(ours, peft, exact):
        assert relative_error(mine, want) <= 2 * relative_error(theirs, want) + 1e-3


@pytest.mark.cuda
def test_cuda_norm_transient_memory_for_a_4096_x_14336_nf4_layer():
    """The issue's bound: one 4096 x 14336 NF4 layer at r = 384 needs < 64 MiB of transient memory
    for the norm (PEFT's dense path: a 112 MiB bf16 weight plus a dense B·A)."""
    d_out, d_in, r = 4096, 14336, 384
    param, _ = _packed_weight(d_out, d_in, "nf4", True, dtype=torch.bfloat16, device="cuda")
    state = param.quant_state
    lora_A, lora_B = (t.cuda().to(torch.bfloat16) for t in _lora(d_out, d_in, r))
    args = (param.data, quantized.absmax_float(state), state.blocksize, state.quant_type, list(state.shape), state.dtype)
    norm_cache.clear()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    norm = torch.ops.dora_fx.weight_norm_4bit(*args, lora_A, lora_B, 2.0)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - before
    assert transient < 64 * 2**20, f"{transient / 2**20:.1f} MiB"
    dense = bnb.functional.dequantize_4bit(param.data, state)
    torch.testing.assert_close(norm, reference.weight_norm(dense, lora_A, lora_B, 2.0, False), rtol=2e-3, atol=0)


def _four_bit_dora_layer(quant_type: str, zero_features: list[int], d_out: int = 64, d_in: int = 128, device="cpu"):
    """One PEFT DoRA layer over a bitsandbytes 4-bit ``[d_out, d_in]`` base (float32 compute), with
    ``m = 0`` at ``zero_features``. ``d_in`` a multiple of 64: bitsandbytes 0.50's CPU
    ``dequantize_4bit`` matches its own quantization there (elsewhere its CPU path differs from the
    flat block layout that its CUDA kernels and dora_fx read)."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    models.quantize_linears(model, ["0"], quant_type, compute_dtype=torch.float32, device=device)
    model = get_peft_model(model, models.dora_config(["0"], 4, 0.0)).to(device)
    models.randomize_adapters(model, torch.Generator().manual_seed(1), b_std=0.1)
    magnitude = next(p for n, p in model.named_parameters() if "lora_magnitude_vector" in n)
    with torch.no_grad():
        magnitude[zero_features] = 0
    return model.train()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4-dq"])
def test_four_bit_training_keeps_the_packed_weight_and_matches_eager_at_zero_magnitudes(quant_type, device):
    """Over a 4-bit base the training compose keeps the output and the packed weight (no dense W, no
    ``adapted``), and the magnitude's gradient at ``m = 0`` features, recomputed from the packed
    weight, equals eager PEFT's."""
    zero = [0, 5, 17, 18, 40]
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(3)).to(device)
    inputs = {"input": x.requires_grad_()}
    backend = RecordingBackend()
    compiled = torch.compile(_four_bit_dora_layer(quant_type, zero, device=device), backend=backend, fullgraph=True)
    out, grads = step(compiled, fresh(inputs), seed=3)
    ref_out, ref_grads = step(_four_bit_dora_layer(quant_type, zero, device=device), fresh(inputs), seed=3)
    counts = op_counts(backend.graphs[0])
    assert counts[torch.ops.dora_fx.compose_saving_output.default] == 1
    assert counts[torch.ops.dora_fx.compose_with_adapted.default] == 0
    assert counts[torch.ops.bitsandbytes.dequantize_4bit.default] == 0
    grad_m = next(g for n, g in ref_grads.items() if "lora_magnitude_vector" in n)
    assert (grad_m[zero] != 0).all()  # the premise: those features do get a gradient
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert_close_all(grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_int8_training_keeps_adapted():
    """An 8-bit base's dequantized ``W`` is not read in place: its training compose keeps ``adapted``."""
    backend, *_ = _compiled_and_eager("mlp", "int8", "train")
    counts = op_counts(backend.graphs[0])
    assert counts[torch.ops.dora_fx.compose_with_adapted.default] == 2
    assert counts[torch.ops.dora_fx.compose_saving_output.default] == 0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_four_bit_rows_decode_as_bitsandbytes_dequantizes(quant_type):
    """dora_fx's reading of the packed bytes (``reference.dequantize_4bit_rows``, which the Triton
    kernel mirrors) gives bitsandbytes' ``dequantize_4bit`` bit for bit, double-quantized scales too."""
    for double_quant in (False, True):
        param, packed = _packed_weight(70, 128, quant_type, double_quant, dtype=torch.bfloat16)
        form = quantized.four_bit_form(packed.absmax, packed.blocksize, quant_type, packed.dtype)
        dense = torch.ops.bitsandbytes.dequantize_4bit.default(
            param.data, packed.absmax, packed.blocksize, quant_type, [70, 128], packed.dtype
        )
        rows = torch.tensor([0, 3, 64, 69])
        assert torch.equal(reference.dequantize_4bit_rows(param.data, form, rows, 128), dense[rows])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_zero_magnitude_kernel_reads_the_packed_weight(quant_type):
    """The Triton kernel (the interpreter on the CPU) decoding the packed weight gives the magnitude's
    gradient at ``m = 0`` features that the reference computes from the dequantized weight."""
    from dora_fx.kernels import compose

    d_out, d_in, r, tokens = 40, 128, 5, 13
    param, packed = _packed_weight(d_out, d_in, quant_type, True, dtype=torch.bfloat16)
    form = quantized.four_bit_form(packed.absmax, packed.blocksize, quant_type, packed.dtype)
    dense = torch.ops.bitsandbytes.dequantize_4bit.default(
        param.data, packed.absmax, packed.blocksize, quant_type, [d_out, d_in], packed.dtype
    )
    gen = torch.Generator().manual_seed(4)
    lora_A, lora_B = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
    x, grad_out = torch.randn(tokens, d_in, generator=gen), torch.randn(tokens, d_out, generator=gen)
    magnitude = torch.rand(d_out, generator=gen) + 0.5
    zero = [1, 2, 15, 39]
    magnitude[zero] = 0
    norm = torch.rand(d_out, generator=gen) + 0.5
    from_output = torch.randn(d_out, generator=gen)
    args = (from_output, grad_out, x)
    rest = (lora_A, lora_B, 1.5, magnitude, norm, False)
    got = compose.zero_magnitude_grad(*args, param.data, *rest, form)
    expected = reference.zero_magnitude_grad(*args, dense, *rest)
    assert (got[magnitude != 0] == from_output[magnitude != 0]).all() and (expected[zero] != from_output[zero]).all()
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())
