"""fastdistill.integrations.transformers.DistillationTrainer on tiny LlamaForCausalLM configs (built here, nothing
downloaded): its loss and its update against the full-logits formula in fp64, gradient accumulation, bf16, errors,
the lazy import, and a run under torchrun (DDP and FSDP2 through accelerate)."""
import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import accelerate  # noqa: E402,F401  (transformers.Trainer needs it; the test extra installs both)
from transformers import TrainingArguments  # noqa: E402

from fastdistill.integrations.transformers import DistillationTrainer  # noqa: E402
from fastdistill.reference import kd_loss_reference, kd_topk_loss_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("distill_trainer", REPO / "examples" / "distill_trainer.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)
KD = example.KD


def training_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, optim="sgd", learning_rate=1.0,
                lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[],
                use_cpu=True, disable_tqdm=True)
    return TrainingArguments(**dict(base, **kw))


def full_batch(dataset):
    return {k: torch.stack([dataset[i][k] for i in range(len(dataset))]) for k in dataset[0]}


def full_logits_loss(student, teacher, batch, dtype, reduction="sum", autocast=False, **kd):
    """kd_loss's definition on the models' full logits (run in `dtype`), labels shifted: (loss, student copy whose
    .grad the backward fills)."""
    s, t = copy.deepcopy(student).to(dtype), copy.deepcopy(teacher).to(dtype)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = s(**inputs).logits[:, :-1]
        with torch.no_grad():
            teacher_logits = t(**inputs).logits[:, :-1]
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    vocab = logits.shape[-1]
    loss = kd_loss_reference(logits.reshape(-1, vocab).to(loss_dtype), teacher_logits.reshape(-1, vocab).to(loss_dtype),
                             labels=batch["labels"][:, 1:].reshape(-1), reduction=reduction, **kd)
    return loss, s


def err(x, ref):
    return (torch.as_tensor(x, dtype=torch.float64) - ref.detach().double()).abs().max().item()


@pytest.mark.parametrize("accumulation", [1, 2])
def test_step_matches_full_logits_reference(tmp_path, accumulation):
    """One SGD step (lr 1, no clipping) over 4 right-padded sequences, in one batch of 4 or two accumulated batches
    of 2 (different item counts): the logged loss is sum over the items / their number, and the update is its
    gradient, each within 2x the error of the plain fp32 full-logits computation against fp64 (+1e-5 relative)."""
    student, teacher = example.student_and_teacher()
    data = example.TokenSequences(4)
    batch = full_batch(data)
    items = (batch["labels"][:, 1:] != -100).sum()
    ref, ref_model = full_logits_loss(student, teacher, batch, torch.float64, **KD)
    plain, plain_model = full_logits_loss(student, teacher, batch, torch.float32, **KD)
    (ref / items).backward()
    (plain / items).backward()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd=KD, train_dataset=data,
                                  args=training_args(tmp_path, per_device_train_batch_size=4 // accumulation,
                                                     gradient_accumulation_steps=accumulation))
    trainer.train()
    logged = trainer.state.log_history[0]["loss"]
    assert err(logged, ref / items) <= 2 * err(plain / items, ref / items) + 1e-5 * (ref / items).item()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in plain_model.named_parameters():
        step = before[name] - dict(student.named_parameters())[name].detach()  # = the gradient at lr 1
        g64 = ref_grads[name].grad
        bound = 2 * err(p.grad, g64) + 1e-5 * (1 + g64.abs().max().item())
        assert err(step, g64) <= bound, (name, err(step, g64), err(p.grad, g64))


def test_compute_loss_without_num_items_is_batchmean():
    """Called as evaluation calls it without item counts: the mean over the counted (shifted) positions."""
    student, teacher = example.student_and_teacher()
    batch = full_batch(example.TokenSequences(3, seed=5))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd=KD,
                                  args=training_args(Path("/tmp"), report_to=[]))
    loss = trainer.compute_loss(trainer.model, batch)
    ref, _ = full_logits_loss(student, teacher, batch, torch.float64, reduction="batchmean", **KD)
    plain, _ = full_logits_loss(student, teacher, batch, torch.float32, reduction="batchmean", **KD)
    assert loss.dtype == torch.float32
    assert err(loss, ref) <= 2 * err(plain, ref) + 1e-5 * ref.item()


def test_evaluate(tmp_path):
    """Trainer.evaluate (prediction_step calls compute_loss with this batch's item count): one batch of 3, the mean
    over its counted positions."""
    student, teacher = example.student_and_teacher()
    data = example.TokenSequences(3, seed=5)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd=KD, eval_dataset=data,
                                  args=training_args(tmp_path, per_device_eval_batch_size=3))
    loss = trainer.evaluate()["eval_loss"]
    ref, _ = full_logits_loss(student, teacher, full_batch(data), torch.float64, reduction="batchmean", **KD)
    plain, _ = full_logits_loss(student, teacher, full_batch(data), torch.float32, reduction="batchmean", **KD)
    assert err(loss, ref) <= 2 * err(plain, ref) + 1e-5 * ref.item()


