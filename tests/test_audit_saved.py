"""``python -m dora_fx audit --model DIR`` on a PEFT DoRA adapter saved with ``save_pretrained``,
over a base model saved to a local folder (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

from dora_fx import saved
from dora_fx.examples import models
from dora_fx.__main__ import main

LAYERS = 1
DORA_LAYERS = LAYERS * len(models.LLAMA_TARGETS)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """``(adapter_dir, base_dir, peft_model)``: a tiny Llama saved to ``base_dir``, loaded back from
    there (so PEFT records the folder as its base), a DoRA adapter with non-zero B saved to
    ``adapter_dir``."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("saved")
    base_dir, adapter_dir = root / "base", root / "adapter"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(base_dir)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir), models.dora_config(models.LLAMA_TARGETS, rank=4, dropout=0.0)
    )
    models.randomize_adapters(model, torch.Generator().manual_seed(1))
    model.save_pretrained(adapter_dir)
    return adapter_dir, base_dir, model.eval()


def test_loaded_adapter_is_the_saved_one(saved_adapter):
    adapter_dir, base_dir, original = saved_adapter
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    loaded = saved.load_adapter(adapter_dir).eval()
    b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert len(b) == DORA_LAYERS and all(p.abs().sum() > 0 for p in b)
    inputs = saved.make_inputs(loaded, torch.Generator().manual_seed(4))
    assert inputs["input_ids"].max() < 128
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, original(**inputs).logits)


def test_audit_cli_on_a_saved_adapter(saved_adapter, capsys):
    adapter_dir, _, _ = saved_adapter
    main(["audit", "--model", str(adapter_dir)])
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith(f"dora_fx: {DORA_LAYERS} DoRA region(s) rewritten, 0 near-miss(es)")
    assert "0 DoRA layer(s) not seen by the backend" in text.splitlines()[0]
    assert "model.layers.0.mlp.down_proj" in text


def test_audit_cli_with_base_named_on_the_command_line(saved_adapter, capsys, tmp_path):
    adapter_dir, base_dir, _ = saved_adapter
    moved = tmp_path / "adapter"  # the same adapter, naming a base that is not a local folder
    moved.mkdir()
    for path in adapter_dir.iterdir():
        (moved / path.name).write_bytes(path.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "some-org/some-model-not-here"
    (moved / "adapter_config.json").write_text(json.dumps(config))

    with pytest.raises(SystemExit):
        main(["audit", "--model", str(moved)])
    error = capsys.readouterr().err
    assert "'some-org/some-model-not-here'" in error and "--base DIR" in error

    main(["audit", "--model", str(moved), "--base", str(base_dir), "--train", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["total_rewrites"] == DORA_LAYERS and data["total_near_misses"] == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no/such/folder"], "neither a built-in example"),
        (["--model", "{base}"], "holds no adapter_config.json"),
        (["--model", "{adapter}", "--rank", "4"], "--rank apply to the built-in examples"),
        (["--model", "mlp", "--base", "{base}"], "--base applies to a saved adapter"),
    ],
)
def test_audit_cli_bad_arguments_are_clear_errors(saved_adapter, capsys, argv, message):
    adapter_dir, base_dir, _ = saved_adapter
    argv = [a.format(base=base_dir, adapter=adapter_dir) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
