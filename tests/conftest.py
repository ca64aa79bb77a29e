import re

import pytest
import torch

import fastdistill
from fastdistill.isa import available_cpu_isas


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)


@pytest.fixture(params=available_cpu_isas())
def isa(request):
    """Runs the test once per CPU ISA path this machine can execute (avx512, avx2, scalar)."""
    with fastdistill.cpu_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 64, K of every Linear a multiple of 4) with a word-level vocabulary of the stdlib
    sentences' words, saved as a transformers model directory with its tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizer

    from fastdistill.compress import stdlib_sentences
    path = tmp_path_factory.mktemp("tiny_bert")
    words = sorted({w for s in sum(stdlib_sentences(), []) for w in re.findall(r"[a-z]+", s.lower())})
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(str(path))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(str(path))
    return path
