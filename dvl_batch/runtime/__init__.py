"""Runtime: the composition of the stages, and the scheduling of shards.

- `session.py`: the run path every front end shares (launch defaults, checks, signals,
  progress files, `output.strict`) and the choice of runner.
- `job.py`, `models.py`: job preparation: the resolved model, the locked OUT, this
  rank's open shards.
- `feed.py`: the shard feed every decoder and engine process pulls from.
- `worker.py`, `pipeline.py`, `assembly.py`: the device worker (one model on one device),
  the flow preprocess -> engine -> sink, and the per-shard assembly of answers into
  checkpoints and parts.
- `stats.py`: what a run counts and its stop flag (no torch: a run with nothing to do stays quick).
- `resume.py`: which parts, checkpoints and folder chunks a resume may trust.
- `progress.py`: terminal bar, log lines, OUT/progress*.json.
- `preflight.py`: the checks that find a usage error before OUT is touched;
  `quiet.py`: library warnings and bars hushed unless `--verbose`.
- `runners/`: local, multi-GPU and Ray; they only schedule shards.
"""
