"""`boa eval MODEL --stream` and `boa quantize --stream always --eval-fp`: a float model's perplexity block by block,
never loading the model whole, equal to the in-memory evaluation's."""
import json

import pytest
import torch

import boa
import boa.models
import boa.pipeline.offload
from boa.cli import main

from conftest import build_llama

EVAL = ["--eval-seqlen", "16", "--eval-windows", "3"]


@pytest.fixture
def model_dir(tmp_path, word_tokenizer):
    """A float model folder in several safetensors shards."""
    folder = tmp_path / "fp"
    build_llama().save_pretrained(folder, max_shard_size="40KB")
    word_tokenizer.save_pretrained(folder)
    return folder


def ppl(report) -> dict[str, float]:
    """{row's model: its perplexity} of a --json report (one corpus)."""
    rows = json.loads(report.read_text())["results"]
    return {row["model"]: next(v for k, v in row.items() if k.startswith("ppl_")) for row in rows}


def never_whole(monkeypatch):
    """Makes loading a model in memory fail: what runs after streams or fails."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded whole")

    monkeypatch.setattr(boa.models, "load_model", refuse)


def in_memory_ppl(model_dir, calib_txt, tmp_path) -> float:
    report = tmp_path / "memory.json"
    assert main(["eval", str(model_dir), "--corpora", str(calib_txt), *EVAL, "--stream", "never",
                 "--json", str(report)]) == 0
    return ppl(report)[str(model_dir)]


def test_eval_stream_always_matches_the_in_memory_eval(model_dir, calib_txt, tmp_path, monkeypatch):
    expected = in_memory_ppl(model_dir, calib_txt, tmp_path)
    never_whole(monkeypatch)
    report = tmp_path / "streamed.json"
    assert main(["eval", str(model_dir), "--corpora", str(calib_txt), *EVAL, "--stream", "always",
                 "--json", str(report)]) == 0
    assert ppl(report)[str(model_dir)] == pytest.approx(expected, rel=1e-5)


def test_eval_stream_auto_streams_what_would_not_fit(model_dir, calib_txt, tmp_path, monkeypatch, empty_cache):
    """auto streams when the weights take over half the free memory (here made 20 kB: the activations, which no
    longer fit either, go to disk under the cache), and loads the model whole otherwise."""
    expected = in_memory_ppl(model_dir, calib_txt, tmp_path)
    monkeypatch.setattr(boa.pipeline.offload, "host_free_memory", lambda: 20_000)
    with monkeypatch.context() as patch:
        never_whole(patch)
        report = tmp_path / "auto.json"
        assert main(["eval", str(model_dir), "--corpora", str(calib_txt), *EVAL, "--json", str(report)]) == 0
    assert ppl(report)[str(model_dir)] == pytest.approx(expected, rel=1e-5)
    assert list((empty_cache / "activations").iterdir()) == []  # the activations' files are gone

    monkeypatch.setattr(boa.pipeline.offload, "host_free_memory", lambda: 1 << 40)
    monkeypatch.setattr(boa.models, "stream_model", lambda *a, **kw: pytest.fail("streamed a model that fits"))
    assert main(["eval", str(model_dir), "--corpora", str(calib_txt), *EVAL, "--json", str(report)]) == 0
    assert ppl(report)[str(model_dir)] == expected


def test_quantize_stream_eval_fp_scores_the_float_model_block_by_block(model_dir, calib_txt, tmp_path, monkeypatch):
    """--eval-fp with --stream always evaluates the float model from its shards (before, refused); the quantized
    model saved is the one a run without --eval-fp saves."""
    expected = in_memory_ppl(model_dir, calib_txt, tmp_path)
    never_whole(monkeypatch)
    quantize = ["quantize", str(model_dir), "--method", "gptq", "--calib", str(calib_txt), "--nsamples", "4",
                "--seqlen", "16", "--device", "cpu", "--stream", "always", "--corpora", str(calib_txt), *EVAL]
    report = tmp_path / "quantize.json"
    assert main([*quantize, "--eval-fp", "--out", str(tmp_path / "OUT"), "--json", str(report)]) == 0
    scores = ppl(report)
    assert scores["fp"] == pytest.approx(expected, rel=1e-5)
    assert set(scores) == {"fp", "gptq w4g128"}

    assert main([*quantize, "--out", str(tmp_path / "PLAIN")]) == 0
    with_fp, plain = (boa.load(tmp_path / name)[0].state_dict() for name in ("OUT", "PLAIN"))
    assert with_fp.keys() == plain.keys() and all(torch.equal(with_fp[k], plain[k]) for k in plain)


REFUSED = {
    "eval-tasks": (lambda d, q, c: ["eval", d, "--stream", "always", "--corpora", c, "--tasks", "hellaswag"],
                   "--tasks need the model in memory"),
    "quantize-eval-fp-tasks": (lambda d, q, c: ["quantize", d, "--method", "rtn", "--stream", "always", "--eval-fp",
                                                "--tasks", "hellaswag", "--corpora", c, "--out", q + "-new"],
                               "--tasks need it in memory"),
    "eval-quantized-folder": (lambda d, q, c: ["eval", q, "--stream", "always", "--corpora", c],
                              "boa-quantized folder, which is evaluated in memory"),
}


@pytest.mark.parametrize("case", REFUSED.values(), ids=REFUSED.keys())
def test_what_streaming_cannot_evaluate_is_refused(case, model_dir, calib_txt, tmp_path, capsys):
    argv, message = case
    quantized = boa.save(boa.quantize(build_llama(), boa.RTN(bits=4), progress=False), tmp_path / "q")
    capsys.readouterr()
    assert main([*argv(str(model_dir), str(quantized), str(calib_txt)), *EVAL]) == 2
    err = capsys.readouterr().err
    assert err.startswith("boa: error:") and message in err
