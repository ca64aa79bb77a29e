"""Every custom CUDA kernel (the FD_KERNEL definitions of csrc/include/fastdistill/*.cuh), by the driver that
must launch it. preflight.py checks this list against the sources; a driver run under the profiler checks
that each one launched."""

KERNELS = {
    "kd_loss": ["kd_forward_kernel", "kd_forward_merge_kernel", "kd_jsd_kernel", "kd_jsd_merge_kernel",
                "kd_backward_kernel", "kd_partial_kernel", "kd_partial_merge_kernel", "kd_jsd_sums_kernel",
                "kd_jsd_sums_merge_kernel"],
    "kd_topk": ["kd_topk_forward_kernel", "kd_topk_backward_kernel"],
    "int8": ["quantize_rows_kernel", "int8_gemv_kernel", "to_f32_padded_kernel", "int8_wo_gemv_kernel",
             "int8_dequant_epilogue_kernel"],
    "sparse24": ["sparse24_gemv_kernel", "sparse24_decompress_kernel"],
}
SANITIZERS = ["memcheck", "racecheck", "synccheck"]
# compute-sanitizer --kernel-name kns=<this>: a substring of every kernel's name (they all live in namespace
# fastdistill::), of no kernel of torch's.
KERNEL_FILTER = "fastdistill"
