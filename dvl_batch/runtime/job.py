"""Job preparation shared by every runner: lock OUT, pin the job's identity, list work.

Runners only schedule shards. What they schedule is decided here once: which model
(resolved), which shards exist, which of them belong to this rank, and which are
already done (their part file exists).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._version import __version__
from ..config.launch import AUTO_COMPILE_MIN_BYTES, parse_gpus, resolve_compile
from ..config.spec import JobSpec
from ..errors import UsageError
from ..records import ResolvedModel, Shard
from ..sink.checkpoints import Checkpoints, source_signature
from ..sink.files import atomic_write_bytes
from ..sink.output import OutputDir
from ..sources import FolderManifest, discover_shards, shard_bytes
from .models import resolve_model
from .preflight import check_devices, check_inputs
from .resume import (
    check_identity_from_checkpoints,
    check_identity_from_parts,
    exclude_paths,
    recover_manifest,
    trusted_parts,
)


@dataclass
class PreparedJob:
    """A locked output folder and the shards this process is responsible for."""

    spec: JobSpec
    model: ResolvedModel
    out: OutputDir
    shards: list[Shard]  # this rank's shards
    todo: list[Shard]  # those without a part file yet
    metadata: dict[str, Any]  # goes into every part's schema metadata
    notices: list[str] = field(default_factory=list)  # said once before the run: warnings, parts redone, chunks rebuilt

    @property
    def done_before(self) -> int:
        return len(self.shards) - len(self.todo)

    def owns(self, shard_id: str) -> bool:
        """Whether this rank owns a shard: only its owner ever writes the shard's part."""
        return shard_owner(shard_id, self.spec.run.world_size) == self.spec.run.rank

    def release(self) -> None:
        self.out.release()


def shard_owner(shard_id: str, world_size: int) -> int:
    """Stable rank assignment: adding shards later never moves existing ones."""
    return int(hashlib.sha1(shard_id.encode()).hexdigest()[:12], 16) % world_size


def job_metadata(spec: JobSpec, model: ResolvedModel) -> dict[str, Any]:
    return {
        "model": model.label,
        "task": spec.prompt.task,
        "prompt": spec.prompt.prompt if spec.prompt.task == "caption" else None,
        "questions": list(spec.prompt.questions) or None,
        "system_prompt": spec.prompt.system_prompt,
        "turns": [list(turn) for turn in spec.prompt.turns] or None,
        "max_prompt_tokens": spec.prompt.max_prompt_tokens,
        "generation": {
            "max_new_tokens": spec.generation.max_new_tokens,
            "temperature": spec.generation.temperature,
            "top_p": spec.generation.top_p,
            "seed": spec.generation.seed,
        },
        "dtype": spec.model.dtype,
        "quantize": spec.model.quantize,
        "kv_dtype": spec.model.kv_dtype,
        "fingerprint": spec.fingerprint(model.label),
        "dvl_batch_version": __version__,
    }


def with_checkpoints(out: OutputDir, todo: list[Shard], notices: list[str]) -> list[Shard]:
    """Open shards, each with the samples its checkpoints already hold (`Shard.skip_keys`).

    A checkpoint that does not read back is removed (its samples are simply answered again);
    so are a shard's checkpoints made from a different version of its input (rows are matched
    to samples by index: a rewritten shard would get another sample's answer), with a notice.
    (Checkpoints of a different job were refused before: resume.check_identity_from_checkpoints.)"""
    checkpoints = Checkpoints(out.root)
    found = checkpoints.scan()
    result = []
    for shard in todo:
        done: dict[int, str] = {}
        paths = found.get(shard.id, [])
        if paths and _changed_since(checkpoints, paths, shard):
            notices.append(f"{shard.url} changed since its checkpoints were written: its samples are answered again")
            paths = []
        for path in paths:
            try:
                done |= checkpoints.done_samples([path])
            except Exception:  # noqa: BLE001 - unreadable or not our rows: redo its samples
                with contextlib.suppress(OSError):
                    path.unlink()
        result.append(replace(shard, skip_keys=done) if done else shard)
    return result


