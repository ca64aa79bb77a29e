"""Benchmark of the vocab-parallel distillation loss (fastdistill.distributed): one training step (forward KL, T = 2,
batchmean, forward + backward, fp32 logits) on 2 gloo processes over loopback, each holding half the vocabulary,
against one process on the full vocabulary and one process on one shard (the same per-rank work without the
communication), every process on one thread. The three are alternated repeat by repeat in one run, the single-process
ones on rank 0 while rank 1 waits. A 2-rank step's time is the slower rank's, from a common barrier. Also reports the
payload bytes each rank hands to collectives per row.

`python -m fastdistill.bench.vocab_parallel [--quick]`; `fastdistill bench` runs it as the vocab_parallel family.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastdistill
from fastdistill import distributed as vp

FULL_SHAPE = (4096, 32000)  # rows x total vocabulary
QUICK_SHAPE = (256, 2000)
WORLD = 2
TEMPERATURE = 2.0


def cases(quick: bool = False, device: str = "cpu"):
    """No in-process cases: the family runs in its own processes (process_report)."""
    return []


def _step(student, teacher, **kw):
    def run():
        fastdistill.kd_loss(student, teacher, temperature=TEMPERATURE, **kw).backward()
        student.grad = None
    return run


def _worker(rank, world, port, rows, vocab, repeats, out_path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=int(os.environ.get("FD_BENCH_TIMEOUT", "300"))))
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(rows, vocab, generator=g) * 4 for _ in range(2))
    s_shard = vp.vocab_shard(student, group).contiguous().requires_grad_()
    t_shard = vp.vocab_shard(teacher, group).contiguous()
    parallel = _step(s_shard, t_shard, process_group=group)
    singles = {}
    if rank == 0:  # the baselines' own copies: the full vocabulary, and one shard without a group
        singles["one process, full vocabulary"] = _step(student.clone().requires_grad_(), teacher)
        singles["one process, one shard"] = _step(s_shard.detach().clone().requires_grad_(), t_shard)
    before = vp.communicated_bytes()
    parallel()  # warm-up, and the bytes of one step
    step_bytes = vp.communicated_bytes() - before
    for fn in singles.values():
        fn()
    baselines = ("one process, full vocabulary", "one process, one shard")  # on rank 0; the same barriers everywhere
    times = {"2 ranks": [], **{name: [] for name in baselines}}
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        parallel()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, dist.ReduceOp.MAX)
        times["2 ranks"].append(elapsed.item())
        for name in baselines:
            dist.barrier()
            if rank == 0:
                start = time.perf_counter()
                singles[name]()
                times[name].append(time.perf_counter() - start)
    dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"times": times, "step_bytes": step_bytes}, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_report(quick: bool = False, repeats: int = None):
    """{shape, median seconds per implementation, ratios, bytes per row}, measured in WORLD spawned processes."""
    rows, vocab = QUICK_SHAPE if quick else FULL_SHAPE
    repeats = repeats or (3 if quick else 7)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.json")
        mp.start_processes(_worker, args=(WORLD, _free_port(), rows, vocab, repeats, out_path), nprocs=WORLD,
                           start_method="spawn")
        with open(out_path) as f:
            raw = json.load(f)
    median = {name: statistics.median(t) for name, t in raw["times"].items()}
    check_bytes = 7 * 8  # the shard check's all-gather, once per call
    return {
        "shape": f"{rows}x{vocab}", "world": WORLD, "threads_per_process": 1, "repeats": repeats,
        "median_s": median,
        "ratio_vs_one_shard": median["2 ranks"] / median["one process, one shard"],
        "ratio_vs_full_vocabulary": median["2 ranks"] / median["one process, full vocabulary"],
        "bytes_per_row": (raw["step_bytes"] - check_bytes) / rows, "bytes_per_call": check_bytes,
    }


def format_report(r) -> str:
    times = ", ".join(f"{name} {t * 1e3:.1f} ms" for name, t in r["median_s"].items())
    return (f"vocab-parallel kd_loss fwd+bwd {r['shape']} fp32, {r['world']} gloo ranks x "
            f"{r['threads_per_process']} thread: {times}; 2 ranks / one shard {r['ratio_vs_one_shard']:.2f}x, "
            f"/ full vocabulary {r['ratio_vs_full_vocabulary']:.2f}x; all-reduced {r['bytes_per_row']:.0f} bytes "
            f"per row + {r['bytes_per_call']} per call")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args(argv)
    print(format_report(process_report(args.quick, args.repeats)))


if __name__ == "__main__":
    main()
