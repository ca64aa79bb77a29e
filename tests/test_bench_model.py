"""`fastdistill bench --model`: every runtime's row on a tiny BERT built from a config, fidelity computed against the
torch fp32 row, a missing peer reported as "not installed", and the CLI flag."""
import importlib.util
import itertools
import json
import sys

import pytest
import torch

from fastdistill import cli
from fastdistill.bench import model as bench_model

SUBJECTS = ["The parser", "A small cache", "This function", "The new reader", "Every socket"]
VERBS = ["returns", "closes", "writes", "decodes"]
OBJECTS = ["the file.", "a list of names for the current module.", "bytes from the stream until it ends.",
           "one header line."]


def sentences():
    """40 distinct English sentences of 4 to 12 words (no download: the bench's tiny model trains its WordPiece
    vocabulary on them)."""
    return [f"{s} {v} {o}" for s, v, o in itertools.islice(itertools.product(SUBJECTS, VERBS, OBJECTS), 40)]


def run_tiny(tmp_path, **kwargs):
    return bench_model.run("tiny", threads=1, n_bs1=3, batch_size=16, repeats=1, pause_s=0, texts=sentences(),
                           in_process=True, json_path=str(tmp_path / "model.json"), **kwargs)


def tiny_workdir(path, perturb=lambda encoder: None):
    """What the bench's parent leaves for a row: the tiny encoder and the tokenised sentences."""
    encoder, tokenize = bench_model.build_encoder("tiny", sentences())
    with torch.no_grad():
        perturb(encoder)
    torch.save(encoder, path / "encoder.pt")
    torch.save(bench_model.make_inputs(tokenize(sentences()), 16, 3), path / "inputs.pt")
    return path


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return run_tiny(tmp_path_factory.mktemp("bench_model"))


def test_every_row_runs(table):
    for row in bench_model.ROWS:
        r = table["results"][row.key]
        assert r["status"] == "ok", (row.label, r["status"])
        assert r["embeddings"].shape == (40, 64)
        assert r["bs1_ms_per_sentence"] > 0 and r["bs32_sentences_per_s"] > 0
        assert f"| {row.label} | " in table["table"]
    assert "inference precision" in table["results"]["openvino"]["version"]
    rows = table["table"].splitlines()[2:]   # below the header and the alignment line
    assert len(rows) == len(bench_model.ROWS)
    ort_int8 = next(line for line in rows if line.startswith("| onnxruntime int8 dynamic |")).split("|")
    assert ort_int8[5].strip() == ort_int8[7].strip() == "1.00"   # the baseline against itself
    base, fd = table["results"]["ort-int8"], table["results"]["fd-int8"]
    fd_line = next(line for line in rows if line.startswith("| fastdistill quantize_ (eager) |")).split("|")
    assert fd_line[5].strip() == f"{base['bs1_ms_per_sentence'] / fd['bs1_ms_per_sentence']:.2f}"
    assert fd_line[7].strip() == f"{fd['bs32_sentences_per_s'] / base['bs32_sentences_per_s']:.2f}"


def test_json_written(tmp_path):
    out = run_tiny(tmp_path, rows=("torch",))
    saved = json.loads((tmp_path / "model.json").read_text())
    assert saved["table"] == out["table"] and saved["rows"]["torch"]["status"] == "ok"
    assert "embeddings" not in saved["rows"]["torch"]


