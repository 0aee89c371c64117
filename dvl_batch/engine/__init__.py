"""Engine: prepared samples' work items in, completions out, on one device.

- `model.py`: loading a resolved checkpoint and the adapter the slot engine drives.
- `continuous.py`, `slots.py`, `attention.py`, `triton_decode.py`: the slot engine: a
  scheduler keeping sequence slots busy, the two-level KV store, attention over it.
- `generate.py` and `batcher.py`: transformers' `generate` on length-bucketed batches.
- `quantize.py`: torchao weight quantization. `types.py`: the engine's interface.

Imports `records`, `config` and preprocess's image views; never the sink or runtime.
"""
