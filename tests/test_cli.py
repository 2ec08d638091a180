"""The command line: each sub-command on a tiny model; bad input exits with code 2."""

import json
import os
import subprocess
import sys

import pytest

from mhc_compile import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inspect_hf_preset(capsys):
    assert cli.main(["inspect", "--hf", "gpt2", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.3" in out and "mHC adds" in out


def test_inspect_hf_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": 100}))
    assert cli.main(["inspect", "--hf-config", str(path)]) == 0
    assert "layers.1" in capsys.readouterr().out


def test_inspect_factory(capsys):
    assert cli.main(["inspect", "mhc_compile.demo:TinyGPT"]) == 1  # needs example inputs: a clear failure
    assert "example_inputs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "--hf", "nope"], "unknown --hf model"),
        (["inspect", "--hf-config", "/no/such/config.json"], "no such file"),
        (["inspect", "no_such_module:build"], "cannot load"),
        (["inspect", "not-a-factory"], "not MODULE:FACTORY"),
        (["inspect"], "name a model"),
    ],
)
def test_bad_model_names_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_config_content_exits_2(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    assert cli.main(["inspect", "--hf-config", str(path)]) == 2


def test_demo_runs_end_to_end(tmp_path):
    plot = tmp_path / "new-dir" / "demo.png"  # the demo creates missing directories
    result = subprocess.run(
        [sys.executable, "-m", "mhc_compile", "demo", "--steps", "4", "--log-every", "2", "--depth", "2",
         "--width", "32", "--batch", "4", "--seq-len", "32", "--corpus-bytes", "200000", "--out", str(plot)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "final val loss" in result.stdout and "mhc" in result.stdout
    assert plot.exists() and plot.stat().st_size > 10_000
