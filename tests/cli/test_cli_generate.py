"""`boa generate`: streams the continuation of a saved folder's model and reports tok/s."""
import boa
from boa.cli import main

PROMPT = "w5 w17 w3 w99"


def test_cli_generate_streams_and_reports_speed(tiny_llama, calib, word_tokenizer, tmp_path, capsys):
    result = boa.quantize(tiny_llama, boa.RTN(bits=4, group_size=32), None, progress=False)
    folder = boa.save(result, tmp_path / "q", word_tokenizer)
    assert main(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6", "--dtype", "bfloat16"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT) and len(out.split()) > 4
    assert "tok/s" in err


def test_cli_generate_runs_a_rotated_w4a8_kv8_model_greedily_as_in_memory(tiny_llama, calib, word_tokenizer,
                                                                           tmp_path, capsys):
    """The loaded folder re-attaches the Hadamards and the quantizers: greedy decoding (KV cache grown step by step,
    keys and values stored at 8 bits) gives the tokens the in-memory model gives."""
    from boa.transforms import ActivationQuant, KVQuant, QuaRot

    config = boa.QuantConfig(boa.RTN(bits=4, group_size=32), transforms=(QuaRot(), ActivationQuant(8), KVQuant(8)))
    result = boa.quantize(tiny_llama, config, None, progress=False)
    folder = boa.save(result, tmp_path / "q", word_tokenizer)
    ids = word_tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = tiny_llama.generate(ids, max_new_tokens=6, do_sample=False)
    loaded, _, _ = boa.load(folder)
    assert loaded.generate(ids, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()
    assert main(["generate", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(PROMPT)
    assert "KV cache" in err and "MiB" in err
