"""boa.models.StreamedModel: a model quantized from its safetensors shards one block at a time gives the codes of
the in-memory run, never holds two blocks' weights at once, and saves sharded output that boa.load reads."""
import json

import pytest
import torch

import boa
from boa.core.errors import BoaError
from boa.core.shards import INDEX
from boa.models import adapter_for
from boa.models.weights import empty_model

from conftest import (
    BlockProbe, build_gemma3, build_llama, build_mixtral, build_opt, build_phi3, build_qwen3_moe, open_streamed,
    random_windows, read_safetensors,
)

FAMILIES = {"llama": build_llama, "opt": build_opt, "gemma3": build_gemma3, "phi3": build_phi3,
            "mixtral": build_mixtral, "qwen3_moe": build_qwen3_moe}
METHODS = [boa.GPTQ(bits=4, group_size=32, act_order=True), boa.TurboBoA(bits=3, group_size=32, rows_per_step=4)]


def sharded(tmp_path, model, shard="40KB"):
    folder = tmp_path / "fp"
    model.save_pretrained(folder, max_shard_size=shard)
    return folder


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
@pytest.mark.parametrize("build", FAMILIES.values(), ids=FAMILIES.keys())
def test_a_streamed_run_gives_the_in_memory_codes_one_block_at_a_time(tmp_path, monkeypatch, method, build):
    """Phi-3's fused projections are read part by part from their one tensor and saved joined; Mixtral's experts
    come from its own checkpoint names (block_sparse_moe.experts.E.w1)."""
    model = build(num_layers=3)
    folder = sharded(tmp_path, model)
    assert (folder / INDEX).is_file() and len(json.loads((folder / INDEX).read_text())["weight_map"]) > 0
    calib = random_windows(4, 16)
    expected = boa.quantize(model, method, calib, progress=False, device="cpu")

    streamed = open_streamed(folder)
    probe = BlockProbe(streamed, monkeypatch)
    result = boa.quantize(streamed, method, calib, out=tmp_path / "q", progress=False, device="cpu")
    assert probe.most == 1 and not probe.resident
    assert all(p.device.type == "meta" for p in probe.blocks.parameters())  # every block released
    assert result.layers.keys() == expected.layers.keys()
    for name, q in expected.layers.items():
        for field in ("codes", "scale", "zero", "g_idx"):
            assert torch.equal(getattr(result.layers[name], field), getattr(q, field)), (name, field)

    boa.save(result, tmp_path / "q", max_shard_size="30KB")
    assert (tmp_path / "q" / INDEX).is_file() and not (tmp_path / "q.partial").exists()
    boa.save(expected, tmp_path / "q_memory")
    loaded, _, _ = boa.load(tmp_path / "q")
    loaded_memory, _, _ = boa.load(tmp_path / "q_memory")
    windows = random_windows(2, 16, seed=1)
    torch.testing.assert_close(loaded(input_ids=windows).logits, loaded_memory(input_ids=windows).logits,
                               rtol=0, atol=0)


def test_experts_stored_fused_are_read_one_expert_slice_at_a_time(tmp_path, monkeypatch):
    """A checkpoint holding the experts as transformers' fused 3-D tensors (gate_up_proj, down_proj): each expert's
    gate, up and down are read as slices of them (Adapter.stored_slice), and the run gives the in-memory codes."""
    from safetensors.torch import save_file

    model = build_qwen3_moe()
    folder = tmp_path / "fused"
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" in set(read_safetensors(folder))
    reads = []
    get = boa.core.shards.ShardReader.get
    monkeypatch.setattr(boa.core.shards.ShardReader, "get", lambda self, name, index=(): reads.append(index) or
                        get(self, name, index))
    calib = random_windows(4, 16)
    streamed = boa.quantize(open_streamed(folder), boa.GPTQ(bits=4, group_size=16), calib, out=tmp_path / "q",
                            progress=False, device="cpu")
    assert (3, slice(48, 96)) in reads  # expert 3's up_proj: the second half of its gate_up rows
    expected = boa.quantize(model, boa.GPTQ(bits=4, group_size=16), calib, progress=False, device="cpu")
    assert streamed.layers.keys() == expected.layers.keys()
    for name, q in expected.layers.items():
        assert torch.equal(streamed.layers[name].codes, q.codes) and torch.equal(streamed.layers[name].scale, q.scale)


