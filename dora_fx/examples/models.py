"""Small PEFT DoRA example models, built from configs with random weights (nothing is downloaded).

Used by the demo, the audit CLI, the tests and the benchmarks. LoRA ``B`` is drawn non-zero and the
magnitudes are perturbed: PEFT initialises ``B = 0`` and ``m = ||W||``, which would hide the norm and
make ``g = 1`` exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from dora_fx.examples import EXAMPLES

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# bitsandbytes bases (QDoRA): 4-bit NF4 / FP4, "-dq" with double quantization, and LLM.int8().
QUANTIZED_BASES = ("nf4", "fp4", "nf4-dq", "fp4-dq", "int8")


class MLP(nn.Module):
    """Two Linears, one with a bias and one without, on ``[batch, tokens, features]`` inputs."""

    def __init__(self, d_in: int = 48, d_hidden: int = 80, d_out: int = 24):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


@dataclasses.dataclass
class Example:
    """A PEFT DoRA model and a function drawing fresh inputs for it (a dict of keyword arguments)."""

    name: str
    model: nn.Module
    make_inputs: Callable[[torch.Generator], dict]
    dora_layers: int


def randomize_adapters(model: nn.Module, generator: torch.Generator, b_std: float = 0.5) -> None:
    """Give every LoRA ``B`` non-zero values and move each magnitude off ``||W||`` by about 10 %."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator).to(param)
            if "lora_B" in name:
                param.copy_(noise * b_std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * noise)


def dora_config(targets, rank: int, dropout: float, **kwargs):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=True, lora_dropout=dropout, **kwargs)


def quantize_linears(model: nn.Module, targets, base: str, compute_dtype: torch.dtype, device) -> None:
    """Replace each ``nn.Linear`` whose attribute name is in ``targets`` by a bitsandbytes
    ``Linear4bit`` / ``Linear8bitLt`` holding its weight quantized on ``device``, as loading with
    transformers' ``BitsAndBytesConfig`` leaves a model, and mark the model so that PEFT wraps them
    in its bitsandbytes LoRA layers. ``base`` is one of :data:`QUANTIZED_BASES`.

    On the CPU, bitsandbytes repacks a 4-bit weight for its AVX512-BF16 inference kernel in the first
    no-grad eval forward; that path fails under ``torch.compile`` with or without dora_fx
    (docs/behaviour.md), so these example layers keep it off, as on CUDA.
    """
    import bitsandbytes as bnb

    if base not in QUANTIZED_BASES:
        raise ValueError(f"unknown quantized base {base!r}; choose one of {', '.join(QUANTIZED_BASES)}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name not in targets or type(child) is not nn.Linear:
                continue
            has_bias = child.bias is not None
            if base == "int8":
                layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, has_bias, has_fp16_weights=False)
                layer.weight = bnb.nn.Int8Params(child.weight.data, requires_grad=False, has_fp16_weights=False)
            else:
                quant_type, double_quant = base.removesuffix("-dq"), base.endswith("-dq")
                layer = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, has_bias, compute_dtype=compute_dtype,
                    compress_statistics=double_quant, quant_type=quant_type, device="meta",
                )
                layer.weight = bnb.nn.Params4bit(
                    child.weight.data, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
                )
                layer.support_avx512bf16_for_cpu = False
            if has_bias:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(device))
    model.is_loaded_in_4bit = base != "int8"
    model.is_loaded_in_8bit = base == "int8"


def cast_adapters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the LoRA and DoRA parameters (not a quantized base) to ``dtype``."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)


def _llama(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def _gpt2(vocab: int, hidden: int, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config)


def build(
    name: str,
    *,
    rank: int = 4,
    dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
    use_dora: bool = True,
    quantized_base: str | None = None,
) -> Example:
    """Build example ``name`` (one of :data:`EXAMPLES`) as a PEFT DoRA model on the CPU, over a
    bitsandbytes base (:data:`QUANTIZED_BASES`) when ``quantized_base`` is given (QDoRA)."""
    from peft import get_peft_model

    if name not in EXAMPLES:
        raise ValueError(f"unknown example {name!r}; choose one of {', '.join(EXAMPLES)}")
    torch.manual_seed(seed)
    vocab, tokens = 128, 12
    if name == "mlp":
        base, targets, extra = MLP(), ["fc1", "fc2"], {}
        count = 2

        def make_inputs(gen):
            return {"x": torch.randn(2, tokens, 48, generator=gen).to(dtype)}

    else:
        if name == "llama":
            base, targets, extra = _llama(vocab, hidden, layers), LLAMA_TARGETS, {}
        else:  # GPT-2's Conv1D stores W as [d_in, d_out]: PEFT's fan_in_fan_out
            base, targets, extra = _gpt2(vocab, hidden, layers), ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}
        count = layers * len(targets) + (layers if name == "gpt2" else 0)  # GPT-2: attn.c_proj and mlp.c_proj

        def make_inputs(gen):
            return {"input_ids": torch.randint(0, vocab, (2, tokens), generator=gen)}

    config = dora_config(targets, rank, dropout, **extra)
    config.use_dora = use_dora
    if quantized_base is not None:
        base.to(dtype)
        quantize_linears(base, targets, quantized_base, compute_dtype=dtype, device="cpu")
    model = get_peft_model(base, config)
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1))
    if quantized_base is None:
        model.to(dtype)
    else:  # .to(dtype) would cast the packed 4-bit bytes
        cast_adapters(model, dtype)
    return Example(name, model, make_inputs, count if use_dora else 0)
