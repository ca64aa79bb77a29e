"""`fastdistill demo`'s MiniLM pipeline (demo.run_minilm) on a tiny randomly initialised BERT built from a config
(conftest.bert_dir; nothing downloads): one run goes through every stage, each saved and reloaded, and the table has
every row. The digits form (--quick) is tested in test_cli.py; here the command's routing to both."""
import json

import torch
import torch.nn as nn

import fastdistill
from fastdistill.cli import main
from fastdistill.compress import load_encoder
from fastdistill.demo import half_depth, print_minilm_table, run_minilm

STAGES = ["teacher (dense)", "student (1 of 2 layers, distilled)", "2:4 (sparsegpt, recovered)", "int8 (W8A8)",
          "2:4 + int8"]


def test_half_depth_keeps_every_other_layer_from_the_last(bert_dir):
    encoder = load_encoder(str(bert_dir))
    student, keep = half_depth(encoder, encoder.model)
    assert keep == [1] and student.config.num_hidden_layers == 1 and encoder.model.config.num_hidden_layers == 2
    assert len(student.encoder.layer) == 1
    assert torch.equal(student.encoder.layer[0].output.dense.weight, encoder.model.encoder.layer[1].output.dense.weight)
    assert student.encoder.layer[0].output.dense.weight is not encoder.model.encoder.layer[1].output.dense.weight
    six = nn.Module()
    six.config = type("Config", (), {"num_hidden_layers": 6})()
    six.layer = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
    encoder.model, encoder.prefix = six, ""
    assert half_depth(encoder, six)[1] == [1, 3, 5]


def test_minilm_pipeline_on_tiny_bert(bert_dir, tmp_path):
    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # the tiny model's ops: a second thread costs more in fork/join than it does work
    try:
        result = run_minilm(str(bert_dir), str(tmp_path), n_calib=8, n_eval=16, batch_size=8, student_steps=2,
                            recover_steps=2, latency_repeats=1, log=lines.append)
    finally:
        torch.set_num_threads(threads)
    rows = {r["stage"]: r for r in result["stages"]}
    assert list(rows) == STAGES and result["pruned_layers"] == 12
    teacher = rows["teacher (dense)"]
    assert teacher["mean_cosine"] > 0.9999 and teacher["nn_agreement"] == 1.0
    for r in rows.values():
        assert -1 <= r["min_cosine"] <= r["mean_cosine"] <= 1 and 0 <= r["nn_agreement"] <= 1
        assert r["latency_b1_ms"] > 0 and r["latency_b32_ms"] > 0 and r["params"] > 0
    student, sparse, int8, both = (rows[s] for s in STAGES[1:])
    assert student["params"] < teacher["params"] and student["bytes"] < teacher["bytes"]
    assert sparse["bytes"] < teacher["bytes"] and int8["bytes"] < teacher["bytes"] and both["bytes"] < int8["bytes"]
    assert sparse["params"] < both["params"] < teacher["params"]   # + the int8 scales
    assert int8["mean_cosine"] > 0.99
    assert set(result["timings_s"]) >= {"student_s", "calibrate_prune_s", "recover_s", "total_s"}
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "demo.png").stat().st_size > 0

    # Each stage is a checkpoint: the student's config has 1 layer; 2:4 + int8 loads back as SparseInt8Linear.
    assert json.loads((tmp_path / "student_1_of_2_layers_distilled" / "config.json").read_text())[
        "num_hidden_layers"] == 1
    from transformers import BertModel
    model = fastdistill.load_compressed(BertModel.from_pretrained(str(bert_dir)), tmp_path / "2_4_int8")
    assert type(model.encoder.layer[0].attention.self.query).__name__ == "SparseInt8Linear"

    table = []
    print_minilm_table(result, table.append)
    assert [line.split(" | ")[0].lstrip("| ") for line in table[3:]] == STAGES


def test_cli_demo_runs_minilm_and_quick_runs_digits(tmp_path, capsys, monkeypatch):
    """The command's routing (both pipelines run for real above and in test_cli.py's digits tests)."""
    import fastdistill.demo as d
    calls = []
    monkeypatch.setattr(d, "run_minilm", lambda **kw: calls.append(("minilm", kw)) or {"stages": []})
    monkeypatch.setattr(d, "run_demo", lambda **kw: calls.append(("digits", kw)) or {"stages": []})
    main(["demo", "--out", str(tmp_path)])
    main(["demo", "--quick", "--epochs", "3", "--seed", "2", "--out", str(tmp_path)])
    assert calls == [("minilm", {"out_dir": str(tmp_path)}),
                     ("digits", {"out_dir": str(tmp_path), "seed": 2, "epochs": 3, "quick": True})]
    out = capsys.readouterr().out
    assert "| latency b=1 (ms) | latency b=32 (ms) |" in out and "| test acc |" in out
