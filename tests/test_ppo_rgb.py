"""ppo_rgb.py on the CPU backend: the image observation, the uint8 buffer, checkpoint and --evaluate."""

import glob
import json
import os

import gymnasium as gym
import pytest
import torch

import util
from conftest import SMALL_CAMERA, run_main, tiny_run



def test_policy_sees_exactly_maniskills_rgb_observation():
    kw = dict(num_envs=1, control_mode="pd_joint_delta_pos")
    backend = util.make_env("PickCube-v1", sim_backend="physx_cpu", obs_mode="state_dict+rgb", **kw)
    reference = gym.make("PickCube-v1", sim_backend="physx_cpu", obs_mode="rgb", **kw)
    wrapped = util.ExpertResidualWrapper(backend, lambda obs: obs["extra"]["obj_pose"][:, :8].new_zeros(1, 8),
                                         policy_obs_fn=util.image_policy_obs(backend))
    obs, _ = wrapped.reset(seed=5)
    ref, _ = reference.reset(seed=5)
    assert set(obs) == {"rgb", "state"}
    assert obs["rgb"].dtype == torch.uint8
    torch.testing.assert_close(obs["rgb"], ref["sensor_data"]["base_camera"]["rgb"])
    assert backend.image_policy_extra_keys == list(ref["extra"])
    assert "obj_pose" not in ref["extra"]  # privileged in this task, so the policy must not see it
    expected_state = util.flat_state(dict(agent=ref["agent"], extra=ref["extra"]))
    torch.testing.assert_close(obs["state"], torch.cat([expected_state, torch.zeros(1, 8)], dim=1))
    wrapped.close()
    reference.close()


@pytest.fixture(scope="module")
def trained_rgb(ik_run):
    """Three iterations over the IK expert (36x36 camera), the first two critic-only: the run directory."""
    return ik_run("ppo_rgb.py")[0]


def test_rgb_training_keeps_images_as_uint8_and_writes_outputs(trained_rgb):
    summary = json.load(open(os.path.join(trained_rgb, "summary.json")))
    # per env step: the uint8 image, and float32 state (qpos 9, qvel 9, is_grasped 1, tcp_pose 7, goal_pos 3, IK
    # action 4), action 4, and six scalars (log-probability, reward, done, value, final value, residual applied)
    assert summary["buffer_bytes_per_env_step"] == 36 * 36 * 3 + 4 * (33 + 4 + 6)
    assert glob.glob(os.path.join(trained_rgb, "videos", "*.mp4"))
    ckpt = torch.load(os.path.join(trained_rgb, "final_ckpt.pt"), weights_only=True)
    assert ckpt["meta"]["network"] == "cnn-rgb-state" and ckpt["meta"]["rgb_shape"] == [36, 36, 3]


def test_rgb_critic_warmup_freezes_encoders_and_actor(trained_rgb):
    # ckpt_<i> follows iteration i: iteration 2 trains the critic alone, iteration 3 everything; the encoders
    # feed the actor
    start, warmed, final = (torch.load(os.path.join(trained_rgb, name), weights_only=True)["model"]
                            for name in ("ckpt_1.pt", "ckpt_2.pt", "final_ckpt.pt"))
    frozen = [k for k in start if not k.startswith("critic.")]
    assert any(k.startswith("cnn.") for k in frozen) and "actor_logstd" in frozen
    assert torch.equal(start["actor_logstd"], torch.full_like(start["actor_logstd"], -0.5)), "untouched since init"
    assert all(torch.equal(start[k], warmed[k]) for k in frozen)
    assert not torch.equal(start["critic.0.weight"], warmed["critic.0.weight"])
    assert not all(torch.equal(start[k], final[k]) for k in frozen), "everything trains after the warm-up"


def test_state_script_refuses_an_image_checkpoint(trained_rgb, tmp_path):
    ckpt = os.path.join(trained_rgb, "final_ckpt.pt")
    for flags, message in [(["--evaluate", "--checkpoint", ckpt], "network=cnn-rgb-state (written by ppo_rgb.py)"),
                           (["--resume", "--checkpoint", ckpt], "network=cnn-rgb-state (written by ppo_rgb.py)"),
                           (["--expert-type", "model", "--model-path", ckpt, "--control-mode", "pd_ee_delta_pos"],
                            "acts from camera images")]:
        proc = run_main("ppo.py", [*flags, "--output-dir", str(tmp_path / "x")], cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_no_include_state_and_no_save_model_reach_the_run(tmp_path):
    """--no-include-state leaves the policy's state with the IK expert's action alone (4 in pd_ee_delta_pos), which
    the buffer's size shows; --no-save-model writes no checkpoint, the run's other outputs still."""
    run_dir, proc = tiny_run("ppo_rgb.py", tmp_path, "--expert-type", "ik", "--no-include-state", "--no-save-model",
                             "--no-capture-video", *SMALL_CAMERA)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["buffer_bytes_per_env_step"] == 36 * 36 * 3 + 4 * (4 + 4 + 6)
    assert summary["global_step"] == 32 and "eval @ 32 steps: success_once=" in proc.stdout
    assert not glob.glob(os.path.join(run_dir, "**", "*.pt"), recursive=True)
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
