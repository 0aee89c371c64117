"""Quantization (torchao), attention implementations and device_map on the tiny model.

What runs on a CPU is run end to end; int4/fp8 need CUDA and are checked on a GPU
(skipped elsewhere) plus by their one-line refusals here.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest
import torch

from dvl_batch.api import run
from dvl_batch.config.spec import BatchSpec, GenerationSpec, JobSpec, ModelSpec
from dvl_batch.engine.continuous import SlotEngine
from dvl_batch.engine.generate import GenerateEngine
from dvl_batch.engine.model import VisionLanguageModel, load_model
from dvl_batch.engine.quantize import check_engine_quantize, check_quantize, int4_group_size
from dvl_batch.errors import EXIT_USAGE, UsageError
from dvl_batch.preprocess.preparer import load_processor
from dvl_batch.runtime.models import resolve_model
from dvl_batch.runtime.progress import NullReporter
from dvl_batch.runtime.worker import build_engine

from .conftest import EXAMPLES, cli_env, job_json, read_rows, run_cli
from .test_engine_parity import generate_references
from .test_multi_image import CASES, MAX_NEW, _items

FAST = ["--model", "tiny", "--max-new-tokens", "6", "--workers", "0", "--no-progress"]
logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-extension warnings on CPU machines
needs_torchao = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao not installed (pip install 'dvl-batch[quant]')"
)


def _load(cache_dir, device="cpu", dtype=torch.float32, **model):
    spec = ModelSpec(name="tiny", **model)
    resolved = resolve_model(spec, cache_dir)
    return load_model(resolved, spec, torch.device(device), dtype), load_processor(resolved.path)


def _tensor_kinds(model, inside: bool) -> set[str]:
    return {
        type(module.weight).__name__
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (("language_model" in name or name == "lm_head") == inside)
    }


@needs_torchao
def test_int8_weight_only_quantizes_language_model_only_and_engines_agree(cache_dir):
    model, processor = _load(cache_dir, quantize="int8wo")
    assert _tensor_kinds(model, inside=True) == {"Int8Tensor"}
    assert _tensor_kinds(model, inside=False) == {"Parameter"}, "the vision tower and aligner stay in full precision"
    items, views = _items(processor, CASES[:4])
    eos = processor.tokenizer.eos_token_id
    refs = generate_references(model, views, items, eos, max_new=MAX_NEW)
    slot = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=12), BatchSpec(batch_size=3), [eos], eos)
    assert {(c.uid, c.index): c.tokens for c in slot.run(iter(items))} == refs
    generate = GenerateEngine(model, views, GenerationSpec(max_new_tokens=12), BatchSpec(batch_size=4), [eos], eos)
    assert {(c.uid, c.index): c.tokens for c in generate.run(iter(items))} == refs


@needs_torchao
def test_cli_int8_weight_only_caption_run(tmp_path, cache_dir):
    out = tmp_path / "out"
    # on the CPU (also on a GPU machine, where the slot engine refuses int8 by design)
    result = run_cli(["caption", str(EXAMPLES / "shards"), "-o", str(out), "--quantize", "int8wo", "--device", "cpu", *FAST],
                     cache_dir)
    assert result.returncode == 0, result.stderr
    assert "Failed to load" not in result.stderr, "torchao's extension warnings are kept out of the job log"
    rows = read_rows(out).to_pandas()
    assert len(rows) == 6 and rows["error"].isna().all() and (rows["generated_tokens"] >= 1).all()
    assert job_json(out)["identity"]["quantize"] == "int8wo"


@needs_torchao
def test_int8_dynamic_quantization_runs_through_the_pipeline(tmp_path, cache_dir):
    spec = JobSpec.from_recipe("vqa-annotation", inputs=str(EXAMPLES / "parquet"), output=str(tmp_path / "out"),
                               model="tiny", quantize="int8dq", max_new_tokens=4, workers=0, progress=False)
    result = run(spec, reporter=NullReporter(), cache_dir=cache_dir, offline=True, say=lambda text: None)
    rows = read_rows(result.out).to_pandas()
    assert len(rows) == 6 * 4 and rows["error"].isna().all()


@needs_torchao
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_only_modes_are_refused_on_cpu_with_one_line(tmp_path, cache_dir):
    for mode in ("int4wo", "fp8"):
        with pytest.raises(UsageError, match=f"--quantize {mode} needs a CUDA GPU"):
            check_quantize(mode, torch.device("cpu"), torch.bfloat16)
    result = run_cli(["caption", str(EXAMPLES / "shards"), "-o", str(tmp_path / "out"), "--quantize", "int4wo", *FAST], cache_dir)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.startswith("error: --quantize int4wo needs a CUDA GPU") and "Traceback" not in result.stderr


def test_int4_group_size_fits_every_layer():
    assert int4_group_size([torch.nn.Linear(2048, 8), torch.nn.Linear(5632, 8)]) == 128
    assert int4_group_size([torch.nn.Linear(64, 8), torch.nn.Linear(128, 8)]) == 64


def test_missing_torchao_is_a_usage_error(tmp_path, cache_dir):
    """sys.modules[name] = None is Python's own way of making an import fail."""
    code = (
        "import sys; sys.modules['torchao'] = None; sys.modules['torchao.quantization'] = None\n"
        "from dvl_batch.engine.quantize import check_quantize\n"
        "import torch\n"
        "try:\n    check_quantize('int8wo', torch.device('cpu'), torch.float32)\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=cli_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert "UsageError --quantize needs torchao: pip install 'dvl-batch[quant]'" in result.stdout, result.stderr


def test_flash_attention_without_flash_attn_is_a_clear_error(tmp_path, cache_dir):
    if importlib.util.find_spec("flash_attn"):
        pytest.skip("flash-attn is installed here")
    result = run_cli(
        ["caption", str(EXAMPLES / "shards"), "-o", str(tmp_path / "out"), "--attn-implementation", "flash_attention_2", *FAST],
        cache_dir,
    )
    assert result.returncode == EXIT_USAGE
    assert result.stderr.startswith("error: --attn-implementation flash_attention_2 needs the flash-attn package")


def test_eager_attention_engines_agree(cache_dir):
    """The slot engine routes only the language model's attention; the vision tower uses the choice."""
    model, processor = _load(cache_dir, attn_implementation="eager")
    assert model.config.vision_config._attn_implementation == "eager"
    items, views = _items(processor, CASES[:2])
    eos = processor.tokenizer.eos_token_id
    refs = generate_references(model, views, items, eos, max_new=MAX_NEW)
    slot = SlotEngine(VisionLanguageModel(model), views, GenerationSpec(max_new_tokens=12), BatchSpec(batch_size=2), [eos], eos)
    assert {(c.uid, c.index): c.tokens for c in slot.run(iter(items))} == refs


def test_device_map_auto_uses_the_generate_engine(tmp_path, cache_dir):
    pytest.importorskip("accelerate")
    spec = JobSpec.from_recipe(None, model="tiny", device_map="auto")
    model, processor = _load(cache_dir, device_map="auto")
    assert isinstance(build_engine(spec, model, processor, torch.device("cpu")), GenerateEngine)
    with pytest.raises(UsageError, match="--device-map needs --engine generate"):
        build_engine(JobSpec.from_recipe(None, device_map="auto", engine="continuous"), model, processor, torch.device("cpu"))
    spec = JobSpec.from_recipe("short-caption", inputs=str(EXAMPLES / "parquet"), output=str(tmp_path / "out"),
                               model="tiny", device_map="auto", max_new_tokens=4, workers=0, progress=False)
    result = run(spec, reporter=NullReporter(), cache_dir=cache_dir, offline=True, say=lambda text: None)
    assert len(read_rows(result.out)) == 6 and result.stats.engine["slots"] == 4, "the generate engine's CPU batch"


def test_torchao_formats_on_a_gpu_belong_to_the_generate_engine():
    """The refusal needs no GPU to check: it looks at the device's type only."""
    cuda = torch.device("cuda")
    for mode in ("int8wo", "int8dq", "int4wo"):
        with pytest.raises(UsageError, match=f"--quantize {mode} on a GPU runs with --engine generate only"):
            check_engine_quantize(mode, "continuous", cuda)
        check_engine_quantize(mode, "generate", cuda)
        check_engine_quantize(mode, "continuous", torch.device("cpu"))  # uncompiled on CPU: allowed
    check_engine_quantize("fp8", "continuous", cuda)  # this package's own float8 layers


@pytest.mark.parametrize("mode", ["int8wo", "int4wo", "fp8"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_quantized_engines_run(tmp_path, cache_dir, mode):
    """fp8 runs in the slot engine (no torchao needed); torchao's int formats are refused
    there with one line and run with --engine generate."""
    device = torch.device("cuda")
    if mode == "fp8" and torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    if mode != "fp8" and importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao not installed")
    out = tmp_path / "out"
    args = ["caption", str(EXAMPLES / "shards"), "-o", str(out), "--quantize", mode, "--dtype", "bfloat16", *FAST]
    if mode != "fp8":
        refused = run_cli(args, cache_dir)
        assert refused.returncode == EXIT_USAGE and "runs with --engine generate only" in refused.stderr
        args += ["--engine", "generate"]
    result = run_cli(args, cache_dir)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out).to_pandas()
    assert len(rows) == 6 and rows["error"].isna().all()
