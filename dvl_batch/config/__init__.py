"""Configuration: what a job is, before any of it runs.

- `sections.py`: the settings of each section (model, prompt, generation, data, batch,
  output, run) as frozen dataclasses, with the allowed values.
- `validate.py`: checking recipe/CLI values against those types, and the whole spec.
- `recipes.py`: bundled and user YAML recipes: finding and reading them.
- `spec.py`: `JobSpec` and the one builder (`spec_from_recipe`) that the CLI, the
  Python API and Ray Data's `ImageAnswerer` share.
- `launch.py`: what the environment decides (rank and world size, RAY_ADDRESS, the
  model cache, CPUs and decoder counts, the reading of `--gpus`).

Imports only `errors`; every stage may import it.
"""
