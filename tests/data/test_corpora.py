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
