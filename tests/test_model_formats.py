"""Policies trained elsewhere as model experts: a state dict in the layout of ManiSkill's PPO baselines, a TorchScript
module and an exported program, each acting in a closed loop and matching its own forward pass; and the one-line
refusals of a policy of the wrong size, of ManiSkill's image Agent and of an unknown layout."""

import pytest
import torch

import experts
import util
from conftest import run_main

# PickCube-v1 in pd_joint_delta_pos, ManiSkill's default control mode: the flat "state" observation is the
# state_dict's leaves in order (qpos 9, qvel 9, then the task's extras), 42 numbers; actions are 8 numbers
OBS_DIM, ACTION_DIM = 42, 8


def state_by_hand(obs: dict) -> torch.Tensor:
    """PickCube-v1's flat state observation, written out from the task's _get_obs_extra."""
    agent, extra = obs["agent"], obs["extra"]
    state = torch.cat([agent["qpos"], agent["qvel"], extra["is_grasped"].float()[:, None], extra["tcp_pose"],
                       extra["goal_pos"], extra["obj_pose"], extra["tcp_to_obj_pos"], extra["obj_to_goal_pos"]], dim=1)
    assert state.shape[1] == OBS_DIM
    return state


def maniskill_state_dict(obs_dim=OBS_DIM, action_dim=ACTION_DIM, hidden=256) -> dict:
    """The Agent of ManiSkill's ppo.py, by its documented key names and shapes: critic and actor_mean are three
    hidden Linear layers of 256 with Tanh between them, at Sequential indices 0, 2, 4 and 6; actor_logstd is
    [1, action_dim]. Random weights, scaled so the mean stays within the action bounds' order."""
    g = torch.Generator().manual_seed(0)
    sizes = [obs_dim, hidden, hidden, hidden]
    layout = {}
    for head, out in (("critic", 1), ("actor_mean", action_dim)):
        for n, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:] + [out])):
            layout[f"{head}.{2 * n}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5
            layout[f"{head}.{2 * n}.bias"] = torch.randn(fan_out, generator=g) * 0.1
    layout["actor_logstd"] = torch.full((1, action_dim), -0.5)
    return layout


def mean_by_hand(layout: dict, state: torch.Tensor) -> torch.Tensor:
    h = state
    for i in (0, 2, 4):
        h = torch.tanh(h @ layout[f"actor_mean.{i}.weight"].T + layout[f"actor_mean.{i}.bias"])
    return h @ layout["actor_mean.6.weight"].T + layout["actor_mean.6.bias"]


class Policy(torch.nn.Module):
    """A policy trained elsewhere: any module from [N, 42] to [N, 8]."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(ACTION_DIM, OBS_DIM, generator=g) * 0.1)

    def forward(self, state):
        return torch.sin(state @ self.weight.T)


def closed_loop(path, forward, obs_mode="state_dict", steps=4):
    """Act with the model expert on one env (ManiSkill's own, in this process) for a few steps, its action
    executed; at every step the action must equal ``forward`` of the flat state built by hand."""
    cameras = dict(sensor_configs=dict(width=36, height=36)) if "rgb" in obs_mode else {}
    env = util.make_env("PickCube-v1", 1, "physx_cpu", obs_mode=obs_mode, control_mode="pd_joint_delta_pos", **cameras)
    try:
        expert = experts.make_expert("model", "PickCube-v1", env, model_path=str(path))
        obs, _ = env.reset(seed=3)
        moved = 0.0
        for _ in range(steps):
            action = expert(obs)
            torch.testing.assert_close(action, forward(state_by_hand(obs)))
            before = obs["agent"]["qpos"].clone()
            obs, *_ = env.step(action.clamp(-1, 1))
            moved += (obs["agent"]["qpos"] - before).abs().sum().item()
        assert moved > 1e-3, "the expert's actions must move the robot"
    finally:
        env.close()


def test_a_maniskill_baseline_state_dict_acts_by_its_actor_mean(tmp_path):
    layout = maniskill_state_dict()
    torch.save(layout, tmp_path / "maniskill.pt")
    closed_loop(tmp_path / "maniskill.pt", lambda state: mean_by_hand(layout, state))


def test_a_torchscript_module_acts_as_the_expert_from_privileged_state(tmp_path):
    policy = Policy()
    torch.jit.save(torch.jit.script(policy), tmp_path / "policy.ts")
    with torch.no_grad():
        # the image scripts' observation: camera images next to the privileged state the expert reads
        closed_loop(tmp_path / "policy.ts", policy, obs_mode="state_dict+rgb", steps=2)


def test_an_exported_program_acts_as_the_expert(tmp_path):
    policy = Policy()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(policy, (torch.zeros(4, OBS_DIM),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "policy.pt2")
    with torch.no_grad():
        closed_loop(tmp_path / "policy.pt2", policy)


# one env each for training and eval: the refusal comes at the expert's first call
ONE_ENV = ["--sim-backend", "cpu", "--num-envs", "1", "--num-eval-envs", "1", "--num-steps", "8",
           "--num-minibatches", "1", "--total-timesteps", "8", "--eval-reconfiguration-freq", "0"]


def refused(tmp_path, *flags):
    proc = run_main("ppo.py", [*ONE_ENV, "--expert-type", "model", *flags, "--output-dir", str(tmp_path / "o")],
                    cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists(), "a refused run writes nothing"
    return proc.stderr.strip().splitlines()[-1]


def test_a_policy_of_the_wrong_size_names_both_sizes(tmp_path):
    torch.save(maniskill_state_dict(), tmp_path / "maniskill.pt")
    # trained in pd_joint_delta_pos (8 actions), run in pd_ee_delta_pos (4 actions)
    line = refused(tmp_path, "--model-path", str(tmp_path / "maniskill.pt"), "--control-mode", "pd_ee_delta_pos")
    assert "maps 42-dim observations to 8-dim actions" in line and "takes 4-dim actions" in line, line
    assert "--control-mode must be the one the policy was trained in" in line, line

    torch.jit.save(torch.jit.script(Policy()), tmp_path / "policy.ts")
    env = util.make_env("PickCube-v1", 1, "physx_cpu", control_mode="pd_ee_delta_pos")
    try:
        expert = experts.make_expert("model", "PickCube-v1", env, model_path=str(tmp_path / "policy.ts"))
        with pytest.raises(util.UsageError, match=r"returns \[1, 8\] for a \[1, 42\] observation, but PickCube-v1 "
                                                  r"in control mode pd_ee_delta_pos gives 42-dim state observations "
                                                  r"and takes 4-dim actions"):
            expert(env.reset(seed=0)[0])
    finally:
        env.close()


@pytest.mark.parametrize("keys, message", [
    (["feature_net.extractors.rgb.0.weight", "actor_mean.0.weight", "actor_logstd"],
     "is the Agent of ManiSkill's ppo_rgb.py (a NatureCNN on its FlattenRGBDObservationWrapper's images); its image "
     "observation is not rebuilt here, so only ManiSkill's state policies serve as experts"),
    (["encoder.weight", "head.bias"],
     "has an unknown layout (keys encoder.weight, head.bias...); expected a checkpoint of these scripts, a state dict "
     "of the Agent of ManiSkill's PPO baselines (ppo.py, ppo_fast.py), a TorchScript module (torch.jit.save) or an "
     "exported program (torch.export.save)"),
])
def test_an_image_agent_or_an_unknown_layout_is_refused_in_one_line(tmp_path, keys, message):
    torch.save({k: torch.zeros(2, 2) for k in keys}, tmp_path / "other.pt")
    line = refused(tmp_path, "--model-path", str(tmp_path / "other.pt"), "--control-mode", "pd_joint_delta_pos")
    assert line == f"error: model '{tmp_path / 'other.pt'}' {message}", line
