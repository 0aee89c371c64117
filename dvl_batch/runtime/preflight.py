"""Checks a job passes before anything is written to OUT or a model is loaded.

Every mistake found here is a one-line UsageError (exit 2) and leaves OUT as it was:
a device this machine does not have, a quantization mode it cannot run, and what the
first samples of the input show (no image field at all, `<image>` markers that do not
match the samples' image count, a questions file whose keys match no sample). Warnings
are returned, to be said once, up front.
"""

from __future__ import annotations

import itertools

from ..config.launch import parse_device_list
from ..config.spec import JobSpec
from ..errors import UsageError
from ..preprocess.prompts import IMAGE_MARKER, load_questions_file
from ..records import RawSample, Shard
from ..sources import read_shard
from ..sources.formats import is_remote

PEEK_SAMPLES = 64  # samples of the first shard read to check the job against the data


def check_devices(spec: JobSpec) -> None:
    """The device(s) the local runners will use exist, and can run the quantization mode and KV format."""
    if spec.run.runner != "local":
        return  # Ray places engines on the cluster's machines, not this one
    names = parse_device_list(spec.run.gpus) if spec.run.gpus else [spec.model.device]
    model = spec.model
    if set(names) <= {"auto", "cpu"} and (model.attn_implementation, model.kv_dtype, model.quantize) == ("sdpa", "auto", "none"):
        return  # nothing to check for these, and no torch to import (a run with nothing to do stays quick)
    from ..engine.model import check_attention, check_kv_dtype, pick_device, pick_dtype

    for name in names:
        device = pick_device(name)
        if spec.model.device_map:
            continue
        check_attention(spec.model.attn_implementation, device)
        check_kv_dtype(spec.model.kv_dtype, device)
        if spec.model.quantize != "none":
            from ..engine.quantize import check_engine_quantize, check_quantize
            from .worker import engine_kind

            check_quantize(spec.model.quantize, device, pick_dtype(spec.model.dtype, device))
            check_engine_quantize(spec.model.quantize, engine_kind(spec), device)


def peek(shard: Shard, spec: JobSpec, limit: int = PEEK_SAMPLES) -> list[RawSample]:
    """The first samples of a shard, read the way the run reads them (no retries: a peek
    that fails says nothing; the run itself retries and reports)."""
    reader = read_shard(shard, spec.data.image_field, spec.data.key_field, spec.data.max_file_bytes, 0)
    try:
        return [item for item in itertools.islice(reader, limit) if isinstance(item, RawSample)]
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()


def _check_images(shard: Shard, samples: list[RawSample], spec: JobSpec) -> None:
    if not samples or any(s.images for s in samples):
        return
    if not all(s.error and s.error.startswith("no image") for s in samples):
        return  # unreadable samples, not a missing field: those become error rows
    fields = sorted({name for s in samples for name in s.field_names})
    asked = f"--image-field {spec.data.image_field} matches no field" if spec.data.image_field else "no image field found"
    raise UsageError(
        f"{asked} in {shard.url} (fields found: {', '.join(fields) or 'none'}); "
        "pass --image-field NAME naming the field that holds the images (dvl-batch inspect lists them)"
    )


def _check_markers(shard: Shard, samples: list[RawSample], spec: JobSpec) -> None:
    prompt = spec.prompt
    texts = [prompt.prompt] if prompt.task == "caption" else list(prompt.questions)
    turns = sum(text.count(IMAGE_MARKER) for _, text in prompt.turns)
    counts = {turns + text.count(IMAGE_MARKER) for text in texts}
    with_images = [s for s in samples if s.images and not s.error]
    if not with_images or not any(counts):
        return
    n_images = {len(s.images) for s in with_images}
    for markers in counts:
        if markers and markers not in n_images:
            have = " or ".join(str(n) for n in sorted(n_images))
            raise UsageError(
                f"the prompt has {markers} {IMAGE_MARKER} markers but the samples of {shard.url} have {have} "
                f"image(s) each; use one {IMAGE_MARKER} per image of a sample (or none: images then come first)"
            )


def _check_questions_file(shard: Shard, samples: list[RawSample], spec: JobSpec) -> list[str]:
    if spec.prompt.task != "vqa" or not spec.prompt.questions_file or not samples:
        return []
    from pathlib import Path

    book = load_questions_file(Path(spec.prompt.questions_file))
    if any(s.key in book for s in samples):
        return []
    theirs = ", ".join(repr(k) for k in list(book)[:3])
    ours = ", ".join(repr(s.key) for s in samples[:3])
    alone = not spec.prompt.questions and not spec.prompt.question_field
    effect = " (those samples will be error rows 'no question for this sample')" if alone else ""
    return [
        f"warning: none of the first {len(samples)} sample keys of {shard.id} ({ours}, ...) is a key of "
        f"{spec.prompt.questions_file} ({theirs}, ...){effect}; check that the file's keys are the samples' keys"
    ]


def check_inputs(spec: JobSpec, shards: list[Shard]) -> list[str]:
    """Refuse a job its data cannot serve, judging from the first local shard; warnings to show.

    Remote shards (`pipe:` commands, URLs) are not peeked at: that would run the user's
    command or download the start of the shard an extra time; their problems show as
    error rows of the run instead.
    """
    local = [s for s in shards if not is_remote(s.url)]
    if not local:
        return []
    shard = local[0]
    samples = peek(shard, spec)
    _check_images(shard, samples, spec)
    _check_markers(shard, samples, spec)
    return _check_questions_file(shard, samples, spec)
