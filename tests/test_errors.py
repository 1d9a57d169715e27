"""Bad inputs: each gives boa.BoaError whose message names the problem (and the CLI exit code 2 with
"boa: error:"), and nothing is written."""
import copy
import math
import os
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import boa
from boa.cli import main


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty BOA_CACHE: a test asserts it is still empty afterwards (nothing cached for a failed call)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("BOA_CACHE", str(cache))
    return cache


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
    for call in (lambda: boa.load_model(str(folder)), lambda: boa.quantize(model, boa.QuantConfig(), calib)):
        with pytest.raises(boa.BoaError, match="unsupported architecture 'gpt2'") as err:
            call()
        message = str(err.value)
        assert "llama" in message and "opt" in message
    assert folder_snapshot(folder) == before


@pytest.mark.parametrize("bits", [5, 1, 0, 16])
def test_unsupported_bits(bits):
    with pytest.raises(boa.BoaError, match=rf"bits={bits} is not supported; choose one of 2, 3, 4, 8"):
        boa.QuantConfig(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, 1.5, True])
def test_invalid_group_size(group_size):
    """0, negative (other than -1), fractional and boolean group sizes are rejected; the message shows the value."""
    with pytest.raises(boa.BoaError, match=re.escape(f"group_size={group_size!r} is invalid")):
        boa.QuantConfig(group_size=group_size)


@pytest.mark.parametrize("group_size", [-1, 1, 128])
def test_valid_group_sizes_are_accepted(group_size):
    assert boa.QuantConfig(group_size=group_size).group_size == group_size


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_non_finite_weight(tiny_llama, calib, tmp_path, bad, method):
    """A NaN/Inf weight is caught before anything runs: the message names the weight, the model is unchanged and
    no checkpoint is written."""
    name = "model.layers.1.mlp.down_proj.weight"
    with torch.no_grad():
        tiny_llama.get_parameter(name)[3, 5] = bad
    before = copy.deepcopy(tiny_llama.state_dict())
    checkpoint = tmp_path / "ckpt"
    with pytest.raises(boa.BoaError, match=rf"weight {name} holds NaN/Inf"):
        boa.quantize(tiny_llama, boa.QuantConfig(method=method), calib, checkpoint_dir=checkpoint, progress=False)
    for key, value in tiny_llama.state_dict().items():
        assert torch.equal(value.nan_to_num(), before[key].nan_to_num()) and value.isnan().equal(before[key].isnan())
    assert not checkpoint.exists()


