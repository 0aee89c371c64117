"""The Python API in five steps: build a JobSpec, run it, read the rows, rerun, customise.

    python examples/python_api.py --model tiny --out out/api

`dvl_batch.run(spec)` is exactly what the `dvl-batch` command calls, so a script
gets the same resume, locking and error-row behaviour as the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from dvl_batch import JobSpec, run

EXAMPLES = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="auto", help="'auto', 'tiny', a hub id or a local folder")
    parser.add_argument("--out", type=Path, default=Path("out/api"))
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    common = dict(model=args.model, max_new_tokens=args.max_new_tokens, workers=0, progress=False)

    # 1. A spec from a bundled recipe plus overrides (the CLI's option names, underscores).
    spec = JobSpec.from_recipe("short-caption", inputs=[str(EXAMPLES / "shards")], output=str(args.out / "captions"), **common)

    # 2. Run it: blocks until every shard has its parquet part.
    result = run(spec)
    print(f"captions: {result.stats.rows} rows, {result.stats.error_rows} errors, {result.seconds:.1f} s")

    # 3. Read the results: one parquet part per input shard.
    for row in pq.read_table(result.out / "parts", columns=["key", "answer"]).to_pylist():
        print(f"  {row['key']:<10} {row['answer']!r}")

    # 4. Running the same spec again resumes: finished shards are skipped.
    again = run(spec)
    print(f"rerun: {again.stats.shards_written} shards written, {again.shards_done}/{again.shards_total} done")

    # 5. No recipe: questions, a system prompt, a conversation template and two images per sample.
    custom = JobSpec.from_recipe(
        None,
        task="vqa",
        inputs=[str(EXAMPLES / "pairs")],
        output=str(args.out / "pairs-vqa"),
        questions=["What is different between <image> and <image>?", "Which of <image> and <image> shows a person?"],
        system_prompt="You are a careful photo annotator.",
        turns=[{"user": "Keep every answer under ten words.", "assistant": "Understood."}],
        max_prompt_tokens=1400,  # question text is cut to fit; the 2 x 576 image tokens never are
        **common,
    )
    result = run(custom)
    table = pq.read_table(result.out / "parts", columns=["key", "question", "prompt_tokens", "answer"])
    for row in table.to_pylist()[:4]:
        print(f"  {row['key']:<8} {row['prompt_tokens']:>5} tokens  {row['question']!r} -> {row['answer']!r}")


if __name__ == "__main__":
    main()
