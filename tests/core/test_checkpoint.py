"""boa.core.checkpoint.Checkpoint: finished steps round-trip with their metadata and the carry the next step starts
from; a kill between a step's files and progress.json resumes from the step before, with its carry; a checkpoint of
another run is refused; only the newest carry is kept."""
import json

import pytest
import torch

import boa.core.checkpoint as checkpoint_module
from boa.core.checkpoint import PROGRESS, Checkpoint
from boa.core.errors import BoaError

FINGERPRINT = "0123abcd"
KIND = "test-steps"


def tensors(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"codes": torch.randint(0, 16, (3, 5), dtype=torch.uint8, generator=g),
            "scale": torch.rand(3, 2, generator=g), "g_idx": torch.arange(5, dtype=torch.int32),
            "scalar": torch.tensor(float(step))}


def carry(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {"batch_0": torch.randn(2, 4, 8, generator=g), "batch_1": torch.randn(1, 4, 8, generator=g).half()}


def assert_tensors_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key


def carries(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("carry-*"))


def test_a_new_checkpoint_starts_at_step_zero(tmp_path):
    ckpt = Checkpoint(tmp_path / "ckpt", FINGERPRINT, KIND)
    assert ckpt.next_step() == 0 and ckpt.load_carry() == {}
    assert not (tmp_path / "ckpt").exists()  # nothing is written until a step finishes


def test_steps_round_trip_with_metadata_and_carry(tmp_path):
    folder = tmp_path / "ckpt"
    meta = {"losses": {"q_proj": 0.25, "k_proj": float("inf")}, "bits": {"q_proj": 4}, "note": "block", "n": [1, 2]}
    Checkpoint(folder, FINGERPRINT, KIND).save(0, tensors(0), meta, carry=carry(0))
    Checkpoint(folder, FINGERPRINT, KIND).save(1, tensors(1), {"n": 1}, carry=carry(1))

    reopened = Checkpoint(folder, FINGERPRINT, KIND)  # as a resumed run sees it
    assert reopened.next_step() == 2
    for step, expected_meta in ((0, meta), (1, {"n": 1})):
        got, got_meta = reopened.load(step)
        assert_tensors_equal(got, tensors(step))
        assert got_meta == expected_meta
    assert_tensors_equal(reopened.load_carry(), carry(1))
    assert json.loads((folder / PROGRESS).read_text()) == {
        "fingerprint": FINGERPRINT, "kind": KIND, "next_step": 2, "carry": "carry-0001.safetensors"}
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-0000.safetensors", "step-0001.safetensors"]


def test_only_the_newest_carry_is_kept(tmp_path):
    folder = tmp_path / "ckpt"
    ckpt = Checkpoint(folder, FINGERPRINT, KIND)
    for step in range(3):
        ckpt.save(step, tensors(step), carry=carry(step))
        assert carries(folder) == [f"carry-{step:04d}.safetensors"]
    ckpt.save(3, tensors(3))  # the last step carries nothing on
    assert carries(folder) == [] and ckpt.load_carry() == {} and ckpt.next_step() == 4


class Killed(BaseException):
    """A kill: nothing after it runs (not even `except Exception`)."""


def test_a_kill_before_progress_json_resumes_from_the_step_before(tmp_path, monkeypatch):
    """Step 1's step and carry files are written, then the process dies before progress.json names them: the
    checkpoint still says 'next step 1' with step 0's carry, and the rerun of step 1 replaces the orphans."""
    folder = tmp_path / "ckpt"
    Checkpoint(folder, FINGERPRINT, KIND).save(0, tensors(0), carry=carry(0))
    progress_before = (folder / PROGRESS).read_bytes()

    def die(path, data):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint_module, "write_json", die)
        with pytest.raises(Killed):
            Checkpoint(folder, FINGERPRINT, KIND).save(1, tensors(1), carry=carry(1))
    assert (folder / "step-0001.safetensors").exists()  # the step file was written...
    assert (folder / PROGRESS).read_bytes() == progress_before  # ...but progress.json never named it

    resumed = Checkpoint(folder, FINGERPRINT, KIND)
    assert resumed.next_step() == 1
    assert_tensors_equal(resumed.load_carry(), carry(0))
    assert_tensors_equal(resumed.load(0)[0], tensors(0))

    rerun = {k: v + 1 if k != "codes" else v for k, v in tensors(1).items()}
    resumed.save(1, rerun, carry=carry(2))
    assert resumed.next_step() == 2
    assert_tensors_equal(resumed.load(1)[0], rerun)
    assert_tensors_equal(resumed.load_carry(), carry(2))
    assert carries(folder) == ["carry-0001.safetensors"]


