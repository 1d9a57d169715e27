"""boa.core.output: which output folders a writer may replace (check_output), and the OUT.partial checkpoint beside
them (checkpoint_folder): kept by a resumed run, discarded by a restarted one, refused (not thrown away) by a plain
fresh run when it holds finished work, never touched when boa did not write it; removed once OUT is written
(finish_output)."""
import json
import re

import pytest

from boa.core.checkpoint import Checkpoint
from boa.core.errors import BoaError
from boa.core.output import check_output, checkpoint_folder, finish_output, partial_folder, read_manifest

MANIFEST = "manifest.json"


def write_manifest(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(json.dumps(fields))
    (folder / "weights.bin").write_bytes(b"\0\1")
    return folder


def test_a_new_or_empty_folder_may_be_written(tmp_path, folder_snapshot):
    check_output(tmp_path / "new", MANIFEST, "abc")
    assert not (tmp_path / "new").exists()  # the check creates nothing
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", MANIFEST, "abc")
    assert folder_snapshot(tmp_path) == {}


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "model.txt"
    target.write_text("keep me")
    with pytest.raises(BoaError, match=re.escape(f"output path {target} is a file, not a folder")):
        check_output(target, MANIFEST)
    assert target.read_text() == "keep me"


def test_a_folder_of_other_files_is_refused_naming_the_writer(tmp_path, folder_snapshot):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an output")
    before = folder_snapshot(folder)
    for fingerprint in (None, "abc"):
        with pytest.raises(BoaError, match=re.escape(f"output folder {folder} is not empty and was not written by "
                                                     "`boa export`")):
            check_output(folder, MANIFEST, fingerprint, writer="boa export")
    assert folder_snapshot(folder) == before


def test_an_earlier_output_may_be_replaced_unless_it_holds_another_run(tmp_path, folder_snapshot):
    """Without a fingerprint any earlier output of the kind may be replaced; with one, only this very run's."""
    folder = write_manifest(tmp_path / "out", fingerprint="abc")
    before = folder_snapshot(folder)
    check_output(folder, MANIFEST)
    check_output(folder, MANIFEST, "abc")
    with pytest.raises(BoaError, match=re.escape(f"output folder {folder} already holds a different model")):
        check_output(folder, MANIFEST, "def")
    unmarked = write_manifest(tmp_path / "unmarked", format="boa")  # a manifest without a fingerprint
    check_output(unmarked, MANIFEST)
    with pytest.raises(BoaError, match="already holds a different model"):
        check_output(unmarked, MANIFEST, "abc")
    assert folder_snapshot(folder) == before


def test_read_manifest(tmp_path):
    assert read_manifest(tmp_path, MANIFEST) is None
    write_manifest(tmp_path, fingerprint="abc", layers={"a": 1})
    assert read_manifest(tmp_path, MANIFEST) == {"fingerprint": "abc", "layers": {"a": 1}}


def test_partial_folder_sits_beside_the_output(tmp_path):
    assert partial_folder(tmp_path / "OUT") == tmp_path / "OUT.partial"
    assert partial_folder(str(tmp_path / "OUT")) == tmp_path / "OUT.partial"


def make_partial(out, finished: int | None = 1):
    """A checkpoint folder as boa leaves it: a step file and, unless finished is None (killed before its first
    progress record), progress.json recording `finished` steps."""
    partial = partial_folder(out)
    partial.mkdir(parents=True)
    (partial / "step-0000.safetensors").write_bytes(b"\0")
    if finished is not None:
        (partial / "progress.json").write_text(json.dumps({"fingerprint": "f", "kind": "k", "next_step": finished}))
    return partial


def test_finished_work_is_refused_without_resume_or_restart(tmp_path, folder_snapshot):
    out = tmp_path / "OUT"
    partial = make_partial(out, finished=3)
    before = folder_snapshot(partial)
    with pytest.raises(BoaError, match=r"interrupted run \(3 finished steps\); rerun with --resume .* --restart"):
        checkpoint_folder(out, resume=False)
    assert folder_snapshot(partial) == before
    assert checkpoint_folder(out, resume=False, restart=True) == partial
    assert not partial.exists()
    assert checkpoint_folder(tmp_path / "OTHER", resume=False) == tmp_path / "OTHER.partial"  # none: nothing to do
    assert not (tmp_path / "OTHER.partial").exists()


def test_a_checkpoint_with_nothing_finished_is_discarded_silently(tmp_path):
    partial = make_partial(tmp_path / "OUT", finished=None)
    assert checkpoint_folder(tmp_path / "OUT", resume=False) == partial
    assert not partial.exists()


def test_a_damaged_progress_record_is_not_discarded_unasked(tmp_path):
    partial = make_partial(tmp_path / "OUT", finished=None)
    (partial / "progress.json").write_text("{trunc")
    with pytest.raises(BoaError, match="progress record is damaged"):
        checkpoint_folder(tmp_path / "OUT", resume=False)
    assert (partial / "progress.json").exists()


def test_a_folder_boa_did_not_write_is_never_touched(tmp_path, folder_snapshot):
    """The issue-18 case: OUT.partial holding someone's thesis is neither deleted nor resumed from."""
    out = tmp_path / "precious"
    partial = partial_folder(out)
    partial.mkdir()
    (partial / "thesis.txt").write_text("x")
    before = folder_snapshot(partial)
    for resume, restart in ((False, False), (True, False), (False, True)):
        with pytest.raises(BoaError, match="was not written by boa"):
            checkpoint_folder(out, resume=resume, restart=restart)
    finish_output(out)
    assert folder_snapshot(partial) == before


def test_resume_and_restart_together_are_refused(tmp_path):
    with pytest.raises(BoaError, match="contradict"):
        checkpoint_folder(tmp_path / "OUT", resume=True, restart=True)


def test_a_resumed_run_keeps_its_checkpoint(tmp_path, folder_snapshot):
    out = tmp_path / "OUT"
    partial = make_partial(out)
    before = folder_snapshot(partial)
    assert checkpoint_folder(out, resume=True) == partial
    assert folder_snapshot(partial) == before
    assert checkpoint_folder(tmp_path / "NEW", resume=True) == tmp_path / "NEW.partial"
    assert not (tmp_path / "NEW.partial").exists()


def test_finish_output_removes_the_checkpoint_only(tmp_path, folder_snapshot):
    out = write_manifest(tmp_path / "OUT", fingerprint="abc")
    before = folder_snapshot(out)
    make_partial(out)
    finish_output(out)
    assert not partial_folder(out).exists()
    assert folder_snapshot(out) == before
    finish_output(out)  # nothing left to remove: no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]


def test_an_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(BoaError, match=r"lies under .*file.txt, which is a file"):
        check_output(tmp_path / "file.txt" / "sub" / "OUT", MANIFEST)


def test_an_unwritable_place_is_refused(tmp_path, monkeypatch):
    """(Root ignores permission bits, so the refusal of os.access — a read-only mount, a folder of another user —
    is simulated.)"""
    import boa.core.output as output

    monkeypatch.setattr(output.os, "access", lambda path, flags: False)
    with pytest.raises(BoaError, match=r"cannot write to .* \(no permission, or a read-only filesystem\)"):
        check_output(tmp_path / "OUT", MANIFEST)


def test_too_little_room_is_refused_before_any_work(tmp_path, monkeypatch):
    import collections

    import boa.core.output as output

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: usage(10 * 2**30, 9 * 2**30, 2**30))
    check_output(tmp_path / "OUT", MANIFEST, need_bytes=2**29)
    with pytest.raises(BoaError, match=r"needs about 2.00 GiB free, its filesystem has 1.00 GiB"):
        check_output(tmp_path / "OUT", MANIFEST, need_bytes=2 * 2**30)


def test_an_interrupted_in_place_write_may_be_redone(tmp_path):
    """A kill while files were moved into an existing OUT leaves boa's temporary inside it and no manifest: the
    next run may write there."""
    out = tmp_path / "OUT"
    (out / ".boa-tmp-x").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\0")
    check_output(out, MANIFEST, fingerprint="abc")


def test_a_kill_while_the_checkpoint_is_removed_leaves_no_finished_work_behind(tmp_path, monkeypatch):
    """Found by bench/soak.py: a SIGKILL while finish_output deleted OUT.partial file by file left progress.json
    naming steps whose files were gone, and --resume then called the checkpoint damaged. The record goes first now."""
    import boa.core.output as output

    out = write_manifest(tmp_path / "OUT", fingerprint="abc")
    partial = make_partial(out, finished=3)

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the process dies as the removal starts

    monkeypatch.setattr(output.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        finish_output(out)
    monkeypatch.undo()
    assert partial.exists() and Checkpoint.steps_done(partial) == 0  # nothing reads as finished
    assert checkpoint_folder(out, resume=False) == partial and not partial.exists()
