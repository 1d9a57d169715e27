"""Foreign exports past --max-shard-size: several weight files with the Hugging Face index, which transformers loads
like the single file (`boa export ... --max-shard-size`, and the exporters' max_shard_size)."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import boa
from boa.cli import main
from boa.core.shards import INDEX, SINGLE, weight_files
from boa.export import export_gptq

from conftest import build_llama, logits, random_windows

pytest.importorskip("compressed_tensors")


def all_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(folder):
        tensors.update(load_file(str(path)))
    return tensors


def shards(folder) -> list:
    return sorted(folder.glob("model-*-of-*.safetensors"))


@pytest.fixture
def saved(tmp_path, word_tokenizer):
    """(fake-quantized tiny Llama, a folder `boa quantize` would have written for it)."""
    model = build_llama()
    result = boa.quantize(model, boa.GPTQ(bits=4, group_size=32), random_windows(8, 32), progress=False)
    return model, boa.save(result, tmp_path / "saved", word_tokenizer)


def test_cli_export_in_shards_loads_in_transformers(saved, heldout, tmp_path):
    model, folder = saved
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert main(["export", str(folder), "--format", "compressed-tensors", "--out", str(whole)]) == 0
    assert main(["export", str(folder), "--format", "compressed-tensors", "--out", str(sharded),
                 "--max-shard-size", "20KB"]) == 0

    assert (whole / SINGLE).is_file() and not (whole / INDEX).exists()
    files = shards(sharded)
    assert len(files) > 2 and not (sharded / SINGLE).exists()
    for file in files:  # a tensor larger than a shard gets one of its own
        held = load_file(str(file))
        assert len(held) == 1 or sum(t.numel() * t.element_size() for t in held.values()) <= 20_000
    index = json.loads((sharded / INDEX).read_text())
    expected = all_tensors(whole)
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    got = all_tensors(sharded)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    loaded = AutoModelForCausalLM.from_pretrained(sharded)
    assert torch.equal(logits(loaded, heldout), logits(model, heldout))


def test_gptq_export_in_shards_holds_the_single_file_tensors(saved, tmp_path):
    model, folder = saved
    loaded, tokenizer, config = boa.load(folder)
    layers = {name: m.quantized_weight() for name, m in loaded.named_modules() if isinstance(m, boa.nn.QuantLinear)}
    whole = export_gptq(loaded, layers, tmp_path / "whole", tokenizer, config)
    sharded = export_gptq(loaded, layers, tmp_path / "sharded", tokenizer, config, max_shard_size=30_000)
    assert len(shards(sharded)) > 1
    expected, got = all_tensors(whole), all_tensors(sharded)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert json.loads((sharded / "config.json").read_text()) == json.loads((whole / "config.json").read_text())


def test_an_unreadable_shard_size_is_refused_before_writing(saved, tmp_path, capsys):
    _, folder = saved
    out = tmp_path / "refused"
    assert main(["export", str(folder), "--format", "gptq", "--out", str(out), "--max-shard-size", "big"]) == 2
    assert "boa: error: shard size 'big'" in capsys.readouterr().err
    assert not out.exists()
