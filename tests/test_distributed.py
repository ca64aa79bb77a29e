"""Vocab-parallel distillation loss (fastdistill.distributed) on 2 and 3 gloo processes over loopback.

Every case runs inside one spawned group per world size (spawning is the slow part): each rank computes its shard's
loss and gradients, compares them with the unsharded op and the fp64 reference, and records the outcome per case;
the parametrized tests below read those outcomes. A case that raises records its error and the next case runs on
the same group, so bad-input cases also show that an error leaves the ranks in step (no rank waits in a collective).
"""
import datetime
import os
import socket
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastdistill
from fastdistill import distributed as vp
from fastdistill.isa import available_cpu_isas
from fastdistill.reference import kd_loss_reference

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
# labels: None; global labels over every shard with ignore_index -100 and a hard term at T = 2 (separate T = 1
# log-sum); the same at T = 1 with ignore_index = 0, a vocabulary column (local labels must not collide with it).
LABELS = ["none", "hard_T2", "hard_T1_ignore0"]
WORLDS = [2, 3]
VOCAB = 1271  # 636 + 635 over 2 ranks, 424 + 424 + 423 over 3: uneven shards
HIDDEN = 24


def logits(shape, dtype=torch.float32, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def err(x, ref):
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def labels_for(variant, lead, vocab, seed=5):
    """(kd_loss keywords, labels) for a LABELS variant: labels spread over the whole vocabulary (every shard)."""
    if variant == "none":
        return dict(temperature=2.0), None
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, vocab, lead, generator=g)
    ignore = -100 if variant == "hard_T2" else 0
    lab.view(-1)[::4] = ignore
    lab.view(-1)[1] = vocab - 1  # in the last shard
    temperature = 2.0 if variant == "hard_T2" else 1.0
    return dict(temperature=temperature, hard_weight=0.5, soft_weight=0.7, ignore_index=ignore), lab


# ------------------------------------------------------------------------------------------ checks (in the ranks)
def check_loss(out, ref, plain, floor=1e-5):
    scale = 1.0 + err(ref, 0)
    assert out.dtype == torch.float32 and out.shape == ref.shape, (out.dtype, out.shape, ref.shape)
    assert err(out, ref) <= 2 * err(plain, ref) + floor * scale, (err(out, ref), err(plain, ref))


def check_grad(g, g64, g32, grad_out, dtype, floor=1e-5):
    """test_kd_loss's rule: fp32 within 2x plain fp32's error plus a floor; 16-bit within one unit of its dtype
    per element on top of that."""
    base = 2 * (g32 - g64).abs().max().item() if g64.numel() else 0.0
    assert g.dtype == dtype and g.shape == g64.shape
    g = g.double()
    if dtype == torch.float32:
        assert err(g, g64) <= base + floor * (1.0 + err(g64, 0)), (err(g, g64), base / 2)
    else:
        info = torch.finfo(dtype)
        fp32_terms = 4 * torch.finfo(torch.float32).eps * max(err(g64, 0), err(grad_out, 0))
        excess = (g - g64).abs() - (info.eps * g64.abs() + info.eps * info.smallest_normal + base + fp32_terms)
        assert (excess <= 0).all(), (excess.max().item(), base / 2)


def kd_case(student, teacher, labels=None, **kw):
    """kd_loss(process_group=WORLD) on this rank's shards against the unsharded op and the fp64 reference."""
    group = dist.group.WORLD
    s_shard = vp.vocab_shard(student, group).clone().requires_grad_()
    t_shard = vp.vocab_shard(teacher, group)
    out = fastdistill.kd_loss(s_shard, t_shard, labels=labels, process_group=group, **kw)
    s64 = student.double().requires_grad_()
    ref = kd_loss_reference(s64, teacher.double(), labels=labels, **kw)
    s32 = student.float().requires_grad_()
    plain = kd_loss_reference(s32, teacher.float(), labels=labels, **kw)
    grad_out = torch.full_like(ref, 0.37) if ref.dim() == 0 else logits(ref.shape, torch.float64, 1.0, seed=9)
    for x, y in ((out, grad_out.float()), (ref, grad_out), (plain, grad_out.float())):
        x.backward(y)
    check_loss(out, ref, plain)
    check_grad(s_shard.grad, vp.vocab_shard(s64.grad, group), vp.vocab_shard(s32.grad.double(), group), grad_out,
               student.dtype)
    single = fastdistill.kd_loss(student, teacher, labels=labels, **kw)  # the unsharded op, same dtype
    assert torch.allclose(out, single, rtol=2e-5, atol=2e-5 * (1 + err(single, 0))), (out, single)
    # every rank holds the same loss
    gathered = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out.detach().contiguous())
    assert all(torch.equal(gathered[0], x) for x in gathered)


