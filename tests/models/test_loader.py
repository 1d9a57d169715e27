"""Loading models (boa.models): a missing folder and an architecture without an adapter give boa.BoaError whose
message names the problem, and nothing is written or cached."""
import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import boa


def test_missing_model_folder(empty_cache):
    with pytest.raises(boa.BoaError, match=r"model '/nonexistent/model' not found: no such folder"):
        boa.load_model("/nonexistent/model")
    assert not os.listdir(empty_cache)


@pytest.fixture
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256, n_positions=64))
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    return folder, model.eval()


def test_unsupported_architecture(gpt2_dir, calib, folder_snapshot):
    """GPT-2 has no adapter: load_model refuses it from its config alone, before reading weights, and quantize
    refuses the in-memory model; both messages list the supported model types."""
    folder, model = gpt2_dir
    before = folder_snapshot(folder)
    for call in (lambda: boa.load_model(str(folder)), lambda: boa.quantize(model, boa.GPTQ(), calib)):
        with pytest.raises(boa.BoaError, match="unsupported architecture 'gpt2'") as err:
            call()
        message = str(err.value)
        assert "llama" in message and "opt" in message
    assert folder_snapshot(folder) == before


def test_an_encoder_loads_quantizes_saves_and_loads_back(tmp_path, word_tokenizer, calib):
    """BERT-style encoders (no LM head) go through the same doors as decoders: load_model builds them with their
    adapter's model class, and boa.load rebuilds the saved packed model with outputs equal to the quantized one."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=256, max_position_embeddings=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    word_tokenizer.save_pretrained(tmp_path / "bert")
    model, tokenizer, adapter = boa.load_model(str(tmp_path / "bert"))
    assert type(model).__name__ == "BertModel" and type(adapter).__name__ == "BertAdapter"
    result = boa.quantize(model, boa.TurboBoA(bits=4, group_size=32), calib, progress=False)
    boa.save(result, tmp_path / "q", tokenizer)
    loaded, _, loaded_config = boa.load(tmp_path / "q")
    assert loaded_config.method == boa.TurboBoA(bits=4, group_size=32)
    ids = calib[:2, :16]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=1e-5)
