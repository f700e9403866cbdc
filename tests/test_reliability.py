"""Reliability of the training scripts: resume, rotating checkpoints, signals, kill -9, dead workers, NaN."""

import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import util
from conftest import ROOT, TINY, run_main

# 1 env, 4 iterations of 25 steps; a checkpoint every 2 iterations, i.e. every 50 steps, which is PickCube's
# episode length: without partial resets, every checkpoint falls on an episode start
ALIGNED = ["--sim-backend", "cpu", "--num-envs", "1", "--num-eval-envs", "1", "--num-steps", "25",
           "--num-minibatches", "1", "--total-timesteps", "100", "--eval-freq", "2", "--num-eval-steps", "50",
           "--no-partial-reset", "--no-capture-video", "--eval-reconfiguration-freq", "0", "--expert-type", "ik"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("script", ["ppo.py", "ppo_fast.py"])
def test_resumed_run_matches_the_straight_run(script, tmp_path):
    """N iterations straight equal N/2, resume, N/2 (CPU backend, fixed seeds, checkpoint at episode starts), whether
    the same script resumes the run or the other of ppo.py and ppo_fast.py (eager), whose checkpoints are alike."""
    proc = run_main(script, [*ALIGNED, "--output-dir", str(tmp_path / "straight")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    straight_stdout = proc.stdout
    (straight,) = glob.glob(str(tmp_path / "straight" / "*"))
    half = load(os.path.join(straight, "ckpt_2.pt"))
    assert (half["resume"]["iteration"], half["resume"]["global_step"]) == (2, 50)
    want = load(os.path.join(straight, "final_ckpt.pt"))
    moved = sum((want["model"][k] - half["model"][k]).norm() for k in want["model"])
    assert moved > 1e-3, "the second half must change the parameters, or the comparison proves nothing"
    first_eval = re.search(r"eval @ 0 steps: success_once=([0-9.]+)", straight_stdout).group(1)

    other = {"ppo.py": "ppo_fast.py", "ppo_fast.py": "ppo.py"}[script]
    for resumer in (script, other):
        resumed = tmp_path / f"resumed_by_{resumer[:-3]}"
        resumed.mkdir()
        shutil.copy(os.path.join(straight, "ckpt_2.pt"), resumed / "ckpt_2.pt")
        proc = run_main(resumer, ["--resume", "--checkpoint", str(resumed / "ckpt_2.pt")], cwd=tmp_path)
        assert proc.returncode == 0, (resumer, proc.stderr[-3000:])
        assert "resumed from" in proc.stdout and "after iteration 2 (50 steps)" in proc.stdout
        assert glob.glob(str(resumed / "events.out.tfevents.*")), "logging continues in the run's directory"

        got = load(resumed / "final_ckpt.pt")
        assert got["resume"]["global_step"] == want["resume"]["global_step"] == 100
        for k in want["model"]:
            torch.testing.assert_close(got["model"][k], want["model"][k], msg=f"{resumer}: parameter {k} diverged")
        for a, b in zip(got["resume"]["optimizer"]["state"].values(), want["resume"]["optimizer"]["state"].values()):
            assert a["step"] == b["step"]
            torch.testing.assert_close(a["exp_avg"], b["exp_avg"])
            torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])
        # the resumed run makes no eval at step 0, yet reports the expert alone as the straight run measured it there
        assert f"PickCube-v1: expert alone {float(first_eval):.2f} -> with residual" in proc.stdout.strip().splitlines()[-1]
        if resumer == "ppo_fast.py":  # its captured graphs read the learning rate from a tensor
            assert isinstance(got["resume"]["optimizer"]["param_groups"][0]["lr"], torch.Tensor)


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    util.save_checkpoint(path, dict(step=torch.tensor(1)))

    def torn(f):  # half a file, then the disk fills
        f.write(b"\x80\x02half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        util.write_atomically(path, torn)
    assert load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"], "no temporary file is left behind"


def test_run_checkpoints_rotate_and_latest_is_the_newest(tmp_path):
    """keep=2: the two newest numbered checkpoints stay; latest.pt is the newest one's bytes under a second name;
    a temporary file left by a save that was killed is removed."""
    (tmp_path / "ckpt_1.pt.tmp999").write_bytes(b"torn")
    for iteration in (1, 2, 3):
        latest = util.save_run_checkpoint(str(tmp_path), f"ckpt_{iteration}.pt", dict(iteration=iteration), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_2.pt", "ckpt_3.pt", "latest.pt"]
    assert load(latest)["iteration"] == 3 and os.path.samefile(latest, tmp_path / "ckpt_3.pt")


# ---------------------------------------------------------------------------------------------------------------
# signals and kill -9
# ---------------------------------------------------------------------------------------------------------------
# a run that would last long, with a checkpoint after every short iteration
ENDLESS = ["--sim-backend", "cpu", "--num-envs", "2", "--num-eval-envs", "1", "--num-steps", "4",
           "--num-minibatches", "2", "--total-timesteps", "1000000", "--eval-freq", "1", "--num-eval-steps", "2",
           "--no-capture-video", "--eval-reconfiguration-freq", "0"]


def start(args, cwd):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo.py"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def wait_for(path, proc, timeout=180):
    deadline = time.time() + timeout
    while not glob.glob(str(path)):
        assert proc.poll() is None, f"the trainer exited with {proc.returncode} before {path} appeared"
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)
    return glob.glob(str(path))[0]


def descendants(pid):
    """The trainer's processes: the env workers, the fork server they come from, multiprocessing's resource
    tracker."""
    pids = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        with open(task) as f:
            pids += [int(p) for p in f.read().split()]
    return pids + [d for p in pids for d in descendants(p)]


def alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in next(line for line in f if line.startswith("State:")).lower()
    except (OSError, StopIteration):
        return False


def assert_gone(pids, timeout=10):
    deadline = time.time() + timeout
    while any(alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p for p in pids if alive(p)], "leftover worker processes"


@pytest.mark.parametrize("signum,to_group,code", [(signal.SIGINT, True, 0), (signal.SIGTERM, False, 143)],
                         ids=["SIGINT to the process group (Ctrl-C)", "SIGTERM to the trainer"])
def test_signal_checkpoints_closes_workers_and_exits(signum, to_group, code, tmp_path):
    proc = start([*ENDLESS, "--output-dir", str(tmp_path)], tmp_path)
    latest = wait_for(tmp_path / "*" / "latest.pt", proc)
    workers = descendants(proc.pid)
    assert len(workers) >= 5, workers  # 2 train workers, 1 eval worker, the fork server, the resource tracker
    if to_group:  # Ctrl-C in a terminal reaches the workers too: they must leave the stop to the trainer
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    assert f"stopped by {signal.Signals(signum).name}: resume with: " in out
    # its 2-step evals end no 50-step episode, and say so rather than print an empty or NaN figure
    assert "eval @ 0 steps: no episode ended within --num-eval-steps\n" in out and "nan" not in out
    resume = load(latest)["resume"]
    assert resume["global_step"] == 8 * resume["iteration"] > 0
    assert_gone(workers)


def test_the_printed_resume_command_starts_as_many_ranks_as_the_run_had():
    """--resume refuses another number of ranks, so a torchrun job's stop names torchrun with its own."""
    latest = "runs/r/latest.pt"
    assert util.resume_command("ppo.py", latest) == "python ppo.py --resume --checkpoint runs/r/latest.pt"
    one_machine = util.Distributed(rank=0, world_size=4, local_rank=0, local_world_size=4)
    assert util.resume_command("ppo_fast.py", latest, one_machine) == \
        "torchrun --standalone --nproc-per-node 4 ppo_fast.py --resume --checkpoint runs/r/latest.pt"
    two_machines = util.Distributed(rank=0, world_size=4, local_rank=0, local_world_size=2)
    assert util.resume_command("ppo.py", latest, two_machines).startswith("torchrun --nnodes 2 --nproc-per-node 2 ")


def newest_checkpoint(run_dir):
    """The iteration of the newest numbered checkpoint in run_dir (0: none yet)."""
    names = (re.fullmatch(r"ckpt_(\d+)\.pt", os.path.basename(p)) for p in glob.glob(os.path.join(run_dir, "*.pt")))
    return max((int(m.group(1)) for m in names if m), default=0)


def test_kill_9_at_random_moments_always_leaves_a_resumable_checkpoint(tmp_path):
    """Three kills, each 1 to 3 checkpoints after the last start plus a random part of an iteration, so that
    they land anywhere in the cycle (stepping, updating, saving) on a fast machine or a slow one; then the run
    resumes once more and finishes. 30 iterations leave room for the at most 13 the kills can use up."""
    rng = random.Random(0)
    args = [*ENDLESS, "--total-timesteps", "120", "--num-envs", "1", "--output-dir", str(tmp_path)]
    proc = start(args, tmp_path)
    latest = wait_for(tmp_path / "*" / "latest.pt", proc)
    run_dir = os.path.dirname(latest)
    for _ in range(3):
        last = newest_checkpoint(run_dir)
        target, seen, iteration_seconds = last + rng.randint(1, 3), time.time(), 1.0
        while (newest := newest_checkpoint(run_dir)) < target:
            assert proc.poll() is None, "the run ended before the kill"
            if newest > last:  # the time between two checkpoints: one iteration
                last, iteration_seconds, seen = newest, time.time() - seen, time.time()
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, iteration_seconds))
        workers = descendants(proc.pid)
        assert proc.poll() is None, "the run ended before the kill"
        proc.kill()
        proc.wait()
        assert_gone(workers)  # the workers and their fork server notice the trainer's death by themselves
        assert "resume" in load(latest)
        proc = start(["--resume", "--checkpoint", latest], tmp_path)
        assert any("resumed from" in line for line in iter(proc.stdout.readline, "")), "the resume did not start"
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert load(os.path.join(run_dir, "final_ckpt.pt"))["resume"]["global_step"] == 120