def fused_case(divergence, reduction, variant, teacher_form, bias, dtype=torch.float32, chunk_size=4):
    """fused_linear_kd_loss with sharded heads against the unsharded fused op and the fp64 reference; the hidden
    gradient summed over the ranks (what a tensor-parallel framework does) against the full one."""
    group = dist.group.WORLD
    rows_shape = (3, 5)
    kw, labels = labels_for(variant, rows_shape, VOCAB)
    kw.update(divergence=divergence, reduction=reduction, beta=0.3)
    h = logits((*rows_shape, HIDDEN), dtype, 1.0, seed=11)
    w = logits((VOCAB, HIDDEN), dtype, 0.5, seed=12)
    b = logits((VOCAB,), dtype, 1.0, seed=13) if bias else None
    th = logits((*rows_shape, HIDDEN + 8), dtype, 1.0, seed=14)
    tw = logits((VOCAB, HIDDEN + 8), dtype, 0.5, seed=15)
    tl = (F.linear(th.double(), tw.double())).to(dtype)

    def teacher(shard):
        if teacher_form == "hidden":
            return dict(teacher_hidden=th, teacher_weight=shard(tw, 0))
        return dict(teacher_logits=shard(tl, -1))

    hs, ws = h.clone().requires_grad_(), vp.vocab_shard(w, group, 0).clone().requires_grad_()
    bs = vp.vocab_shard(b, group, 0).clone().requires_grad_() if bias else None
    t_kw = teacher(lambda x, d: vp.vocab_shard(x, group, d))
    t_kw = {"teacher_hidden": t_kw.get("teacher_hidden"), "teacher_weight": t_kw.get("teacher_weight"),
            "teacher_logits": t_kw.get("teacher_logits")}
    out = fastdistill.fused_linear_kd_loss(hs, ws, t_kw["teacher_hidden"], t_kw["teacher_weight"],
                                           teacher_logits=t_kw["teacher_logits"], student_bias=bs, labels=labels,
                                           chunk_size=chunk_size, process_group=group, **kw)
    # fp64 and plain fp32 references through full logits
    leaves64 = [x.double().requires_grad_() if x is not None else None for x in (h, w, b)]
    leaves32 = [x.float().requires_grad_() if x is not None else None for x in (h, w, b)]
    t_full = F.linear(th.double(), tw.double()) if teacher_form == "hidden" else tl.double()
    ref = kd_loss_reference(F.linear(*leaves64), t_full, labels=labels, **kw)
    plain = kd_loss_reference(F.linear(*leaves32), t_full.float(), labels=labels, **kw)
    grad_out = torch.full_like(ref, 0.37) if ref.dim() == 0 else logits(ref.shape, torch.float64, 1.0, seed=9)
    for x, y in ((out, grad_out.float()), (ref, grad_out), (plain, grad_out.float())):
        x.backward(y)
    check_loss(out, ref, plain, floor=1e-5 if dtype == torch.float32 else 1e-4)
    gh = hs.grad.float().contiguous()
    dist.all_reduce(gh)  # the tensor-parallel framework's sum of the partial hidden gradients
    if dtype == torch.float32:
        check_grad(gh, leaves64[0].grad, leaves32[0].grad.double(), grad_out, dtype)
    else:  # each rank's partial was rounded to the dtype once: the sum carries up to one rounding per rank
        spread = hs.grad.float().abs()
        dist.all_reduce(spread)
        base = 2 * err(leaves32[0].grad, leaves64[0].grad)
        bound = torch.finfo(dtype).eps * (spread.double() + leaves64[0].grad.abs()) + base + 1e-6
        assert ((gh.double() - leaves64[0].grad).abs() <= bound).all(), err(gh, leaves64[0].grad)
    check_grad(ws.grad, vp.vocab_shard(leaves64[1].grad, group, 0), vp.vocab_shard(leaves32[1].grad.double(), group, 0),
               grad_out, dtype)
    if bias:
        check_grad(bs.grad, vp.vocab_shard(leaves64[2].grad, group, 0),
                   vp.vocab_shard(leaves32[2].grad.double(), group, 0), grad_out, dtype)
    full_t = teacher(lambda x, d: x)
    single = fastdistill.fused_linear_kd_loss(h, w, full_t.get("teacher_hidden"), full_t.get("teacher_weight"),
                                              teacher_logits=full_t.get("teacher_logits"), student_bias=b,
                                              labels=labels, chunk_size=chunk_size, **kw)
    assert torch.allclose(out, single, rtol=2e-5, atol=2e-5 * (1 + err(single, 0))), (out, single)


