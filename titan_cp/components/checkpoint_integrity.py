"""Checkpoints that are verified before they are loaded: a checksum manifest per save.

TorchTitan's ``CheckpointManager`` (DCP) trusts whatever lies in
``{dump_folder}/{checkpoint.folder}/step-N``: a truncated shard fails deep in
DCP without naming the file, random bytes inside a shard load silently (the
loss turns NaN later), and a save killed midway is skipped without a word.
:class:`VerifiedCheckpointManager` is TorchTitan's manager plus a manifest,
selected by the config (``Trainer.Config.checkpoint =
VerifiedCheckpointManager.Config(...)``), nothing patched:

- **Save.** Before a save, rank 0 removes the folder's old ``manifest.json``;
  after it (all ranks past a barrier, so every rank's files are on disk),
  the ranks checksum a share of the files each and rank 0 writes ``manifest.json`` = ``{"step": N, "files": {path: {"size",
  "sha256"}}}`` over every file of the folder (DCP's ``__r_k.distcp`` shards
  and ``.metadata``, or HF safetensors), to a temporary name, fsynced, then
  renamed: a folder has a manifest only if its save finished. Async saves
  (``checkpoint.async_mode = "async" | "async_with_pinned_mem"``) get theirs
  when TorchTitan waits for the save to finish (at the next save or the last
  step), so a run killed in between leaves that step without a manifest,
  i.e. incomplete.
- **Resume** (``checkpoint.folder`` holds ``step-*``): folders are tried
  newest first; each is checked against its manifest (files split over the
  ranks, results gathered so every rank picks the same step). A folder with
  no manifest, a missing file, a different size or a different SHA-256 is
  skipped with a warning naming the file, and the newest good one is loaded.
  None good: a warning, then TorchTitan's usual path (``initial_load_path``,
  else a fresh start).
- **Explicit loads** (``checkpoint.load_step``, ``checkpoint.initial_load_path``):
  the folder is checked the same way and a damaged one raises
  :class:`CheckpointCorrupted` naming the files (the user asked for exactly
  that checkpoint, so there is no fallback). A folder without any manifest
  (written by plain TorchTitan) loads with a warning that it is unverified.

Manifests assume every rank sees the checkpoint folder (one node, or a shared
file system: what DCP's resharding load needs anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torchtitan.components.checkpoint import AsyncMode, CheckpointManager
from torchtitan.tools.logging import logger

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 8 * 2**20


class CheckpointCorrupted(RuntimeError):
    """A checkpoint folder that was asked for explicitly fails its manifest check."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_files(folder: str) -> list[str]:
    """Paths (relative, sorted) of every file in a checkpoint folder except the manifest."""
    out = []
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST and not rel.startswith(MANIFEST + "."):
                out.append(rel)
    return sorted(out)


