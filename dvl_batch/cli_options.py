"""The CLI's options: each one's flag, help text and panel, declared once.

Every option a job command takes maps, by its name, to a JobSpec field through
`config.spec.option_path` (the mapping the Python API uses too); unset options (None)
keep the recipe's or the default value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .config.sections import DEFAULT_CAPTION_PROMPT, GenerationSpec
from .errors import EXIT_ERROR_ROWS


def _default(value: object) -> str:
    """The '[default: X]' Typer shows for options whose own default is None ('unset: keep the recipe's')."""
    return f"\\[default: {value}]"  # escaped: rich markup would swallow a bare [default: ...]


Inputs = Annotated[list[str], typer.Argument(metavar="INPUT...", help="Webdataset .tar/.tgz shards, parquet files, image folders, or brace patterns like 'shards/{000..099}.tar'.", show_default=False)]
Output = Annotated[str | None, typer.Option("--output", "-o", help="Output folder: parts/*.parquet, job.json, progress.json.", show_default=False)]
Model = Annotated[str | None, typer.Option("--model", "-m", help="Hub id or local folder; 'tiny' for the offline test model. Default: deepseek-community/deepseek-vl-1.3b-chat, or the tiny model when it is unreachable.", rich_help_panel="Model")]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit).", rich_help_panel="Model")]
Device = Annotated[str | None, typer.Option(help="auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps.", rich_help_panel="Model")]
Dtype = Annotated[str | None, typer.Option(help="auto, bfloat16, float16 or float32 (auto: bfloat16 on GPU, float32 on CPU).", rich_help_panel="Model")]
Attn = Annotated[str | None, typer.Option("--attn-implementation", help="Attention for the vision tower and generate engine: sdpa, eager, flash_attention_2.", rich_help_panel="Model")]
Quantize = Annotated[str | None, typer.Option(help="none; fp8 (this package's float8 layers, no torchao: CUDA compute capability >= 8.9 "
                                                  "and --dtype bfloat16); or torchao's int8wo, int8dq, int4wo (pip install 'dvl-batch\\[quant]'; on a GPU "
                                                  "with --engine generate only; int4wo on CUDA only).", rich_help_panel="Model")]