def test_training_lowers_the_loss_and_leaves_the_teacher_alone(tmp_path):
    student, teacher = example.student_and_teacher()
    teacher.train()  # the trainer puts it in eval mode
    teacher_before = copy.deepcopy(teacher.state_dict())
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd=KD, train_dataset=example.TokenSequences(4),
                                  args=training_args(tmp_path, per_device_train_batch_size=4, max_steps=8,
                                                     optim="adamw_torch", learning_rate=1e-2))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k])


def test_bf16(tmp_path):
    """bf16 mixed precision (accelerate's autocast): the first step's loss against fp64 within 2x the error of the
    full bf16-autocast logits path, and the loss falls."""
    student, teacher = example.student_and_teacher()
    data = example.TokenSequences(4)
    batch = full_batch(data)
    items = (batch["labels"][:, 1:] != -100).sum()
    ref, _ = full_logits_loss(student, teacher, batch, torch.float64, **KD)
    plain, _ = full_logits_loss(student, teacher, batch, torch.float32, autocast=True, **KD)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd=KD, train_dataset=data,
                                  args=training_args(tmp_path, bf16=True, per_device_train_batch_size=4, max_steps=6,
                                                     optim="adamw_torch", learning_rate=1e-2))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert err(losses[0], ref / items) <= 2 * err(plain / items, ref / items), (losses[0], (ref / items).item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_importing_fastdistill_does_not_import_transformers():
    code = "import sys, fastdistill; assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_bad_arguments(tmp_path):
    student, teacher = example.student_and_teacher()
    args = training_args(tmp_path)
    pre = r"^fastdistill\.DistillationTrainer: "
    with pytest.raises(ValueError, match=pre + r"unknown kd option\(s\) \['reduction', 'temprature'\]"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, kd=dict(temprature=2.0, reduction="sum"))
    for kw in (dict(teacher_topk="column"), dict(kd=dict(teacher_topk=8))):
        with pytest.raises(ValueError, match=pre + "an offline top-k teacher comes as the batch columns"):
            DistillationTrainer(model=student, teacher_model=teacher, args=args, **kw)
    capped = example.tiny_llama(32, seed=2)
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=pre + "teacher_model's config sets final_logit_softcapping=30.0"):
        DistillationTrainer(model=student, teacher_model=capped, args=args)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args)
    batch = full_batch(example.TokenSequences(2))
    with pytest.raises(ValueError, match=pre + "the batch has no 'labels'"):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "labels"})
    idx, lp = torch.zeros(2, 12, 4, dtype=torch.long), torch.zeros(2, 12, 4)
    with pytest.raises(ValueError, match=pre + r"give the teacher in one form: .* \(got both\)"):
        trainer.compute_loss(trainer.model, dict(batch, teacher_topk_indices=idx, teacher_topk_logprobs=lp))
    offline = DistillationTrainer(model=student, args=args)
    with pytest.raises(ValueError, match=pre + r"give the teacher in one form: .* \(got neither\)"):
        offline.compute_loss(offline.model, batch)
    with pytest.raises(ValueError, match=pre + "the batch has one of"):
        offline.compute_loss(offline.model, dict(batch, teacher_topk_indices=idx))


def topk_columns(teacher, batch, k, temperature):
    """The offline teacher's columns: top-k log-probs at the temperature of the live teacher's logits."""
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs, indices = torch.log_softmax(logits.double() / temperature, -1).topk(k, dim=-1)
    return dict(teacher_topk_indices=indices, teacher_topk_logprobs=logprobs.float())


@pytest.mark.parametrize("k", [5, example.VOCAB])
def test_offline_topk_teacher_from_batch_columns(k):
    """teacher_model=None and the teacher's top-k as batch columns: the loss is kd_loss's top-k form on the student's
    full logits (shifted labels), within 2x plain fp32's error; with all V tokens it equals the live teacher's loss."""
    student, teacher = example.student_and_teacher()
    batch = full_batch(example.TokenSequences(3, seed=7))
    columns = topk_columns(teacher, batch, k, KD["temperature"])
    trainer = DistillationTrainer(model=student, kd=KD, args=training_args(Path("/tmp"), report_to=[]))
    loss = trainer.compute_loss(trainer.model, dict(batch, **columns))

    def reference(dtype):
        loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.no_grad():
            logits = copy.deepcopy(student).to(dtype)(input_ids=batch["input_ids"],
                                                      attention_mask=batch["attention_mask"]).logits[:, :-1]
        vocab = logits.shape[-1]
        idx, lp = (c[:, :-1].reshape(-1, k) for c in columns.values())
        return kd_topk_loss_reference(logits.reshape(-1, vocab).to(loss_dtype), idx, lp.to(loss_dtype),
                                      labels=batch["labels"][:, 1:].reshape(-1), reduction="batchmean", **KD)

    ref, plain = reference(torch.float64), reference(torch.float32)
    assert err(loss, ref) <= 2 * err(plain, ref) + 1e-5 * abs(ref.item())
    if k == example.VOCAB:
        live = DistillationTrainer(model=student, teacher_model=teacher, kd=KD,
                                   args=training_args(Path("/tmp"), report_to=[]))
        dense = live.compute_loss(live.model, batch)
        assert err(loss, dense.double()) <= 1e-5 * abs(dense.item())