# ---------------------------------------------------------------------------------------------------------------
# CPU-worker faults (the plain dead-worker error and orphans: tests/test_backends.py)
# ---------------------------------------------------------------------------------------------------------------
def test_restarted_worker_reports_truncated_episodes_and_goes_on():
    env = util.CpuVectorEnv("PickCube-v1", 4, num_workers=2, restart_dead_workers=True, obs_mode="state_dict",
                            control_mode="pd_joint_delta_pos")
    try:
        env.reset(seed=0)
        for _ in range(3):
            obs, *_ = env.step(torch.zeros(4, 8))
        last = util.flat_state(obs)
        old_pid = env.procs[1].pid
        env.procs[1].kill()
        env.procs[1].join()
        obs, reward, terminated, truncated, info = env.step(torch.zeros(4, 8))
        assert env.worker_restarts == 1 and env.procs[1].pid != old_pid
        assert truncated.tolist() == [False, False, True, True] and not terminated.any()
        assert info["_final_info"].tolist() == [False, False, True, True]
        assert reward[2:].tolist() == [0.0, 0.0]
        # the cut episodes end where the trainer last saw them; the new ones start afresh
        torch.testing.assert_close(util.flat_state(info["final_observation"])[2:], last[2:])
        assert info["final_info"]["episode"]["episode_len"][2:].tolist() == [3, 3]
        obs, _, _, truncated, info = env.step(torch.zeros(4, 8))
        assert info["elapsed_steps"].tolist() == [5, 5, 1, 1] and not truncated.any()
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------------------------
# numerical faults
# ---------------------------------------------------------------------------------------------------------------
def error_lines(proc):
    return [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]


