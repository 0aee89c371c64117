"""Runners: how a prepared job's open shards are spread over engines; nothing else.

`local.py` runs one device worker in this process, `multigpu.py` one engine process per
device, `ray.py` one engine actor per GPU of a Ray cluster; `engines.py` is what the
last two share. They hand out shards (runtime.feed) and fold stats; they never import
sources or preprocess (tests/test_architecture.py).
"""
