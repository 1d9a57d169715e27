"""Issue 18's bad-input matrix: every user mistake ends in one line "boa: error: <problem and fix>", exit code 2, no
traceback, and nothing written or deleted (the whole tmp_path, cache included, is compared before and after)."""
import time

import pytest
import torch

from boa.cli import main
from conftest import build_llama, build_opt


class Inputs:
    """Bad inputs built offline under tmp_path, each on first use."""

    def __init__(self, tmp_path, model_dir, calib_txt, word_tokenizer):
        self.tmp, self.model, self.calib, self.tokenizer = tmp_path, str(model_dir), str(calib_txt), word_tokenizer

    def file(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.write_bytes(data)
        return str(path)

    def folder(self, name: str, model, tokenizer=True, pickle=False) -> str:
        folder = self.tmp / name
        model.save_pretrained(folder)
        if tokenizer:
            self.tokenizer.save_pretrained(folder)
        if pickle:
            from safetensors.torch import load_file

            torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()
        return str(folder)

    def missing_shard(self) -> str:
        folder = self.tmp / "sharded"
        build_llama().save_pretrained(folder, max_shard_size="40KB")
        self.tokenizer.save_pretrained(folder)
        sorted(folder.glob("model-*.safetensors"))[1].unlink()
        return str(folder)

    def truncated(self) -> str:
        folder = self.tmp / "truncated"
        folder.mkdir()
        for path in (self.tmp / "tiny-llama").iterdir():
            data = path.read_bytes()
            (folder / path.name).write_bytes(data[: len(data) // 2] if path.name == "model.safetensors" else data)
        return str(folder)

    def quantized_without_tokenizer(self) -> str:
        import boa

        result = boa.quantize(build_llama(), boa.RTN(bits=4, group_size=32), progress=False)
        return str(boa.save(result, self.tmp / "quantized"))


QUANTIZE = ["--nsamples", "4", "--seqlen", "16", "--corpora", ""]
LINE = '{"text": "w1 w2 w3"}\n'
CASES = {
    # 1. calibration files (named, with the line number)
    "txt-not-utf8": (lambda i: ["quantize", i.model, "--calib", i.file("latin1.txt", "w1 caf\xe9 w2".encode("latin-1")),
                                *QUANTIZE], ["latin1.txt", "not UTF-8", "line 1"]),
    "jsonl-bad-json": (lambda i: ["quantize", i.model, "--calib", i.file("bad.jsonl", f"{LINE}{{oops\n".encode()),
                                  *QUANTIZE], ["bad.jsonl", "line 2", "not valid JSON"]),
    "jsonl-no-text": (lambda i: ["quantize", i.model, "--calib",
                                 i.file("notext.jsonl", f'{LINE}\n{{"body": "w1"}}\n'.encode()), *QUANTIZE],
                      ["notext.jsonl", "line 3", 'no "text" key']),
    "jsonl-bare-string": (lambda i: ["quantize", i.model, "--calib", i.file("bare.jsonl", f'{LINE}"w1 w2"\n'.encode()),
                                     *QUANTIZE], ["bare.jsonl", "line 2", "JSON string, not an object"]),
    "eval-corpus-bad-jsonl": (lambda i: ["eval", i.model, "--corpora", i.file("ev.jsonl", b"[1]\n")],
                              ["ev.jsonl", "line 1", "JSON array"]),
    # 2. model folders
    "folder-without-config": (lambda i: ["quantize", i.file("notes", b"x") and str(i.tmp), "--method", "rtn",
                                         "--corpora", ""], ["is not a model folder", "no config.json"]),
    "truncated-safetensors": (lambda i: ["quantize", i.truncated(), "--method", "rtn", "--corpora", ""],
                              ["model.safetensors is damaged or truncated"]),
    "quantize-a-quantized-folder": (lambda i: ["quantize", i.quantized_without_tokenizer(), "--method", "rtn",
                                               "--corpora", ""], ["is a boa-quantized folder", "float model"]),
    "missing-shard-streamed": (lambda i: ["quantize", i.missing_shard(), "--stream", "always", "--calib", i.calib,
                                          "--nsamples", "2", "--seqlen", "16", "--corpora", "",
                                          "--out", str(i.tmp / "OUT")], ["missing shard", "model-00002-of-"]),
    "stream-without-out": (lambda i: ["quantize", i.model, "--stream", "always", "--corpora", ""],
                           ["--stream", "give --out"]),
    "nproc-over-windows": (lambda i: ["quantize", i.model, "--calib", i.calib, "--nsamples", "2", "--nproc", "3",
                                      "--corpora", "", "--out", str(i.tmp / "OUT")],
                           ["--nproc 3", "more processes than calibration windows"]),
    "offload-dir-not-writable": (lambda i: ["quantize", i.model, "--calib", i.calib, "--nsamples", "2", "--seqlen",
                                            "16", "--offload", "disk", "--offload-dir",
                                            i.file("a-file", b"x") + "/below", "--corpora", "",
                                            "--out", str(i.tmp / "OUT")], ["--offload-dir"]),
    "rotate-a-layernorm-model": (lambda i: ["quantize", i.folder("opt", build_opt()), "--method", "rtn",
                                            "--rotate", "--corpora", "", "--out", str(i.tmp / "OUT")],
                                 ["RMSNorm", "without --rotate"]),
    "rotate-a-streamed-layernorm-model": (lambda i: ["quantize", i.folder("opt", build_opt()), "--method", "rtn",
                                                     "--rotate", "--stream", "always", "--corpora", "",
                                                     "--out", str(i.tmp / "OUT")], ["RMSNorm"]),
    "quantize-bad-device": (lambda i: ["quantize", i.model, "--device", "tpu9", "--corpora", ""],
                            ["is not a device"]),
    # 3. evaluation and calibration lengths
    "eval-windows-negative": (lambda i: ["eval", i.model, "--corpora", i.calib, "--eval-windows", "-1"],
                              ["--eval-windows -1", "0 for the whole"]),
    "eval-seqlen-0": (lambda i: ["eval", i.model, "--corpora", i.calib, "--eval-seqlen", "0"],
                      ["--eval-seqlen 0", "positive"]),
    "quantize-eval-windows-negative": (lambda i: ["quantize", i.model, "--method", "rtn", "--corpora", i.calib,
                                                  "--eval-windows", "-1", "--out", str(i.tmp / "OUT")],
                                       ["--eval-windows -1"]),
    "eval-seqlen-over-positions-opt": (lambda i: ["eval", i.folder("opt", build_opt()), "--corpora", i.calib,
                                                  "--eval-seqlen", "200"],
                                       ["--eval-seqlen=200", "128 positions", "max_position_embeddings"]),
    "eval-seqlen-over-positions-rope": (lambda i: ["eval", i.model, "--corpora", i.calib, "--eval-seqlen", "129"],
                                        ["--eval-seqlen=129", "128 positions"]),
    "calib-seqlen-over-positions-opt": (lambda i: ["quantize", i.folder("opt", build_opt()), "--calib", i.calib,
                                                   "--nsamples", "2", "--seqlen", "200", "--corpora", "",
                                                   "--out", str(i.tmp / "OUT")],
                                        ["--seqlen=200", "128 positions"]),
    "calib-seqlen-over-positions-rope": (lambda i: ["quantize", i.model, "--calib", i.calib, "--nsamples", "2",
                                                    "--seqlen", "300", "--corpora", "", "--out", str(i.tmp / "OUT")],
                                         ["--seqlen=300", "128 positions"]),
    "nsamples-0": (lambda i: ["quantize", i.model, "--calib", i.calib, "--nsamples", "0", "--corpora", ""],
                   ["--nsamples 0"]),
    "bad-corpora-name-before-quantizing": (lambda i: ["quantize", i.model, "--method", "rtn", "--corpora",
                                                      "wikipedia,shakespeare", "--out", str(i.tmp / "OUT")],
                                           ["unknown corpus 'shakespeare'"]),
    # 4. generate, and a quantized folder saved without a tokenizer
    "top-p-0": (lambda i: ["generate", i.model, "--prompt", "w1", "--temperature", "1", "--top-p", "0"],
                ["top_p=0.0 must be in (0, 1]"]),
    "top-p-above-1": (lambda i: ["generate", i.model, "--prompt", "w1", "--temperature", "1", "--top-p", "1.5"],
                      ["top_p=1.5 must be in (0, 1]"]),
    "temperature-negative": (lambda i: ["generate", i.model, "--prompt", "w1", "--temperature", "-1"],
                             ["temperature=-1.0 must be a number >= 0"]),
    "max-new-tokens-0": (lambda i: ["generate", i.model, "--prompt", "w1", "--max-new-tokens", "0"],
                         ["max_new_tokens=0 must be at least 1"]),
    "empty-prompt": (lambda i: ["generate", i.model, "--prompt", ""], ["--prompt is empty"]),
    "bad-device": (lambda i: ["generate", i.model, "--prompt", "w1", "--device", "tpu9"], ["is not a device"]),
    "eval-quantized-without-tokenizer": (lambda i: ["eval", i.quantized_without_tokenizer(), "--corpora", i.calib],
                                         ["saved without a tokenizer"]),
    "generate-quantized-without-tokenizer": (lambda i: ["generate", i.quantized_without_tokenizer(), "--prompt",
                                                        "w1"], ["saved without a tokenizer"]),
    "model-folder-without-tokenizer": (lambda i: ["eval", i.folder("notok", build_llama(), tokenizer=False),
                                                  "--corpora", i.calib], ["has no tokenizer boa can load"]),
    # 7. pickle weights only
    "pickle-only-quantize": (lambda i: ["quantize", i.folder("pkl", build_llama(), pickle=True), "--method", "rtn",
                                        "--corpora", ""], ["holds only pickle weights", "--allow-pickle"]),
    "pickle-only-eval": (lambda i: ["eval", i.folder("pkl", build_llama(), pickle=True), "--corpora", i.calib],
                         ["holds only pickle weights", "--allow-pickle"]),
    "pickle-only-generate": (lambda i: ["generate", i.folder("pkl", build_llama(), pickle=True), "--prompt", "w1"],
                             ["holds only pickle weights", "--allow-pickle"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_line(case, tiny_llama_dir, calib_txt, word_tokenizer, tmp_path, empty_cache,
                                    folder_snapshot, capsys):
    build, words = CASES[case]
    argv = build(Inputs(tmp_path, tiny_llama_dir, calib_txt, word_tokenizer))
    before = folder_snapshot(tmp_path)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("boa: error: ")]
    assert code == 2, captured.err[-2000:]
    assert len(lines) == 1 and captured.err.rstrip().endswith(lines[0]), captured.err[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert folder_snapshot(tmp_path) == before
    assert not (tmp_path / "OUT").exists() and not (tmp_path / "OUT.partial").exists()


@pytest.mark.parametrize("command", [["generate", "--prompt", "w1"], ["quantize", "--corpora", ""]])
def test_cuda_without_a_gpu(command, tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([command[0], str(tiny_llama_dir), *command[1:], "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "boa: error: --device cuda: no CUDA GPU is available here" in err and "--device cpu" in err
    assert "Traceback" not in err


def test_allow_pickle_reads_a_pickle_only_folder(tmp_path, word_tokenizer, calib_txt, capsys):
    """--allow-pickle is the explicit way in: the same folder then evaluates."""
    folder = Inputs(tmp_path, tmp_path, calib_txt, word_tokenizer).folder("pkl", build_llama(), pickle=True)
    assert main(["eval", folder, "--corpora", str(calib_txt), "--eval-seqlen", "64", "--eval-windows", "2",
                 "--allow-pickle"]) == 0
    assert "ppl_" in capsys.readouterr().out


@pytest.mark.parametrize("argv, what", [
    (["quantize", "no-such/model", "--method", "rtn", "--corpora", ""], "the Hub cannot be reached from here"),
    (["eval", "no-such/model", "--corpora", ""], "the Hub cannot be reached from here"),
], ids=["quantize-unknown-model", "eval-unknown-model"])
def test_unreachable_hub_fails_fast(argv, what, monkeypatch, empty_cache, capsys):
    """Where the Hub cannot be reached, an unknown model name fails in seconds (the Hub clients run offline), not
    after ~25 s of retries."""
    import boa.data.hub as hub

    monkeypatch.setattr(hub, "_probe", lambda endpoint, timeout: False)
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "boa: error: model 'no-such/model' could not be loaded" in err and what in err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) > 0
