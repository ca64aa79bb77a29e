"""recover(): distilling a pruned model from its dense original with the prune_2_4_ masks kept, for the three
objectives (embeddings, logits, a causal LM's hidden states + lm_head), its loss against a plain-PyTorch fp64
formula, and apply_2_4_masks(masks=...)."""
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdistill
from fastdistill.recover import embedding_loss, hidden_state_loss, similarity_logits


def raises(op, message):
    return pytest.raises(ValueError, match=rf"^fastdistill\.{re.escape(op)}: {message}")


def mlp(out=16):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(24, 48), nn.GELU(), nn.Linear(48, 32), nn.GELU(), nn.Linear(32, out))


def pruned_copy(dense, batches, method="sparsegpt"):
    student = copy.deepcopy(dense)
    calib = fastdistill.calibrate(student, batches)
    masks = fastdistill.prune_2_4_(student, calib, method=method)
    return student, masks


def held_out_cosine(student, teacher, x):
    with torch.no_grad():
        return F.cosine_similarity(student(x), teacher(x), dim=-1).mean().item()


def embedding_loss_fp64(s, t, temperature, similarity_weight):
    """The objective in plain fp64 PyTorch: the mean 1 - cosine plus the weighted KL(p || q) of the in-batch
    similarity rows (diagonal excluded), summed over the row's entries and averaged over rows."""
    s, t = s.double(), t.double()

    def rows(e):
        e = e / e.norm(dim=-1, keepdim=True)
        sim = (e @ e.T) / temperature
        off = ~torch.eye(len(e), dtype=torch.bool)
        return sim[off].reshape(len(e), len(e) - 1)

    p, log_q = F.softmax(rows(t), -1), F.log_softmax(rows(s), -1)
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    cos = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
    return (1 - cos).mean() + similarity_weight * kl


@pytest.mark.parametrize("rows", [3, 7, 32])
def test_embedding_loss_matches_fp64_formula(rows):
    s, t = torch.randn(rows, 20), torch.randn(rows, 20)
    s.requires_grad_()
    loss = embedding_loss(s, t, temperature=0.05, similarity_weight=0.7)
    ref_s = s.detach().double().requires_grad_()
    ref = embedding_loss_fp64(ref_s, t, 0.05, 0.7)
    # fp32 against fp64: a few fp32 roundings of terms of size ~ |sim| / T
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    grad_out = torch.tensor(0.37)
    (loss * grad_out).backward()
    (ref * grad_out.double()).backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-6)


def test_similarity_logits_and_small_batches():
    e = torch.randn(4, 8)
    sim = similarity_logits(e)
    assert torch.isinf(sim.diagonal()).all() and (sim.diagonal() < 0).all()
    n = F.normalize(e, dim=-1)
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(sim[off], (n @ n.T)[off])
    # one or two rows: only the cosine term (a similarity row would have one entry or none)
    for b in (1, 2):
        s, t = torch.randn(b, 8), torch.randn(b, 8)
        torch.testing.assert_close(embedding_loss(s, t, similarity_weight=2.0),
                                   (1 - F.cosine_similarity(s, t, dim=-1)).mean())


def test_recover_embeddings_keeps_masks_and_gets_closer():
    dense = mlp()
    batches = [torch.randn(32, 24) for _ in range(8)]
    student, masks = pruned_copy(dense, batches, method="magnitude")
    held_out = torch.randn(256, 24)
    before = held_out_cosine(student, dense, held_out)
    teacher_state = copy.deepcopy(dense.state_dict())
    losses = fastdistill.recover(student, dense, batches, masks, steps=60, lr=3e-3, progress=False)
    after = held_out_cosine(student, dense, held_out)
    assert len(losses) == 60 and sum(losses[-5:]) < sum(losses[:5])
    assert after > before + 0.5 * (1 - before), (before, after)
    for fqn, mask in masks.items():
        w = student.get_submodule(fqn).weight
        assert bool((w[~mask] == 0).all())
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in teacher_state.items())   # the teacher is untouched
    assert not any(p.grad is not None for p in dense.parameters())
    assert fastdistill.sparsify_(student) is student


