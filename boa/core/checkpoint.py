"""Checkpoints of long runs (an LLM's blocks, Genie-D's image batches): each finished step is one atomic unit, so an
interrupted run resumes after its last finished step and ends with what an uninterrupted run gives.

    progress.json           {"fingerprint", "kind", "next_step", "carry"}: written last, it names what counts
    step-KKKK.safetensors   step K's results: tensors, and string metadata
    carry-KKKK.safetensors  what step K + 1 starts from (e.g. the next block's inputs); only the newest is kept
    carry-KKKK-rankRofW.safetensors   the same, per rank, when W processes share the run (boa.core.ranks): each
                            writes its own, rank 0 writes the step and progress.json once all of them have

A kill at any point leaves progress.json naming a complete set: a step or carry file written after it is ignored (and
overwritten by the rerun), and the carry it names is removed only after a newer progress.json replaced it. A folder
holding anything else is not a checkpoint: boa neither resumes from it nor deletes it (`owns`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from boa.core.errors import BoaError
from boa.core.io import atomic_file, write_json
from boa.core.ranks import Ranks

PROGRESS = "progress.json"
# What a checkpoint folder may hold: its files, and the temporaries atomic_file leaves when killed (".NAME.xxxx").
_FILES = r"(progress\.json|step-\d{4}\.safetensors|carry-\d{4}(-rank\d+of\d+)?\.safetensors)"
_OWN = re.compile(rf"{_FILES}|\.{_FILES}\..+")


def _damaged(path: Path, err: Exception) -> BoaError:
    return BoaError(f"checkpoint file {path} is damaged ({type(err).__name__}: {err}); rerun with --restart (or "
                    f"delete {path.parent}) to start over")


class Checkpoint:
    """The steps of one run (identified by `fingerprint`) in `folder`; `kind` names the run type in errors."""

    def __init__(self, folder, fingerprint: str, kind: str, ranks: Ranks = Ranks.single()):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.kind = kind
        self.ranks = ranks

    @staticmethod
    def owns(folder) -> bool:
        """Whether `folder` holds nothing but checkpoint files (or nothing): boa's to resume or delete."""
        folder = Path(folder)
        return folder.is_dir() and all(_OWN.fullmatch(entry.name) for entry in folder.iterdir())

    @staticmethod
    def _progress(folder: Path) -> dict | None:
        """The progress record of `folder`, None when there is none; BoaError when it cannot be read."""
        path = folder / PROGRESS
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise _damaged(path, err) from None

    @staticmethod
    def steps_done(folder) -> int | None:
        """How many steps a checkpoint folder records as finished: 0 when none, None when its record is unreadable."""
        try:
            state = Checkpoint._progress(Path(folder))
            return 0 if state is None else int(state["next_step"])
        except (BoaError, KeyError, TypeError, ValueError):
            return None

    def _state(self) -> dict | None:
        state = self._progress(self.folder)
        if state is None:
            return None
        if state.get("fingerprint") != self.fingerprint or state.get("kind") != self.kind:
            raise BoaError(
                f"the checkpoint in {self.folder} belongs to a different run (model, settings or calibration "
                "differ); drop --resume to start over, or delete that folder"
            )
        return state

    def next_step(self) -> int:
        """Where a resumed run starts: 0 if there is no checkpoint yet."""
        state = self._state()
        return 0 if state is None else state["next_step"]

    def _step_path(self, step: int) -> Path:
        return self.folder / f"step-{step:04d}.safetensors"

    def _carry_name(self, step: int) -> str:
        rank = f"-rank{self.ranks.rank}of{self.ranks.world}" if self.ranks.distributed else ""
        return f"carry-{step:04d}{rank}.safetensors"

    def save(self, step: int, tensors: dict[str, torch.Tensor], meta: dict | None = None,
             carry: dict[str, torch.Tensor] | None = None) -> None:
        """Records step `step` as finished, with the state the next step starts from (if any). With several
        ranks every rank calls it with its own carry; rank 0's tensors and meta are the step's."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if carry is not None:
            with atomic_file(self.folder / self._carry_name(step)) as tmp:
                save_file({k: v.contiguous() for k, v in carry.items()}, str(tmp))
        self.ranks.barrier(f"the checkpoint of step {step}")  # every rank's carry is on disk
        if self.ranks.main:
            with atomic_file(self._step_path(step)) as tmp:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
            write_json(self.folder / PROGRESS, {"fingerprint": self.fingerprint, "kind": self.kind,
                                                "next_step": step + 1,
                                                "carry": None if carry is None else self._carry_name(step)})
            for old in self.folder.glob("carry-*.safetensors"):
                if not old.name.startswith(f"carry-{step:04d}"):
                    old.unlink()
        self.ranks.barrier(f"the progress record of step {step}")

    def load(self, step: int) -> tuple[dict[str, torch.Tensor], dict]:
        """A finished step's tensors and metadata."""
        path = self._step_path(step)
        try:
            with safe_open(str(path), "pt") as f:
                meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            return load_file(str(path)), meta
        except Exception as err:  # safetensors raises its own error types for truncated or garbled files
            raise _damaged(path, err) from None

    def load_carry(self) -> dict[str, torch.Tensor]:
        """The state the next step starts from, this rank's ({} when the last step saved none)."""
        state = self._state()
        if state is None or not state.get("carry"):
            return {}
        # rank 0's file is named; the other ranks' follow from the step
        name = self._carry_name(state["next_step"] - 1) if self.ranks.distributed else state["carry"]
        try:
            return load_file(str(self.folder / name))
        except Exception as err:
            raise _damaged(self.folder / name, err) from None
