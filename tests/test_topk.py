"""fastdistill.TeacherTopK: record a teacher's top-k over a dataset once, read it back by sample, feed kd_loss."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import TeacherTopK, kd_loss
from fastdistill.topk import index_dtype_for

import safetensors  # noqa: E402,F401  (TeacherTopK writes safetensors; the test extra installs it)


class TinyLM(torch.nn.Module):
    """A causal-LM-shaped teacher: token ids [B, L] -> logits [B, L, V]."""

    def __init__(self, vocab, width=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids)))) * 3


def dataset(vocab, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g) for _ in range(n)]


@pytest.mark.parametrize("vocab,k", [(50, 8), (300, 16), (40000, 4)])
@pytest.mark.parametrize("logprob_dtype", [torch.float16, torch.bfloat16])
def test_record_and_read_back(tmp_path, vocab, k, logprob_dtype):
    torch.manual_seed(0)
    model, data = TinyLM(vocab), dataset(vocab)
    path = str(tmp_path / "cache")
    cache = TeacherTopK.record(path, model, data, k=k, temperature=2.0, logprob_dtype=logprob_dtype,
                               tokenizer="tiny-test", shard_tokens=20)  # several shards
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["k"] == k and manifest["temperature"] == 2.0 and manifest["vocab_size"] == vocab
    assert manifest["tokenizer"] == "tiny-test" and len(manifest["shards"]) > 1
    assert len(cache) == len(data)
    for i, ids in enumerate(data):
        idx, lp = cache[i]
        want_lp, want_idx = F.log_softmax(model(ids[None])[0].float() / 2.0, -1).topk(k, -1)
        assert idx.dtype == index_dtype_for(vocab) and lp.dtype == logprob_dtype
        assert torch.equal(idx.long(), want_idx)
        assert torch.equal(lp, want_lp.to(logprob_dtype))


def test_index_dtypes_are_the_smallest_that_hold_the_vocabulary():
    assert index_dtype_for(256) == torch.uint8 and index_dtype_for(257) == torch.int16
    assert index_dtype_for(32768) == torch.int16 and index_dtype_for(32769) == torch.uint16
    assert index_dtype_for(65536) == torch.uint16 and index_dtype_for(128256) == torch.int32


def test_cache_feeds_kd_loss_and_fused_linear(tmp_path):
    torch.manual_seed(0)
    vocab, k = 120, 10
    model, data = TinyLM(vocab), dataset(vocab, n=4)
    cache = TeacherTopK.record(str(tmp_path / "c"), model, data, k=k, temperature=1.5)
    idx, lp = cache.batch(range(4))
    lengths = [len(d) for d in data]
    assert idx.shape == (4, max(lengths), k)
    student = torch.randn(4, max(lengths), vocab, requires_grad=True)
    labels = torch.full((4, max(lengths)), -100)
    for i, d in enumerate(data):
        labels[i, :len(d) - 1] = d[1:]
    loss = kd_loss(student, teacher_topk=(idx, lp), temperature=1.5, labels=labels, hard_weight=0.5)
    loss.backward()
    # the same loss from each sample's own top-k (padded positions are ignored rows)
    total, rows = 0.0, 0
    for i, d in enumerate(data):
        n = len(d) - 1
        if n == 0:
            continue
        ri, rl = cache[i]
        per_row = kd_loss(student[i, :n].detach(), teacher_topk=(ri[:n], rl[:n]), temperature=1.5,
                          labels=labels[i, :n], hard_weight=0.5, reduction="sum")
        total, rows = total + per_row, rows + n
    torch.testing.assert_close(loss, total / rows)
    assert student.grad[labels == -100].abs().max() == 0
    h, w = torch.randn(4, max(lengths), 8), torch.randn(vocab, 8)
    fused = fastdistill.fused_linear_kd_loss(h, w, teacher_topk=(idx, lp), temperature=1.5, labels=labels)
    torch.testing.assert_close(fused, kd_loss(h @ w.T, teacher_topk=(idx, lp), temperature=1.5, labels=labels))


def test_bytes_per_token_against_dense_logits(tmp_path, capsys):
    vocab, k = 32000, 64
    cache = TeacherTopK.record(str(tmp_path / "c"), TinyLM(vocab, 4), dataset(vocab, n=2), k=k)
    stored = sum(os.path.getsize(os.path.join(cache.path, s["file"])) for s in cache.manifest["shards"])
    tokens = sum(s["num_tokens"] for s in cache.manifest["shards"])
    assert cache.bytes_per_token() == k * (2 + 2)  # int16 indices, fp16 log-probs
    assert stored / tokens < 1.1 * cache.bytes_per_token() + 1024 / tokens * 2
    with capsys.disabled():
        print(f"\nTeacherTopK k={k}, V={vocab}: {cache.bytes_per_token():.0f} B/token "
              f"({stored / tokens:.0f} on disk with headers) vs dense logits {2 * vocab} B/token bf16, "
              f"{4 * vocab} fp32")


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="^fastdistill.TeacherTopK: logprob_dtype must be"):
        TeacherTopK.writer(str(tmp_path / "a"), k=4, logprob_dtype=torch.float32)
    path = str(tmp_path / "b")
    TeacherTopK.record(path, TinyLM(20), dataset(20, n=1), k=4)
    with pytest.raises(FileExistsError, match="already holds a teacher cache"):
        TeacherTopK.writer(path, k=4)
    with pytest.raises(IndexError, match="sample 1 is outside \\[0, 1\\)"):
        TeacherTopK(path)[1]
    with TeacherTopK.writer(str(tmp_path / "c"), k=4) as w:
        w.add(torch.randn(3, 20))
        with pytest.raises(ValueError, match="same vocabulary"):
            w.add(torch.randn(3, 21))


def test_vocabulary_smaller_than_k_pads_with_unused_slots(tmp_path):
    cache = TeacherTopK.record(str(tmp_path / "c"), TinyLM(5), dataset(5, n=2), k=8)
    idx, lp = cache[0]
    assert idx.shape[-1] == 8 and torch.isinf(lp[:, 5:]).all() and torch.isfinite(lp[:, :5]).all()
