"""`boa quantize` refusals: bad settings, a missing model and an occupied output folder exit 2 with "boa: error:"
and the problem, before anything is loaded or written."""
import pytest

from boa.cli import main


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


@pytest.mark.parametrize("args, message", [
    (["--bits", "5"], "bits=5 is not supported"),
    (["--group-size", "0"], "group_size=0 is invalid"),
    (["--percdamp", "1.5"], "percdamp=1.5 must be in [0, 1)"),
    (["--init", "gptq"], "--init applies only to --method aespa"),
    (["--method", "aespa", "--rounding-iters", "0"], "rounding_iters=0 must be a positive integer"),
    (["--method", "turboboa", "--rows-per-step", "0"], "rows_per_step=0 must be a positive integer"),
    (["--method", "aespa", "--init", "boa", "--dx-alpha", "2"], "dx_alpha=2.0 must be a number in [0, 1]"),
], ids=["bits-5", "group-size-0", "percdamp-1.5", "init-without-aespa", "rounding-iters-0", "rows-per-step-0",
        "aespa-init-dx-alpha-2"])
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


def test_cli_never_deletes_a_partial_folder_it_did_not_write(tiny_llama_dir, tmp_path, folder_snapshot, capsys):
    """OUT.partial holding the user's files (not a boa checkpoint): exit 2 naming it, the files untouched, nothing
    written."""
    partial = tmp_path / "precious.partial"
    partial.mkdir()
    (partial / "thesis.txt").write_text("x")
    before = folder_snapshot(partial)
    code = main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--out", str(tmp_path / "precious"),
                 "--corpora", ""])
    err = capsys.readouterr().err
    assert code == 2 and f"boa: error: {partial} exists and was not written by boa" in err
    assert folder_snapshot(partial) == before and not (tmp_path / "precious").exists()


def test_cli_ctrl_c_says_what_was_kept_and_how_to_go_on(tiny_llama_dir, calib_txt, tmp_path, monkeypatch, capsys):
    """Ctrl-C during block 1: one line (no traceback), exit 2, naming the finished block kept and --resume; a plain
    rerun then refuses to throw that block away, and --resume finishes the run."""
    import boa.pipeline.loop as loop

    real_block, calls = loop.quantize_block, []

    def interrupted_at_block_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_block(*args, **kwargs)

    monkeypatch.setattr(loop, "quantize_block", interrupted_at_block_1)
    out = tmp_path / "OUT"
    args = ["quantize", str(tiny_llama_dir), "--calib", str(calib_txt), "--nsamples", "4", "--seqlen", "16",
            "--out", str(out), "--corpora", ""]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (f"boa: stopped (interrupted). 1 finished blocks are kept in "
                                            f"{out}.partial; rerun the same command with --resume to continue.")
    assert "Traceback" not in err and not out.exists()
    monkeypatch.setattr(loop, "quantize_block", real_block)
    assert main(args) == 2
    assert "(1 finished steps); rerun with --resume to continue it, or --restart" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert (out / "quantization.json").exists() and not (tmp_path / "OUT.partial").exists()
