"""Sanitizer driver: the int8 kernels (csrc/include/fastdistill/int8.cuh): per-channel and per-token
quantization, the W8A8 and weight-only GEMV tiles at M = 1, 3, 16, the torch._int_mm path's dequant epilogue
at M = 40, and the s32 GEMM; K = 1000 (padded to 1024) and 4096, every input dtype. Usage: _driver.py."""
import torch

from _driver import close, equal, main


def exercise(ops, device):
    cpu = torch.ops.fastdistill
    g = torch.Generator().manual_seed(0)
    for K, N in ((1000, 24), (4096, 64)):  # the epilogue path needs K % 32 == 0 and N % 8 == 0
        w = torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g)
        wq, ws = ops.quantize_per_channel(w.to(device))
        wq_c, ws_c = cpu.quantize_per_channel(w)
        equal(wq, wq_c, f"quantize_per_channel {N}x{K}")
        equal(ws, ws_c, f"quantize_per_channel scales {N}x{K}")
        packed, packed_c = ops.int8_pack_weight(wq), cpu.int8_pack_weight(wq_c)
        equal(ops.int8_unpack_weight(packed, N, K), wq_c, f"int8 pack/unpack {N}x{K}")
        for M in (1, 3, 16, 40):
            for dtype in ((torch.float32, torch.bfloat16, torch.float16) if M == 3 else (torch.bfloat16,)):
                x = (torch.randn(M, K, generator=g) * 2).to(dtype)
                what = f"M={M} K={K} N={N} {dtype}"
                xq, xs = ops.quantize_per_token(x.to(device))
                xq_c, xs_c = cpu.quantize_per_token(x)
                equal(xq, xq_c, "quantize_per_token " + what)
                equal(xs, xs_c, "quantize_per_token scales " + what)
                close(ops.int8_linear(x.to(device), packed, ws, b.to(device)), cpu.int8_linear(x, packed_c, ws_c, b),
                      1e-5, 1e-5, "int8_linear " + what)
                # Above 16 rows a 16-bit x meets a weight dequantised to its dtype (cuBLAS): a few units of the
                # output dtype, at the outputs' scale.
                want = cpu.int8_weight_only_linear(x, packed_c, ws_c, b)
                tol = 1e-4 if dtype == torch.float32 else 3e-2
                close(ops.int8_weight_only_linear(x.to(device), packed, ws, b.to(device)), want, tol,
                      tol * float(want.abs().max()), "int8_weight_only_linear " + what)
        qx = torch.randint(-127, 128, (2, K), generator=g, dtype=torch.int8)
        equal(ops.int8_gemm_s32(qx.to(device), wq), cpu.int8_gemm_s32(qx, wq_c), f"int8_gemm_s32 M=2 K={K} N={N}")


if __name__ == "__main__":
    main("int8", exercise)