KvDtype = Annotated[str | None, typer.Option(help="Key/value cache of the slot engine: auto (the model's dtype) or fp8 (half the memory and decode reads; answers can differ from bf16, check quality on your data). CUDA only.", rich_help_panel="Model")]
DeviceMap = Annotated[str | None, typer.Option(help="'auto' spreads a too-large model over GPUs (uses the generate engine).", rich_help_panel="Model")]
Prompt = Annotated[str | None, typer.Option("--prompt", "-p", help=f"Caption instruction. {_default(DEFAULT_CAPTION_PROMPT)}", rich_help_panel="Prompt")]
Question = Annotated[list[str] | None, typer.Option("--question", "-q", help="A question asked about every image (repeatable).", rich_help_panel="Prompt")]
QuestionsFile = Annotated[str | None, typer.Option(help="JSONL ({key, question|questions}) or CSV (key,question) with per-image questions.", rich_help_panel="Prompt")]
QuestionField = Annotated[str | None, typer.Option(help="Input field/column holding each sample's question (e.g. 'question', 'txt', 'json.question').", rich_help_panel="Prompt")]
SystemPrompt = Annotated[str | None, typer.Option(help="Replace the checkpoint's system prompt.", rich_help_panel="Prompt")]
MaxNew = Annotated[int | None, typer.Option(help=f"Longest answer in tokens. {_default(GenerationSpec.max_new_tokens)}", rich_help_panel="Generation")]
Temperature = Annotated[float | None, typer.Option(help="0 for greedy decoding (default); > 0 samples.", rich_help_panel="Generation")]
TopP = Annotated[float | None, typer.Option(help=f"Nucleus sampling threshold. {_default(GenerationSpec.top_p)}", rich_help_panel="Generation")]
Seed = Annotated[int | None, typer.Option(help=f"Sampling seed. {_default(GenerationSpec.seed)}", rich_help_panel="Generation")]
ImageField = Annotated[str | None, typer.Option(help="Image field/column (auto-detected); comma-separated for multi-image samples.", rich_help_panel="Data")]
KeyField = Annotated[str | None, typer.Option(help="Parquet column with sample keys (default: key/__key__/id, else row number).", rich_help_panel="Data")]
Workers = Annotated[int | None, typer.Option("--workers", "-j", help="Decoder processes (default: CPU count - 1; 0 decodes in-process).", rich_help_panel="Data")]
Prefetch = Annotated[int | None, typer.Option(help="Samples buffered per decoder process.", rich_help_panel="Data")]
FastDecode = Annotated[bool | None, typer.Option("--fast-decode/--exact-decode", help="Fast: JPEG draft decoding + normalisation on device. Exact: the checkpoint's image processor on full decodes.", rich_help_panel="Data")]
MaxPixels = Annotated[int | None, typer.Option(help="Images with more pixels become error rows (decompression-bomb guard).", rich_help_panel="Data")]
MaxFileBytes = Annotated[int | None, typer.Option(help="Members, files and parquet values larger than this many bytes become error rows, unread (default 64 MiB).", rich_help_panel="Data")]
Limit = Annotated[int | None, typer.Option(help="Stop after this many samples (smoke tests; counted per engine process with --gpus/--runner ray).", rich_help_panel="Data")]
ShardSize = Annotated[int | None, typer.Option(help="Images per shard for plain folders.", rich_help_panel="Data")]
Engine = Annotated[str | None, typer.Option(help="auto (continuous, or generate with --device-map), continuous (the slot scheduler) or generate (transformers' generate).", rich_help_panel="Batching")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", "-b", help="Concurrent sequences (default: fit to GPU memory; 8 on CPU).", rich_help_panel="Batching")]
TokenBudget = Annotated[int | None, typer.Option(help="Most prompt tokens per generate batch.", rich_help_panel="Batching")]
PrefillBatch = Annotated[int | None, typer.Option(help="Images encoded and prefilled per step.", rich_help_panel="Batching")]
CudaGraphs = Annotated[bool | None, typer.Option("--cuda-graphs/--no-cuda-graphs", help="Capture the decode step as a CUDA graph.", rich_help_panel="Batching")]
Compile = Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the slot engine's passes on CUDA: ~2 ms less device time per image for 20-65 s of start. Default: only when the job has 2 GB or more of input left per engine (so a cron run over a few shards starts without compiling).", rich_help_panel="Batching")]
CompileDecode = Annotated[bool | None, typer.Option("--compile-decode/--no-compile-decode", help="When compiling, compile the decode step's forward (and VQA's question prefill) too: ~10% faster decode steps on the H200, ~10 s more start warm and ~25 s cold.", rich_help_panel="Batching")]
OverlapPrefill = Annotated[bool | None, typer.Option("--overlap-prefill/--no-overlap-prefill", help="Run new images' vision tower and prefill on a second CUDA stream while the decode steps continue (bandwidth-bound decode beside compute-bound prefill). Default: on.", rich_help_panel="Batching")]
Overwrite = Annotated[bool | None, typer.Option("--overwrite", help="Discard results in OUT from a run with different settings.", rich_help_panel="Output")]
Strict = Annotated[bool | None, typer.Option("--strict", help=f"Exit with code {EXIT_ERROR_ROWS} if any row has an error.", rich_help_panel="Output")]
Runner = Annotated[str | None, typer.Option(help="local (default) or ray.", rich_help_panel="Scale-out")]
Gpus = Annotated[str | None, typer.Option(help="'all' or '0,1,...': one engine process per GPU ('cpu,cpu': CPU engine processes). With --runner ray the same: one actor per entry ('0,1': two GPU actors, placed by Ray), 'all': every GPU of the cluster.", rich_help_panel="Scale-out")]
Rank = Annotated[int | None, typer.Option(help="This worker's index for static partitioning (default: RANK, or SLURM_PROCID / the SLURM array index).", rich_help_panel="Scale-out")]
WorldSize = Annotated[int | None, typer.Option(help="Number of independent workers (default: WORLD_SIZE, or SLURM_NTASKS / the SLURM array size).", rich_help_panel="Scale-out")]
RayAddress = Annotated[str | None, typer.Option(help="Ray cluster address for --runner ray (default: RAY_ADDRESS, else a local Ray instance).", rich_help_panel="Scale-out")]
Verbose = Annotated[bool | None, typer.Option("--verbose", help="Keep the libraries' warnings and progress bars in the log (hushed by default).", rich_help_panel="Output")]
Progress = Annotated[bool | None, typer.Option("--progress/--no-progress", help="Progress bar (terminal) or log lines (no terminal).", rich_help_panel="Output")]
CheckpointSeconds = Annotated[float | None, typer.Option(help="Save answered rows of shards still in progress at least this often (seconds; default 60), so a kill loses at most that much work.", rich_help_panel="Output")]
ReadRetries = Annotated[int | None, typer.Option(help="Retries, with backoff, of a shard read that fails for a transient reason (network, a failing pipe: command, I/O error); default 3.", rich_help_panel="Data")]
WatchdogSeconds = Annotated[float | None, typer.Option(help="End a run whose device and decoders make no progress for this long (seconds; default 1800; 0: never).", rich_help_panel="Output")]
Recipe = Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe: a bundled name (see `dvl-batch recipes`) or a YAML file; options given here override it.", show_default=False)]
MaxPromptTokens = Annotated[int | None, typer.Option(help="Longest prompt in tokens: question text is cut to fit, image tokens never (a sample whose images alone exceed it becomes an error row).", rich_help_panel="Prompt")]
Task = Annotated[str | None, typer.Option(help="caption or vqa (default: the recipe's).", rich_help_panel="Prompt")]
BenchKvDtypes = Annotated[list[str] | None, typer.Option("--kv-dtype", help="KV cache of the slot-engine runs: auto (bf16) and/or fp8; repeat to run both side by side.")]
BenchQuantize = Annotated[list[str] | None, typer.Option("--quantize", help="Weights of the slot-engine runs: none (bf16) and/or fp8 (CUDA), or on a CPU torchao's int8wo/int8dq; repeat to run several (times each --kv-dtype).")]
BenchPaired = Annotated[bool, typer.Option("--paired", help="With as many --quantize as --kv-dtype values: run the first weights with the first KV type and so on, not every combination.")]
HostProfile = Annotated[str | None, typer.Option(help="Write a cProfile of dvl-batch's host side to this file.")]
DeviceProfile = Annotated[str | None, typer.Option(help="Trace the measured dvl-batch runs (GPU) and write their kernels by kind, top kernels and idle gaps between kernels to this file (the traced runs' rates include the tracing).")]
InputOption = Annotated[list[str] | None, typer.Option("--input", "-i", help="Shards, parquet files, image folders or brace patterns (repeatable; default: the recipe's data.inputs).", show_default=False)]


# Options every job command (caption, vqa, run) takes after its own, in help order.
JOB_OPTIONS: dict[str, Any] = {
    "max_new_tokens": MaxNew, "temperature": Temperature, "top_p": TopP, "seed": Seed,
    "batch_size": BatchSize, "engine": Engine, "token_budget": TokenBudget, "prefill_batch": PrefillBatch,
    "cuda_graphs": CudaGraphs, "compile": Compile, "compile_decode": CompileDecode, "overlap_prefill": OverlapPrefill,
    "workers": Workers, "prefetch": Prefetch, "fast_decode": FastDecode, "image_field": ImageField,
    "key_field": KeyField, "max_image_pixels": MaxPixels, "max_file_bytes": MaxFileBytes, "limit": Limit, "shard_size": ShardSize,
    "device": Device, "dtype": Dtype, "attn_implementation": Attn, "quantize": Quantize, "kv_dtype": KvDtype, "device_map": DeviceMap,
    "revision": Revision, "overwrite": Overwrite, "strict": Strict, "progress": Progress, "verbose": Verbose,
    "checkpoint_seconds": CheckpointSeconds, "read_retries": ReadRetries, "watchdog_seconds": WatchdogSeconds,
    "gpus": Gpus, "rank": Rank, "world_size": WorldSize, "runner": Runner, "ray_address": RayAddress,
}
