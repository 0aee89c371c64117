"""A job's stderr holds dvl-batch's own lines: library warnings and bars are hushed unless verbose.

Applied once per process that runs part of a job (the run itself, each engine process
or actor; decoder processes fork from them and inherit it). `--verbose`
(`run.verbose`) leaves every library as it is.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Warnings a user can do nothing about, matched by message.
QUIET_WARNINGS = (
    (UserWarning, r".*NumPy array is not writable"),  # torch.from_numpy on a read-only view
    (FutureWarning, r".*_set_allocator_settings"),  # torch's deprecated allocator setter
    (UserWarning, r".*TensorFloat32 tensor cores"),  # inductor's TF32 hint
    (Warning, r".*torch\.utils\._pytree"),
)
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "torch._inductor", "huggingface_hub")


def quiet_libraries(verbose: bool = False) -> None:
    """No library warnings, weight-loading bars or hub chatter in a job log (unless `verbose`)."""
    if verbose:
        return
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency
        pass
    if "transformers" not in sys.modules:
        # not imported yet (a run that may have nothing to do never needs it): transformers reads
        # its verbosity from the environment when it is imported, here or in an engine process
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"  # (what set_verbosity_error below would force)
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
