"""`dvl-batch bench`: the product end to end against transformers' `generate`, side by side.

corpus.py makes the inputs (JPEG shards, questions, the stop schedule), shapes.py the
random-weight models of the real shapes and their FLOP counts, harness.py runs both
engines on the same inputs and collects the numbers (with device time per phase),
profiling.py traces a measured run on request (cProfile of the host, the device's kernels and
idle gaps), report.py prints the tables. Benchmarks are programs, not tests: they print and write JSON.
"""

from .corpus import BENCH_SYSTEM_PROMPT, VQA_QUESTIONS, stop_after
from .harness import BenchConfig, run_bench, run_preprocess_bench
from .report import format_preprocess_table, format_table
from .shapes import FlopModel, build_model

__all__ = [
    "BENCH_SYSTEM_PROMPT", "VQA_QUESTIONS", "BenchConfig", "FlopModel", "build_model", "format_preprocess_table",
    "format_table", "run_bench", "run_preprocess_bench", "stop_after",
]
