"""boa.eval.Report: the table and the JSON a run reports."""
import json

from boa.eval import Report


def test_report_json_holds_rows_phases_and_info(tmp_path):
    report = Report()
    with report.phase("quantize"):
        pass
    report.rows.append({"model": "gptq w4g128", "ppl_wikipedia": 12.5})
    report.info["config"] = {"method": "gptq"}
    report.write(tmp_path / "report.json")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["results"] == [{"model": "gptq w4g128", "ppl_wikipedia": 12.5}]
    assert set(data["seconds"]) == {"quantize"} and data["config"] == {"method": "gptq"}
    assert data["peak_memory_mb"] > 0


def test_report_prints_to_the_current_stdout(capsys):
    report = Report(rows=[{"model": "fp", "ppl_wikipedia": 10.0}])
    report.print()
    out = capsys.readouterr().out
    assert "ppl_wikipedia" in out and "10.000" in out and "time:" in out