def file_entries(folder: str, names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(name, {"size", "sha256"}) of each of ``names`` in ``folder``."""
    return [(rel, {"size": os.path.getsize(os.path.join(folder, rel)), "sha256": sha256_of(os.path.join(folder, rel))})
            for rel in names]


def write_manifest(folder: str, step: int, files: dict[str, dict[str, Any]] | None = None) -> str:
    """Write ``folder/manifest.json`` (atomic: temp file, fsync, rename) from ``files`` (default: checksum all)."""
    if files is None:
        files = dict(file_entries(folder, checkpoint_files(folder)))
    path = os.path.join(folder, MANIFEST)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"format": 1, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def read_manifest(folder: str) -> dict[str, Any] | None:
    """The folder's manifest, or None if it has none (an unfinished save) or it is unreadable."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        return manifest if isinstance(manifest.get("files"), dict) and manifest["files"] else None
    except (OSError, ValueError, AttributeError):
        return None


def check_files(folder: str, manifest: dict[str, Any], names: list[str]) -> list[str]:
    """Problems of ``names`` (keys of the manifest) in ``folder``: one line per bad file, naming it."""
    problems = []
    for rel in names:
        want = manifest["files"][rel]
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, the manifest says {want['size']} (truncated or overwritten)")
        elif sha256_of(path) != want["sha256"]:
            problems.append(f"{path}: SHA-256 differs from the manifest (the bytes changed after the save)")
    return problems


def split_over_ranks(work, items: list) -> list:
    """``work(items[rank::world])`` on every rank, the result lists concatenated over ranks, on every rank.

    A collective under a process group (call it on all ranks with the same ``items``); ``work(items)`` without.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rank, world = dist.get_rank(), dist.get_world_size()
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, work(items[rank::world]))
        return [x for part in gathered for x in part]
    return work(items)


def verify_checkpoint(folder: str) -> list[str] | None:
    """Problems of a checkpoint folder ([] = good); None if it has no manifest.

    Under a process group the files are split over the ranks and the problems
    all-gathered, so every rank returns the same list (a collective: call it on
    all ranks).
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    return sorted(split_over_ranks(lambda names: check_files(folder, manifest, names), sorted(manifest["files"])))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class VerifiedCheckpointManager(CheckpointManager):
    """TorchTitan's DCP ``CheckpointManager`` with a checksum manifest per save, checked on load."""

    @dataclass(kw_only=True, slots=True)
    class Config(CheckpointManager.Config):
        pass

    def __init__(self, config: Config, **kwargs):
        super().__init__(config, **kwargs)
        self._pending_manifest_step: int | None = None  # an async save whose manifest is still due
        self._verified: set[str] = set()  # folders checked by _find_load_step

    # --- save ------------------------------------------------------------------------------

    def _save(self, curr_step: int, last_step: bool = False) -> bool:
        if not self._should_save(curr_step, last_step):
            return False
        # the previous async save's manifest is written inside super()._save's wait
        folder = self._create_checkpoint_id(curr_step)
        if _is_rank0() and os.path.exists(os.path.join(folder, MANIFEST)):
            os.remove(os.path.join(folder, MANIFEST))  # a re-save: the old manifest no longer describes it
        saved = super()._save(curr_step, last_step)
        if saved:
            if self.async_mode == AsyncMode.DISABLED or last_step:
                self._finish_manifest(curr_step)
            else:
                self._pending_manifest_step = curr_step
        return saved

    def _wait_for_saving(self) -> None:
        super()._wait_for_saving()
        if self._pending_manifest_step is not None:
            step, self._pending_manifest_step = self._pending_manifest_step, None
            self._finish_manifest(step)

    def _finish_manifest(self, step: int) -> None:
        _barrier()  # every rank's files are written
        folder = self._create_checkpoint_id(step)
        files = dict(split_over_ranks(lambda names: file_entries(folder, names), checkpoint_files(folder)))
        if _is_rank0():
            write_manifest(folder, step, files)
        _barrier()  # nobody proceeds (and maybe purges or reloads) before the manifest exists

    # --- load ------------------------------------------------------------------------------

    def _find_load_step(self, folder: str = "") -> int:
        """The newest ``step-N`` of ``folder`` that passes its manifest check; warns for each skipped one."""
        folder = folder or self.folder
        if not os.path.isdir(folder):
            return -1
        steps = sorted((int(m.group(1)) for name in os.listdir(folder) if (m := _STEP_DIR.match(name))),
                       reverse=True)
        for step in steps:
            ckpt = self._create_checkpoint_id(step, folder)
            problems = verify_checkpoint(ckpt)
            if problems == []:
                self._verified.add(ckpt)
                logger.info(f"Checkpoint {ckpt} matches its manifest")
                return step
            why = ("it has no manifest.json: its save did not finish" if problems is None
                   else "damaged: " + "; ".join(problems))
            if _is_rank0():  # every rank reached the same verdict
                logger.warning(f"Skipping checkpoint {ckpt}: {why}. Falling back to an older checkpoint.")
        if steps and _is_rank0():
            logger.warning(f"No checkpoint in {folder} passed its manifest check; not resuming from it.")
        return -1

    def dcp_load(self, state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if checkpoint_id not in self._verified and os.path.isdir(checkpoint_id):
            problems = verify_checkpoint(checkpoint_id)
            if problems is None and not from_hf:
                logger.warning(f"Checkpoint {checkpoint_id} has no {MANIFEST}: loading it unverified.")
            elif problems:
                raise CheckpointCorrupted(
                    f"Checkpoint {checkpoint_id} is damaged and was not loaded: " + "; ".join(problems)
                    + ". Point checkpoint.initial_load_path / checkpoint.load_step at an intact checkpoint."
                )
        super().dcp_load(state_dict, checkpoint_id, from_hf, from_quantized)


__all__ = [
    "MANIFEST",
    "CheckpointCorrupted",
    "VerifiedCheckpointManager",
    "check_files",
    "checkpoint_files",
    "file_entries",
    "read_manifest",
    "split_over_ranks",
    "verify_checkpoint",
    "write_manifest",
]
