"""An offline teacher: its top-k log-probabilities over a dataset, written once and read back by sample.

Layout of a cache directory: ``manifest.json`` (k, temperature, vocabulary size, tokenizer name when known, dtypes,
the shards) and shards ``shard-NNNNN.safetensors``, each holding the samples [first, first + n) concatenated:
``indices`` [tokens, k] in the smallest integer dtype that holds V - 1, ``logprobs`` [tokens, k] in fp16 or bf16
(the teacher's log-probabilities at the temperature), and ``offsets`` [n + 1] int64 (sample i's tokens are rows
offsets[i] : offsets[i + 1]). What a read returns goes straight into kd_loss / fused_linear_kd_loss's teacher_topk.
"""
import json
import os
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor

FORMAT = "fastdistill.teacher_topk"
VERSION = 1
MANIFEST = "manifest.json"
_LOGPROB_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_OP = "fastdistill.TeacherTopK"


def index_dtype_for(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every index of a vocabulary of `vocab_size` tokens."""
    for dtype in (torch.uint8, torch.int16, torch.uint16, torch.int32):
        if vocab_size - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(f"{_OP} needs the safetensors package (pip install safetensors)") from exc
    return safetensors


def _logits_of(output) -> Tensor:
    """A model's logits, whether it returns them or an object (a transformers ModelOutput) that holds them."""
    return output if isinstance(output, Tensor) else output.logits


class TeacherTopK:
    """A recorded top-k teacher, opened read-only: ``cache[i]`` is sample i's (indices [tokens, k],
    logprobs [tokens, k]); ``cache.batch(ids)`` pads samples to one length with unused (-inf) slots."""

    def __init__(self, path: str):
        self.path = path
        with open(os.path.join(path, MANIFEST)) as f:
            self.manifest = json.load(f)
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise ValueError(f"{_OP}: {path} is not a version-{VERSION} teacher cache (manifest format "
                             f"{self.manifest.get('format')!r}, version {self.manifest.get('version')!r})")
        self.k = int(self.manifest["k"])
        self.temperature = float(self.manifest["temperature"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self.tokenizer = self.manifest.get("tokenizer")
        self._shards = self.manifest["shards"]
        self._open = {}

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def _shard(self, sample: int):
        if not 0 <= sample < len(self):
            raise IndexError(f"{_OP}: sample {sample} is outside [0, {len(self)})")
        for s, shard in enumerate(self._shards):
            if shard["first_sample"] <= sample < shard["first_sample"] + shard["num_samples"]:
                if s not in self._open:
                    self._open[s] = _safetensors().torch.load_file(os.path.join(self.path, shard["file"]))
                return self._open[s], sample - shard["first_sample"]
        raise IndexError(f"{_OP}: no shard holds sample {sample} (manifest of {self.path} is inconsistent)")

    def __getitem__(self, sample: int) -> Tuple[Tensor, Tensor]:
        tensors, local = self._shard(int(sample))
        a, b = tensors["offsets"][local].item(), tensors["offsets"][local + 1].item()
        return tensors["indices"][a:b], tensors["logprobs"][a:b]

    def batch(self, samples: Iterable[int], length: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """(indices [B, L, k] int32, logprobs [B, L, k]) of `samples`, each padded to L (default: the longest) with
        unused slots: logprob -inf, index 0. Padded positions have no soft term in kd_loss."""
        rows = [self[s] for s in samples]
        length = max((r[0].shape[0] for r in rows), default=0) if length is None else int(length)
        idx = torch.zeros((len(rows), length, self.k), dtype=torch.int32)
        lp = torch.full((len(rows), length, self.k), float("-inf"), dtype=_LOGPROB_DTYPES[self.manifest["logprob_dtype"]])
        for i, (ri, rl) in enumerate(rows):
            n = min(length, ri.shape[0])
            idx[i, :n] = ri[:n].to(torch.int32)
            lp[i, :n] = rl[:n]
        return idx, lp

    def bytes_per_token(self) -> float:
        """Stored bytes per token of the top-k tensors (shard headers and offsets aside)."""
        idx_bytes = torch.empty((), dtype=getattr(torch, self.manifest["index_dtype"])).element_size()
        return self.k * (idx_bytes + 2)

    @staticmethod
    def writer(path: str, *, k: int, temperature: float = 1.0, logprob_dtype: torch.dtype = torch.float16,
               tokenizer: Optional[str] = None, shard_tokens: int = 1 << 20) -> "TeacherTopKWriter":
        return TeacherTopKWriter(path, k=k, temperature=temperature, logprob_dtype=logprob_dtype,
                                 tokenizer=tokenizer, shard_tokens=shard_tokens)

    @classmethod
    @torch.no_grad()
    def record(cls, path: str, model, samples: Iterable[Tensor], *, k: int, temperature: float = 1.0,
               logprob_dtype: torch.dtype = torch.float16, tokenizer: Optional[str] = None,
               shard_tokens: int = 1 << 20) -> "TeacherTopK":
        """Runs `model` (anything whose output is logits [..., tokens, V] or has .logits, e.g. a transformers causal
        LM) on each sample (token ids [tokens], or a batch [B, tokens] of B samples) and records its top-k."""
        with cls.writer(path, k=k, temperature=temperature, logprob_dtype=logprob_dtype, tokenizer=tokenizer,
                        shard_tokens=shard_tokens) as w:
            for ids in samples:
                batch = ids if ids.dim() == 2 else ids.unsqueeze(0)
                logits = _logits_of(model(batch))
                for row in logits:
                    w.add(row)
        return cls(path)


class TeacherTopKWriter:
    """Appends samples (their teacher logits [tokens, V]) to a new cache; a context manager that writes the last
    shard and the manifest on exit."""

    def __init__(self, path: str, *, k: int, temperature: float, logprob_dtype: torch.dtype, tokenizer: Optional[str],
                 shard_tokens: int):
        if logprob_dtype not in _LOGPROB_DTYPES.values():
            raise ValueError(f"{_OP}: logprob_dtype must be torch.float16 or torch.bfloat16, got {logprob_dtype}")
        if k < 1 or not (temperature > 0):
            raise ValueError(f"{_OP}: k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        if os.path.exists(os.path.join(path, MANIFEST)):
            raise FileExistsError(f"{_OP}: {path} already holds a teacher cache")
        os.makedirs(path, exist_ok=True)
        self.path, self.k, self.temperature = path, int(k), float(temperature)
        self.logprob_dtype, self.tokenizer, self.shard_tokens = logprob_dtype, tokenizer, int(shard_tokens)
        self.vocab_size = None
        self._pending: List[Tuple[Tensor, Tensor]] = []
        self._pending_tokens = 0
        self._shards = []
        self._samples = 0

    def add(self, logits: Tensor) -> None:
        """One sample's teacher logits [tokens, V]: its top-k log-probabilities at the temperature are kept."""
        if logits.dim() != 2:
            raise ValueError(f"{_OP}: a sample's logits must be [tokens, V], got {list(logits.shape)}")
        if self.vocab_size is None:
            self.vocab_size = logits.shape[-1]
        elif logits.shape[-1] != self.vocab_size:
            raise ValueError(f"{_OP}: every sample must have the same vocabulary, got {logits.shape[-1]} after "
                             f"{self.vocab_size}")
        k = min(self.k, self.vocab_size)
        lp, idx = torch.log_softmax(logits.detach().float() / self.temperature, dim=-1).topk(k, dim=-1)
        if k < self.k:  # a vocabulary smaller than k: the missing slots are unused
            pad = self.k - k
            idx = torch.cat([idx, idx.new_zeros(idx.shape[0], pad)], -1)
            lp = torch.cat([lp, lp.new_full((lp.shape[0], pad), float("-inf"))], -1)
        self._pending.append((idx.cpu().to(index_dtype_for(self.vocab_size)), lp.cpu().to(self.logprob_dtype)))
        self._pending_tokens += idx.shape[0]
        self._samples += 1
        if self._pending_tokens >= self.shard_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        lengths = torch.tensor([0] + [i.shape[0] for i, _ in self._pending], dtype=torch.int64)
        name = f"shard-{len(self._shards):05d}.safetensors"
        tensors = {"indices": torch.cat([i for i, _ in self._pending]).contiguous(),
                   "logprobs": torch.cat([p for _, p in self._pending]).contiguous(),
                   "offsets": lengths.cumsum(0)}
        _safetensors().torch.save_file(tensors, os.path.join(self.path, name))
        first = self._shards[-1]["first_sample"] + self._shards[-1]["num_samples"] if self._shards else 0
        self._shards.append(dict(file=name, first_sample=first, num_samples=len(self._pending),
                                 num_tokens=int(lengths.sum())))
        self._pending, self._pending_tokens = [], 0

    def close(self) -> None:
        self._flush()
        if self.vocab_size is None:
            raise ValueError(f"{_OP}: no sample was added to {self.path}")
        manifest = dict(format=FORMAT, version=VERSION, k=self.k, temperature=self.temperature,
                        vocab_size=self.vocab_size, tokenizer=self.tokenizer,
                        index_dtype=str(index_dtype_for(self.vocab_size)).removeprefix("torch."),
                        logprob_dtype=str(self.logprob_dtype).removeprefix("torch."), num_samples=self._samples,
                        shards=self._shards)
        with open(os.path.join(self.path, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
