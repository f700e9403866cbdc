"""Reliability of the training scripts: resume, rotating checkpoints, signals, kill -9, dead workers, NaN."""

import glob
import os
import shutil

import torch

from conftest import run_script

# 2 envs, 4 iterations of 25 steps; a checkpoint every 2 iterations, i.e. every 50 steps per env, which is
# PickCube's episode length: without partial resets, every checkpoint falls on an episode start
ALIGNED = ["--sim-backend", "cpu", "--num-envs", "2", "--num-eval-envs", "1", "--num-steps", "25",
           "--num-minibatches", "2", "--total-timesteps", "200", "--eval-freq", "2", "--num-eval-steps", "10",
           "--no-partial-reset", "--no-capture-video"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resumed_run_matches_the_straight_run(tmp_path):
    """N iterations straight equal N/2, resume, N/2 (CPU backend, fixed seeds, checkpoint at episode starts)."""
    proc = run_script("ppo.py", [*ALIGNED, "--output-dir", str(tmp_path / "straight")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (straight,) = glob.glob(str(tmp_path / "straight" / "*"))
    half = load(os.path.join(straight, "ckpt_2.pt"))
    assert (half["resume"]["iteration"], half["resume"]["global_step"]) == (2, 100)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(os.path.join(straight, "ckpt_2.pt"), resumed / "ckpt_2.pt")
    proc = run_script("ppo.py", ["--resume", "--checkpoint", str(resumed / "ckpt_2.pt")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "after iteration 2 (100 steps)" in proc.stdout
    assert glob.glob(str(resumed / "events.out.tfevents.*")), "logging continues in the run's directory"

    want, got = load(os.path.join(straight, "final_ckpt.pt")), load(resumed / "final_ckpt.pt")
    assert got["resume"]["global_step"] == want["resume"]["global_step"] == 200
    moved = sum((want["model"][k] - half["model"][k]).norm() for k in want["model"])
    assert moved > 1e-3, "the second half must change the parameters, or the comparison proves nothing"
    for k in want["model"]:
        torch.testing.assert_close(got["model"][k], want["model"][k], msg=f"parameter {k} diverged")
    for a, b in zip(got["resume"]["optimizer"]["state"].values(), want["resume"]["optimizer"]["state"].values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])
