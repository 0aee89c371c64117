"""The bench's device-profile report: kernel time by kind and the idle gaps between kernels."""

from __future__ import annotations

from dvl_batch.bench.profiling import format_summary, kind_of, summarise_kernels


def test_kernels_are_grouped_by_kind():
    assert kind_of("_decode_kernel") == "attention (decode)"
    assert kind_of("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention (prefill)"
    assert kind_of("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT") == "matmul"
    assert kind_of("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "norm"  # RMSNorm fused with its casts
    assert kind_of("void at::native::index_elementwise_kernel<128, 4>") == "copy/index"
    assert kind_of("triton_poi_fused__unsafe_view_mul_silu_1") == "activation"
    assert kind_of("triton_poi_fused__unsafe_view_add_2") == "other element-wise"


def test_gaps_between_kernels_are_binned_and_the_kernel_before_a_long_gap_is_named():
    # times in microseconds: two overlapping kernels, then a 5 us gap, then a 2 ms gap
    kernels = [
        ("nvjet_a", 0.0, 100.0),
        ("_decode_kernel", 50.0, 300.0),  # overlaps the first (another stream): no gap
        ("triton_poi_fused_add", 305.0, 310.0),  # 5 us after the decode kernel ends
        ("nvjet_b", 2310.0, 2410.0),  # 2000 us idle before it
    ]
    summary = summarise_kernels(kernels, images=2)
    assert summary["span_ms_per_image"] == round(2410 / 2000, 4)
    gaps = summary["gap_ms_per_image"]
    assert gaps["< 10 us"] == round(5 / 2000, 4)
    assert gaps["1000-10000 us"] == round(2000 / 2000, 4)
    assert sum(gaps.values()) == round(5 / 2000, 4) + 1.0
    assert summary["before_long_gaps"] == [("triton_poi_fused_add", 1)]
    kinds = summary["kernel_ms_per_image"]
    assert kinds["matmul"] == round(200 / 2000, 4) and kinds["attention (decode)"] == round(250 / 2000, 4)
    text = format_summary(summary)
    assert "idle gaps" in text and "triton_poi_fused_add" in text


def test_no_kernels_gives_an_empty_report():
    assert summarise_kernels([], images=3) == {}
    assert format_summary({}) == "(no device kernels recorded)"
