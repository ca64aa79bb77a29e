"""calibrate + prune_2_4_: each method against a small fp64 reimplementation written here, SparseGPT's
reconstruction advantage, sequential calibration, dtypes, and the errors."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fastdistill
from fastdistill.prune import sparsegpt_2_4


# ----------------------------------------------------------------------------------------- fp64 references
def ref_keep_2_of_4(scores):
    """Per row and group of 4 columns, True at the 2 largest scores (plain loops over argsort)."""
    n, k = scores.shape
    mask = torch.zeros(n, k, dtype=torch.bool)
    for r in range(n):
        for g in range(0, k, 4):
            for j in torch.argsort(scores[r, g:g + 4], descending=True)[:2]:
                mask[r, g + int(j)] = True
    return mask


def ref_sparsegpt(w, gram, damp=0.01):
    """Unblocked OBS in fp64 with explicit inverses: the columns left to right; at column i, with F = {i, ..., K-1}
    still free, removing w_i moves the free weights by -w_i / [H_F^-1]_00 * H_F^-1[0, :]."""
    w, h = w.double().clone(), gram.double().clone()
    k = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=torch.float64)
    hinvs = [torch.linalg.inv(h[i:, i:]) for i in range(k)]
    mask = torch.zeros(w.shape, dtype=torch.bool)
    for i in range(k):
        if i % 4 == 0:
            diag = torch.stack([hinvs[j][0, 0] for j in range(i, i + 4)])
            mask[:, i:i + 4] = ref_keep_2_of_4(w[:, i:i + 4].square() / diag)
        hinv = hinvs[i]
        removed = torch.where(mask[:, i], torch.zeros_like(w[:, i]), w[:, i])
        w[:, i:] -= torch.outer(removed / hinv[0, 0], hinv[0])
    return torch.where(mask, w, torch.zeros_like(w)), mask


def correlated_inputs(rows, k, dtype=torch.float64):
    """Rows of strongly correlated features with unequal scales (a random mixing with decaying spectrum)."""
    q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64))
    mix = q * torch.logspace(0, -2, k, dtype=torch.float64) @ torch.randn(k, k, dtype=torch.float64)
    scales = torch.logspace(-0.5, 0.5, k, dtype=torch.float64)[torch.randperm(k)]
    return ((torch.randn(rows, k, dtype=torch.float64) @ mix) * scales).to(dtype)


def is_exactly_2_4(w, mask):
    groups = mask.reshape(mask.shape[0], -1, 4)
    return bool((groups.sum(-1) == 2).all()) and bool((w[~mask] == 0).all())


def one_layer(w, dtype):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


# ----------------------------------------------------------------------------------------- methods vs reference
@pytest.mark.parametrize("k", [8, 36, 132])   # 132: a block of 128 columns, then one of 4
def test_methods_match_fp64_reference(k):
    w = torch.randn(12, k, dtype=torch.float64)
    x = correlated_inputs(300, k)
    x[:, 5] = 0   # a dead input column
    batches = list(x.split(100))
    sq_norms = x.square().sum(0)

    for method, ref_mask in [("magnitude", ref_keep_2_of_4(w.abs())),
                             ("wanda", ref_keep_2_of_4(w.abs() * sq_norms.sqrt()))]:
        lin = one_layer(w, torch.float64)
        masks = fastdistill.prune_2_4_(lin, fastdistill.calibrate(lin, batches), method=method)
        assert torch.equal(masks[""], ref_mask), method
        assert torch.equal(lin.weight.detach(), torch.where(ref_mask, w, torch.zeros_like(w))), method

    lin = one_layer(w, torch.float64)
    calib = fastdistill.calibrate(lin, batches)
    torch.testing.assert_close(calib.stats[""].gram, x.T @ x, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(calib.stats[""].sq_norms, sq_norms, rtol=1e-12, atol=1e-10)
    assert calib.stats[""].rows == 300
    threads = torch.get_num_threads()
    masks = fastdistill.prune_2_4_(lin, calib, method="sparsegpt")
    assert torch.get_num_threads() == threads   # its one-thread inner loop gives the threads back
    ref_w, ref_mask = ref_sparsegpt(w, x.T @ x)
    assert torch.equal(masks[""], ref_mask)
    torch.testing.assert_close(lin.weight.detach(), ref_w, rtol=1e-9, atol=1e-9)
    assert bool((lin.weight[:, 5] == 0).all())


def test_sparsegpt_block_size_changes_nothing_but_the_schedule():
    w = torch.randn(16, 96, dtype=torch.float64)
    x = correlated_inputs(400, 96)
    results = [sparsegpt_2_4(w, x.T @ x, block_size=b) for b in (4, 32, 128)]
    for got_w, got_mask in results[1:]:
        assert torch.equal(got_mask, results[0][1])
        torch.testing.assert_close(got_w, results[0][0], rtol=1e-10, atol=1e-10)


def reconstruction_errors(dtype):
    w = torch.randn(64, 128, dtype=torch.float64)
    x, held_out = correlated_inputs(2048, 128).split(1024)
    errors = {}
    for method in fastdistill.prune.METHODS:
        lin = one_layer(w, dtype)
        fastdistill.prune_2_4_(lin, fastdistill.calibrate(lin, [x.to(dtype)]), method=method)
        w_hat = lin.weight.detach().double()
        errors[method] = [float(torch.linalg.norm(d @ w.T - d @ w_hat.T)) for d in (x, held_out)]
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparsegpt_reconstructs_correlated_inputs_best(dtype):
    errors = reconstruction_errors(dtype)
    for which in (0, 1):   # the calibration rows, then held-out rows of the same distribution
        sgpt, wanda, mag = (errors[m][which] for m in ("sparsegpt", "wanda", "magnitude"))
        assert sgpt < 0.8 * wanda and sgpt < 0.8 * mag, errors
        assert wanda < mag, errors


# ----------------------------------------------------------------------------------------- dtypes and interplay
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", fastdistill.prune.METHODS)
def test_exact_2_4_dtype_kept_and_into_masks_and_sparsify(dtype, method):
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 12)).to(dtype)
    batches = [correlated_inputs(30, 24, dtype) for _ in range(3)]
    calib = fastdistill.calibrate(model, batches)
    for s in calib.stats.values():
        assert s.gram.dtype == torch.float32 and s.sq_norms.dtype == torch.float32
    masks = fastdistill.prune_2_4_(model, calib, method=method)
    assert sorted(masks) == ["0", "2"]
    pruned = {fqn: model.get_submodule(fqn).weight.detach().clone() for fqn in masks}
    for fqn, mask in masks.items():
        w = model.get_submodule(fqn).weight
        assert w.dtype == dtype and mask.dtype == torch.bool
        assert is_exactly_2_4(w, mask)

    handle = fastdistill.apply_2_4_masks(model)   # takes the pattern as it is and keeps it
    for mod, mask in handle.layers:
        fqn = next(f for f in masks if model.get_submodule(f) is mod)
        assert torch.equal(mod.weight.detach(), pruned[fqn])
        assert bool((mod.weight[mask] == pruned[fqn][mask]).all())
    handle.remove()
    x = batches[0]
    dense_out = model(x)
    fastdistill.sparsify_(model)
    assert all(isinstance(model[i], fastdistill.SparseLinear) for i in (0, 2))
    for i in (0, 2):
        assert torch.equal(model[i].to_dense(), pruned[str(i)])
    torch.testing.assert_close(model(x), dense_out, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)


# ----------------------------------------------------------------------------------------- sequential calibration
def test_sequential_calibration_uses_pruned_upstream_outputs():
    model = nn.Sequential(nn.Linear(16, 32, dtype=torch.float64), nn.Linear(32, 8, dtype=torch.float64))
    dense = [m.weight.detach().clone() for m in model]
    model2 = copy.deepcopy(model)
    batches = [correlated_inputs(40, 16) for _ in range(4)]
    x = torch.cat(batches)

    masks = fastdistill.prune_2_4_(model, fastdistill.calibrate(model, batches), method="sparsegpt")
    assert sorted(masks) == ["0", "1"]
    first, _ = ref_sparsegpt(dense[0], x.T @ x)
    torch.testing.assert_close(model[0].weight.detach(), first, rtol=1e-9, atol=1e-9)

    h_pruned = x @ first.T + model[0].bias.detach()
    h_dense = x @ dense[0].T + model[0].bias.detach()
    from_pruned, _ = ref_sparsegpt(dense[1], h_pruned.T @ h_pruned)
    from_dense, _ = ref_sparsegpt(dense[1], h_dense.T @ h_dense)
    assert float((from_pruned - from_dense).abs().max()) > 1e-3   # the test can tell the two apart
    torch.testing.assert_close(model[1].weight.detach(), from_pruned, rtol=1e-9, atol=1e-9)

    # sequential=False: every layer from the dense model's statistics
    fastdistill.prune_2_4_(model2, fastdistill.calibrate(model2, batches), method="sparsegpt", sequential=False)
    torch.testing.assert_close(model2[1].weight.detach(), from_dense, rtol=1e-9, atol=1e-9)


class QKBlock(nn.Module):
    """q and k read one input tensor; o reads their product; tail reads o's output."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o, self.tail = (nn.Linear(8, 8) for _ in range(4))
        self.tail_runs = 0

    def forward(self, x):
        y = self.o(self.q(x) * self.k(x))
        self.tail_runs += 1
        return self.tail(y)


