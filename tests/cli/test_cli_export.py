"""`boa export DIR --format F --out OUT`: a folder saved by `boa quantize` exported to the formats other tools load."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import boa
from boa.cli import main
from boa.export.common import EXPORT_MANIFEST
from boa.export.gptq_format import gptq_tensors

from conftest import build_llama, logits, read_safetensors

pytest.importorskip("compressed_tensors")

ACT_ORDER = dict(bits=4, group_size=16, act_order=True)


def test_cli_exports_a_saved_folder(tiny_llama, calib, heldout, tmp_path, word_tokenizer, capsys):
    """`boa export DIR --format F --out OUT` reads a `boa quantize` folder (QuantLinear layers) and writes a folder
    transformers loads with exactly the fake-quantized model's logits; refusals exit 2 with boa's error line."""
    result = boa.quantize(tiny_llama, boa.GPTQ(bits=4, group_size=32, sym=True), calib, progress=False)
    saved = boa.save(result, tmp_path / "saved", word_tokenizer)

    assert main(["export", str(saved), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    assert torch.equal(logits(loaded, heldout), logits(tiny_llama, heldout))
    assert (tmp_path / "ct" / "tokenizer.json").exists()
    assert main(["export", str(saved), "--format", "gptq", "--out", str(tmp_path / "gptq")]) == 0
    assert json.loads((tmp_path / "gptq" / EXPORT_MANIFEST).read_text())["config"] == result.config.to_dict()
    assert torch.equal(read_safetensors(tmp_path / "gptq")["model.layers.0.mlp.up_proj.qweight"],
                       gptq_tensors(result.layers["model.layers.0.mlp.up_proj"])["qweight"])

    act_order = boa.quantize(build_llama(), boa.GPTQ(**ACT_ORDER), calib, progress=False)
    boa.save(act_order, tmp_path / "act-order")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "act-order"), "--format", "compressed-tensors",
                 "--out", str(tmp_path / "refused")]) == 2
    assert "boa: error: model.layers.0.self_attn.q_proj: its groups are act-order groups" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
