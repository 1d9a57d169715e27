"""boa.eval.streamed: the perplexity of a model read from its safetensors shards one block at a time equals the
in-memory model's, with a tied head, OPT's optional final norm and output projection, and never two blocks'
weights held; evaluate_perplexity takes either."""
import pytest
import torch
from transformers import BertModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import boa
from boa.eval import evaluate_perplexity, perplexity
from boa.eval.streamed import streamed_perplexity

from conftest import (
    VOCAB, BlockProbe, build_bert, build_gemma3, build_llama, build_mixtral, build_opt, build_phi3, open_streamed,
    random_windows,
)


def tied_llama():
    """SmolLM2's shape: the head shares the embeddings' weight, stored once under the embeddings' name."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=True,
    )).eval()


def opt_350m_like():
    """OPT-350m's shape: no final norm (the norm comes after each block's sublayers) and a head narrower than the
    blocks, reached through project_out."""
    torch.manual_seed(0)
    return OPTForCausalLM(OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4, vocab_size=VOCAB,
        word_embed_proj_dim=32, max_position_embeddings=128, do_layer_norm_before=False,
    )).eval()


MODELS = {"llama": lambda: build_llama(num_layers=3), "llama-tied": tied_llama,
          "opt": lambda: build_opt(num_layers=3), "opt-350m-like": opt_350m_like, "gemma3": build_gemma3,
          "phi3": build_phi3, "mixtral": build_mixtral}


def sharpened(model):
    """The model with norms of random gains and a head 30 times larger: a random model's next-token distribution is
    nearly uniform (perplexity ≈ the vocabulary whatever it computes), this one's is not, so a norm or head left out
    or misapplied shows in the perplexity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(torch.rand(param.shape, generator=generator) * 2 + 0.5)
        model.get_output_embeddings().weight.mul_(30)
    return model


def streamed(model, folder):
    model.save_pretrained(folder, max_shard_size="40KB")
    return open_streamed(folder)


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_streamed_perplexity_is_the_in_memory_one(build, tmp_path, monkeypatch):
    model = sharpened(build())
    weights = streamed(model, tmp_path / "fp")
    assert len(list((tmp_path / "fp").glob("model-*.safetensors"))) > 1
    probe = BlockProbe(weights, monkeypatch)
    tokens = random_windows(1, 16 * 11, seed=3)  # 11 windows: batches of 8 and 3, heads on 4, 4, 3 and 3

    expected = perplexity(model, tokens, seqlen=16)
    assert not 0.8 * VOCAB < expected < 1.2 * VOCAB  # sharpened: far from the uniform guess
    assert streamed_perplexity(weights, tokens, seqlen=16) == pytest.approx(expected, rel=1e-5)
    assert probe.most == 1 and not probe.resident
    assert id(weights.model.get_output_embeddings()) in probe.loaded
    assert all(p.device.type == "meta" for p in weights.model.parameters())  # everything released

    assert streamed_perplexity(weights, tokens, seqlen=16, max_windows=2) == pytest.approx(
        perplexity(model, tokens, seqlen=16, max_windows=2), rel=1e-5)


def test_evaluate_perplexity_takes_a_streamed_model(tmp_path, word_tokenizer, calib_txt):
    model = sharpened(build_llama())
    weights = streamed(model, tmp_path / "fp")
    corpora = [str(calib_txt)]
    expected = evaluate_perplexity(model, word_tokenizer, corpora, seqlen=32, max_windows=5)
    got = evaluate_perplexity(weights, word_tokenizer, corpora, seqlen=32, max_windows=5)
    assert got.keys() == expected.keys() == {f"ppl_{calib_txt}"}
    assert got[f"ppl_{calib_txt}"] == pytest.approx(expected[f"ppl_{calib_txt}"], rel=1e-5)


def test_an_encoder_has_no_perplexity(tmp_path):
    weights = streamed(BertModel(build_bert().config), tmp_path / "bert")  # with the pooler its skeleton has
    with pytest.raises(boa.BoaError, match="no output head"):
        streamed_perplexity(weights, random_windows(1, 64), seqlen=16)


def test_one_token_windows_are_refused_by_both_paths(tmp_path):
    model = build_llama()
    weights = streamed(model, tmp_path / "fp")
    tokens = random_windows(1, 64)
    for score, scored in ((perplexity, model), (streamed_perplexity, weights)):
        with pytest.raises(boa.BoaError, match="seqlen=1: a window of one token has no next token"):
            score(scored, tokens, seqlen=1)
        with pytest.raises(boa.BoaError, match="max_windows=0 must be a positive"):
            score(scored, tokens, seqlen=16, max_windows=0)