def test_a_kill_before_the_old_carry_is_removed_keeps_the_named_one(tmp_path, monkeypatch):
    """Dying after progress.json but before the cleanup leaves two carries: the one progress.json names is read,
    and the next step removes the stale one."""
    folder = tmp_path / "ckpt"
    ckpt = Checkpoint(folder, FINGERPRINT, KIND)
    ckpt.save(0, tensors(0), carry=carry(0))
    stale = folder / "carry-0000.safetensors"
    kept = stale.read_bytes()
    ckpt.save(1, tensors(1), carry=carry(1))
    stale.write_bytes(kept)  # as if the unlink never ran
    assert carries(folder) == ["carry-0000.safetensors", "carry-0001.safetensors"]
    assert_tensors_equal(Checkpoint(folder, FINGERPRINT, KIND).load_carry(), carry(1))
    ckpt.save(2, tensors(2), carry=carry(2))
    assert carries(folder) == ["carry-0002.safetensors"]


@pytest.mark.parametrize("fingerprint, kind", [("ffff0000", KIND), (FINGERPRINT, "other-kind")],
                         ids=["fingerprint", "kind"])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, fingerprint, kind):
    folder = tmp_path / "ckpt"
    Checkpoint(folder, FINGERPRINT, KIND).save(0, tensors(0), carry=carry(0))
    other = Checkpoint(folder, fingerprint, kind)
    for call in (other.next_step, other.load_carry):
        with pytest.raises(BoaError, match="belongs to a different run") as err:
            call()
        assert str(folder) in str(err.value)
    assert Checkpoint(folder, FINGERPRINT, KIND).next_step() == 1  # left as it was


@pytest.mark.parametrize("damage", ["step", "carry", "progress"])
def test_a_damaged_file_is_refused_naming_it(tmp_path, damage):
    """A truncated step or carry file, or a garbled progress record, gives a BoaError naming the file and the way
    out — never a half-read checkpoint."""
    folder = tmp_path / "ckpt"
    Checkpoint(folder, FINGERPRINT, KIND).save(0, tensors(0), {"n": 0}, carry=carry(0))
    path = {"step": folder / "step-0000.safetensors", "carry": folder / "carry-0000.safetensors",
            "progress": folder / PROGRESS}[damage]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    reopened = Checkpoint(folder, FINGERPRINT, KIND)
    with pytest.raises(BoaError, match=rf"{path.name} is damaged.*--restart"):
        reopened.next_step()
        reopened.load(0)
        reopened.load_carry()


def test_ownership_and_finished_steps_of_a_folder(tmp_path):
    folder = tmp_path / "ckpt"
    assert Checkpoint.steps_done(folder) == 0
    Checkpoint(folder, FINGERPRINT, KIND).save(0, tensors(0), carry=carry(0))
    (folder / ".step-0001.safetensors.tmp1234").write_bytes(b"")  # a temporary a kill left behind
    assert Checkpoint.owns(folder) and Checkpoint.steps_done(folder) == 1
    (folder / "notes.txt").write_text("mine")
    assert not Checkpoint.owns(folder)