def test_sequential_passes_group_shared_inputs_and_stop_early():
    model = QKBlock()
    forwards = []

    def forward(m, batch):
        forwards.append(1)
        return m(batch)

    batches = [torch.randn(5, 8) for _ in range(3)]
    calib = fastdistill.calibrate(model, batches, forward=forward)
    assert calib.groups == [["q", "k"], ["o"], ["tail"]]
    assert calib.calls_per_batch == {"q": 1, "k": 1, "o": 1, "tail": 1}
    x = torch.cat(batches)
    for fqn in ("q", "k"):   # one input, computed once, each layer's own accumulators
        torch.testing.assert_close(calib.stats[fqn].gram, x.T @ x)
        torch.testing.assert_close(calib.stats[fqn].sq_norms, x.square().sum(0))
    assert calib.stats["q"].gram is not calib.stats["k"].gram
    y = model.q(x) * model.k(x)
    torch.testing.assert_close(calib.stats["o"].gram, y.T.detach() @ y.detach())
    forwards.clear()
    model.tail_runs = 0
    tail_calls = []
    model.tail.register_forward_hook(lambda *a: tail_calls.append(1))
    fastdistill.prune_2_4_(model, calib, method="wanda")
    assert len(forwards) == 2 * len(batches)   # one pass for o, one for tail; q and k reuse calibrate's statistics
    assert model.tail_runs == len(batches)      # o's pass stopped before reaching the tail
    assert tail_calls == []                      # the tail's own pass stopped at its input


