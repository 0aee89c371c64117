"""Run bundled recipes on the bundled example inputs through the Python API.

    python examples/run_recipe.py                      # every recipe
    python examples/run_recipe.py alt-text read-text   # some of them
    python examples/run_recipe.py --model deepseek-community/deepseek-vl-1.3b-chat

Each recipe gets the example layout it is written for (compare-images needs two
images per sample: examples/pairs); results go to OUT/<recipe>/parts/*.parquet and
the first answers are printed. This is what `dvl-batch run RECIPE -i INPUT -o OUT`
does from the command line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pyarrow.parquet as pq

from dvl_batch import JobSpec, bundled_recipes, run

EXAMPLES = Path(__file__).resolve().parent
INPUT_FOR_RECIPE = {
    "short-caption": "images",
    "detailed-caption": "parquet",
    "alt-text": "images",
    "vqa-annotation": "shards",
    "read-text": "images",
    "compare-images": "pairs",
}


def run_one(name: str, out: Path, model: str, max_new_tokens: int | None) -> None:
    spec = JobSpec.from_recipe(
        name,
        inputs=[str(EXAMPLES / INPUT_FOR_RECIPE.get(name, "shards"))],
        output=str(out / name),
        model=model,
        max_new_tokens=max_new_tokens,  # None keeps the recipe's own limit
        workers=0,
        progress=False,
    )
    result = run(spec)
    rows = pq.read_table(result.out / "parts").to_pylist()
    print(f"== {name}: {len(rows)} rows in {result.out} ({result.seconds:.1f} s)")
    for row in rows[:3]:
        answer = row["answer"] if row["error"] is None else f"[error] {row['error']}"
        print(f"  {row['key']:<10} {row['question'][:48]!r:<52} -> {answer[:80]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipe names (default: all bundled recipes)")
    parser.add_argument("--model", default="auto", help="'auto' (real checkpoint if reachable, else tiny), 'tiny', a hub id or a folder")
    parser.add_argument("--out", type=Path, default=Path("out/recipes"), help="output root")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override every recipe's answer length")
    args = parser.parse_args()
    names = args.recipes or [info.name for info in bundled_recipes()]
    for name in names:
        run_one(name, args.out, args.model, args.max_new_tokens)


if __name__ == "__main__":
    main()
