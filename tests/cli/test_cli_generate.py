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
