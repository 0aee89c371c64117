"""The reference engine: transformers' `generate` on bucketed, left-padded batches.

It is what users of transformers would write themselves, kept as `--engine generate`
for models or settings the slot engine does not cover (device_map over several GPUs,
exotic checkpoints) and as the baseline every benchmark compares against.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from ..config.spec import BatchSpec, GenerationSpec
from ..preprocess.images import ImageView, normalize_pixels
from .batcher import LengthBucketer, left_pad
from .sampling import sample_top_p
from .types import Completion, EnginePrompt, EngineStats, WorkItem


class ForcedEOS:
    """Logits processor: row b must emit EOS as its generated token number force_at[b].

    The benchmark's stop schedule; the slot engine applies the same rule on device.
    """

    def __init__(self, force_at: torch.Tensor, prompt_width: int, eos_id: int):
        self.force_at = force_at
        self.prompt_width = prompt_width
        self.eos_id = eos_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_width
        rows = (self.force_at.to(scores.device) == generated + 1).nonzero().flatten()
        if rows.numel():
            scores[rows] = float("-inf")
            scores[rows, self.eos_id] = 0.0
        return scores


class SeededSampling:
    """Logits processor: draw the next token with the engine's own generator, leave only it.

    generate then runs greedy over the drawn token, so sampling is reproducible from the
    job's seed without reseeding torch's global RNG (which the caller may rely on).
    """

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator):
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = sample_top_p(scores.float(), self.temperature, self.top_p, self.generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, chosen[:, None], 0.0)


def trim_at_eos(tokens: list[int], eos_ids: list[int]) -> tuple[list[int], str]:
    """Cut a generated row after its first EOS; returns (tokens, finish_reason)."""
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


class GenerateEngine:
    """Runs `model.generate` per batch; each prompt re-encodes its image."""

    def __init__(
        self,
        model,
        views: list[ImageView],
        generation: GenerationSpec,
        batch: BatchSpec,
        eos_token_ids: list[int],
        pad_token_id: int,
        cache_implementation: str | None = None,
    ):
        self.model = model
        self.views = {v.name: v for v in views}
        self.gen = generation
        self.batch_size = batch.batch_size or (64 if _device_of(model).type == "cuda" else 4)
        self.token_budget = batch.token_budget
        self.eos_ids = list(eos_token_ids)
        self.pad_id = pad_token_id
        self.cache_implementation = cache_implementation
        self.stats = EngineStats(slots=self.batch_size)
        self.generator = torch.Generator(device=_device_of(model)).manual_seed(generation.seed)

    def run(self, items: Iterator[WorkItem]) -> Iterator[Completion]:
        bucketer: LengthBucketer[tuple[WorkItem, EnginePrompt]] = LengthBucketer(self.batch_size, self.token_budget)
        for item in items:
            for prompt in item.prompts:
                for ready in bucketer.add(len(prompt.input_ids), (item, prompt)):
                    yield from self._generate(ready)
        for ready in bucketer.flush():
            yield from self._generate(ready)

    def _pixels(self, batch: list[tuple[WorkItem, EnginePrompt]]) -> dict[str, torch.Tensor]:
        device = _device_of(self.model)
        dtype = self.model.dtype
        out = {}
        for name in batch[0][0].pixels:
            stacked = torch.cat([item.pixels[name] for item, _ in batch]).to(device)
            if stacked.dtype == torch.uint8:
                stacked = normalize_pixels(stacked, self.views[name], dtype)
            out[name] = stacked.to(dtype)
        return out

    @torch.inference_mode()
    def _generate(self, batch: list[tuple[WorkItem, EnginePrompt]]) -> list[Completion]:
        started = time.perf_counter()
        try:
            tokens = self._run_generate(batch)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.stats.oom_splits += 1
            if len(batch) == 1:
                item, prompt = batch[0]
                return [Completion(item.uid, prompt.index, [], "error", len(prompt.input_ids), "out of memory on the device")]
            half = len(batch) // 2
            return self._generate(batch[:half]) + self._generate(batch[half:])
        done = []
        for (item, prompt), row in zip(batch, tokens, strict=True):
            kept, reason = trim_at_eos(row, self.eos_ids)
            self.stats.generated_tokens += len(kept)
            done.append(Completion(item.uid, prompt.index, kept, reason, len(prompt.input_ids)))
        self.stats.decode_seconds += time.perf_counter() - started
        self.stats.decode_steps += 1
        return done

    def _run_generate(self, batch: list[tuple[WorkItem, EnginePrompt]]) -> list[list[int]]:
        ids, mask = left_pad([p.input_ids for _, p in batch], self.pad_id)
        device = _device_of(self.model)
        kwargs = dict(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=self.gen.max_new_tokens,
            do_sample=False,  # sampling, when asked for, is SeededSampling's
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )
        processors: list = []
        if any(p.force_eos_after for _, p in batch):
            force = torch.tensor([p.force_eos_after or 1 << 30 for _, p in batch])
            processors.append(ForcedEOS(force, ids.shape[1], self.eos_ids[0]))
        if self.gen.temperature > 0:
            processors.append(SeededSampling(self.gen.temperature, self.gen.top_p, self.generator))
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
        out = self.model.generate(**kwargs, **self._pixels(batch))
        return out[:, ids.shape[1] :].tolist()


def _device_of(model) -> torch.device:
    return next(model.parameters()).device