def test_calibrate_keeps_training_mode_and_skips_gram_when_asked():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    model.train()
    x = torch.randn(6, 8)
    calib = fastdistill.calibrate(model, [x], gram=False)
    assert model.training and model[1].training
    assert calib.stats["0"].gram is None
    h = model[0](x)
    torch.testing.assert_close(calib.stats["2"].sq_norms, h.detach().square().sum(0))  # dropout was off


@pytest.mark.cuda
@pytest.mark.parametrize("method", fastdistill.prune.METHODS)
def test_cuda_matches_cpu(method):
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16)).double()
    batches = [correlated_inputs(50, 64) for _ in range(3)]
    cpu, gpu = copy.deepcopy(model), copy.deepcopy(model).cuda()
    masks_cpu = fastdistill.prune_2_4_(cpu, fastdistill.calibrate(cpu, batches), method=method)
    calib_gpu = fastdistill.calibrate(gpu, [b.cuda() for b in batches])
    assert all(s.gram.is_cuda and s.sq_norms.is_cuda for s in calib_gpu.stats.values())
    masks_gpu = fastdistill.prune_2_4_(gpu, calib_gpu, method=method)
    for fqn in masks_cpu:
        assert torch.equal(masks_gpu[fqn].cpu(), masks_cpu[fqn])
        torch.testing.assert_close(gpu.get_submodule(fqn).weight.cpu(), cpu.get_submodule(fqn).weight,
                                   rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------- errors and skips
def test_errors_and_skip_warning():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 4), nn.Linear(12, 4))
    model.forward = lambda x: model[2](model[1](model[0](x)))   # layer 3 never runs
    batches = [torch.randn(4, 8)]
    calib = fastdistill.calibrate(model, batches)
    with pytest.raises(ValueError, match=r"fastdistill.prune_2_4_: method must be one of 'magnitude', 'wanda', "
                                         r"'sparsegpt', got 'obs'"):
        fastdistill.prune_2_4_(model, calib, method="obs")
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match=rf"fastdistill.prune_2_4_: method '{method}' needs a calibration"):
            fastdistill.prune_2_4_(model, method=method)
    with pytest.raises(ValueError, match=r"needs the input Gram matrices; this calibration was made with gram=False"):
        fastdistill.prune_2_4_(model, fastdistill.calibrate(model, batches, gram=False), method="sparsegpt")
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"fastdistill.prune_2_4_: the calibration has no statistics for 2 layer\(s\): "
                                         r"1, 2 \(was it made for another model"):
        fastdistill.prune_2_4_(other, fastdistill.calibrate(nn.Sequential(nn.Linear(8, 8)), batches))
    with pytest.raises(ValueError, match=r"block_size must be a positive multiple of 4, got 6"):
        fastdistill.prune_2_4_(model, calib, block_size=6)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        masks = fastdistill.prune_2_4_(model, calib, filter_fn=lambda m, fqn: fqn != "3")
    assert sorted(masks) == ["0", "1"]
    assert len(rec) == 1
    assert str(rec[0].message) == "fastdistill.prune_2_4_: left 1 layer(s) unpruned: 2 (K=6 is not a multiple of 4)"
    with pytest.raises(ValueError, match=r"no statistics for 1 layer\(s\): 3 \(.*did the forward never reach them"):
        fastdistill.prune_2_4_(model, calib)
    # magnitude needs no calibration and names the same skip
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) unpruned: 2 \(K=6"):
        assert sorted(fastdistill.prune_2_4_(model, method="magnitude", filter_fn=lambda m, f: f != "3")) == ["0", "1"]