def test_calibration_text_shorter_than_one_window(tmp_path, word_tokenizer):
    """A window needs seqlen + 1 tokens of text: 3 tokens for seqlen 512 is refused with the counts in the message;
    at the boundary, 17 tokens make 16-token windows and 16 do not."""
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    with pytest.raises(boa.BoaError, match=r"has 3 tokens, shorter than one window of 512"):
        boa.data.calibration_windows(word_tokenizer, str(short), nsamples=4, seqlen=512)

    short.write_text(" ".join(f"w{i}" for i in range(17)))
    windows = boa.data.calibration_windows(word_tokenizer, str(short), nsamples=2, seqlen=16)
    assert windows.shape == (2, 16) and windows.dtype == torch.long
    short.write_text(" ".join(f"w{i}" for i in range(16)))
    with pytest.raises(boa.BoaError, match="has 16 tokens, shorter than one window of 16"):
        boa.data.calibration_windows(word_tokenizer, str(short), nsamples=2, seqlen=16)


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_online_corpus_offline(monkeypatch, empty_cache, name):
    """Offline (or without the `datasets` package) an online corpus gives BoaError pointing at the offline corpora."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(boa.BoaError, match=rf"corpus '{name}' needs the `datasets` package") as err:
        boa.data.corpus_text(name)
    assert "Offline corpora: wikipedia, austen" in str(err.value)
    assert not os.listdir(empty_cache)


def test_unknown_corpus(empty_cache, tmp_path):
    expected = r"unknown corpus 'shakespeare'; offline: wikipedia, austen.*online: wikitext2"
    with pytest.raises(boa.BoaError, match=expected):
        boa.data.corpus_text("shakespeare")
    missing = tmp_path / "missing.txt"
    with pytest.raises(boa.BoaError, match=re.escape(f"calibration file '{missing}' does not exist")):
        boa.data.corpus_text(str(missing))
    with pytest.raises(boa.BoaError, match=r"split 'train'"):
        boa.data.corpus_text("wikipedia", "train")
    assert not os.listdir(empty_cache)


def test_austen_is_not_for_calibration(empty_cache, word_tokenizer):
    """austen is evaluation-only: refused for calibration before anything is fetched or cached."""
    with pytest.raises(boa.BoaError, match="austen is an evaluation-only corpus"):
        boa.data.corpus_text("austen", "calib")
    with pytest.raises(boa.BoaError, match="austen is an evaluation-only corpus"):
        boa.data.calibration_windows(word_tokenizer, "austen", nsamples=2, seqlen=16)
    assert not os.listdir(empty_cache)


def test_bad_calibration_tensor(tiny_llama, calib):
    """GPTQ without windows, or with float/1-D windows, is refused and leaves the model as it was."""
    before = copy.deepcopy(tiny_llama.state_dict())
    with pytest.raises(boa.BoaError, match="needs calibration windows"):
        boa.quantize(tiny_llama, boa.QuantConfig(method="gptq"), None, progress=False)
    for windows in (calib.float(), calib[0]):
        with pytest.raises(boa.BoaError, match=r"calib must be a LongTensor \(nsamples, seqlen\)"):
            boa.quantize(tiny_llama, boa.QuantConfig(method="gptq"), windows, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())


def test_calibration_ids_outside_the_vocabulary(tiny_llama):
    with pytest.raises(boa.BoaError, match="vocab"):
        boa.quantize(tiny_llama, boa.QuantConfig(), torch.full((2, 8), 300), progress=False)


@pytest.fixture
def occupied_out(tmp_path, tiny_opt):
    """An output folder already holding a different (boa-quantized OPT) model."""
    result = boa.quantize(tiny_opt, boa.QuantConfig(method="rtn", bits=4), progress=False)
    return boa.save(result, tmp_path / "occupied")


def test_cli_refuses_an_occupied_output_folder(tiny_llama_dir, calib_txt, occupied_out, folder_snapshot, capsys):
    """`boa quantize --out FOLDER` where FOLDER holds another model: exit code 2, "boa: error:" naming the folder,
    its files unchanged and no FOLDER.partial checkpoint started."""
    before = folder_snapshot(occupied_out)
    code = main(["quantize", str(tiny_llama_dir), "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "16",
                 "--out", str(occupied_out), "--corpora", ""])
    err = capsys.readouterr().err
    assert code == 2
    assert f"boa: error: output folder {occupied_out} already holds a different model" in err
    assert folder_snapshot(occupied_out) == before
    assert not occupied_out.with_name("occupied.partial").exists()


def test_save_refuses_an_occupied_output_folder(tiny_llama, calib, occupied_out, folder_snapshot):
    before = folder_snapshot(occupied_out)
    result = boa.quantize(tiny_llama, boa.QuantConfig(bits=4), calib, progress=False)
    with pytest.raises(boa.BoaError, match=re.escape(f"output folder {occupied_out} already holds a different model")):
        boa.save(result, occupied_out)
    assert folder_snapshot(occupied_out) == before


def test_save_refuses_an_output_path_that_is_a_file(tiny_llama, calib, tmp_path):
    target = tmp_path / "model.txt"
    target.write_text("keep me")
    result = boa.quantize(tiny_llama, boa.QuantConfig(method="rtn", bits=4), progress=False)
    with pytest.raises(boa.BoaError, match=re.escape(str(target))):
        boa.save(result, target)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "bits=5 is not supported"),
    (["--group-size", "0"], "group_size=0 is invalid"),
    (["--percdamp", "1.5"], "percdamp=1.5 must be in [0, 1)"),
    (["--init", "gptq"], "init='gptq' applies only to method='aespa'"),
    (["--method", "aespa", "--rounding-iters", "0"], "rounding_iters=0 must be a positive integer"),
], ids=["bits-5", "group-size-0", "percdamp-1.5", "init-without-aespa", "rounding-iters-0"])
def test_cli_bad_settings_exit_2(tiny_llama_dir, tmp_path, capsys, args, message):
    """Invalid settings are caught before anything is loaded or written: exit 2 and "boa: error: <problem>"."""
    out = tmp_path / "OUT"
    code = main(["quantize", str(tiny_llama_dir), *args, "--out", str(out), "--corpora", ""])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("boa: error: ") and message in captured.err
    assert "Traceback" not in captured.err
    assert not out.exists() and not out.with_name("OUT.partial").exists()


def test_cli_missing_model_exit_2(tmp_path, capsys):
    code = main(["quantize", str(tmp_path / "nope"), "--out", str(tmp_path / "OUT"), "--corpora", ""])
    assert code == 2
    assert f"boa: error: model '{tmp_path / 'nope'}' not found" in capsys.readouterr().err
    assert not (tmp_path / "OUT").exists()
