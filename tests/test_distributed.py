"""Multi-process training of a converted model on the CPU (gloo), through the example script
``examples/train_fsdp.py`` launched with ``torchrun``: DDP and FSDP2 match one process at the
same global batch, compiled or not, and sharded checkpoints resume on another world size."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "64", "--layers", "2", "--vocab", "128", "--seq", "32", "--global-batch", "4"]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN_LIMIT_S = 300  # a whole run
TEARDOWN_LIMIT_S = 45  # from the log's writing (after the last step) to the processes' exit


def _train(tmp_path, nproc: int, *options: str, attempts: int = 2) -> dict:
    """Run examples/train_fsdp.py under torchrun and return its ``--log-json``.

    gloo's teardown (``destroy_process_group``) hangs now and then on a loaded 2-core
    machine after every step has finished (pytorch/pytorch#75097). Rank 0 writes the log
    after the last step, so a run whose processes are still alive ``TEARDOWN_LIMIT_S`` after
    the log appeared is killed (the whole process group) and its log used. A run that hangs
    before it writes its log is killed after ``RUN_LIMIT_S`` and run once more; a second
    hang, or any failure, fails the test.
    """
    for attempt in range(attempts):
        log = tmp_path / f"log-{_free_port()}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(ROOT / "examples" / "train_fsdp.py"), *SMALL, *options, "--log-json", str(log)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        returncode, stderr = _run_until_logged(cmd, env, log, tmp_path)
        if returncode is None and not log.exists():  # hung before the end of training
            if attempt + 1 == attempts:
                raise TimeoutError(f"{' '.join(cmd)} ran past {RUN_LIMIT_S} s:\n{stderr[-3000:]}")
            continue
        assert returncode in (0, None), stderr[-3000:]  # None: killed in teardown, after the log
        return json.loads(log.read_text())


def _run_until_logged(cmd: list[str], env: dict, log: Path, tmp_path: Path) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; returns its exit code (``None`` where it was
    killed: past ``RUN_LIMIT_S``, or ``TEARDOWN_LIMIT_S`` after ``log`` appeared) and stderr."""
    with open(tmp_path / "stdout.txt", "w") as out, open(tmp_path / "stderr.txt", "w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        start, logged = time.monotonic(), None
        returncode = None
        while returncode is None:
            try:
                returncode = proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if logged is None and log.exists():
                    logged = now
                if now - start > RUN_LIMIT_S or (logged is not None and now - logged > TEARDOWN_LIMIT_S):
                    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
                    proc.wait()
                    break
        err.seek(0)
        return returncode, err.read()


def _assert_same_run(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert len(a["loss"]) == len(b["loss"]) > 0
    for key in ("loss", "grad_norm"):
        for x, y in zip(a[key], b[key]):
            assert abs(x - y) <= tol * abs(y), (key, a[key], b[key])


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, mode):
    one = _train(tmp_path, 1, "--mode", mode, "--steps", "3")
    two = _train(tmp_path, 2, "--mode", mode, "--steps", "3")
    _assert_same_run(two, one)
    assert two["mhc_parameters"] == 12 and two["mhc_in_optimizer"]  # 2 layers x 2 connections x (phi, bias, alpha)
    if mode == "fsdp":
        assert two["mhc_sharded"]  # the mHC parameters are sharded DTensors like every other


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_compiled_layers_match_eager(tmp_path, mode):
    eager = _train(tmp_path, 1, "--mode", mode, "--steps", "2")
    compiled = _train(tmp_path, 2, "--mode", mode, "--steps", "2", "--compile", "--compile-backend", "aot_eager")
    _assert_same_run(compiled, eager, tol=1e-4)


def test_recompute_under_fsdp_matches(tmp_path):
    plain = _train(tmp_path, 1, "--mode", "fsdp", "--steps", "2")
    recompute = _train(tmp_path, 2, "--mode", "fsdp", "--steps", "2", "--recompute")
    _assert_same_run(recompute, plain)


@pytest.mark.parametrize("save_procs, load_procs", [(2, 1), (1, 2)])
def test_checkpoint_resumes_on_another_world_size(tmp_path, save_procs, load_procs):
    ckpt = str(tmp_path / "ckpt")
    straight = _train(tmp_path, save_procs, "--steps", "3")
    _train(tmp_path, save_procs, "--steps", "2", "--save-dir", ckpt)
    resumed = _train(tmp_path, load_procs, "--steps", "1", "--resume-from", ckpt)
    assert abs(resumed["loss"][0] - straight["loss"][2]) <= 1e-5 * abs(straight["loss"][2])
    assert abs(resumed["grad_norm"][0] - straight["grad_norm"][2]) <= 1e-5 * straight["grad_norm"][2]
