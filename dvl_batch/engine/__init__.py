"""Engine: prepared samples' work items in, completions out, on one device.

- `model.py`: loading a resolved checkpoint and the adapter the slot engine drives.
- `continuous.py`, `planning.py`, `slots.py`, `decode_step.py`, `questions.py`, `attention.py`,
  `triton_decode.py`, `triton_suffix.py`, `sampling.py`: the slot engine: a scheduler keeping
  sequence slots busy (and the groups and rows it plans), the two-level KV store and its model
  passes (the decode step, VQA's question prefill), attention over it and its Triton kernels.
- `device_clock.py`: device time per phase from CUDA events (used by the bench).
- `generate.py` and `batcher.py`: transformers' `generate` on length-bucketed batches.
- `quantize.py`: torchao weight quantization. `types.py`: the engine's interface.

Imports `records`, `config` and preprocess's image views; never the sink or runtime.
"""
