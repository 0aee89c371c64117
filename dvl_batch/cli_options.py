"""The CLI's options: each one's flag, help text and panel, declared once.

Every option a job command takes maps, by its name, to a JobSpec field through
`config.spec.option_path` (the mapping the Python API uses too); unset options (None)
keep the recipe's or the default value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .config.launch import MAX_DECODERS_PER_ENGINE
from .config.sections import DEFAULT_CAPTION_PROMPT, BatchSpec, DataSpec, GenerationSpec, ModelSpec, OutputSpec, RunSpec
from .errors import EXIT_ERROR_ROWS


def _default(value: object) -> str:
    """The '[default: X]' Typer shows for options whose own default is None ('unset: keep the recipe's').

    Job options default to None so that a recipe's value is kept when they are not given;
    Typer then shows no default, so each help text states the one the job gets, read
    from the spec's dataclasses where it is a plain value (it cannot drift from them).
    """
    return f"\\[default: {value}]"  # escaped: rich markup would swallow a bare [default: ...]


def _switch(on: str, off: str, value: bool) -> str:
    """The default of an --on/--off pair, named as Typer names it for a pair of its own."""
    return _default(on if value else off)


Inputs = Annotated[list[str], typer.Argument(metavar="INPUT...", help="Webdataset .tar/.tgz shards, parquet files, image folders, or brace patterns like 'shards/{000..099}.tar'.", show_default=False)]
Output = Annotated[str | None, typer.Option("--output", "-o", help="Output folder: parts/*.parquet, job.json, progress.json.", show_default=False)]
Model = Annotated[str | None, typer.Option("--model", "-m", help=f"Hub id or local folder; 'tiny' for the offline test model. {_default('auto: deepseek-community/deepseek-vl-1.3b-chat, or the tiny model when it is unreachable')}", rich_help_panel="Model")]
Revision = Annotated[str | None, typer.Option(help="Hub revision (branch, tag or commit). " + _default("the hub's main branch"), rich_help_panel="Model")]
Device = Annotated[str | None, typer.Option(help=f"auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps. {_default(ModelSpec.device)}", rich_help_panel="Model")]
Dtype = Annotated[str | None, typer.Option(help=f"auto, bfloat16, float16 or float32 (auto: bfloat16 on GPU, float32 on CPU). {_default(ModelSpec.dtype)}", rich_help_panel="Model")]
Attn = Annotated[str | None, typer.Option("--attn-implementation", help=f"Attention for the vision tower and generate engine: sdpa, eager, flash_attention_2. {_default(ModelSpec.attn_implementation)}", rich_help_panel="Model")]
Quantize = Annotated[str | None, typer.Option(help=f"none; fp8 (this package's float8 layers, no torchao: CUDA compute capability >= 8.9 "
                                                  "and --dtype bfloat16); or torchao's int8wo, int8dq, int4wo (pip install 'dvl-batch\\[quant]'; on a GPU "
                                                  f"with --engine generate only; int4wo on CUDA only). {_default(ModelSpec.quantize)}", rich_help_panel="Model")]
KvDtype = Annotated[str | None, typer.Option(help=f"Key/value cache of the slot engine: auto (the model's dtype) or fp8 (half the memory and decode reads; answers can differ from bf16, check quality on your data). CUDA only. {_default(ModelSpec.kv_dtype)}", rich_help_panel="Model")]
DeviceMap = Annotated[str | None, typer.Option(help=f"'auto' spreads a too-large model over GPUs (uses the generate engine). {_default('off: one device')}", rich_help_panel="Model")]
Prompt = Annotated[str | None, typer.Option("--prompt", "-p", help=f"Caption instruction. {_default(DEFAULT_CAPTION_PROMPT)}", rich_help_panel="Prompt")]
Question = Annotated[list[str] | None, typer.Option("--question", "-q", help="A question asked about every image (repeatable).", rich_help_panel="Prompt")]
QuestionsFile = Annotated[str | None, typer.Option(help="JSONL ({key, question|questions}) or CSV (key,question) with per-image questions.", rich_help_panel="Prompt")]
QuestionField = Annotated[str | None, typer.Option(help="Input field/column holding each sample's question (e.g. 'question', 'txt', 'json.question').", rich_help_panel="Prompt")]
SystemPrompt = Annotated[str | None, typer.Option(help="Replace the checkpoint's system prompt ('' for none). " + _default("the checkpoint's"), rich_help_panel="Prompt")]
MaxNew = Annotated[int | None, typer.Option(help=f"Longest answer in tokens. {_default(GenerationSpec.max_new_tokens)}", rich_help_panel="Generation")]
Temperature = Annotated[float | None, typer.Option(help=f"0 for greedy decoding; > 0 samples. {_default(GenerationSpec.temperature)}", rich_help_panel="Generation")]
TopP = Annotated[float | None, typer.Option(help=f"Nucleus sampling threshold. {_default(GenerationSpec.top_p)}", rich_help_panel="Generation")]
Seed = Annotated[int | None, typer.Option(help=f"Sampling seed. {_default(GenerationSpec.seed)}", rich_help_panel="Generation")]
ImageField = Annotated[str | None, typer.Option(help=f"Image field/column; comma-separated for multi-image samples. {_default('auto-detected')}", rich_help_panel="Data")]
KeyField = Annotated[str | None, typer.Option(help=f"Parquet column with sample keys. {_default('key/__key__/id, else the row number')}", rich_help_panel="Data")]
Workers = Annotated[int | None, typer.Option("--workers", "-j", help=f"Decoder processes (0 decodes in-process). {_default(f'usable CPUs - 1, at most {MAX_DECODERS_PER_ENGINE}')}", rich_help_panel="Data")]
Prefetch = Annotated[int | None, typer.Option(help=f"Samples buffered per decoder process. {_default(DataSpec.prefetch)}", rich_help_panel="Data")]
FastDecode = Annotated[bool | None, typer.Option("--fast-decode/--exact-decode", help=f"Fast: JPEG draft decoding + normalisation on device. Exact: the checkpoint's image processor on full decodes. {_switch('fast-decode', 'exact-decode', DataSpec.fast_decode)}", rich_help_panel="Data")]
MaxPixels = Annotated[int | None, typer.Option(help=f"Images with more pixels become error rows (decompression-bomb guard). {_default(DataSpec.max_image_pixels)}", rich_help_panel="Data")]
MaxFileBytes = Annotated[int | None, typer.Option(help=f"Members, files and parquet values larger than this many bytes become error rows, unread. {_default(f'{DataSpec.max_file_bytes} ({DataSpec.max_file_bytes >> 20} MiB)')}", rich_help_panel="Data")]
Limit = Annotated[int | None, typer.Option(help=f"Stop after this many samples (smoke tests; counted per engine process with --gpus/--runner ray). {_default('no limit')}", rich_help_panel="Data")]
ShardSize = Annotated[int | None, typer.Option(help=f"Images per shard for plain folders. {_default(DataSpec.shard_size)}", rich_help_panel="Data")]
Engine = Annotated[str | None, typer.Option(help=f"auto (continuous, or generate with --device-map), continuous (the slot scheduler) or generate (transformers' generate). {_default(BatchSpec.engine)}", rich_help_panel="Batching")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", "-b", help=f"Concurrent sequences. {_default('fit to GPU memory; 8 on CPU')}", rich_help_panel="Batching")]
TokenBudget = Annotated[int | None, typer.Option(help=f"Most prompt tokens per generate batch. {_default('no limit')}", rich_help_panel="Batching")]
PrefillBatch = Annotated[int | None, typer.Option(help=f"Images encoded and prefilled per step. {_default('32 on CUDA, 4 on CPU')}", rich_help_panel="Batching")]
CudaGraphs = Annotated[bool | None, typer.Option("--cuda-graphs/--no-cuda-graphs", help=f"Capture the decode step as a CUDA graph. {_switch('cuda-graphs', 'no-cuda-graphs', BatchSpec.cuda_graphs)}", rich_help_panel="Batching")]
Compile = Annotated[bool | None, typer.Option("--compile/--no-compile", help=f"torch.compile the slot engine's passes on CUDA: ~2 ms less device time per image for 20-65 s of start. {_default(f'{BatchSpec.compile}: compile only when the job has 2 GB or more of input left per engine, so a cron run over a few shards starts without compiling')}", rich_help_panel="Batching")]
CompileDecode = Annotated[bool | None, typer.Option("--compile-decode/--no-compile-decode", help=f"When compiling, compile the decode step's forward (and VQA's question prefill) too: ~10% faster decode steps on the H200, ~10 s more start warm and ~25 s cold. {_switch('compile-decode', 'no-compile-decode', BatchSpec.compile_decode)}", rich_help_panel="Batching")]
OverlapPrefill = Annotated[bool | None, typer.Option("--overlap-prefill/--no-overlap-prefill", help=f"Run new images' vision tower and prefill on a second CUDA stream while the decode steps continue (bandwidth-bound decode beside compute-bound prefill). {_switch('overlap-prefill', 'no-overlap-prefill', BatchSpec.overlap_prefill)}", rich_help_panel="Batching")]
Overwrite = Annotated[bool | None, typer.Option("--overwrite", help="Discard results in OUT from a run with different settings.", rich_help_panel="Output")]
Strict = Annotated[bool | None, typer.Option("--strict", help=f"Exit with code {EXIT_ERROR_ROWS} if any row has an error.", rich_help_panel="Output")]
Runner = Annotated[str | None, typer.Option(help=f"local or ray. {_default(RunSpec.runner)}", rich_help_panel="Scale-out")]
Gpus = Annotated[str | None, typer.Option(help=f"'all' or '0,1,...': one engine process per GPU ('cpu,cpu': CPU engine processes). With --runner ray the same: one actor per entry ('0,1': two GPU actors, placed by Ray), 'all': every GPU of the cluster. {_default('one engine, on --device')}", rich_help_panel="Scale-out")]
Rank = Annotated[int | None, typer.Option(help=f"This worker's index for static partitioning. {_default('RANK, or SLURM_PROCID / the SLURM array index, else 0')}", rich_help_panel="Scale-out")]
WorldSize = Annotated[int | None, typer.Option(help=f"Number of independent workers. {_default('WORLD_SIZE, or SLURM_NTASKS / the SLURM array size, else 1')}", rich_help_panel="Scale-out")]
RayAddress = Annotated[str | None, typer.Option(help=f"Ray cluster address for --runner ray. {_default('RAY_ADDRESS, else a local Ray instance')}", rich_help_panel="Scale-out")]
Verbose = Annotated[bool | None, typer.Option("--verbose", help="Keep the libraries' warnings and progress bars in the log (hushed by default).", rich_help_panel="Output")]
Progress = Annotated[bool | None, typer.Option("--progress/--no-progress", help=f"Progress bar (terminal) or log lines (no terminal). {_switch('progress', 'no-progress', RunSpec.progress)}", rich_help_panel="Output")]
CheckpointSeconds = Annotated[float | None, typer.Option(help=f"Save answered rows of shards still in progress at least this often (seconds), so a kill loses at most that much work. {_default(OutputSpec.checkpoint_seconds)}", rich_help_panel="Output")]
ReadRetries = Annotated[int | None, typer.Option(help=f"Retries, with backoff, of a shard read that fails for a transient reason (network, a failing pipe: command, I/O error). {_default(DataSpec.read_retries)}", rich_help_panel="Data")]
WatchdogSeconds = Annotated[float | None, typer.Option(help=f"End a run whose device and decoders make no progress for this long (seconds; 0: never). {_default(RunSpec.watchdog_seconds)}", rich_help_panel="Output")]
Recipe = Annotated[Path | None, typer.Option("--recipe", "-r", help="Recipe: a bundled name (see `dvl-batch recipes`) or a YAML file; options given here override it.", show_default=False)]
MaxPromptTokens = Annotated[int | None, typer.Option(help=f"Longest prompt in tokens: question text is cut to fit, image tokens never (a sample whose images alone exceed it becomes an error row). {_default('no limit')}", rich_help_panel="Prompt")]
Task = Annotated[str | None, typer.Option(help="caption or vqa. " + _default("the recipe's, else caption"), rich_help_panel="Prompt")]
BenchKvDtypes = Annotated[list[str] | None, typer.Option("--kv-dtype", help=f"KV cache of the slot-engine runs: auto (bf16) and/or fp8; repeat to run both side by side. {_default('auto')}")]
BenchQuantize = Annotated[list[str] | None, typer.Option("--quantize", help=f"Weights of the slot-engine runs: none (bf16) and/or fp8 (CUDA), or on a CPU torchao's int8wo/int8dq; repeat to run several (times each --kv-dtype). {_default('none')}")]
BenchFuseProjections = Annotated[bool, typer.Option("--fuse-projections/--no-fuse-projections", help="One product for Q/K/V and one for gate/up in the slot engine's layers; --no-fuse-projections runs transformers' layer forward (to measure the difference).")]
BenchVisionEpilogue = Annotated[bool, typer.Option("--vision-epilogue/--no-vision-epilogue", help="SigLIP fc1's bias and GELU in the matmul's epilogue (cuBLASLt) in the slot engine's image encoding; --no-vision-epilogue runs transformers' arithmetic (to measure the difference).")]
BenchPaired = Annotated[bool, typer.Option("--paired", help="With as many --quantize as --kv-dtype values: run the first weights with the first KV type and so on, not every combination.")]
BenchHfBatchSizes = Annotated[list[int] | None, typer.Option("--hf-batch-size", help=f"generate batch sizes to try (best is reported; repeatable). {_default(256)}")]
BenchDataDir = Annotated[str | None, typer.Option(help=f"Where to write (or reuse) the generated shards. {_default('a new temporary folder')}")]
HostProfile = Annotated[str | None, typer.Option(help="Write a cProfile of dvl-batch's host side to this file.")]
DeviceProfile = Annotated[str | None, typer.Option(help="Trace the measured dvl-batch runs (GPU) and write their kernels by kind, top kernels and idle gaps between kernels to this file (the traced runs' rates include the tracing).")]
InputOption = Annotated[list[str] | None, typer.Option("--input", "-i", help="Shards, parquet files, image folders or brace patterns (repeatable). " + _default("the recipe's data.inputs"), show_default=False)]


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
