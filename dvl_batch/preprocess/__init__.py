"""Preprocess, the second stage: raw samples to model-ready samples, in decoder processes.

- `images.py`: decoding (every failure an `ImageError`) and the checkpoint's resize/pad.
- `prompts.py`: questions per sample and the chat layout, tokenized.
- `preparer.py`: the processor, loaded once per process role, and `SamplePreparer`
  (one RawSample to one PreparedSample).
- `stream.py`: the stream of prepared samples a device worker consumes: shards pulled
  from the run's feed, prepared by a DataLoader pool of decoder processes.
- `decoder_pool.py`: restarting that pool when a decoder dies, resuming its shards.
- `handoff.py`: how a prepared sample crosses from a decoder to the device process.

Imports `records`, `config` and the sources' readers; never the engine, sink or run.
"""
