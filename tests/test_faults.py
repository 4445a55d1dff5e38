"""Hard faults on real processes: SIGKILL mid-run then resume, and a torchrun rank killed.

A suite across modules, not one module's tests: a fault is survived by the engine, the
checkpoint writer and the command line together, so each test runs whole processes."""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsnet.train.checkpoint import read_checkpoint
from dsnet.config import load_config, save_config
from tests.test_runs import ROOT, TINY, assert_same_weights

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
LONGER = ["data.synthetic_train_size=320", "train.epochs=4", "gate.epochs=4", "train.recalibrate_bn=false"]


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yml"
    save_config(load_config(None, [*TINY, *LONGER]), path)
    return path


def _train(script: str, cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), "-c", str(cfg), *extra, f"output.dir={out}"],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def _kill_after_first_checkpoint(proc: subprocess.Popen, out: Path, rng: random.Random) -> None:
    """SIGKILL ``proc`` at a random moment after its first checkpoint (maybe while it writes one)."""
    last = out / "checkpoints" / "last.pth"
    deadline = time.monotonic() + 240
    while not last.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def _records(run: Path) -> list[dict]:
    """The whole records of ``run``'s metrics.jsonl (a killed writer may leave half a line)."""
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            records.append({})
    return records


@pytest.mark.parametrize("stage", ["supernet", "gate"])
def test_sigkill_at_a_random_moment_then_resume_ends_with_the_uninterrupted_weights(tmp_path, stage):
    cfg, rng = _config(tmp_path), random.Random(stage)
    extra: tuple[str, ...] = ()
    script = "train_supernet.py"
    if stage == "gate":
        _finish(_train("train_supernet.py", cfg, tmp_path / "supernet", "train.epochs=1"))
        extra, script = ("--supernet", str(tmp_path / "supernet" / "checkpoints" / "last.pth")), "train_gate.py"
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    reference = _train(script, cfg, straight, *extra)
    victim = _train(script, cfg, broken, *extra)
    _kill_after_first_checkpoint(victim, broken, rng)
    _finish(reference)
    killed_at = read_checkpoint(broken / "checkpoints" / "last.pth")  # whole, though the kill may hit a save
    assert 1 <= killed_at["epoch"] < 4
    logged = len(_records(broken))
    _finish(_train(script, cfg, broken, *extra, f"train.resume={broken / 'checkpoints' / 'last.pth'}"))
    resumed = [r["epoch"] for r in _records(broken)[logged:] if "train_time_s" in r and "recalibrated" not in r]
    assert resumed[0] == killed_at["epoch"] + 1  # resumed, not trained again from the start (same weights either way)
    a, b = (read_checkpoint(d / "checkpoints" / "last.pth") for d in (straight, broken))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 4
    assert_same_weights(a["model"], b["model"])
    if stage == "supernet":
        assert_same_weights(a["ema"], b["ema"])
    assert not list((broken / "checkpoints").glob(".*.tmp")), "a resumed run clears half-written checkpoints"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), read from /proc."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [d for c in children for d in [c, *_descendants(c)]]


def _rank_pid(agent: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the agent)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} appeared")


@pytest.mark.skipif(not Path("/proc/self/task").exists() or not torch.distributed.is_available(),
                    reason="needs Linux /proc and torch.distributed")
def test_torchrun_with_a_killed_rank_stops_the_others_quickly_with_an_error(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           str(ROOT / "train_supernet.py"), "-c", str(_config(tmp_path)), "train.epochs=50",
           "train.batch_size=8", f"output.dir={out}"]
    agent = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        victim = _rank_pid(agent, 1)
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # both ranks are in the training loop
            assert agent.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        _, err = agent.communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    assert "train_supernet.py FAILED" in err and "exitcode  : -9" in err, err[-2000:]
    assert elapsed < 60, f"the surviving rank took {elapsed:.0f} s to stop"


@pytest.mark.skipif(not Path("/proc/self/task").exists() or not torch.distributed.is_available(),
                    reason="needs Linux /proc and torch.distributed")
def test_torchrun_killed_then_the_same_command_again_ends_bit_identical(tmp_path):
    """A 2-rank torchrun run with dropout, SIGKILLed (agent and workers) at a random moment after
    its first checkpoint, then started again with the very same command (``train.resume=auto``),
    ends with the weights of the run never interrupted: each rank resumes its own random streams
    (dropout masks, augmentation), not rank 0's."""
    cfg = _config(tmp_path)
    same = ["model.drop_rate=0.3", "data.num_workers=1", "train.batch_size=8", "data.synthetic_train_size=1280",
            "train.resume=auto"]  # 80 steps per rank and epoch: time to kill it mid-run

    def torchrun(out: Path, port: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                 f"--master_port={port}", str(ROOT / "train_supernet.py"), "-c", str(cfg), *same,
                                 f"output.dir={out}"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)

    straight, broken = tmp_path / "straight", tmp_path / "broken"
    reference, victim = torchrun(straight, 29545), torchrun(broken, 29547)
    try:
        last = broken / "checkpoints" / "last.pth"
        deadline = time.monotonic() + 240
        while not last.exists():
            assert victim.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.01)
        time.sleep(random.Random(7).uniform(0.0, 0.6))
        for pid in _descendants(victim.pid) + [victim.pid]:  # the ranks (their own sessions) and the agent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        victim.wait(timeout=60)
        _finish(reference)
    finally:
        for proc in (reference, victim):
            if proc.poll() is None:
                for pid in _descendants(proc.pid) + [proc.pid]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
    killed_at = read_checkpoint(last)
    assert 1 <= killed_at["epoch"] < 4, "the run finished before it could be killed"
    _finish(torchrun(broken, 29549))
    a, b = (read_checkpoint(d / "checkpoints" / "last.pth") for d in (straight, broken))
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 4
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])
    assert len(a["rank_rng"]) == 2