NAN_EXPERT = """
import torch

train_calls = 0


def nan_from_iteration_3(obs):
    global train_calls
    n = obs["agent"]["qpos"].shape[0]
    train_calls += n == 2  # the 2 training envs (the eval env is another batch)
    return torch.full((n, 8), float("nan") if train_calls > 20 else 0.0)
"""


def test_nan_observation_stops_naming_iteration_and_keeps_last_good_checkpoint(tmp_path):
    (tmp_path / "nan_expert.py").write_text(NAN_EXPERT)
    proc = run_main("ppo.py", [*TINY, "--total-timesteps", "80", "--no-capture-video", "--expert-type", "custom",
                                 "--expert-fn", "nan_expert.py:nan_from_iteration_3", "--output-dir", "out"],
                      cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    (run_dir,) = glob.glob("out/*", root_dir=tmp_path)
    assert error_lines(proc) == [f"error: iteration 3: non-finite observations (nan or inf); stopped without saving "
                                 f"this iteration (the last good checkpoint is {run_dir}/latest.pt)"]
    assert "Traceback" not in proc.stderr
    assert sorted(glob.glob("*.pt", root_dir=tmp_path / run_dir)) == ["ckpt_1.pt", "ckpt_2.pt", "latest.pt"]
    good = load(tmp_path / run_dir / "latest.pt")
    assert good["resume"]["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_nonfinite_loss_and_gradients_are_named(tmp_path):
    # rewards of 1e30 are finite, but their squared value error is not
    proc = run_main("ppo.py", [*TINY, "--reward-scale", "1e30", "--no-capture-video", "--output-dir", "out"],
                      cwd=tmp_path)
    assert proc.returncode == 1
    assert error_lines(proc) == ["error: iteration 1: non-finite loss (nan or inf); stopped without saving this "
                                 "iteration (no checkpoint was saved yet)"], proc.stderr[-3000:]
    with pytest.raises(util.FatalError, match="iteration 7: non-finite gradients"):
        util.check_finite(7, str(tmp_path), loss=torch.tensor(1.0), gradients=torch.tensor([0.0, float("inf")]))
