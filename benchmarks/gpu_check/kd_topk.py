"""Sanitizer driver: the top-k teacher loss's kernels (csrc/include/fastdistill/kd_topk.cuh), every divergence and
tail mode, forward and backward, with labels, an ignored row, unused slots and a masked vocabulary tail; fp32 rows
near the GPU's vocabulary limit (a full shared-memory bitmap) and bf16 rows of an odd vocabulary. Usage: _driver.py."""
import torch

from _driver import close, main


def exercise(ops, device):
    cpu = torch.ops.fastdistill
    g = torch.Generator().manual_seed(0)
    for rows, V, k, dtype in ((2, 262144, 128, torch.float32), (300, 1001, 20, torch.bfloat16)):
        s = (torch.randn(rows, V, generator=g) * 3).to(dtype)
        s[:, -V // 8:] = float("-inf")
        lp, idx = torch.log_softmax(torch.randn(rows, V, generator=g) * 3, -1).topk(k, -1)
        lp[0, -3:] = float("-inf")  # unused slots
        lab = torch.randint(0, V - V // 8, (rows,), generator=g)
        lab[-1] = -100
        grad_rows = torch.linspace(0.3, 1.7, rows)
        sd, idd, lpd, ld = s.to(device), idx.to(device), lp.to(device), lab.to(device)
        for tail, div in (("bucket", "forward_kl"), ("bucket", "reverse_kl"), ("bucket", "jsd"),
                          ("renormalize", "forward_kl")):
            params = (2.0, div, 0.3, -100, 4.0, 0.5, tail)  # T, divergence, beta, ignore_index, soft, hard, tail
            what = f"kd_topk {tail} {div} {rows}x{V} {dtype}"
            loss, stats = ops.kd_topk_forward(sd, idd, lpd, ld, *params)
            want_loss, want_stats = cpu.kd_topk_forward(s, idx, lp, lab, *params)
            close(loss, want_loss, 1e-4, 1e-5, what + " loss")
            grad = ops.kd_topk_backward(grad_rows.to(device), sd, idd, lpd, ld, stats, *params)
            want_grad = cpu.kd_topk_backward(grad_rows, s, idx, lp, lab, want_stats, *params)
            close(grad, want_grad, 1e-2, 1e-5, what + " gradient")


if __name__ == "__main__":
    main("kd_topk", exercise)
