"""Distilling a causal LM with the transformers Trainer: fastdistill.integrations.transformers.DistillationTrainer.

    python examples/distill_trainer.py --steps 20
    torchrun --nproc_per_node 2 examples/distill_trainer.py            # DDP through accelerate (gloo on CPU)
    torchrun --nproc_per_node 2 examples/distill_trainer.py --fsdp2    # FSDP2 through accelerate (GPUs only)

Tiny Llama student and a wider teacher, built from configs (nothing is downloaded), on random token sequences with
right padding. Needs transformers and accelerate (pip install "fastdistill[transformers]").
"""
import argparse
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from fastdistill.integrations.transformers import DistillationTrainer

VOCAB, SEQ = 67, 12
KD = dict(temperature=2.0, divergence="jsd", beta=0.3, soft_weight=0.8, hard_weight=0.4)


def tiny_llama(hidden: int, seed: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config)


def student_and_teacher():
    """The student (hidden 32) and a teacher with another hidden size (48) and a tied head."""
    return tiny_llama(32, seed=0), tiny_llama(48, seed=1, tie=True).eval()


class TokenSequences(torch.utils.data.Dataset):
    """Random sequences, each right-padded to SEQ after a length of its own (padding: attention 0, label -100)."""

    def __init__(self, n: int, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=g)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        return dict(input_ids=self.tokens[i], attention_mask=mask, labels=self.tokens[i].masked_fill(mask == 0, -100))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2, help="per device")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--fsdp2", action="store_true", help="shard the student with FSDP2 (through accelerate)")
    parser.add_argument("--output-dir", default="distill_trainer_out")
    parser.add_argument("--out", help="write the logged losses and the final student parameters here (rank 0)")
    args = parser.parse_args()

    student, teacher = student_and_teacher()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun
    fsdp = dict(fsdp="full_shard", fsdp_config=dict(fsdp_version=2, transformer_layer_cls_to_wrap=["LlamaDecoderLayer"]))
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accumulation,
        max_steps=args.steps, learning_rate=args.lr, optim=args.optim, lr_scheduler_type="constant", max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if distributed and not torch.cuda.is_available() else None, **(fsdp if args.fsdp2 else {}))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=training_args, kd=KD,
                                  train_dataset=TokenSequences(args.samples))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    state = trainer.accelerator.get_state_dict(trainer.model)  # gathers FSDP shards
    if trainer.is_world_process_zero():
        print("losses", " ".join(f"{x:.4f}" for x in losses))
        if args.out:
            torch.save(dict(losses=losses, world_size=trainer.args.world_size, wrapped=type(trainer.model_wrapped).__name__,
                            params={k: v.detach().cpu().clone() for k, v in state.items()}), args.out)


if __name__ == "__main__":
    main()
