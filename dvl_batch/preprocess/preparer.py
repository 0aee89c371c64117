"""The sample preparer: one RawSample to one PreparedSample (pixels and tokenized prompts).

The processor (tokenizer, image processor, chat template) is loaded once per process
role by `load_processor`, with the job's revision, and handed to every preparer of
that process; decoder processes inherit it when they fork.
"""

from __future__ import annotations

import time

import numpy as np

from ..config.spec import JobSpec
from ..errors import UsageError
from ..records import PreparedSample, PromptRequest, RawSample, Shard
from .images import ImageError, ImageView, decode_image_drafted, render_views, views_from_image_processor
from .prompts import PromptRenderer, QuestionBook


def load_processor(path: str, revision: str | None = None, label: str | None = None):
    """The checkpoint's processor at `revision`; a missing one is a one-line UsageError."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, revision=revision)
    except OSError as exc:
        raise UsageError(f"cannot load the processor of {label or path}: {str(exc).splitlines()[0]}") from exc


class SamplePreparer:
    """Everything a worker needs to turn a RawSample into a PreparedSample."""

    def __init__(self, spec: JobSpec, model_path: str, processor=None):
        """`processor`: the one this process loaded already; None loads it (with spec.model.revision)."""
        processor = processor if processor is not None else load_processor(model_path, spec.model.revision)
        self.spec = spec
        self.processor = processor
        self.views: list[ImageView] = views_from_image_processor(processor.image_processor)
        self.renderer = PromptRenderer.from_spec(processor, spec.prompt)
        self.questions = QuestionBook(spec.prompt)
        roots = [v.size for v in self.views if v.source is None]
        self.draft_side = max(roots) if spec.data.fast_decode else None

    def prepare(self, raw: RawSample, shard: Shard) -> PreparedSample:
        started = time.perf_counter()
        sample = PreparedSample(shard_id=shard.id, key=raw.key, index=raw.index, error=raw.error,
                                n_images=max(1, len(raw.images)))
        questions = self.questions.questions_for(raw.source_key or raw.key, raw.fields)
        if not questions:
            sample.error = sample.error or "no question for this sample"
            questions = [""]
        sample.requests = [PromptRequest(question=q) for q in questions]
        if sample.error is None:
            try:
                sample.pixels = self._pixels(raw.images)
            except ImageError as exc:
                sample.error = str(exc)
            except Exception as exc:  # noqa: BLE001 - one odd image must not end a million-image job
                sample.error = f"image preprocessing failed ({type(exc).__name__}: {exc})"
        if sample.error is None:
            n_images = len(raw.images)
            for request in sample.requests:
                self._tokenize(request, n_images)
        sample.decode_seconds = time.perf_counter() - started
        return sample

    def _tokenize(self, request: PromptRequest, n_images: int) -> None:
        try:
            prompt = self.renderer.tokenize(request.question, n_images)
        except ValueError as exc:
            request.error = str(exc)
            return
        request.input_ids, request.prefix_len = prompt.input_ids, prompt.prefix_len

    def _pixels(self, images: list[bytes]) -> dict[str, np.ndarray]:
        per_view: dict[str, list[np.ndarray]] = {v.name: [] for v in self.views}
        for data in images:
            image, drafted = decode_image_drafted(data, self.spec.data.max_image_pixels, self.draft_side)
            if self.spec.data.fast_decode:
                rendered = render_views(image, self.views, approximate=drafted)
            else:
                rendered = {k: np.asarray(v[0]) for k, v in self.processor.image_processor(image).items()}
            for name, array in rendered.items():
                per_view[name].append(array)
        return {name: np.stack(arrays) for name, arrays in per_view.items()}