def _changed_since(checkpoints: Checkpoints, paths: list[Path], shard: Shard) -> bool:
    """Whether the shard's input differs from the one its checkpoints were answered from (they
    are then removed)."""
    source = source_signature(shard)
    changed = False
    for path in paths:
        try:
            header = checkpoints.header(path)
        except (OSError, ValueError):
            continue  # unreadable: done_samples removes it
        changed |= None not in (header.get("source"), source) and header.get("source") != source
    if changed:
        checkpoints.remove(paths)
    return changed


def _questions_digest(spec: JobSpec) -> dict[str, str]:
    """The questions file's content digest for job.json: the job's identity names the file by
    its path, so an edited file would otherwise give new questions to the shards still to do."""
    if not spec.prompt.questions_file:
        return {}
    try:
        data = Path(spec.prompt.questions_file).read_bytes()
    except OSError:
        return {}  # unreadable: loading its questions has refused the job already
    return {"questions_file_sha256": hashlib.sha256(data).hexdigest()}


def prepare_job(spec: JobSpec, cache_dir: Path, offline: bool = False) -> PreparedJob:
    """Validate inputs, lock OUT, check or write job.json, and list this rank's open shards."""
    # Every usage error is found before OUT is touched: inputs, device, model, what the data holds.
    exclude = exclude_paths(spec.output.path)  # nothing in OUT is ever read as input
    listed = discover_shards(spec.data.inputs, spec.data.shard_size, exclude=exclude)
    check_devices(spec)
    model = resolve_model(spec.model, cache_dir, offline)
    warnings = check_inputs(spec, listed)
    rank, world_size = spec.run.rank, spec.run.world_size
    out = OutputDir(spec.output.path, rank, world_size)
    out.prepare(owns=lambda shard_id: shard_owner(shard_id, world_size) == rank)
    try:
        record = {
            "fingerprint": spec.fingerprint(model.label),
            "identity": spec.output_identity(model.label),
            "spec": spec.to_dict(),
            "model": model.label,
            "dvl_batch_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        } | _questions_digest(spec)
        metadata = job_metadata(spec, model)
        notices: list[str] = list(warnings)
        with out.shared_lock():
            check_identity_from_parts(out, metadata, spec.output.overwrite)
            check_identity_from_checkpoints(out, metadata["fingerprint"], spec.output.overwrite)
            out.check_job(record, spec.output.overwrite)
            manifest = FolderManifest(out.manifest_file, taken=lambda shard_id: out.part_path(shard_id).exists())
            if recover_manifest(out, manifest):
                notices.append(f"{out.manifest_file.name}: folder chunks missing from it were rebuilt from OUT/parts")
            shards = discover_shards(spec.data.inputs, spec.data.shard_size, manifest, exclude=exclude)
            manifest.save(atomic_write_bytes)
        mine = [s for s in shards if shard_owner(s.id, spec.run.world_size) == spec.run.rank]
        done, redo = trusted_parts(out, mine, metadata["fingerprint"])
        notices.extend(redo)
        todo = with_checkpoints(out, [s for s in mine if s.id not in done], notices)
    except BaseException:
        out.release()
        raise
    if spec.batch.compile == "auto":
        request = parse_gpus(spec.run.gpus) if spec.run.gpus else None  # ("all": unknown here, counted as one)
        engines = len(request.entries) if request and not request.every else 1
        spec, notice = resolve_compile(spec, _input_bytes(todo, AUTO_COMPILE_MIN_BYTES * engines), engines)
        if notice and todo and _may_use_cuda(spec):
            notices.append(notice)
    return PreparedJob(spec, model, out, mine, todo, metadata, notices)


def _input_bytes(shards: list[Shard], enough: int) -> int | None:
    """What is left to read, in bytes, counted up to `enough` (None if a shard's size is
    unknown: remote inputs)."""
    total = 0
    for shard in shards:
        size = shard_bytes(shard)
        if size is None:
            return None
        total += size
        if total >= enough:
            break
    return total


def _may_use_cuda(spec: JobSpec) -> bool:
    """Whether the engines may run on a GPU (where compiling matters): the local device when
    the local runner uses one, else (GPU lists, Ray) assume so."""
    if spec.run.runner != "local" or spec.run.gpus:
        return True
    from ..engine.model import pick_device  # (torch: never for a run with nothing to do)

    try:
        return pick_device(spec.model.device).type == "cuda"
    except UsageError:  # (check_devices has said so already where it matters)
        return False
