"""Per-element error bounds shared by the int8 and 2:4 int8 tests: what the exact result of the same scheme may
differ by, so that a wrong scale, a dropped product or a missing bias fails."""
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
