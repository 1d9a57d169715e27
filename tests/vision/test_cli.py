"""`boa quantize-vision` and `boa eval-vision` end to end (EfficientNet-Lite0, tiny budgets)."""
import json

import pytest

from boa.cli import main
from boa.core.errors import BoaError
from boa.vision.models import lite0_weights_file


def test_cli_quantize_vision_saves_a_network_that_evaluates_the_same(tmp_path, capsys):
    """`boa quantize-vision` (zero-shot, tiny budgets) on EfficientNet-Lite0: a report with agreement and KL against
    the float model on the bundled photos, a saved folder that `boa eval-vision` scores identically."""
    pytest.importorskip("skimage")
    try:
        lite0_weights_file()
    except BoaError as err:
        pytest.skip(str(err))
    out, report = tmp_path / "lite0-w4a8", tmp_path / "report.json"
    args = ["quantize-vision", "efficientnet-lite0", "--w-bits", "4", "--a-bits", "8", "--images", "4",
            "--distill-iters", "2", "--distill-batch", "4", "--iters", "2", "--batch-size", "2", "--eval-images", "6",
            "--out", str(out), "--json", str(report)]
    assert main(args) == 0
    rows = json.loads(report.read_text())["results"]
    assert [r["model"] for r in rows] == ["fp", "genie-m W4A8 (genie)"]
    assert rows[0]["agreement"] is None and 0 <= rows[1]["agreement"] <= 100 and rows[1]["kl"] >= 0
    again = tmp_path / "again.json"
    assert main(["eval-vision", str(out), "--eval-images", "6", "--json", str(again)]) == 0
    assert json.loads(again.read_text())["results"][1]["kl"] == rows[1]["kl"]
    assert not (tmp_path / "lite0-w4a8.partial").exists()  # the finished run removed its checkpoint

    assert main(["quantize-vision", "efficientnet-lite0", "--data", "real", "--images", "4"]) == 2
    assert "no real imagenet training images" in capsys.readouterr().err
    assert main(["quantize-vision", "efficientnet-lite0", "--w-bits", "5", "--images", "4"]) == 2
    assert "w_bits=5" in capsys.readouterr().err
    assert main(["quantize-vision", "efficientnet-lite0", "--resume"]) == 2
    assert "give the same --out" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert main(["quantize-vision", "efficientnet-lite0", "--images", "4", "--out", str(tmp_path / "taken")]) == 2
    assert "not written by `boa quantize-vision`" in capsys.readouterr().err
    assert not (tmp_path / "taken.partial").exists()
