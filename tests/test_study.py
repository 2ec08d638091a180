"""The residual vs HC vs mHC study: the CPU smoke run of benchmarks/study.py, and its pieces."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mhc_compile import cli, study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_NAMES = [s.name for s in study.RUNS]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``benchmarks/study.py --steps 20 --depth 4 --width 64`` on the CPU, into a tmp dir."""
    out = tmp_path_factory.mktemp("study")
    cmd = [sys.executable, "benchmarks/study.py", "--steps", "20", "--depth", "4", "--width", "64",
           "--out", str(out / "study.md"), "--figure", str(out / "study.png")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "study.json") as f:
        results = json.load(f)
    return out, proc.stdout, results


def test_table_has_every_run_at_every_lr(smoke):
    out, stdout, results = smoke
    table = (out / "study.md").read_text()
    assert "python benchmarks/study.py --steps 20 --depth 4 --width 64` (the output paths" in table  # the command
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    seen = {(name.strip(), float(lr)) for name, lr in rows[1:]}  # rows[0]: the header
    assert seen == {(name, lr) for name in RUN_NAMES for lr in (1e-3, 4e-3)}
    assert all(name in stdout for name in RUN_NAMES)  # the short table on stdout
    assert os.path.getsize(out / "study.png") > 10_000  # the figure: two panels per learning rate


def test_losses_are_finite_and_fall(smoke):
    runs = smoke[2]["runs"]
    assert len(runs) == 8
    for r in runs:
        assert r["error"] is None and r["diverged_at"] is None, r["name"]
        assert len(r["train_loss"]) == 20 and len(r["grad_norm"]) == 20
        values = r["train_loss"] + r["val_loss"] + r["grad_norm"]
        assert all(v is not None and math.isfinite(v) for v in values), r["name"]
        assert r["val_loss"][-1] < r["val_loss"][0] - 0.3, (r["name"], r["val_loss"])  # it learned
        assert r["tokens_per_s"] > 0 and r["wall_s"] > 0


def test_gains_mhc_bounded_hc_mixes_residual_is_one(smoke):
    runs = {(r["name"], r["lr"]): r for r in smoke[2]["runs"]}
    for (name, lr), r in runs.items():
        gains = r["forward_gain"] + r["backward_gain"] + r["layer_gain"]
        assert len(r["forward_gain"]) == len(r["gain_steps"]) >= 5
        if name.startswith("mhc"):
            assert min(gains) >= 1 - 1e-4, (name, lr, gains)  # doubly stochastic: the gain stays at 1
            assert max(gains) <= 1 + 1e-3, (name, lr, gains)
            assert len(r["forward_gain_per_depth"][-1]) == 2 * 4  # two connections per layer
        elif name == "hc":
            assert max(r["forward_gain"]) > 1.01, gains  # unconstrained mixing amplifies
        else:
            assert set(gains) == {1.0}  # no mixing: 1 by definition
    # the same seed: the base model starts from the same weights, so the residual runs and mHC with
    # the function-preserving init see the same first loss
    assert runs["residual", 1e-3]["train_loss"][0] == pytest.approx(runs["mhc-preserve", 1e-3]["train_loss"][0], rel=1e-5)


def test_spikes_are_rises_over_the_running_ema():
    losses = [3.0, 2.9, 2.8, 3.2, 2.7, 2.75, float("nan"), 9.0]
    assert study.spike_steps(losses, margin=0.1) == [4]  # 3.2 > ema(3.0, 2.9, 2.8) + 0.1; stops at NaN
    assert study.spike_steps(losses, margin=1.0) == []


def test_a_non_finite_loss_is_recorded_as_divergence():
    record = study.RunRecord("hc", "hc", "paper", 1e-2)
    trainer = study.Trainer(None, record, None, {}, torch.device("cpu"))
    pending = [(torch.tensor(2.5), torch.tensor(1.0)), (torch.tensor(float("nan")), torch.tensor(3.0))]
    assert trainer._flush(pending) is True
    assert record.diverged_at == 2 and record.train_loss[0] == 2.5
    record.forward_gain = [1.5, float("inf")]
    row = study.table_rows([record])[0]
    assert row["final val loss"] == "diverged at step 2" and row["best val loss"] == "-"
    assert row["max fwd gain"] == "inf or nan" and row["max bwd gain"] == "-"


def test_validation_split_is_every_tenth_block():
    data = torch.arange(100, dtype=torch.long)
    train, val = study.split_corpus(data, val_every=10, block=5)
    assert val.tolist() == [*range(45, 50), *range(95, 100)]
    assert train.numel() == 90 and not set(train.tolist()) & set(val.tolist())


def test_cli_forwards_to_the_study_and_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["study", "--steps", "0"])
    assert err.value.code == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err


def test_a_run_that_turns_nan_stops_is_recorded_and_the_results_are_still_written(tmp_path):
    parser = study.argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--steps", "12", "--depth", "2", "--width", "32", "--lrs", "1e-3",
                              "--out", str(tmp_path / "r.md"), "--figure", str(tmp_path / "r.png")])
    device = torch.device("cpu")
    study._fill_defaults(args, device)
    args.command_line = "test"
    corpus = torch.randint(0, 256, (40_000,), generator=torch.Generator().manual_seed(0))
    train, val = study.split_corpus(corpus, block=1000)
    data = {"train": train, "val_batches": [study.sample_batch(val, 2, args.seq_len, torch.Generator(), "cpu")]}
    spec = study.RunSpec("hc", "hc", "paper")
    model = study.build_model(args, spec, device)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = float("nan")  # NaN embeddings: every loss is NaN from step 1
    record = study.RunRecord(spec.name, spec.mode, spec.init, 1e-3)
    study.Trainer(model, record, args, data, device).run(on_eta=lambda seconds: None)
    assert record.diverged_at == 1 and len(record.train_loss) == 1 and record.error is None
    study.write_results([record], args, args.out, device, corpus.numel(), train.numel(), val.numel())
    assert "diverged at step 1" in (tmp_path / "r.md").read_text()
    saved = study.json.load(open(tmp_path / "r.json"))["runs"][0]
    assert saved["diverged_at"] == 1 and saved["train_loss"] == [None]  # NaN is written as null
    assert (tmp_path / "r.png").exists()
