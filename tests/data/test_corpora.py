"""Calibration and evaluation corpora (boa.data): bad requests give boa.BoaError whose message names the problem,
and nothing is fetched or cached for them."""
import os
import re

import pytest
import torch

import boa


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


@pytest.mark.parametrize("name, data, words", [
    ("latin1.txt", "w1 w2\nw3 caf\xe9\n".encode("latin-1"), ["latin1.txt", "not UTF-8", "line 2"]),
    ("json.jsonl", b'{"text": "w1"}\n{oops\n', ["json.jsonl", "line 2", "not valid JSON"]),
    ("notext.jsonl", b'{"text": "w1"}\n\n{"body": "w1"}\n', ["notext.jsonl", "line 3", 'no "text" key']),
    ("bare.jsonl", b'"w1 w2"\n', ["bare.jsonl", "line 1", "JSON string, not an object"]),
    ("nonstr.jsonl", b'{"text": 3}\n', ["nonstr.jsonl", "line 1", '"text" that is not a string']),
    ("latin1.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), ["latin1.jsonl", "line 1", "not UTF-8"]),
], ids=["txt-not-utf8", "jsonl-bad-json", "jsonl-no-text", "jsonl-bare-string", "jsonl-text-not-str",
        "jsonl-not-utf8"])
def test_bad_local_corpus_names_file_and_line(tmp_path, word_tokenizer, name, data, words):
    path = tmp_path / name
    path.write_bytes(data)
    for call in (lambda: boa.data.corpus_text(str(path)), lambda: boa.data.check_corpus(str(path), "eval"),
                 lambda: boa.data.calibration_windows(word_tokenizer, str(path), nsamples=2, seqlen=4)):
        with pytest.raises(boa.BoaError) as err:
            call()
        assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"nsamples": 0}, "nsamples=0 must be a positive integer"),
    ({"nsamples": -3}, "nsamples=-3 must be a positive integer"),
    ({"seqlen": 0}, "seqlen=0 must be a positive integer"),
    ({"seqlen": -1}, "seqlen=-1 must be a positive integer"),
])
def test_calibration_windows_refuses_empty_requests(calib_txt, word_tokenizer, kwargs, message):
    with pytest.raises(boa.BoaError, match=message):
        boa.data.calibration_windows(word_tokenizer, str(calib_txt), **{"nsamples": 2, "seqlen": 8, **kwargs})


def test_check_corpus_names(calib_txt):
    """check_corpus: the names' refusals without fetching anything (a local file is read)."""
    for name, split in (("wikipedia", "calib"), ("austen", "eval"), ("wikitext2", "eval"), (str(calib_txt), "eval")):
        boa.data.check_corpus(name, split)
    with pytest.raises(boa.BoaError, match="unknown corpus 'shakespeare'"):
        boa.data.check_corpus("shakespeare", "eval")
    with pytest.raises(boa.BoaError, match="austen is an evaluation-only corpus"):
        boa.data.check_corpus("austen", "calib")


def test_unreachable_hub_runs_offline_for_the_call(monkeypatch):
    """The probe fails: huggingface_hub runs offline inside the block and as before after it; HF_HUB_OFFLINE set
    by the user means no probe at all."""
    import huggingface_hub.constants as constants

    import boa.data.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: False)
    saved = constants.HF_HUB_OFFLINE
    with hub.offline_unless_reachable() as reachable:
        assert reachable is False and constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == saved
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: True)
    with hub.offline_unless_reachable() as reachable:
        assert reachable is True and constants.HF_HUB_OFFLINE == saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: pytest.fail("probed in offline mode"))
    assert hub.hub_reachable() is False
