"""The bench's device-time line: per-phase costs only where the phases ran one after another."""

from __future__ import annotations

from dvl_batch.bench.report import device_line

SPLIT = {"attention_TBps": 4.25, "copy_TBps": 4.27}


def _entry(overlapped: int) -> dict:
    ms = {"vision": 0.85, "prefix": 2.57, "suffix": 0.02, "decode": 2.70, "decode_attention": 2.30,
          "decode_rest": 0.40, "busy": 6.14, "idle": 0.15, "wall": 6.29}
    return {"device_ms_per_image": ms, "decode_attention": SPLIT, "prefill_mfu": 0.69,
            "overlapped_prefills": overlapped, "prefill_calls": 128}


def test_one_stream_run_reports_phase_costs_idle_and_prefill_mfu():
    line = device_line(_entry(overlapped=0))
    assert "vision 0.85, prefix 2.57" in line and "attention 2.30 at 4.25 TB/s" in line
    assert "busy 6.14, idle 0.15" in line and "vision+prefix 3.42 at 69% MFU" in line


def test_overlapped_run_does_not_pass_stretched_phase_times_off_as_costs():
    line = device_line(_entry(overlapped=127))
    assert "127 of 128 prefills ran beside decode" in line and "wall 6.29" in line
    assert "--no-overlap-prefill" in line
    assert "MFU" not in line and "vision+prefix" not in line and "idle" not in line
