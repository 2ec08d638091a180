"""Convert a small Llama-style model to 4-stream mHC, check it, train a few steps."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mhc_compile as mhc

torch.manual_seed(0)
config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)
model = LlamaForCausalLM(config)
original = copy.deepcopy(model).eval()

model = mhc.mhc_compile(model, n_streams=4)  # residual adds -> 4-stream mHC
mhc.inspect(model)

ids = torch.randint(0, 256, (2, 16))
with torch.no_grad():
    diff = (model.eval()(ids).logits - original(ids).logits).abs().max().item()
print(f"max |converted - original| at init: {diff:.2e}")

model.train()
opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
for step in range(5):
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
added = sum(p.numel() for p in mhc.mhc_parameters(model))
print(f"mHC parameters added: {added} ({100 * added / sum(p.numel() for p in model.parameters()):.1f}% of the model)")
