"""Data-parallel training with fused_linear_kd_loss on 2 gloo processes (CPU, loopback): DistributedDataParallel and
FSDP2 (fully_shard), the lm_head read outside its module's forward as the Trainer does, against one process that
sees both ranks' batches. One spawned run covers every case (process start-up dominates); the example script runs
under torchrun."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastdistill import fused_linear_kd_loss

if not dist.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

WORLD = 2
VOCAB, HIDDEN, TEACHER_HIDDEN = 53, 16, 24  # the teacher's hidden size differs from the student's
STEPS, LR = 2, 0.5
KD = dict(temperature=2.0, divergence="jsd", beta=0.3, hard_weight=0.4, soft_weight=0.8, chunk_size=7)
REPO = Path(__file__).resolve().parents[1]


class TinyLM(nn.Module):
    """Embedding -> MLP body; forward returns the last hidden states, the head is read by the loss."""

    def __init__(self, hidden, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.body = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.lm_head = nn.Linear(hidden, VOCAB)

    def forward(self, tokens):
        return self.body(self.embed(tokens))


def batch(rank, step):
    """Rank `rank`'s batch at `step`: tokens [2, 9] and labels with ignored positions (ranks count different
    numbers of rows, so the per-rank batchmean matters)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[0, : 2 + rank] = -100
    return tokens, labels


def kd_loss_of(student, head, teacher, teacher_head, tokens, labels, seen=None):
    """The loss as the Trainer computes it: the models' forwards, then their heads' weights read by the loss.
    Appends the type names of the two head weights the loss reads to `seen`."""
    hidden = student(tokens)
    with torch.no_grad():
        teacher_hidden = teacher(tokens)
    if seen is not None:
        seen.append((type(head.weight).__name__, type(teacher_head.weight).__name__))
    return fused_linear_kd_loss(hidden, head.weight, teacher_hidden, teacher_head.weight, student_bias=head.bias,
                                teacher_bias=teacher_head.bias, labels=labels, **KD)


def full(x):
    """A parameter or gradient as a plain full tensor (FSDP2 keeps DTensor shards)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x.detach().clone()


def train(rank, wrap):
    """STEPS SGD steps on this rank's batches. Returns the gradients of every step and the final parameters (full
    tensors, by parameter name), and the types of the head weights the loss read."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    student, teacher = TinyLM(HIDDEN, seed=0), TinyLM(TEACHER_HIDDEN, seed=1).eval()
    names = [n for n, _ in student.named_parameters()]
    if wrap == "ddp":
        model = DistributedDataParallel(student)
    elif wrap == "fsdp2_root":  # the head is in the root's group: FSDP2 leaves it gathered after the root forward
        fully_shard(student.body)
        model = fully_shard(student)
    elif wrap == "fsdp2_sharded_heads":  # heads in groups of their own, never run: DTensor shards reach the loss
        for module in (student.lm_head, student.body, teacher.lm_head):
            fully_shard(module)
        model = fully_shard(student)
        fully_shard(teacher)
    else:
        raise ValueError(wrap)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads, head_types = [], []
    for step in range(STEPS):
        tokens, labels = batch(rank, step)
        opt.zero_grad()
        kd_loss_of(model, student.lm_head, teacher, teacher.lm_head, tokens, labels, head_types).backward()
        grads.append({n: full(p.grad) for n, p in zip(names, model.parameters())})
        opt.step()
    params = {n: full(p) for n, p in zip(names, model.parameters())}
    return dict(grads=grads, params=params, head_types=head_types)


CASES = ("ddp", "fsdp2_root", "fsdp2_sharded_heads")


def dtensor_hidden_error():
    """The message for DTensor hidden states (only the heads are gathered)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    hidden = distribute_tensor(torch.randn(3, HIDDEN), init_device_mesh("cpu", (WORLD,)), [Replicate()])
    try:
        fused_linear_kd_loss(hidden, torch.randn(VOCAB, HIDDEN), teacher_logits=torch.randn(3, VOCAB))
    except ValueError as exc:
        return str(exc)
    return None


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {case: train(rank, case) for case in CASES}
        results["dtensor_hidden_error"] = dtensor_hidden_error()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def single_process_reference():
    """One process, both ranks' batches: the data-parallel step averages the ranks' losses."""
    student, teacher = TinyLM(HIDDEN, seed=0), TinyLM(TEACHER_HIDDEN, seed=1).eval()
    opt = torch.optim.SGD(student.parameters(), lr=LR)
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        losses = [kd_loss_of(student, student.lm_head, teacher, teacher.lm_head, *batch(r, step)) for r in range(WORLD)]
        (sum(losses) / WORLD).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
        opt.step()
    return dict(grads=grads, params={n: p.detach().clone() for n, p in student.named_parameters()})


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_fsdp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", CASES)
def test_matches_single_process(distributed_runs, case):
    ref = single_process_reference()
    for rank_result in distributed_runs:
        got = rank_result[case]
        for step in range(STEPS):
            for name, g in ref["grads"][step].items():
                torch.testing.assert_close(got["grads"][step][name], g, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{case} step {step} grad {name}: {m}")
        for name, p in ref["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{case} param {name}: {m}")
    # Each case exercises the head form it names.
    heads = ("DTensor", "DTensor") if case == "fsdp2_sharded_heads" else ("Parameter", "Parameter")
    assert distributed_runs[0][case]["head_types"] == [heads] * STEPS


def test_example_script_under_torchrun(tmp_path):
    """examples/distill_ddp.py: 2 processes under torchrun on CPU; the loss falls and both ranks end equal."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "examples" / "distill_ddp.py"), "--steps", "6",
           "--out", str(tmp_path / "result.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["world_size"] == 2
    assert result["losses"][-1] < 0.9 * result["losses"][0], result["losses"]
    assert result["max_param_diff_across_ranks"] == 0.0


def test_dtensor_hidden_states_are_a_clear_error(distributed_runs):
    for rank_result in distributed_runs:
        assert rank_result["dtensor_hidden_error"].startswith(
            "fastdistill.fused_linear_kd_loss: student_hidden is a DTensor; pass its local tensor")
