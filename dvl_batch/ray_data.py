"""Ray Data interop: the dvl-batch engine as a callable class for `Dataset.map_batches`.

For users whose images already flow through Ray Data. Ray Data creates one
`ImageAnswerer` per actor (load the model once, `num_gpus=1` each) and calls it
on batches of rows; each call returns one row per (input row, question) with the
same answer columns as dvl-batch's parquet parts, plus the input's other columns.

    import ray
    from dvl_batch.ray_data import ImageAnswerer

    ds = ray.data.read_parquet("s3://bucket/images/")          # column "image": bytes
    ds = ds.map_batches(ImageAnswerer, fn_constructor_kwargs={"model": "deepseek-community/deepseek-vl-1.3b-chat"},
                        batch_size=256, num_gpus=1, concurrency=8)
    ds.write_parquet("s3://bucket/captions/")

Here Ray Data owns scheduling, retries and output; dvl-batch's OUT folder, lock,
resume and per-shard parts do not apply (use `--runner ray` for those).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .preprocess.preparer import SamplePreparer
from .records import AnswerRow, PreparedSample, RawSample, Shard, ShardEnd
from .runtime.pipeline import ShardAssembler
from .sink.parts import PART_SCHEMA

ANSWER_COLUMNS = [name for name in PART_SCHEMA.names if name not in ("key", "shard", "sample_index")]


class _RowCollector:
    """Takes the assembler's finished rows instead of writing a parquet part (no checkpoints:
    a batch is answered in one call)."""

    checkpoints = None

    def __init__(self) -> None:
        self.rows: list[AnswerRow] = []

    def write(self, shard: Shard, end: ShardEnd | None, rows: list[AnswerRow], note: str | None = None,
              checkpoints=()) -> None:
        self.rows = sorted(rows, key=lambda r: (r.sample_index, r.question_index))


def image_bytes(value: Any) -> list[bytes]:
    """A cell of the image column: bytes, an HF-datasets {bytes, path} struct, a path, or a list of those."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray, memoryview)):
        return [bytes(value)]
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return [bytes(value["bytes"])]
        return image_bytes(value.get("path"))
    if isinstance(value, str):
        return [Path(value).read_bytes()]
    return [data for item in value for data in image_bytes(item)]


class ImageAnswerer:
    """Caption (or answer questions about) a batch of images; for `Dataset.map_batches`.

    model, prompt, questions, question_column and max_new_tokens mirror the CLI;
    `options` takes any other option by its CLI name or JobSpec field by its dotted name
    (e.g. {"temperature": 0.7, "batch.batch_size": 64}); `recipe` a bundled recipe name
    or a YAML file, as for `dvl-batch run` (the spec is built as `JobSpec.from_recipe` builds it).
    Images are decoded by `decode_threads` threads of the actor (PIL releases the
    GIL), overlapping with generation on the device.
    """

    def __init__(
        self,
        model: str = "auto",
        *,
        prompt: str | None = None,
        questions: Sequence[str] = (),
        question_column: str | None = None,
        image_column: str = "image",
        key_column: str | None = None,
        max_new_tokens: int | None = None,
        device: str | None = None,
        options: Mapping[str, Any] | None = None,
        recipe: str | None = None,
        cache_dir: str | None = None,
        decode_threads: int = 8,
    ):
        from .config.launch import default_cache_dir, hub_offline
        from .config.spec import spec_from_recipe
        from .runtime.models import resolve_model
        from .runtime.quiet import quiet_libraries
        from .runtime.worker import DeviceWorker

        asked = {
            "model": model,
            "prompt": prompt,
            "question": list(questions),
            "question_field": question_column,
            "max_new_tokens": max_new_tokens,
            "device": device,
        }
        if questions or question_column:
            asked["task"] = "vqa"
        self.spec = spec_from_recipe(recipe, **asked, **(options or {}))
        quiet_libraries(self.spec.run.verbose)
        cache = Path(self.spec.model.cache_dir or cache_dir or default_cache_dir())
        resolved = resolve_model(self.spec.model, cache, hub_offline())
        self.worker = DeviceWorker(self.spec, resolved)
        self.preparer = SamplePreparer(self.spec, resolved.path, self.worker.processor)
        self.image_column, self.key_column, self.question_column = image_column, key_column, question_column
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="dvl-decode")

    def _prepare(self, batch: Mapping[str, Any], index: int, shard: Shard) -> PreparedSample:
        key = str(batch[self.key_column][index]) if self.key_column else str(index)
        fields = {}
        if self.question_column:
            fields[self.question_column] = _plain(batch[self.question_column][index])
        raw = RawSample(key=key, index=index, fields=fields)
        try:
            raw.images = image_bytes(batch[self.image_column][index])
        except OSError as exc:
            raw.error = f"cannot read image file: {exc}"
        if not raw.images and raw.error is None:
            raw.error = f"no image data in column '{self.image_column}'"
        return self.preparer.prepare(raw, shard)

    def answer_rows(self, batch: Mapping[str, Any]) -> list[AnswerRow]:
        """One AnswerRow per (row, question), ordered by row then question."""
        if self.image_column not in batch:
            raise KeyError(f"no column '{self.image_column}' in the batch; columns: {', '.join(batch)}")
        n_rows = len(batch[self.image_column])
        shard = Shard(id="batch", url="", format="ray-data")
        collector = _RowCollector()
        assembler = ShardAssembler(collector, self.worker.decode, lambda stats: None,  # type: ignore[arg-type]
                                   checkpoint_seconds=float("inf"))

        def work_items():
            for sample in self.pool.map(lambda i: self._prepare(batch, i, shard), range(n_rows)):
                item = assembler.add_sample(sample, shard)
                if item is not None:
                    yield item

        for completion in self.worker.engine.run(work_items()):
            assembler.add_completion(completion)
        assembler.end_shard(ShardEnd(shard, n_rows))
        return collector.rows

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[Any]]:
        rows = self.answer_rows(batch)
        passthrough = [name for name in batch if name != self.image_column]
        out: dict[str, list[Any]] = {name: [_plain(batch[name][r.sample_index]) for r in rows] for name in passthrough}
        for name in ANSWER_COLUMNS:
            out[name] = [getattr(r, name) for r in rows]
        return out


def _plain(value: Any) -> Any:
    """numpy scalars and arrays from a Ray batch as plain Python values."""
    return value.tolist() if hasattr(value, "tolist") else value
