"""Fine-tune a Llama-style model converted to mHC with Hugging Face's ``Trainer``; save
checkpoints and resume from one.

    python examples/finetune_trainer.py --output-dir runs/mhc --steps 20 --save-steps 10
    python examples/finetune_trainer.py --output-dir runs/mhc-resumed --steps 20 --resume-from runs/mhc/checkpoint-10

The model is built from a config with random weights and trained on random token ids, so
the script runs anywhere (``--cpu`` forces the CPU); swap in
``AutoModelForCausalLM.from_pretrained(...)`` and a real dataset. A converted model is an
ordinary ``PreTrainedModel``: Trainer saves it with ``save_pretrained`` (config.json
carries the mHC options under ``"mhc"``, model.safetensors the ``<block>.mhc.*`` weights)
and its optimizer state covers the mHC parameters. To resume, build and convert the model
exactly as before and pass ``resume_from_checkpoint``: Trainer loads the weights (mHC
included), optimizer, scheduler and RNG state. A finished checkpoint is also a model:
``mhc.from_pretrained(LlamaForCausalLM, "runs/mhc/checkpoint-20")``.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import mhc_compile as mhc


def build_model(hidden: int = 64, layers: int = 2, vocab: int = 1000, n_streams: int = 4, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama (tied embeddings), converted to ``n_streams``-stream mHC."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                         max_position_embeddings=128, tie_word_embeddings=True)
    return mhc.mhc_compile(LlamaForCausalLM(config), n_streams=n_streams)


class RandomTokens(torch.utils.data.Dataset):
    """``size`` sequences of ``length`` random token ids; labels = inputs (causal LM)."""

    def __init__(self, size: int = 64, length: int = 32, vocab: int = 1000, seed: int = 0) -> None:
        self.ids = torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def make_trainer(model: torch.nn.Module, output_dir: str, *, steps: int, save_steps: int, batch: int = 4,
                 lr: float = 1e-2, cpu: bool = True, callbacks: Optional[Sequence[TrainerCallback]] = None) -> Trainer:
    """A Trainer that saves a checkpoint every ``save_steps`` steps."""
    args = TrainingArguments(
        output_dir=output_dir, max_steps=steps, save_steps=save_steps, per_device_train_batch_size=batch,
        learning_rate=lr, logging_steps=max(1, steps // 4), use_cpu=cpu, report_to=[], seed=0,
        disable_tqdm=True,
    )
    vocab = model.config.vocab_size
    return Trainer(model=model, args=args, train_dataset=RandomTokens(vocab=vocab), callbacks=list(callbacks or []))


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/mhc")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-steps", type=int, default=10)
    p.add_argument("--resume-from", default=None, help="a checkpoint-N directory written by an earlier run")
    p.add_argument("--n-streams", type=int, default=4)
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where CUDA is available")
    args = p.parse_args(argv)
    model = build_model(n_streams=args.n_streams)
    trainer = make_trainer(model, args.output_dir, steps=args.steps, save_steps=args.save_steps,
                           cpu=args.cpu or not torch.cuda.is_available())
    trainer.train(resume_from_checkpoint=args.resume_from)
    print(f"mHC parameters: {sum(p.numel() for p in mhc.mhc_parameters(model)):,}; checkpoints in {args.output_dir}")


if __name__ == "__main__":
    main()
