"""DDP and FSDP2 on a memory-free momentum stack: real process groups (torchrun, gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(ROOT / "tests" / "distributed" / script),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_ddp_matches_one_process() -> None:
    assert "worst relative gradient error" in torchrun("ddp_parity.py")


def test_fsdp2_whole_model_matches_and_per_block_is_refused() -> None:
    assert "per block refused: True" in torchrun("fsdp_parity.py")