def expect_error(match, fn):
    try:
        fn()
    except ValueError as exc:
        assert match in str(exc) and str(exc).startswith("fastdistill."), str(exc)
        return
    raise AssertionError(f"no error (expected {match!r})")


def bad_input_cases(rank, world):
    """Inputs the ranks disagree on, or that do not add up: each a ValueError naming the op, on every rank."""
    group = dist.group.WORLD
    s, t = logits((4, 13)), logits((4, 13), seed=1)
    sh = lambda x: vp.vocab_shard(x, group)  # noqa: E731
    kd = fastdistill.kd_loss

    def uneven_rule():  # rank 0 one column short, the last rank one extra: the total adds up, the split does not
        widths = vp.shard_sizes(13, world)
        widths[0] -= 1
        widths[-1] += 1
        kd(s.tensor_split(torch.tensor(widths).cumsum(0)[:-1].tolist(), -1)[rank],
           t.tensor_split(torch.tensor(widths).cumsum(0)[:-1].tolist(), -1)[rank], process_group=group)

    def student_teacher_widths():
        kd(sh(s), sh(t)[:, :-1] if rank == world - 1 else sh(t), process_group=group)

    def row_counts():
        kd(sh(s)[: 3 if rank == 1 else 4], sh(t)[: 3 if rank == 1 else 4], process_group=group)

    def labels_out_of_range():
        kd(sh(s), sh(t), labels=torch.tensor([0, 3, 13, 1]), hard_weight=1.0, process_group=group)

    def one_rank_rejects():
        lab = torch.tensor([0, 3, 12, 1], dtype=torch.int32 if rank == 1 else torch.long)
        kd(sh(s), sh(t), labels=lab, hard_weight=1.0, process_group=group)

    def fused_teacher_widths():
        h, w, tw = logits((4, 6), seed=3), logits((13, 6), seed=4), logits((13, 6), seed=5)
        tws = vp.vocab_shard(tw, group, 0)
        fastdistill.fused_linear_kd_loss(h, vp.vocab_shard(w, group, 0), h, tws[:-1] if rank == 0 else tws,
                                         process_group=group)

    def fused_too_few_columns():  # 2 columns over 3 ranks (or 1 over 2): a rank with none
        h, w = logits((4, 6), seed=3), logits((world - 1, 6), seed=4)
        fastdistill.fused_linear_kd_loss(h, vp.vocab_shard(w, group, 0), h, vp.vocab_shard(w, group, 0),
                                         process_group=group)

    return {
        "uneven_rule": ("not torch.tensor_split's split of 13 columns", uneven_rule),
        "student_teacher_widths": ("student and teacher vocabulary shards differ in width", student_teacher_widths),
        "row_counts": ("disagree on the number of rows", row_counts),
        "labels_out_of_range": ("labels must be global vocabulary indices in [0, 13)", labels_out_of_range),
        "one_rank_rejects": ("fastdistill.kd_loss: ", one_rank_rejects),
        "fused_teacher_widths": ("fastdistill.fused_linear_kd_loss: student and teacher vocabulary shards differ",
                                 fused_teacher_widths),
        "fused_too_few_columns": ("every rank needs at least one column", fused_too_few_columns),
    }


