"""The documented way to train under dora_fx in each framework, on a tiny PEFT DoRA Llama on the CPU:
a plain PyTorch loop (``torch.compile``), the HF ``Trainer`` and TRL's ``SFTTrainer`` (the model
compiled in place with ``model.compile(backend=...)``). Each takes 2 optimizer steps; the DoRA layers
are rewritten and the losses equal eager PEFT's (float32).

dora_fx runs over ``aot_eager`` here, which compiles far faster than Inductor on a CPU; the rewrite
and the numbers are the same (Inductor as the inner compiler is tested in test_backend.py and
test_compile_options.py).
"""

from __future__ import annotations

import pytest
import torch

import dora_fx
from dora_fx.examples import models
from dora_fx.audit import dora_layers

VOCAB, TOKENS, ROWS = 128, 12, 4
# float32, 2 steps of a tiny model: what separates dora_fx from eager PEFT is the factored norm's rounding
LOSS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _backend():
    return dora_fx.DoraBackend(inner="aot_eager")


def _tiny_llama():
    """A one-layer PEFT DoRA Llama (7 DoRA layers, B non-zero), the same on every call."""
    model = models.build("llama", layers=1).model.train()
    model.base_model.model.config.use_cache = False
    return model


def _token_rows(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (ROWS, TOKENS), generator=torch.Generator().manual_seed(seed))


def _assert_all_dora_layers_rewritten(model) -> None:
    """Every DoRA layer of ``model`` rewritten once (names are relative to the frame Dynamo compiled:
    a graph that starts inside the PEFT wrapper names them without its ``base_model.model.``)."""
    report = dora_fx.last_report()
    rewritten = sorted(r.module.removeprefix("base_model.model.") for r in report.rewrites)
    assert rewritten == sorted(name.removeprefix("base_model.model.") for name in dora_layers(model)), report.to_text()
    assert report.near_misses == []


def test_plain_pytorch_loop():
    def train(model, compiled):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        rows, losses = _token_rows(), []
        for step in range(2):
            batch = rows[2 * step : 2 * step + 2]
            loss = compiled(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses

    eager = _tiny_llama()
    expected = train(eager, eager)
    model = _tiny_llama()
    losses = train(model, torch.compile(model, backend=_backend()))
    _assert_all_dora_layers_rewritten(model)
    assert expected[0] != expected[1]
    torch.testing.assert_close(losses, expected, **LOSS_TOLERANCE)


def _recording(trainer_class):
    """``trainer_class`` that keeps each training step's loss (the logged ones are rounded)."""

    class Recording(trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = result[0] if return_outputs else result
            if model.training:
                self.step_losses.append(loss.detach().item())
            return result

    return Recording


_TRAINING_ARGUMENTS = dict(
    per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, use_cpu=True, report_to="none",
    save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_pin_memory=False, seed=0,
)


def test_hf_trainer_with_the_model_compiled_in_place(tmp_path):
    datasets = pytest.importorskip("datasets")
    from transformers import Trainer, TrainingArguments

    rows = _token_rows().tolist()
    dataset = datasets.Dataset.from_dict(
        {"input_ids": rows, "attention_mask": [[1] * TOKENS] * ROWS, "labels": rows, "unused": list(range(ROWS))}
    )

    def train(model, compile_it):
        if compile_it:
            model.compile(backend=_backend())  # nn.Module.compile: in place, forward's signature kept
        args = TrainingArguments(output_dir=str(tmp_path / f"out{int(compile_it)}"), **_TRAINING_ARGUMENTS)
        trainer = _recording(Trainer)(model=model, args=args, train_dataset=dataset)
        trainer.step_losses = []
        trainer.train()
        return trainer.step_losses

    _assert_trains_like_eager(train)


def _assert_trains_like_eager(train) -> None:
    """``train(model, compile_it)`` gives the step losses: compiled in place under dora_fx, every DoRA
    layer is rewritten and the two losses equal eager PEFT's."""
    expected = train(_tiny_llama(), compile_it=False)
    model = _tiny_llama()
    losses = train(model, compile_it=True)
    _assert_all_dora_layers_rewritten(model)
    assert len(expected) == 2 and expected[0] != expected[1]
    torch.testing.assert_close(losses, expected, **LOSS_TOLERANCE)


def _word_tokenizer():
    """A word-level tokenizer over ``w0 .. w{VOCAB - 3}``, built in memory (nothing downloaded)."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1} | {f"w{i}": i + 2 for i in range(VOCAB - 2)}
    tokenizer = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>")


def test_trl_sft_trainer_with_the_model_compiled_in_place(tmp_path):
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    words = (_token_rows() % (VOCAB - 2)).tolist()
    dataset = datasets.Dataset.from_dict({"text": [" ".join(f"w{i}" for i in row) for row in words]})
    tokenizer = _word_tokenizer()

    def train(model, compile_it):
        if compile_it:
            model.compile(backend=_backend())
        args = SFTConfig(
            output_dir=str(tmp_path / f"out{int(compile_it)}"),
            bf16=False,  # TRL's default is bf16 autocast; this test compares float32
            gradient_checkpointing=False,  # TRL's default is on; see the README on checkpointing
            **_TRAINING_ARGUMENTS,
        )
        trainer = _recording(SFTTrainer)(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.step_losses = []
        trainer.train()
        return trainer.step_losses

    _assert_trains_like_eager(train)