def test_hidden_state_loss_matches_fp64_formula():
    s, t = torch.randn(37, 24, requires_grad=True), 3 * torch.randn(37, 24)
    loss = hidden_state_loss(s, t)
    ref_s = s.detach().double().requires_grad_()
    ref = ((ref_s - t.double()) ** 2).sum() / (t.double() ** 2).sum()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    (loss * 0.37).backward()
    (ref * 0.37).backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-8)


def test_recover_hidden_states_and_cosine_schedule():
    """Matching the hidden layers adds hidden_weight x their mean hidden_state_loss to the first step's loss
    (padding rows of a dict batch left out), and the cosine schedule's lr warms up and decays to 0."""
    dense = mlp()
    x = torch.randn(8, 5, 24)
    mask = torch.ones(8, 5, dtype=torch.long)
    mask[:, 3:] = 0
    batch = {"x": x, "attention_mask": mask}
    forward = lambda m, b: m(b["x"]).mean(1)  # noqa: E731
    student, masks = pruned_copy(dense, [x], method="magnitude")
    pairs = {"1": "1", "3": "3"}
    with torch.no_grad():
        keep = mask.bool()
        base = embedding_loss(forward(student, batch), forward(dense, batch))
        hidden = sum(hidden_state_loss(student[:i + 1](x)[keep], dense[:i + 1](x)[keep]) for i in (1, 3)) / 2
    first = fastdistill.recover(copy.deepcopy(student), dense, [batch], masks, steps=1, forward=forward,
                                hidden_states=pairs, hidden_weight=0.5, progress=False)[0]
    assert first == pytest.approx(float(base + 0.5 * hidden), rel=1e-5)
    off = fastdistill.recover(copy.deepcopy(student), dense, [batch], masks, steps=1, forward=forward,
                              hidden_states=pairs, hidden_weight=0.0, progress=False)[0]
    assert off == pytest.approx(float(base), rel=1e-5)
    lrs = []
    orig_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return orig_step(self, *a, **k)

    torch.optim.AdamW.step = step
    try:
        fastdistill.recover(student, dense, [batch], masks, steps=40, forward=forward, lr=1e-3, schedule="cosine",
                            progress=False)
    finally:
        torch.optim.AdamW.step = orig_step
    assert lrs[0] == pytest.approx(0.5e-3) and lrs[1] == pytest.approx(1e-3)   # 2 warm-up steps (5% of 40)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 1e-5
    for fqn, m in masks.items():
        assert bool((student.get_submodule(fqn).weight[~m] == 0).all())


def test_recover_logits_objective_is_kd_loss():
    dense = mlp(out=10)
    batches = [torch.randn(16, 24) for _ in range(4)]
    student, masks = pruned_copy(dense, batches)
    probe = copy.deepcopy(student)
    losses = fastdistill.recover(student, dense, batches, masks, steps=1, objective="logits", temperature=3.0,
                                 progress=False)
    with torch.no_grad():
        expected = fastdistill.kd_loss(probe(batches[0]), dense(batches[0]), temperature=3.0)
    assert losses[0] == pytest.approx(float(expected), rel=1e-6)
    many = fastdistill.recover(student, dense, batches, masks, steps=40, objective="logits", lr=2e-3,
                               progress=False)
    assert sum(many[-4:]) < sum(many[:4])


