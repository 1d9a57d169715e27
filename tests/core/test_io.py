"""boa.core.io: atomic writes. A new folder appears whole; an existing one (a mount point cannot be renamed over)
is filled in place with its manifest moved in last; temporaries a kill left are removed; files and folders get the
permissions the umask gives, not mkdtemp's 0700."""
import os
import stat

import pytest

from boa.core.io import TEMP_TAG, atomic_dir, atomic_file


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)
    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


def test_a_new_folder_appears_whole_with_umask_permissions(tmp_path, umask):
    final = tmp_path / "OUT"
    with atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        assert not final.exists()
    assert sorted(p.name for p in final.iterdir()) == ["a.bin"]
    assert mode(final) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["OUT"]


def test_an_existing_folder_is_filled_in_place_manifest_last(tmp_path, monkeypatch):
    """The folder itself stays (same inode, as a mount point must); old entries go, new files arrive with the
    manifest moved in after every other file."""
    final = tmp_path / "OUT"
    final.mkdir()
    (final / "old.bin").write_bytes(b"0")
    (final / "manifest.json").write_text("old")
    inode = os.stat(final).st_ino
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moved.append(os.path.basename(b)) or real_replace(a, b))
    with atomic_dir(final, last="manifest.json") as tmp:
        assert tmp.parent == final and tmp.name.startswith(TEMP_TAG)
        (tmp / "manifest.json").write_text("new")
        (tmp / "z.bin").write_bytes(b"1")
        (tmp / "a.bin").write_bytes(b"2")
    assert os.stat(final).st_ino == inode
    assert sorted(p.name for p in final.iterdir()) == ["a.bin", "manifest.json", "z.bin"]
    assert (final / "manifest.json").read_text() == "new" and moved[-1] == "manifest.json"


def test_a_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "OUT"
    final.mkdir()
    (final / "keep.bin").write_bytes(b"0")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "new.bin").write_bytes(b"1")
            raise RuntimeError
    assert [p.name for p in final.iterdir()] == ["keep.bin"]
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "NEW"):
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]


def test_temporaries_a_kill_left_are_removed(tmp_path):
    (tmp_path / f".OUT{TEMP_TAG}dead").mkdir()
    with atomic_dir(tmp_path / "OUT") as tmp:
        (tmp / "a").write_text("")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["OUT"]
    (tmp_path / "OUT" / f"{TEMP_TAG}dead").mkdir()
    with atomic_dir(tmp_path / "OUT") as tmp:
        (tmp / "b").write_text("")
    assert sorted(p.name for p in (tmp_path / "OUT").iterdir()) == ["b"]


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    assert mode(tmp_path / "f.json") == expected