def test_a_streamed_run_needs_a_checkpoint(tmp_path):
    streamed = open_streamed(sharded(tmp_path, build_llama()))
    with pytest.raises(BoaError, match="checkpoint"):
        boa.quantize(streamed, boa.GPTQ(bits=4), random_windows(2, 16), progress=False, device="cpu")


def test_a_skeleton_allocates_no_weights():
    config = build_llama().config
    model = empty_model(config, adapter_for(config), torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # computed buffers are real


def test_a_missing_shard_fails_before_any_work(tmp_path):
    folder = sharded(tmp_path, build_llama())
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(BoaError, match=f"missing shard.*{shard.name}"):
        open_streamed(folder)


def test_a_checkpoint_that_does_not_match_the_config_fails_at_open(tmp_path):
    folder = sharded(tmp_path, build_llama())
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BoaError, match="shape"):
        open_streamed(folder)


def test_nan_weights_are_refused_when_their_block_is_read(tmp_path):
    model = build_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    streamed = open_streamed(sharded(tmp_path, model))
    with pytest.raises(BoaError, match="layers.1.mlp.up_proj.weight holds NaN"):
        boa.quantize(streamed, boa.GPTQ(bits=4), random_windows(2, 16), out=tmp_path / "q", progress=False,
                     device="cpu")


def test_weights_stream_in_the_run_dtype(tmp_path):
    streamed = open_streamed(sharded(tmp_path, build_llama()), dtype=torch.bfloat16)
    block = streamed.model.model.layers[0]
    streamed.load(block)
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    streamed.release(block)
    assert all(p.device.type == "meta" for p in block.parameters())


def test_a_tied_head_stays_tied_after_its_embedding_was_loaded(tmp_path):
    model = build_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    streamed = open_streamed(sharded(tmp_path, model))
    names = [n for n, _ in streamed.model.named_parameters()]
    assert "lm_head.weight" not in names
    embedding = streamed.model.get_input_embeddings()
    streamed.load(embedding)
    streamed.release(embedding)
    assert [n for n, _ in streamed.model.named_parameters()] == names
    assert streamed.model.lm_head.weight is embedding.weight


@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("phi3", False)],
                         ids=["untied", "tied", "phi3"])
def test_a_streamed_rotated_run_gives_the_in_memory_codes_and_model(tmp_path, monkeypatch, family, tied):
    """QuaRot fused into each module as it is read (embeddings, blocks, an untied head with the final norm's γ read
    from the shards), never two blocks at once; the saved folder computes what the in-memory run's does. Phi-3:
    its fused projections rotated part by part, also when a block is read joined again for saving."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from boa.transforms import ActivationQuant, QuaRot

    torch.manual_seed(3)
    model = build_phi3(num_layers=3) if family == "phi3" else LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # norms far from 1, so that folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    folder = sharded(tmp_path, model)
    config = boa.QuantConfig(boa.GPTQ(bits=4, group_size=32), transforms=(QuaRot(seed=2), ActivationQuant(8)))
    calib = random_windows(4, 16)
    expected = boa.quantize(model, config, calib, progress=False, device="cpu")

    streamed = open_streamed(folder)
    probe = BlockProbe(streamed, monkeypatch)
    result = boa.quantize(streamed, config, calib, out=tmp_path / "q", progress=False, device="cpu")
    assert probe.most == 1 and not probe.resident
    assert result.layers.keys() == expected.layers.keys()
    for name, q in expected.layers.items():
        assert torch.equal(result.layers[name].codes, q.codes), name
    boa.save(result, tmp_path / "q")
    boa.save(expected, tmp_path / "q_memory")
    windows = random_windows(2, 16, seed=1)
    got = boa.load(tmp_path / "q")[0](input_ids=windows).logits
    torch.testing.assert_close(got, boa.load(tmp_path / "q_memory")[0](input_ids=windows).logits, rtol=0, atol=0)
