"""What every script's checkpoint holds and does: --evaluate's metrics over the IK expert, the model expert's
composition (base, scale, learned mix), the image policy's state size, and the files a run keeps."""

import glob
import json
import os
import re

import pytest
import torch

import experts
import util
from conftest import SMALL_CAMERA, TINY, run_main, with_head

SCRIPTS = ["ppo.py", "ppo_rgb.py", "ppo_fast.py", "ppo_rgb_fast.py"]


def camera(script):
    return SMALL_CAMERA if "rgb" in script else []


def test_a_run_keeps_the_newest_numbered_checkpoints(ik_run):
    run_dir = ik_run("ppo.py")[0]  # two iterations, --keep-checkpoints 1
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.pt"))) == \
        ["ckpt_2.pt", "final_ckpt.pt", "latest.pt"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_progress_bar_ends_at_the_runs_env_steps(script, ik_run):
    """2 envs x 8 steps an iteration: 2 iterations (32 steps), or 3 for ppo_rgb.py's run (48 steps). The bar's
    last state, printed when it closes, must count them all."""
    total = 48 if script == "ppo_rgb.py" else 32
    counts = re.findall(r"\| *(\d+)/(\d+) \[", ik_run(script)[1].stderr)
    assert counts and counts[-1] == (str(total), str(total)), counts[-3:]


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluate_scores_the_expert_under_a_zero_residual(script, ik_run, tmp_path):
    """A zero residual head executes the IK expert alone, which solves PickCube-v1: --evaluate must report it."""
    zero = with_head(os.path.join(ik_run(script)[0], "final_ckpt.pt"), tmp_path / "zero.pt", torch.zeros(4))
    proc = run_main(script, ["--evaluate", "--checkpoint", zero, "--expert-type", "ik", "--sim-backend", "cpu",
                               "--num-eval-envs", "1", "--no-capture-video", "--eval-reconfiguration-freq", "0",
                               *camera(script), "--output-dir", str(tmp_path / "eval")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = glob.glob(str(tmp_path / "eval" / "*" / "summary.json"))
    metrics = json.load(open(summary))["eval"]
    assert json.load(open(summary))["checkpoint"] == zero
    assert metrics["episodes"] == 1 and metrics["episode_len"] == 50
    assert metrics["success_once"] == 1.0, metrics


def test_model_expert_is_the_clipped_sum_of_its_base_and_scaled_mean(ik_run, tmp_path):
    """A checkpoint trained over IK at scale 0.2, its policy mean set to a large constant: the expert executes
    clip(IK + 0.2 * mean), computed here from the IK expert and the network by hand."""
    import ppo

    mean = torch.tensor([0.5, -4.0, 0.3, 6.0])
    path = with_head(os.path.join(ik_run("ppo_fast.py")[0], "final_ckpt.pt"), tmp_path / "head.pt", mean)
    env = util.make_env("PickCube-v1", 1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos")
    try:
        expert = experts.make_expert("model", "PickCube-v1", env, model_path=path)
        ik = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")
        payload = torch.load(path, weights_only=True)
        agent = ppo.Agent(payload["meta"]["obs_dim"], payload["meta"]["action_dim"])
        agent.load_state_dict(payload["model"])
        obs, _ = env.reset(seed=2)
        for _ in range(4):
            with torch.no_grad():
                got = expert(obs)
                policy_mean = agent.get_action(torch.cat([util.flat_state(obs), ik(obs)], dim=1))
            torch.testing.assert_close(policy_mean, mean[None])
            want = (ik(obs) + 0.2 * mean).clamp(-1, 1)
            torch.testing.assert_close(got, want)
            assert want[0, 3] == 1.0 and want[0, 1] < ik(obs)[0, 1], "the clip and the scale both show"
            obs, *_ = env.step(got)
    finally:
        env.close()


@pytest.mark.parametrize("script", ["ppo_rgb.py", "ppo_rgb_fast.py"])
def test_image_checkpoints_record_the_policy_state_size(script, ik_run):
    """PickCube-v1 in ManiSkill's "rgb" mode: qpos 9 + qvel 9 + is_grasped 1, tcp_pose 7, goal_pos 3, and the
    IK expert's action 4 (pd_ee_delta_pos) = 33; no object pose."""
    meta = torch.load(os.path.join(ik_run(script)[0], "final_ckpt.pt"), weights_only=True)["meta"]
    assert meta["state_dim"] == 33 and meta["rgb_shape"] == [36, 36, 3]


# ManiSkill's "rgb"-mode extras of each task (its _get_obs_extra without state), plus qpos 9 and qvel 9, plus the
# IK expert's action (4 in pd_ee_delta_pos)
RGB_POLICY_STATE = {"PickCube-v1": 18 + (1 + 7 + 3) + 4, "StackCube-v1": 18 + 7 + 4, "PushCube-v1": 18 + 7 + 4,
                    "PullCube-v1": 18 + (7 + 3) + 4}


def test_image_policy_state_for_every_ik_task():
    """In this process (ManiSkill's own CPU simulation), all four envs open together: the software renderer
    compiles its shaders once while any of its envs lives. The CPU backend's workers find the same keys
    (test_image_checkpoints_record_the_policy_state_size)."""
    envs = []
    try:
        for task, policy_state in RGB_POLICY_STATE.items():
            envs.append(util.make_env(task, 1, sim_backend="physx_cpu", obs_mode="state_dict+rgb",
                                      control_mode="pd_ee_delta_pos", sensor_configs=dict(width=36, height=36)))
            ik = experts.IKExpert(task, envs[-1].control_mode)
            for include_state, size in ((True, policy_state), (False, 4)):
                policy_obs = util.image_policy_obs(envs[-1], include_state)
                obs, _ = util.ExpertResidualWrapper(envs[-1], ik, policy_obs_fn=policy_obs).reset(seed=0)
                assert obs["state"].shape == (1, size), (task, include_state)
                assert obs["rgb"].shape[:3] == (1, 36, 36) and obs["rgb"].dtype == torch.uint8, task
    finally:
        for env in envs:
            env.close()


def test_a_checkpoint_holding_a_pickled_object_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):  # what unpickling would run
            return (open, (str(marker), "w"))

    torch.save({"model": Payload(), "meta": {}}, tmp_path / "evil.pt")
    proc = run_main("ppo.py", [*TINY, "--evaluate", "--checkpoint", str(tmp_path / "evil.pt"), "--output-dir",
                                 str(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(lines) == 1 and "evil.pt' cannot be loaded" in lines[0], proc.stderr
    assert not marker.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_reports_its_expert_alone_and_where_it_ended(script, ik_run):
    """The residual head starts at exactly zero, so the first eval is the expert alone: it is labelled so, and the
    last line and summary.json carry that figure beside the final eval's."""
    import importlib

    agent_cls = importlib.import_module(script[:-3]).Agent
    agent = agent_cls([36, 36, 3], 33, 4, -0.5) if "rgb" in script else agent_cls(33, 4, -0.5)
    obs = dict(rgb=torch.randint(0, 255, (5, 36, 36, 3), dtype=torch.uint8), state=torch.randn(5, 33)) \
        if "rgb" in script else torch.randn(5, 33)
    assert torch.equal(agent.get_action(obs), torch.zeros(5, 4))

    run_dir, proc = ik_run(script)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    first, final = summary["expert_alone"]["success_once"], summary["eval"]["success_once"]
    evals = re.findall(r"^eval @ (\d+) steps: success_once=([0-9.]+)", proc.stdout, re.M)
    assert evals[0][0] == "0" and int(evals[-1][0]) == summary["global_step"] > 0, evals
    # the summary's figures are the printed evals': the first (the expert alone) and the last
    assert first == pytest.approx(float(evals[0][1]), abs=5e-4)
    assert final == pytest.approx(float(evals[-1][1]), abs=5e-4)
    assert proc.stdout.count("(the expert alone: the residual head starts at zero)") == 1
    assert re.search(r"^eval @ 0 steps: .*\(the expert alone: the residual head starts at zero\)$", proc.stdout, re.M)
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith(f"PickCube-v1: expert alone {first:.2f} -> with residual {final:.2f} success_once "
                                f"({summary['global_step']} env steps, "), last_line
    meta = torch.load(os.path.join(run_dir, "final_ckpt.pt"), weights_only=True)["meta"]
    assert meta["expert_alone"] == summary["expert_alone"], "a resumed run reports the same starting point"


def test_a_run_without_an_expert_reports_its_final_eval_alone(trained):
    run_dir, proc = trained  # the zero expert
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["expert_alone"] is None and "expert alone" not in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith(f"PickCube-v1: {summary['eval']['success_once']:.2f} "
                                                           f"success_once (")


def test_the_users_of_each_shared_run_go_to_one_xdist_worker(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) every test of a shared training run carries that run's
    group, so that one worker trains it once for all of them."""
    from conftest import SHARED_RUNS

    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under pytest-xdist's --dist loadgroup, as `make test` does")
    groups = {item.nodeid: next((n for n in SHARED_RUNS if n in item.fixturenames), None)
              for item in request.session.items}
    users = {nodeid: name for nodeid, name in groups.items() if name}
    if not users:
        pytest.skip("no test of a shared run is selected")
    assert all(nodeid.endswith(f"@{name}") for nodeid, name in users.items()), users
