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

EXAMPLES = ("mlp", "llama", "gpt2")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
) -> Example:
    """Build example ``name`` (one of :data:`EXAMPLES`) as a PEFT DoRA model on the CPU."""
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
    model = get_peft_model(base, config)
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1))
    model.to(dtype)
    return Example(name, model, make_inputs, count if use_dora else 0)