def all_cases(rank, world):
    """case id -> a function that raises AssertionError (or anything else) if the case fails."""
    cases = {}
    lead = (5, 3)
    for div in DIVERGENCES:
        for red in REDUCTIONS:
            for variant in LABELS:
                kw, lab = labels_for(variant, lead, VOCAB)
                cases[f"kd-{div}-{red}-{variant}"] = (
                    lambda div=div, red=red, kw=kw, lab=lab: kd_case(
                        logits((*lead, VOCAB), seed=1), logits((*lead, VOCAB), seed=2), lab, divergence=div,
                        reduction=red, beta=0.3, **kw))
    for dtype in (torch.bfloat16, torch.float16):
        for div in DIVERGENCES:
            kw, lab = labels_for("hard_T2", (9,), VOCAB)
            cases[f"kd-{div}-{dtype}"] = (lambda div=div, dtype=dtype, kw=kw, lab=lab: kd_case(
                logits((9, VOCAB), dtype, seed=1), logits((9, VOCAB), dtype, seed=2), lab, divergence=div, **kw))
    for div in DIVERGENCES:
        # few long rows: the kernels split each shard's rows into column chunks (more than 32768 columns per rank)
        cases[f"kd-{div}-long_rows"] = (lambda div=div: kd_case(
            logits((3, 32769 * world + 1), seed=1), logits((3, 32769 * world + 1), seed=2), divergence=div,
            temperature=1.5))
        # peaked rows whose argmax sits in one shard: the centre of the log ratio must come from that rank
        cases[f"kd-{div}-peaked"] = (lambda div=div: kd_case(
            logits((6, VOCAB), scale=3e3, seed=3), logits((6, VOCAB), scale=3e3, seed=4), divergence=div,
            temperature=0.5))

        def masked(div=div):  # masked columns; a row whose first shard is masked entirely on both sides, and one
            s, t = logits((4, VOCAB), seed=1), logits((4, VOCAB), seed=2)  # where only the primary side is
            first = VOCAB // world
            for x in (s, t):
                x[:, ::3] = float("-inf")
                x[0, :first] = float("-inf")
            (t if div == "forward_kl" else s)[1, :first] = float("-inf")
            kd_case(s, t, divergence=div, temperature=2.0)
        cases[f"kd-{div}-masked"] = masked
    cases["kd-empty"] = lambda: kd_case(logits((0, VOCAB), seed=1), logits((0, VOCAB), seed=2))
    cases["kd-jsd-beta0-is-forward-kl"] = lambda: kd_case(logits((4, VOCAB), seed=1), logits((4, VOCAB), seed=2),
                                                          divergence="jsd", beta=0.0, temperature=2.0)
    cases["kd-module"] = lambda: module_case()
    for isa in available_cpu_isas():
        for div in DIVERGENCES:
            def on_isa(isa=isa, div=div):
                kw, lab = labels_for("hard_T2", (7,), VOCAB)
                with fastdistill.cpu_isa(isa):
                    kd_case(logits((7, VOCAB), seed=1), logits((7, VOCAB), seed=2), lab, divergence=div, **kw)
            cases[f"kd-{div}-isa-{isa}"] = on_isa
    cases["kd-bytes-per-row"] = lambda: bytes_case(world)
    for div in DIVERGENCES:
        for red in ("batchmean", "none"):
            for variant in ("none", "hard_T2"):
                for form in ("hidden", "logits"):
                    cases[f"fused-{div}-{red}-{variant}-{form}"] = (
                        lambda div=div, red=red, variant=variant, form=form: fused_case(
                            div, red, variant, form, bias=form == "hidden"))
    cases["fused-forward_kl-sum-hard_T1_ignore0-hidden"] = lambda: fused_case(
        "forward_kl", "sum", "hard_T1_ignore0", "hidden", bias=True, chunk_size=64)
    cases["fused-jsd-bf16"] = lambda: fused_case("jsd", "batchmean", "hard_T2", "hidden", bias=True,
                                                 dtype=torch.bfloat16)
    for name, (match, fn) in bad_input_cases(rank, world).items():
        cases[f"bad-{name}"] = lambda match=match, fn=fn: expect_error(match, fn)
    return cases


def module_case():
    group = dist.group.WORLD
    s, t = logits((6, VOCAB), seed=1), logits((6, VOCAB), seed=2)
    crit = fastdistill.KDLoss(temperature=2.0, divergence="reverse_kl", process_group=group)
    got = crit(vp.vocab_shard(s, group), vp.vocab_shard(t, group))
    want = fastdistill.kd_loss(s, t, temperature=2.0, divergence="reverse_kl")
    assert torch.allclose(got, want, rtol=2e-5), (got, want)
    fcrit = fastdistill.FusedLinearKDLoss(temperature=2.0, process_group=group)
    h, w, tw = logits((6, 8), seed=3), logits((VOCAB, 8), seed=4), logits((VOCAB, 8), seed=5)
    got = fcrit(h, vp.vocab_shard(w, group, 0), h, vp.vocab_shard(tw, group, 0))
    want = fastdistill.fused_linear_kd_loss(h, w, h, tw, temperature=2.0)
    assert torch.allclose(got, want, rtol=2e-5), (got, want)