class TinyCausalLM(nn.Module):
    """The transformers causal-LM convention recover() relies on: get_output_embeddings() is the lm_head."""

    def __init__(self, vocab=50, hidden=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, 64), nn.GELU(), nn.Linear(64, hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def hidden(self, batch):
        return self.body(self.embed(batch["input_ids"]))


def test_recover_causal_lm_uses_hidden_states_and_heads_skipping_padding():
    torch.manual_seed(5)
    dense = TinyCausalLM()
    ids = torch.randint(0, 50, (4, 9))
    attention = torch.ones(4, 9, dtype=torch.long)
    attention[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": attention}
    student = copy.deepcopy(dense)
    masks = fastdistill.prune_2_4_(student, method="magnitude", filter_fn=lambda m, fqn: fqn.startswith("body"))
    probe = copy.deepcopy(student)
    forward = lambda model, b: model.hidden(b)   # noqa: E731
    losses = fastdistill.recover(student, dense, [batch], masks, steps=1, objective="causal_lm", forward=forward,
                                 progress=False)
    with torch.no_grad():
        keep = attention.bool()
        expected = fastdistill.kd_loss(probe.lm_head(probe.hidden(batch))[keep], dense.lm_head(dense.hidden(batch))[keep])
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
    more = fastdistill.recover(student, dense, [batch], masks, steps=30, objective="causal_lm", forward=forward,
                               lr=3e-3, progress=False)
    assert more[-1] < more[0]
    for fqn, mask in masks.items():
        assert bool((student.get_submodule(fqn).weight[~mask] == 0).all())


def test_apply_2_4_masks_with_given_masks():
    model = mlp()
    masks = fastdistill.prune_2_4_(model, method="magnitude", filter_fn=lambda m, fqn: fqn == "2")
    # a kept weight that is 0 stays in the mask (magnitude re-pruning could have moved it)
    w = model[2].weight
    r, c = torch.nonzero(masks["2"])[0].tolist()
    with torch.no_grad():
        w[r, c] = 0
    handle = fastdistill.apply_2_4_masks(model, masks=masks)
    assert [m for m, _ in handle.layers] == [model[2]] and torch.equal(handle.layers[0][1], masks["2"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 24)).square().sum().backward()
    opt.step()
    handle.remove()
    assert bool((w[~masks["2"]] == 0).all()) and w[r, c] != 0
    assert bool((model[0].weight != 0).all())   # not named in masks: untouched


def test_errors():
    dense = mlp()
    batches = [torch.randn(8, 24)]
    student, masks = pruned_copy(dense, batches, method="magnitude")
    with raises("recover", "objective must be one of 'embedding', 'logits', 'causal_lm', got 'mse'"):
        fastdistill.recover(student, dense, batches, masks, steps=1, objective="mse")
    with raises("recover", "steps must be an int >= 0, got -1"):
        fastdistill.recover(student, dense, batches, masks, steps=-1)
    with raises("recover", "the student must be a copy, not the teacher itself"):
        fastdistill.recover(dense, dense, batches, masks, steps=1)
    with raises("recover", "no batches"):
        fastdistill.recover(student, dense, [], masks, steps=1)
    with raises("recover", "temperature must be > 0, got 0.0"):
        fastdistill.recover(student, dense, batches, masks, steps=1, temperature=0)
    with raises("recover", "lr must be > 0, got 0"):
        fastdistill.recover(student, dense, batches, masks, steps=1, lr=0)
    with raises("recover", "similarity_weight must be >= 0, got -1"):
        fastdistill.recover(student, dense, batches, masks, steps=1, similarity_weight=-1)
    with raises("recover", "hidden_weight must be >= 0, got -1"):
        fastdistill.recover(student, dense, batches, masks, steps=1, hidden_weight=-1)
    with raises("recover", "schedule must be one of 'constant', 'cosine', got 'step'"):
        fastdistill.recover(student, dense, batches, masks, steps=1, schedule="step")
    with raises("recover", "hidden_states names a module the teacher does not have"):
        fastdistill.recover(student, dense, batches, masks, steps=1, hidden_states={"1": "9"})
    with raises("recover", "objective 'causal_lm' needs model.get_output_embeddings"):
        fastdistill.recover(student, dense, batches, masks, steps=1, objective="causal_lm")
    with raises("apply_2_4_masks", "masks names 'nope', which is not a module of the model"):
        fastdistill.apply_2_4_masks(student, masks={"nope": masks["0"]})
    with raises("apply_2_4_masks", r"masks\['0'\] must be a bool mask of an nn.Linear's weight shape"):
        fastdistill.apply_2_4_masks(student, masks={"0": masks["2"]})
    with raises("apply_2_4_masks", "masks= keeps fixed masks"):
        fastdistill.apply_2_4_masks(student, sr_ste_decay=1e-4, masks=masks)