def test_offline_topk_training_keeps_the_columns_and_lowers_the_loss(tmp_path):
    """Through Trainer.train(): remove_unused_columns keeps the top-k columns, and the loss falls."""
    student, teacher = example.student_and_teacher()
    data = example.TokenSequences(4)
    batch = full_batch(data)
    columns = topk_columns(teacher, batch, 6, KD["temperature"])
    rows = [dict(data[i], **{c: v[i] for c, v in columns.items()}) for i in range(len(data))]
    trainer = DistillationTrainer(model=student, kd=dict(KD, topk_tail="bucket"), train_dataset=rows,
                                  args=training_args(tmp_path, per_device_train_batch_size=4, max_steps=8,
                                                     optim="adamw_torch", learning_rate=1e-2))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.8 * losses[0], losses


def single_process_step(samples):
    """The update of one SGD step (lr 1) on all `samples` sequences in one process."""
    student, teacher = example.student_and_teacher()
    batch = full_batch(example.TokenSequences(samples))
    items = (batch["labels"][:, 1:] != -100).sum()
    loss, model = full_logits_loss(student, teacher, batch, torch.float64, **KD)
    (loss / items).backward()
    return {n: (p.detach() - p.grad).float() for n, p in model.named_parameters()}, (loss / items).item()


def test_ddp_under_torchrun(tmp_path):
    """examples/distill_trainer.py on 2 gloo processes (accelerate prepares DDP): one step over 2 x 2 sequences
    equals one process's step over the 4."""
    from test_ddp_fsdp import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "examples" / "distill_trainer.py"), "--steps", "1",
           "--samples", "4", "--batch", "2", "--optim", "sgd", "--lr", "1.0", "--output-dir", str(tmp_path / "run"),
           "--out", str(tmp_path / "result.pt")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["world_size"] == 2
    assert result["wrapped"] == "DistributedDataParallel"
    ref_params, ref_loss = single_process_step(4)
    assert abs(result["losses"][0] - ref_loss) <= 1e-5 * ref_loss
    for name, p in ref_params.items():
        torch.testing.assert_close(result["params"][name].float(), p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _fsdp2_worker(rank, port, out_dir):
    """compute_loss on a student sharded with fully_shard, as accelerate shards it for FSDP2 (accelerate runs FSDP on
    GPUs only, so the sharding is applied here by hand on gloo): this rank's half of the batch, the items counted
    over both halves. Saves the full gradients."""
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    student, teacher = example.student_and_teacher()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd=KD,
                                  args=training_args(Path(out_dir), ddp_backend="gloo"))
    assert trainer.accelerator.num_processes == 2
    for layer in student.model.layers:
        fully_shard(layer)
    fully_shard(student.lm_head)  # a group of its own, never run with rows: the loss reads the DTensor shards
    fully_shard(student)
    batch = full_batch(example.TokenSequences(4))
    items = (batch["labels"][:, 1:] != -100).sum()
    half = {k: v[2 * rank: 2 * rank + 2] for k, v in batch.items()}
    trainer.compute_loss(student, half, num_items_in_batch=items).backward()
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    if rank == 0:
        torch.save(dict(grads=grads, head=type(student.lm_head.weight).__name__), Path(out_dir) / "fsdp2.pt")
    torch.distributed.destroy_process_group()


def test_compute_loss_on_an_fsdp2_sharded_student(tmp_path):
    """2 gloo processes, FSDP2-sharded student (head in its own group, so the loss gets DTensor shards): the
    gradients equal one process's over the whole batch."""
    import torch.multiprocessing as mp
    from test_ddp_fsdp import free_port

    mp.spawn(_fsdp2_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    result = torch.load(tmp_path / "fsdp2.pt")
    assert result["head"] == "DTensor"
    student, teacher = example.student_and_teacher()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, kd=KD, args=training_args(tmp_path))
    batch = full_batch(example.TokenSequences(4))
    trainer.compute_loss(student, batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum()).backward()
    for name, p in student.named_parameters():
        torch.testing.assert_close(result["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
