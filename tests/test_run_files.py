"""What a run leaves for its users: ``train.log`` holds what the console showed (every log line,
the final table, the error that stopped a resumed run), and checkpoints are created as any other
file is (0666 less the umask: readable by the group), not 0600 as a temporary file would be."""
import os
import stat
import subprocess
import sys
from pathlib import Path

from dsnet.config import config_yaml, load_config
from dsnet.train.checkpoint import save_checkpoint
from tests.test_runs import TINY

ROOT = Path(__file__).resolve().parents[1]
QUICK = [*TINY, "train.epochs=1", "train.max_steps_per_epoch=1", "train.recalibrate_bn=false",
         "data.synthetic_val_size=16"]


def _dsnet(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsnet.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_train_log_holds_every_line_the_console_showed(tmp_path):
    config = tmp_path / "tiny.yml"
    config.write_text(config_yaml(load_config(None, QUICK)))
    run = tmp_path / "run"
    done = _dsnet(tmp_path, "train-supernet", "-c", str(config), f"output.dir={run}")
    assert done.returncode == 0, done.stderr
    log = (run / "train.log").read_text().splitlines()
    shown = [line for line in (done.stderr + done.stdout).splitlines() if not line.startswith("run directory:")]
    assert any(line.startswith("supernet epoch 1/1: ") for line in shown) and "samples: 16" in shown
    # a log line carries its time ("2026-01-02 03:04:05 "); the table is as printed
    assert [line[20:] if line[:2] == "20" else line for line in log] == shown
    last = run / "checkpoints" / "last.pth"
    refused = _dsnet(tmp_path, "train-supernet", "-c", str(config), f"output.dir={run}", "train.lr=0.2",
                     f"train.resume={last}")
    assert refused.returncode == 2
    message = refused.stderr.strip().splitlines()[-1].removeprefix("dsnet train-supernet: ")
    assert (run / "train.log").read_text().splitlines()[-1] == message  # appended, the run's history kept
    assert len((run / "train.log").read_text().splitlines()) == len(log) + 1


def test_checkpoints_are_created_with_the_umask_like_any_file(tmp_path):
    old = os.umask(0o027)
    try:
        path = save_checkpoint({"stage": "supernet", "model": {}}, tmp_path / "last.pth")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o640