def test_fidelity_against_fp32(table):
    results = table["results"]
    reference = results["torch"]["embeddings"]
    assert bench_model.fidelity(reference, reference) == (pytest.approx(1.0, abs=1e-12), 1.0)
    # ONNX Runtime fp32 runs the same graph: equal to rounding; every int8 row differs from fp32, so a cosine below 1
    # shows that the row's own embeddings were compared.
    assert bench_model.fidelity(results["ort"]["embeddings"], reference)[0] > 1 - 1e-6
    for key, lowest in (("ort-int8", 0.99), ("fd-int8", 0.99), ("fd-int8-compile", 0.99), ("fd-int8-fused", 0.99),
                        ("fd-int8-fused-compile", 0.99), ("fd-24-int8", 0.5)):
        cos, _ = bench_model.fidelity(results[key]["embeddings"], reference)
        assert lowest < cos < 1 - 1e-5, key
    # compiled and eager fastdistill int8 run the same kernels: far closer to each other than to fp32 (not bitwise:
    # inductor reorders the fp32 sums of LayerNorm, and that can move an activation across an int8 rounding step)
    compiled_to_eager, _ = bench_model.fidelity(results["fd-int8-compile"]["embeddings"], results["fd-int8"]["embeddings"])
    int8_to_fp32, _ = bench_model.fidelity(results["fd-int8"]["embeddings"], reference)
    assert 1 - compiled_to_eager < (1 - int8_to_fp32) / 10
    # the fused rows differ from the unfused one only by the epilogue GELU's last fp32 units
    fused_to_unfused, _ = bench_model.fidelity(results["fd-int8-fused"]["embeddings"], results["fd-int8"]["embeddings"])
    assert 1 - fused_to_unfused < (1 - int8_to_fp32) / 10


def test_planted_wrong_row_is_caught(table, tmp_path):
    """A row whose encoder is not the fp32 one (one weight matrix perturbed) shows a cosine below 1 in the table."""
    workdir = tiny_workdir(tmp_path, lambda encoder: encoder.encoder.layer[0].attention.self.query.weight.mul_(-1))
    planted = bench_model.run_row("torch", workdir, threads=1, repeats=1)
    results = dict(table["results"], **{"fd-int8": planted})
    cos, nn = bench_model.fidelity(planted["embeddings"], results["torch"]["embeddings"])
    assert cos < 0.999
    line = next(line for line in bench_model.format_table(results).splitlines()
                if line.startswith("| fastdistill quantize_ (eager) |"))
    assert line.split("|")[2].strip() == f"{cos:.4f}" and line.split("|")[3].strip() == f"{nn:.3f}"


def test_missing_peer_is_not_installed(tmp_path, monkeypatch):
    """onnxruntime absent (find_spec says so): its rows say "not installed", the others run, nothing raises."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    out = run_tiny(tmp_path, rows=("torch", "ort", "ort-int8", "fd-int8"))
    assert out["results"]["ort"]["status"] == out["results"]["ort-int8"]["status"] == "not installed (onnxruntime)"
    assert out["results"]["torch"]["status"] == out["results"]["fd-int8"]["status"] == "ok"
    assert "| onnxruntime fp32 | not installed (onnxruntime) |" in out["table"]
    # the ratio columns need the ORT int8 row: "-" without it
    fd = next(line for line in out["table"].splitlines() if line.startswith("| fastdistill quantize_ (eager) |"))
    assert fd.split("|")[5].strip() == "-"


def test_worker_reports_a_failing_import(tmp_path, monkeypatch):
    """A peer that is found but fails to import (None in sys.modules makes `import openvino` raise ImportError)
    is reported by the row itself."""
    workdir = tiny_workdir(tmp_path)
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert bench_model.run_row("openvino", workdir, threads=1, repeats=1)["status"] == "not installed (openvino)"


def test_row_in_its_own_process(tmp_path):
    workdir = tiny_workdir(tmp_path)
    r = bench_model.spawn_row("fd-int8", workdir, threads=1, repeats=1, timeout=300)
    assert r["status"] == "ok" and r["embeddings"].shape == (40, 64)
    here = bench_model.run_row("fd-int8", workdir, threads=1, repeats=1)
    assert torch.equal(r["embeddings"], here["embeddings"])


def test_cli_model_flag(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_model, "run", lambda *a, **k: calls.append((a, k)))
    cli.main(["bench", "--model", "bert-base", "--threads", "3"])
    cli.main(["bench", "--model", "minilm", "--quick", "--json", "x.json"])
    assert calls == [(("bert-base",), {"threads": 3, "json_path": None}),
                     (("minilm",), {"threads": 2, "json_path": "x.json", "sentences": 100, "n_bs1": 32, "repeats": 3})]
    with pytest.raises(SystemExit):
        cli.main(["bench", "--model", "gpt2"])
