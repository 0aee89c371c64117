"""A device worker: one loaded model on one device, processing whatever shards it is fed.

The same class serves the local runner, each process of the multi-GPU runner and
each Ray actor: runners differ only in how they create feeds and collect stats.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch

from ..config.spec import JobSpec
from ..engine.model import (
    ResolvedModel,
    VisionLanguageModel,
    check_kv_dtype,
    kv_cache_dtype,
    load_model,
    pick_device,
    pick_dtype,
)
from ..engine.quantize import check_engine_quantize
from ..errors import UsageError
from ..preprocess.images import views_from_image_processor
from ..preprocess.preparer import load_processor
from ..sink.output import OutputDir
from ..sink.parts import ParquetSink
from .feed import ShardFeed
from .pipeline import process_shards
from .quiet import quiet_libraries
from .stats import RunStats, StopFlag


def quiet_transformers() -> None:
    """No weight-loading bars interleaved with ours, no warnings repeated per engine in a job log."""
    quiet_libraries()


def eos_ids(processor, model) -> list[int]:
    """EOS ids from the tokenizer and the generation config, tokenizer's first."""
    ids = [processor.tokenizer.eos_token_id]
    configured = getattr(model.generation_config, "eos_token_id", None)
    for value in configured if isinstance(configured, (list, tuple)) else [configured]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return [i for i in ids if i is not None]


def engine_kind(spec: JobSpec) -> str:
    """`continuous` (the slot engine) or `generate`: auto picks generate only for --device-map."""
    if spec.batch.engine == "auto":
        return "generate" if spec.model.device_map else "continuous"
    return spec.batch.engine


def build_engine(spec: JobSpec, model, processor, device: torch.device):
    """The slot engine unless the job needs transformers' generate."""
    views = views_from_image_processor(processor.image_processor)
    eos = eos_ids(processor, model)
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos[0]
    engine = engine_kind(spec)
    if engine == "continuous":
        if spec.model.device_map:
            raise UsageError("--device-map needs --engine generate (the slot engine runs on one device)")
        from ..engine.continuous import SlotEngine

        check_kv_dtype(spec.model.kv_dtype, device)  # Ray actors skip the local preflight

        return SlotEngine(
            VisionLanguageModel(model), views, spec.generation, spec.batch, eos, pad,
            kv_dtype=kv_cache_dtype(spec.model.kv_dtype),
        )
    from ..engine.generate import GenerateEngine

    return GenerateEngine(model, views, spec.generation, spec.batch, eos, pad)


def prepare_cuda_process(device: torch.device) -> None:
    """Settings for a process that drives one GPU, applied before the model is loaded.

    Expandable segments let the KV slots fill memory without fragmenting what prefill
    needs; a few CPU threads are enough for the host work here, and more only spin
    against the decoder processes.
    """
    if device.index is not None:
        torch.cuda.set_device(device)
    with contextlib.suppress(AttributeError, RuntimeError):
        _allocator_setter()("expandable_segments:True")
    torch.set_num_threads(min(4, torch.get_num_threads()))


def _allocator_setter():
    """torch's run-time allocator setting (CUDA is initialised by now, so PYTORCH_CUDA_ALLOC_CONF
    would be read too late): the accelerator-wide setter where this torch has it, else the
    older CUDA one that newer versions deprecate in its favour."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    return setter if setter is not None else torch.cuda.memory._set_allocator_settings


class DeviceWorker:
    """Loads the model once; `process` runs shards from a feed into parts."""

    def __init__(self, spec: JobSpec, model: ResolvedModel, device: str | None = None):
        quiet_libraries(spec.run.verbose)  # engine processes and Ray actors start afresh
        self.spec = spec
        self.resolved = model
        self.device = pick_device(device or spec.model.device)
        if self.device.type == "cuda":
            if self.device.index is None:  # "cuda"/"auto": name the current GPU
                self.device = torch.device("cuda", torch.cuda.current_device())
            prepare_cuda_process(self.device)
        self.dtype = pick_dtype(spec.model.dtype, self.device)
        check_engine_quantize(spec.model.quantize, engine_kind(spec), self.device)  # before minutes of loading
        started = time.perf_counter()
        self.processor = load_processor(model.path, spec.model.revision, model.label)
        self.model = load_model(model, spec.model, self.device, self.dtype)
        self._finish_setup()
        self.engine.stats.load_seconds = time.perf_counter() - started

    @classmethod
    def from_loaded(cls, spec: JobSpec, resolved: ResolvedModel, model, processor) -> DeviceWorker:
        """Wrap an already loaded model (the benchmark builds random-weight models itself)."""
        worker = cls.__new__(cls)
        worker.spec, worker.resolved, worker.model, worker.processor = spec, resolved, model, processor
        worker.device = next(model.parameters()).device
        worker.dtype = next(model.parameters()).dtype
        worker._finish_setup()
        return worker

    def _finish_setup(self) -> None:
        self.engine = build_engine(self.spec, self.model, self.processor, self.device)
        tokenizer = self.processor.tokenizer
        self.decode: Callable[[list[int]], str] = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()

    def process(
        self,
        feed: ShardFeed,
        out: OutputDir,
        metadata: dict[str, Any],
        on_progress: Callable[[RunStats], None] = lambda stats: None,
        stop: StopFlag | None = None,
    ) -> RunStats:
        sink = ParquetSink(out, metadata)
        return process_shards(
            self.spec, self.resolved.path, self.engine, sink, feed, self.decode, on_progress=on_progress, stop=stop,
            processor=self.processor,
        )
