"""What a rerun trusts in OUT: only what it can verify.

- A shard is done when its part reads back and belongs to this job (`sink/verify.py`);
  any other part is redone, and the run says so.
- Without job.json, the parts say which job OUT holds: a run of another job is refused
  (not mixed in), the same job rewrites job.json and resumes.
- Folder chunks missing from folder_shards.json (deleted, or edited by hand) are
  rebuilt from their parts, so images already answered stay done and new ones get new
  chunks with ids no part has.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..records import Shard
from ..sink.checkpoints import Checkpoints
from ..sink.output import OutputDir, describe_differences
from ..sink.verify import VerifiedParts, part_record
from ..sources import FolderManifest, name_of_key

FOLDER_CHUNK_ID = re.compile(r"-[0-9a-f]{8}-\d{6}$")  # discovery's `{folder}-{digest}-{NNNNNN}`
NOT_IDENTITY = ("fingerprint", "dvl_batch_version")


def trusted_parts(out: OutputDir, shards: list[Shard], fingerprint: str) -> tuple[set[str], list[str]]:
    """Ids of `shards` whose part is a finished shard of this job, and one notice per part that is not."""
    done: set[str] = set()
    notices: list[str] = []
    verified = VerifiedParts(out.verified_file)
    for shard in shards:
        path = out.part_path(shard.id)
        if not path.exists():
            continue
        reason = verified.untrusted_reason(path, fingerprint)
        if reason is None:
            done.add(shard.id)
        else:
            notices.append(f"part {path.name} {reason}: its shard is done again")
    with contextlib.suppress(OSError):
        verified.prune(set(os.listdir(out.parts)))
    verified.save()
    return done, notices


def check_identity_from_parts(out: OutputDir, metadata: dict[str, Any], overwrite: bool) -> None:
    """OUT has no job.json: refuse a run whose job differs from the one its parts were written by."""
    if overwrite or out.job_file.exists():
        return
    for path in sorted(out.parts.glob("*.parquet")):
        try:
            job = part_record(path).get("job") or {}
        except (OSError, ValueError):
            continue  # unreadable parts say nothing; they are redone
        if job.get("fingerprint") != metadata["fingerprint"]:
            strip = lambda record: {k: v for k, v in record.items() if k not in NOT_IDENTITY}  # noqa: E731
            diffs = describe_differences(strip(job), strip(metadata))
            raise UsageError(
                f"{out.root} has no job.json and its parts were written by a different job ({diffs}); rerun with "
                "that job's settings to resume, use --overwrite to discard them, or pick another output folder"
            )


def check_identity_from_checkpoints(out: OutputDir, fingerprint: str, overwrite: bool) -> None:
    """OUT has no job.json: refuse a run of another job whose checkpoints (a run stopped before
    any part) are here. Rows are matched to samples by index, so they would be folded into this
    job's parts. Checks before job.json is written, so a refused run leaves OUT as it was."""
    if overwrite or out.job_file.exists():
        return
    checkpoints = Checkpoints(out.root)
    for paths in checkpoints.scan().values():
        for path in paths:
            try:
                written_by = checkpoints.header(path).get("fingerprint")
            except (OSError, ValueError):
                continue  # unreadable: removed and redone later
            if written_by not in (None, fingerprint):
                raise UsageError(
                    f"{out.root} has no job.json and its checkpoints ({path.name}) were written by a different job; "
                    "rerun with that job's settings to resume, use --overwrite to discard them, or pick another "
                    "output folder"
                )


def recover_manifest(out: OutputDir, manifest: FolderManifest) -> int:
    """Pin the folder chunks that have a part but no entry in the manifest; returns how many."""
    import pyarrow.parquet as pq

    known = {chunk["id"] for chunks in manifest.data.values() for chunk in chunks}
    recovered = 0
    for path in sorted(out.parts.glob("*.parquet")):
        if path.stem in known or not FOLDER_CHUNK_ID.search(path.stem):
            continue
        try:
            shard = part_record(path).get("shard") or {}
            if shard.get("format") != "folder" or not shard.get("url"):
                continue
            table = pq.read_table(path, columns=["key", "sample_index"])
        except (OSError, ValueError):
            continue
        by_index = dict(zip(table["sample_index"].to_pylist(), table["key"].to_pylist(), strict=True))
        members = [name_of_key(by_index[i]) for i in sorted(by_index)]
        manifest.add_chunk(str(shard["url"]), path.stem, members)
        recovered += 1
    return recovered


def exclude_paths(out: str | Path) -> tuple[Path, ...]:
    return (Path(out),)
