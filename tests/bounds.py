"""Error bounds shared by the tests: the int8 and 2:4 int8 ones (what the exact result of the same scheme may
differ by, so that a wrong scale, a dropped product or a missing bias fails), and the distillation losses' gradient
rule."""
import torch


def assert_epilogue_rounding_only(y, ref, bias, out_dtype=torch.float32):
    """W8A8 against the exact result of the same scheme, per element: the int32 sums are exact, so only the fp32
    epilogue (int32 -> fp32, times two scales, plus bias: a few roundings) and the output dtype may differ."""
    b = bias.double().abs() if bias is not None else 0.0
    unbiased = (ref - (bias.double() if bias is not None else 0.0)).abs()
    bound = 4 * torch.finfo(torch.float32).eps * (unbiased + b) + torch.finfo(out_dtype).eps * ref.abs() + 1e-30
    excess = (y.double() - ref).abs() - bound
    assert (excess <= 0).all(), (excess.max().item(), (y.double() - ref).abs().max().item())


def assert_fp32_sum_rounding_only(y, ref, x, w_dequant, bias, out_dtype):
    """Weight-only against x @ (w * s_w)^T + bias in fp64, per element: fp32 sums of K products (random-walk bound
    2 sqrt(K) eps32 sum |x||w|), the bias add, and the output's rounding to its dtype."""
    k = max(x.shape[-1], 1)
    mag = x.double().abs() @ w_dequant.double().abs().T
    b = bias.double().abs() if bias is not None else 0.0
    eps = torch.finfo(torch.float32).eps
    bound = 2 * k ** 0.5 * eps * mag + 2 * eps * b + torch.finfo(out_dtype).eps * ref.abs() + 1e-30
    excess = (y.double() - ref).abs() - bound
    assert (excess <= 0).all(), (excess.max().item(), (y.double() - ref).abs().max().item())


def assert_logits_gradient(grad, g64, g32, grad_out, floor):
    """A distillation loss's gradient w.r.t. the logits against the fp64 one (g64), with plain PyTorch's fp32 one
    (g32): fp32 within 2x plain fp32's error plus `floor` relative to the largest gradient; 16-bit per element
    within one unit of its dtype (eps |ref|, subnormal spacing included) on top of 2x plain fp32's error and a few
    fp32 roundings of the largest gradient or grad_output (soft and hard parts may cancel to 0)."""
    g, g64, g32 = grad.double(), g64.double(), g32.double()
    base = 2 * (g32 - g64).abs().max().item() if g64.numel() else 0.0
    err = (g - g64).abs().max().item() if g.numel() else 0.0
    if grad.dtype == torch.float32:
        assert err <= base + floor * (1.0 + (g64.abs().max().item() if g64.numel() else 0.0)), (err, base / 2)
        return
    info = torch.finfo(grad.dtype)
    fp32_terms = 4 * torch.finfo(torch.float32).eps * max(g64.abs().max().item() if g64.numel() else 0.0,
                                                          grad_out.abs().max().item())
    bound = info.eps * g64.abs() + info.eps * info.smallest_normal + base + fp32_terms
    excess = (g - g64).abs() - bound
    assert (excess <= 0).all(), (excess.max().item(), err, base / 2)
