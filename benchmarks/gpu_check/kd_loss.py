"""Sanitizer driver: the distillation-loss kernels (csrc/include/fastdistill/kd_loss.cuh), every divergence,
forward and backward, with labels, ignored rows and a masked vocabulary tail; fp32 rows long enough to be
split across blocks (the merge kernels) and bf16 rows that are not; and the vocab-parallel shard kernels
(kd_loss_partial, kd_loss_jsd_sums) on the same rows. Usage: _driver.py."""
import torch

from _driver import close, main


def exercise(ops, device):
    cpu = torch.ops.fastdistill
    g = torch.Generator().manual_seed(0)
    # 4 x 65536 fp32: the launch rule splits each row over 2 blocks on an H200 (and on the emulator's 8 SMs).
    for rows, V, dtype in ((4, 65536, torch.float32), (300, 1000, torch.bfloat16)):
        s = (torch.randn(rows, V, generator=g) * 3).to(dtype)
        t = (torch.randn(rows, V, generator=g) * 3).to(dtype)
        s[:, -V // 8:] = float("-inf")
        t[:, -V // 8:] = float("-inf")
        lab = torch.randint(0, V - V // 8, (rows,), generator=g)
        lab[0] = -100
        grad_rows = torch.linspace(0.3, 1.7, rows)
        sd, td, ld = s.to(device), t.to(device), lab.to(device)
        for div in ("forward_kl", "reverse_kl", "jsd"):
            params = (2.0, div, 0.3, -100, 4.0, 0.5)  # T, divergence, beta, ignore_index, soft_coef, hard_weight
            what = f"kd_loss {div} {rows}x{V} {dtype}"
            loss, stats = ops.kd_loss_forward(sd, td, ld, *params)
            want_loss, want_stats = cpu.kd_loss_forward(s, t, lab, *params)
            close(loss, want_loss, 1e-5, 1e-5, what + " loss")
            # The logsumexps; reverse KL's centre (and the mean taken around it) is each implementation's pick.
            close(stats[:, :5], want_stats[:, :5], 1e-5, 1e-5, what + " stats")
            grad = ops.kd_loss_backward(grad_rows.to(device), sd, td, ld, stats, *params)
            want_grad = cpu.kd_loss_backward(grad_rows, s, t, lab, want_stats, *params)
            close(grad, want_grad, 1e-2, 1e-5, what + " gradient")
            # The shard state: maxima exact, sums to summation order. The centre (the other side's logit at the
            # primary argmax) and the sum around it are each implementation's pick among tied maxima, as above.
            part, want_part = ops.kd_loss_partial(sd, td, ld, *params), cpu.kd_loss_partial(s, t, lab, *params)
            close(part[:, [0, 2]], want_part[:, [0, 2]], 0, 0, what + " partial maxima")
            close(part[:, [1, 3, 4]], want_part[:, [1, 3, 4]], 2e-5, 1e-30, what + " partial sums")
            if div == "jsd":
                sums = ops.kd_loss_jsd_sums(sd, td, stats, 2.0, 0.3)
                close(sums, cpu.kd_loss_jsd_sums(s, t, want_stats, 2.0, 0.3), 1e-4, 1e-6, what + " jsd sums")


if __name__ == "__main__":
    main("kd_loss", exercise)