def bytes_case(world):
    """What goes over the wire: the shard check's 7 int64, then per row 2 int64 maxima keys (one carrying the centre)
    and 3 fp32 sums (forward KL without labels); JSD sums 2 and then its 2 second-pass sums, and a hard term at T != 1
    adds the T = 1 sum and the label's logit."""
    group = dist.group.WORLD
    rows = 10
    s, t = logits((rows, VOCAB), seed=1), logits((rows, VOCAB), seed=2)
    sh = lambda x: vp.vocab_shard(x, group)  # noqa: E731
    before = vp.communicated_bytes()
    fastdistill.kd_loss(sh(s), sh(t), process_group=group)
    assert vp.communicated_bytes() - before == 7 * 8 + rows * (16 + 12), vp.communicated_bytes() - before
    kw, lab = labels_for("hard_T2", (rows,), VOCAB)
    before = vp.communicated_bytes()
    fastdistill.kd_loss(sh(s), sh(t), labels=lab, divergence="jsd", process_group=group, **kw)
    assert vp.communicated_bytes() - before == 7 * 8 + rows * (16 + 16 + 8), vp.communicated_bytes() - before


# ---------------------------------------------------------------------------------------- the spawned group
def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, fn in all_cases(rank, world).items():
            try:
                start = time.perf_counter()
                fn()
                results[name] = None
                if os.environ.get("FASTDISTILL_TEST_TIMES"):
                    print(f"{name}: {time.perf_counter() - start:.2f}", flush=True)
            except Exception:  # noqa: BLE001 - recorded for the test that reads this case
                results[name] = traceback.format_exc()
            dist.barrier()  # keeps the ranks in step between cases; hangs (and then times out) if a case desynced
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RESULTS = {}


def _results(world):
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as out_dir:
            mp.start_processes(_worker, args=(world, _free_port(), out_dir), nprocs=world, start_method="spawn")
            _RESULTS[world] = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    return _RESULTS[world]


@pytest.mark.parametrize("world,case", [(w, c) for w in WORLDS for c in all_cases(0, w)],
                         ids=lambda x: str(x))
def test_vocab_parallel(world, case):
    per_rank = _results(world)
    failures = [f"rank {r}:\n{res[case]}" for r, res in enumerate(per_rank) if res[case] is not None]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------- one process
def test_shard_sizes_are_tensor_split():
    for vocab in (1, 2, 7, 1271, 32000):
        for world in (1, 2, 3, 8):
            want = [x.numel() for x in torch.arange(vocab).tensor_split(world)]
            assert vp.shard_sizes(vocab, world) == want


def test_shard_ops_opcheck():
    s, t = logits((5, 37)), logits((5, 37), seed=1)
    lab = torch.tensor([0, 5, -100, 36, 2])
    for div in DIVERGENCES:
        torch.library.opcheck(torch.ops.fastdistill.kd_loss_partial, (s, t, lab, 2.0, div, 0.3, -100, 4.0, 0.5))
    _, stats = torch.ops.fastdistill.kd_loss_forward(s, t, None, 2.0, "jsd", 0.3, -100, 4.0, 0.0)
    torch.library.opcheck(torch.ops.fastdistill.kd_loss_jsd_sums, (s, t, stats, 2.0, 0.3))


def test_partial_state_of_the_whole_row_finishes_as_the_forward():
    """One shard holding the whole vocabulary: the partial state's log-sums are the forward's statistics."""
    s, t = logits((6, 300)), logits((6, 300), seed=1)
    part = torch.ops.fastdistill.kd_loss_partial(s, t, None, 2.0, "forward_kl", 0.5, -100, 4.0, 0.0)
    _, stats = torch.ops.fastdistill.kd_loss_forward(s, t, None, 2.0, "forward_kl", 0.5, -100, 4.0, 0.0)
    assert torch.equal(part[:, 0], stats[:, 2]) and torch.equal(part[:, 2], stats[:, 0])
    torch.testing.assert_close(part[:, 1].log(), stats[:, 3], rtol=0, atol=1e-6)
    torch.testing.assert_close(part[:, 3].log(), stats[:, 1], rtol=0, atol=1e-6)


def test_jsd_sums_rejects_bad_stats():
    s, t = logits((5, 37)), logits((5, 37), seed=1)
    with pytest.raises(RuntimeError, match="fastdistill.kd_loss_jsd_sums: stats must be float32 \\[5, 8\\]"):
        torch.ops.fastdistill.kd_loss_jsd_sums(s, t, torch.zeros(4, 8), 2.0, 0.3)
