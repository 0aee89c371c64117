"""Test-only fault injection for dvl-batch subprocesses; never imported by the product.

Python imports `sitecustomize` at start-up from sys.path. The reliability tests put this
folder on a subprocess's PYTHONPATH and describe the faults in the DVL_TEST_FAULTS
environment variable (a JSON object); without it this module does nothing. The product
code has no test hooks: the faults wrap `pyarrow.parquet.write_table`, which the sink
calls to fill a part's temporary file.

Faults:
- "pause_part_write": seconds. Each part's bytes are written in two halves; in between
  the process prints "dvl-test: part half-written <temp file>" on stderr and sleeps,
  so a test can signal it exactly while a part file is being written.
- "fail_part_write": an errno name (ENOSPC, EROFS), with "after_parts": N. Every part
  write after the first N fails half-way through its temporary file with that OSError,
  as a full or read-only disk would.
- "crash_on_bytes": text. A process asked to open an image whose bytes contain it dies
  of SIGSEGV, as a decoder hitting a bug in a native image library would.
- "slow_image_open": seconds added to every image open (a slow decoder); before each it
  prints "dvl-test: decoder <pid> opening an image", so a test can kill that decoder
  process while it is working. With "slow_image_opens": N, only each process's first N
  image opens are slowed (and announced); the rest run at full speed.
- "log_answers": a file. The main process appends one line (the time) to it for every
  answer it decodes (tokenizer.decode with skip_special_tokens), so a test counts the
  answers a run made even when it was killed (O_APPEND writes survive SIGKILL).
"""

from __future__ import annotations

import json
import os

FAULTS = json.loads(os.environ.get("DVL_TEST_FAULTS") or "{}")
PART_TEMP_MARK = ".parquet.tmp-"


def _announce(text: str) -> None:
    import sys

    print(f"dvl-test: {text}", file=sys.stderr, flush=True)


def _install_part_write_faults() -> None:
    import errno
    import io
    import time

    import pyarrow.parquet as pq

    real_write_table = pq.write_table
    completed = 0

    def write_table(table, where, *args, **kwargs):
        nonlocal completed
        name = str(getattr(where, "name", where))
        if PART_TEMP_MARK not in name:
            return real_write_table(table, where, *args, **kwargs)
        buffer = io.BytesIO()
        real_write_table(table, buffer, *args, **kwargs)
        data = buffer.getvalue()
        where.write(data[: len(data) // 2])
        where.flush()
        if "fail_part_write" in FAULTS and completed >= FAULTS.get("after_parts", 0):
            code = getattr(errno, FAULTS["fail_part_write"])
            _announce(f"failing part write {name} with {FAULTS['fail_part_write']}")
            raise OSError(code, os.strerror(code), name)
        if "pause_part_write" in FAULTS:
            _announce(f"part half-written {name}")
            time.sleep(float(FAULTS["pause_part_write"]))
        where.write(data[len(data) // 2 :])
        completed += 1
        return None

    pq.write_table = write_table


def _install_decoder_faults() -> None:
    import io
    import signal
    import time

    from PIL import Image

    real_open = Image.open
    slowed: dict[int, int] = {}  # pid -> image opens slowed so far (decoders fork: one count each)

    def open_image(fp, *args, **kwargs):
        if isinstance(fp, io.BytesIO):
            if FAULTS.get("crash_on_bytes") and FAULTS["crash_on_bytes"].encode() in fp.getvalue():
                _announce(f"decoder {os.getpid()} crashing")
                os.kill(os.getpid(), signal.SIGSEGV)
            delay = float(FAULTS.get("slow_image_open", 0))
            if delay and slowed.get(os.getpid(), 0) < FAULTS.get("slow_image_opens", float("inf")):
                slowed[os.getpid()] = slowed.get(os.getpid(), 0) + 1
                _announce(f"decoder {os.getpid()} opening an image")
                time.sleep(delay)
        return real_open(fp, *args, **kwargs)

    Image.open = open_image


def _install_answer_log() -> None:
    import importlib.abc
    import importlib.util
    import sys
    import time

    main_pid = os.getpid()
    fd = os.open(FAULTS["log_answers"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    target = "transformers.tokenization_utils_base"

    def patch(module) -> None:
        base = module.PreTrainedTokenizerBase
        real_decode = base.decode

        def decode(self, *args, **kwargs):
            text = real_decode(self, *args, **kwargs)
            if kwargs.get("skip_special_tokens") and os.getpid() == main_pid:
                os.write(fd, f"{time.time():.3f}\n".encode())
            return text

        base.decode = decode

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target_module=None):
            if name != target:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            real_exec = spec.loader.exec_module

            def exec_module(module):
                real_exec(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Finder())


if "log_answers" in FAULTS:
    _install_answer_log()
if "pause_part_write" in FAULTS or "fail_part_write" in FAULTS:
    _install_part_write_faults()
if "crash_on_bytes" in FAULTS or "slow_image_open" in FAULTS:
    _install_decoder_faults()
