"""Hugging Face Trainer: fine-tune a converted model, checkpoint, resume with the mHC weights
and their optimizer state intact (through ``examples/finetune_trainer.py``)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mhc_compile.checkpoint import is_mhc_key, read_state_dict

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_trainer.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_trainer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Capture(transformers.TrainerCallback):
    """What the model and optimizer hold when training (re)starts, after a resume has loaded."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        self.mhc = {n: p.detach().clone() for n, p in model.named_parameters() if is_mhc_key(n)}
        self.opt_state = {n: opt.state.get(p, {}) for n, p in model.named_parameters() if is_mhc_key(n)}


def test_trainer_checkpoints_and_resumes_the_mhc_state(tmp_path):
    ex = _example()
    straight_model = ex.build_model()
    ex.make_trainer(straight_model, str(tmp_path / "run"), steps=3, save_steps=2).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert json.loads((checkpoint / "config.json").read_text())["mhc"]["n_streams"] == 4
    saved = read_state_dict(str(checkpoint), is_mhc_key)
    assert len(saved) == 12  # 2 layers x 2 connections x (phi, bias, alpha)

    capture = _Capture()
    resumed_model = ex.build_model()
    ex.make_trainer(resumed_model, str(tmp_path / "resumed"), steps=3, save_steps=2,
                    callbacks=[capture]).train(resume_from_checkpoint=str(checkpoint))

    assert capture.mhc.keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(capture.mhc[name], value), name  # the checkpoint's mHC weights were loaded
        state = capture.opt_state[name]
        assert state and state["exp_avg"].abs().sum() > 0, name  # ... and their AdamW moments
    final = dict(resumed_model.named_parameters())
    for name, p in straight_model.named_parameters():  # resumed run ends where the straight one did
        torch.testing.assert_close(final[name], p, rtol=1e-5, atol=1e-6)
