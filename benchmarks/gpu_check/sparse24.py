"""Sanitizer driver: the 2:4 kernels (csrc/include/fastdistill/sparse24.cuh): the GEMV tiles at M = 1, 5, 16,
vectorised (K % 32 == 0) and not (K = 1028), fp32 / bf16 / fp16 / int8 values; and the decompression that
feeds the vendor GEMM at M = 40. Usage: _driver.py."""
import torch

from _driver import close, main
from fastdistill.reference import compressed_2_4_sample


def exercise(ops, device):
    cpu = torch.ops.fastdistill
    g = torch.Generator().manual_seed(0)
    for K, N in ((256, 64), (1028, 24)):
        b = torch.randn(N, generator=g)
        for vdtype in (torch.float32, torch.bfloat16, torch.float16):
            values, meta, _ = compressed_2_4_sample(torch.randn(N, K, generator=g).to(vdtype))
            pv, pm = ops.sparse24_pack(values.to(device), meta.to(device))
            for M in (1, 5, 16, 40):
                x = torch.randn(M, K, generator=g, dtype=torch.bfloat16)
                close(ops.sparse24_linear(x.to(device), pv, pm, b.to(device)), cpu.sparse24_linear(x, values, meta, b),
                      3e-2, 3e-2, f"sparse24_linear M={M} K={K} N={N} {vdtype} values")
        wq, ws = cpu.quantize_per_channel(torch.randn(N, K, generator=g))
        values, meta, _ = compressed_2_4_sample(wq)
        for M in (3, 40):
            x = torch.randn(M, K, generator=g)
            close(ops.sparse24_int8_linear(x.to(device), values.to(device), meta.to(device), ws.to(device), b.to(device)),
                  cpu.sparse24_int8_linear(x, values, meta, ws, b), 1e-5, 1e-5,
                  f"sparse24_int8_linear M={M} K={K} N={N}")


if __name__ == "__main__":
    main("sparse24", exercise)
