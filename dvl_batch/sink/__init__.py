"""Sink, the last stage: finished shards into OUT, written so that a killed run loses nothing.

- `parts.py`: one parquet part per shard (`ParquetSink`), its footer record, and
  counting error rows from footers.
- `checkpoints.py`: answered rows of shards still in progress, saved every few seconds.
- `output.py`: OUT's layout (`OutputDir`): job.json, progress files, stale temp files.
- `verify.py`: reading back parts and state files, to trust only what parses.
- `locks.py`: the per-rank run lock and the world-size lock.
- `files.py`: the atomic write every file in OUT goes through.

Imports only `records` and `errors`.
"""
