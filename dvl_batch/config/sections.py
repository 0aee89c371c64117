"""The job's settings, section by section: what a recipe, the CLI and the Python API set.

Every stage receives the `JobSpec` (config/spec.py) or the section it needs as an
argument; nothing deeper reads globals or environment variables, except the launch
defaults (config/launch.py) that the run applies once, up front.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TASKS = ("caption", "vqa")
ENGINES = ("auto", "continuous", "generate")
DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANTIZE = ("none", "int4wo", "int8wo", "int8dq", "fp8")
# A format whose arithmetic changed gets a new name in the job identity, so an output folder
# started with the old one is not resumed with the new (fp8 was torchao's layers everywhere).
QUANTIZE_IDENTITY = {"fp8": "fp8/e4m3-prefill-bf16-decode"}
KV_DTYPES = ("auto", "fp8")  # auto: the model's dtype; fp8: float8_e4m3 keys/values (slot engine, CUDA)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
TURN_ROLES = ("user", "assistant")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's placement strategies
RUNNERS = ("local", "ray")
# run.gpus: "all", or a comma list of GPU indices ("0,1"), "cuda:N" or "cpu" (one engine per entry)
GPUS_PATTERN = re.compile(r"all|(cpu|\d+|cuda:\d+)(,(cpu|\d+|cuda:\d+))*")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # model.device: what this tool can run on
DEFAULT_CAPTION_PROMPT = "Describe this image."


@dataclass(frozen=True)
class ModelSpec:
    """Which checkpoint, on which device, in which precision."""

    name: str = "auto"  # hub id, local dir, "tiny", "tiny-hybrid", or "auto" (real if reachable, else tiny)
    revision: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"  # auto: cuda if available, else cpu
    attn_implementation: str = "sdpa"
    quantize: str = "none"
    kv_dtype: str = "auto"  # the slot engine's key/value cache: auto (model dtype) or fp8
    device_map: str | None = None  # "auto" spreads a too-large model over GPUs (generate engine)
    cache_dir: str | None = None  # where offline tiny models are built and kept


@dataclass(frozen=True)
class PromptSpec:
    """What to ask about each image."""

    task: str = "caption"
    prompt: str = DEFAULT_CAPTION_PROMPT
    questions: tuple[str, ...] = ()
    questions_file: str | None = None  # JSONL/CSV keyed by image key
    question_field: str | None = None  # a text field/column of the input holding the question
    system_prompt: str | None = None  # None: the checkpoint's own system prompt
    turns: tuple[tuple[str, str], ...] = ()  # (role, text) turns before the question: few-shot, earlier chat
    max_prompt_tokens: int | None = None  # cut question text (never image tokens) to fit; None: no limit


@dataclass(frozen=True)
class GenerationSpec:
    """Decoding parameters; temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class DataSpec:
    """Where samples come from and how they are decoded."""

    inputs: tuple[str, ...] = ()
    image_field: str | None = None  # auto-detected when None
    key_field: str | None = None  # parquet column holding the sample key
    workers: int | None = None  # preprocessing processes; None: from the CPU count
    prefetch: int = 32  # samples buffered per worker
    fast_decode: bool = True  # JPEG draft decoding + normalisation on the device
    max_image_pixels: int = 89_478_485  # larger images become error rows (decompression bombs)
    max_file_bytes: int = 64 * 2**20  # larger members/files/values become error rows, never read whole
    limit: int | None = None  # stop after this many samples (smoke tests)
    read_retries: int = 3  # retries (with backoff) of a shard read that fails for a transient reason
    shard_size: int = 1000  # images per shard for plain folders


@dataclass(frozen=True)
class BatchSpec:
    """How requests are grouped on the device."""

    engine: str = "auto"  # continuous (slot scheduler) or generate (transformers' generate)
    batch_size: int | None = None  # concurrent sequences; None: fit to device memory
    token_budget: int | None = None  # cap on prompt tokens per prefill batch
    prefill_batch: int | None = None  # images per prefill step; None: automatic
    cuda_graphs: bool = True
    # torch.compile the slot engine's passes (CUDA only); "auto": unless the job's unfinished
    # inputs are small (config.launch.resolve_compile), where compiling costs more than it saves
    compile: bool | str = "auto"
    compile_decode: bool = True  # ... the decode step's forward too (faster steps, ~10-25 s more start)
    triton_attention: bool = True  # Triton decode attention reading only valid keys (CUDA only)
    overlap_prefill: bool = True  # new images' prefill on a second CUDA stream, beside decode (engine/overlap.py)
    fuse_projections: bool = True  # one product for Q/K/V and one for gate/up in the slot engine (engine/fused_layers.py)
    vision_epilogue: bool = True  # SigLIP fc1's bias and GELU in the matmul's epilogue (engine/vision_layers.py)
    phase_timing: bool = False  # synchronise to time vision/prefill phases (diagnosis; slower)

    @property
    def compiles(self) -> bool:
        """Whether the engine compiles: an unresolved "auto" (an engine built without a job,
        e.g. in Ray Data) compiles, since it serves a stream of unknown length."""
        return self.compile is True or self.compile == "auto"

    @property
    def compiles_decode(self) -> bool:
        """--no-compile turns every compilation off, the decode step's included."""
        return self.compiles and self.compile_decode


@dataclass(frozen=True)
class OutputSpec:
    """Where results go and how a rerun treats existing results."""

    path: str = ""
    overwrite: bool = False
    strict: bool = False  # exit code 4 when any row has an error
    checkpoint_seconds: float = 60.0  # answered rows of unfinished shards are saved at least this often


@dataclass(frozen=True)
class RunSpec:
    """How shards are scheduled; never changes what a row contains."""

    runner: str = "local"
    gpus: str | None = None  # None: one device (model.device); "all" or "0,1,3"
    rank: int | None = None  # None: from the launcher's environment (RANK, SLURM), else 0
    world_size: int | None = None  # None: from the environment (WORLD_SIZE, SLURM), else 1
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray instance
    progress: bool = True
    verbose: bool = False  # keep libraries' warnings and progress bars in the log
    watchdog_seconds: float = 1800.0  # end a run whose device and decoders make no progress this long (0: never)




SECTION_TYPES = {
    "model": ModelSpec,
    "prompt": PromptSpec,
    "generation": GenerationSpec,
    "data": DataSpec,
    "batch": BatchSpec,
    "output": OutputSpec,
    "run": RunSpec,
}
