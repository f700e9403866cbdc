"""Adaptive residual scaling: each env's scale from its experts' confidence, the action the env executes, the scale
shown to the policy, and the confidence sources (the IK expert's phases, several experts' agreement)."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import experts
import util
from conftest import TINY, RecordingEnv, pick_cube_state, run_main

EXPERT_ACTION = torch.tensor([0.1, -0.2, 0.05, 0.0])  # pd_ee_delta_pos: xyz and gripper, all inside the bounds
RESIDUAL = torch.tensor([0.2, 0.2, -0.4, 0.3])


def confident_in(levels):
    """A custom expert returning (action, confidence): the same action everywhere, confidence ``levels``."""
    return lambda obs: (EXPERT_ACTION.repeat(len(levels), 1), torch.tensor(levels))


def test_the_scale_follows_confidence_and_is_what_the_env_executes_and_the_policy_sees():
    env = RecordingEnv(util.make_env("PickCube-v1", 3, "cpu", control_mode="pd_ee_delta_pos"))
    try:
        # confidence 1, 0 and 0.25 with scale 0.5 and min 0.1: 0.1, 0.5 and 0.1 + 0.4 * 0.75 = 0.4
        wrapped = util.ExpertResidualWrapper(env, confident_in([1.0, 0.0, 0.25]), residual_scale=0.5,
                                             residual_scale_mode="adaptive", residual_scale_min=0.1)
        obs, _ = wrapped.reset(seed=0)
        want = torch.tensor([0.1, 0.5, 0.4])
        torch.testing.assert_close(obs[:, -1], want)  # the policy sees its authority
        torch.testing.assert_close(obs[:, -5:-1], EXPERT_ACTION.repeat(3, 1))
        for _ in range(2):
            obs, _, _, _, info = wrapped.step(RESIDUAL.repeat(3, 1))
            executed = env.executed[-1]
            # at confidence 1 the action moves by min * residual; at confidence 0 by scale * residual
            torch.testing.assert_close(executed, EXPERT_ACTION + want[:, None] * RESIDUAL)
            torch.testing.assert_close(info["action_stats"]["residual_scale"], want.mean())

        constant = util.ExpertResidualWrapper(env, confident_in([1.0, 0.0, 0.25]), residual_scale=0.5)
        obs, _ = constant.reset(seed=0)
        constant.step(RESIDUAL.repeat(3, 1))
        assert obs.shape[1] == wrapped.reset(seed=0)[0].shape[1] - 1, "constant scaling adds no column"
        torch.testing.assert_close(env.executed[-1], EXPERT_ACTION + 0.5 * RESIDUAL.repeat(3, 1))
    finally:
        env.close()


def test_ik_confidence_by_phase_on_scripted_states():
    expert = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")
    # far above the cube (approach), on the cube with open fingers (closing), holding it (carry)
    obs = pick_cube_state(tcp=[[0.0, 0.0, 0.2], [0.1, 0.1, 0.02], [0.1, 0.1, 0.02]],
                          cube=[[0.1, 0.1, 0.02]] * 3, grasped=[False, False, True])
    expert(obs)
    # full trust in free motion, half while the fingers close on the cube (the guide's phases)
    assert expert.confidence(obs).tolist() == [1.0, 0.5, 1.0]

    # PegInsertionSide: a 10 cm peg (2 cm half width) held 6 cm behind its centre, its head 1 cm before the
    # mouth of a hole 30 cm away along y (env 0: on the hole's axis, the fine alignment) or 30 cm off it (env 1)
    gripper_down = torch.tensor([0.0, 1.0, 0.0, 0.0])  # a half turn about x: the TCP's z axis points down
    hole = torch.tensor([0.0, 0.3, 0.1])
    peg_centres = torch.stack([hole - torch.tensor([0.21, 0.0, 0.0]), torch.tensor([-0.21, 0.0, 0.1])])
    qpos = torch.zeros(2, 9)
    qpos[:, 7:] = 0.02  # fingers closed on 4 cm
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(2, 1)
    obs = dict(agent=dict(qpos=qpos, qvel=torch.zeros(2, 9)), extra=dict(
        tcp_pose=torch.cat([peg_centres - torch.tensor([0.06, 0.0, 0.0]), gripper_down.repeat(2, 1)], 1),
        peg_pose=torch.cat([peg_centres, identity], 1), peg_half_size=torch.tensor([[0.1, 0.02, 0.02]] * 2),
        box_hole_pose=torch.cat([hole.repeat(2, 1), identity], 1), box_hole_radius=torch.full((2,), 0.023)))
    peg = experts.IKExpert("PegInsertionSide-v1", "pd_ee_delta_pose")
    assert peg.confidence(obs).tolist() == [0.0, 1.0]  # none in the fine alignment, full far from the hole


def test_several_experts_are_as_confident_as_they_agree():
    env = util.make_env("PickCube-v1", 2, "cpu", control_mode="pd_ee_delta_pos")
    try:
        # pd_ee_delta_pos bounds are [-1, 1]: actions 0.4 apart on one entry spread 0.4 / 2 = 0.2 -> agreement 0.8
        left = lambda obs: torch.tensor([[0.2, 0.0, 0.0, 1.0]] * 2)
        right = lambda obs: (torch.tensor([[-0.2, 0.0, 0.0, 1.0]] * 2), torch.tensor([1.0, 0.5]))
        wrapped = util.ExpertResidualWrapper(env, [left, right], residual_scale=0.5, residual_scale_mode="adaptive")
        obs, _ = wrapped.reset(seed=0)
        # own confidences (1 and 1, then 1 and 0.5) averaged, times the agreement: 0.8 and 0.6
        torch.testing.assert_close(obs[:, -1], 0.5 * (1 - torch.tensor([0.8, 0.6])))
        same = util.ExpertResidualWrapper(env, [left, left], residual_scale=0.5, residual_scale_mode="adaptive")
        torch.testing.assert_close(same.reset(seed=0)[0][:, -1], torch.zeros(2))  # full agreement: no authority
    finally:
        env.close()


def test_an_adaptive_run_trains_and_its_checkpoint_acts_with_the_scale_it_was_trained_with(tmp_path):
    """ppo.py under --residual-scale-mode adaptive; its checkpoint as a model expert rebuilds the per-env scale from
    the IK expert's phase, shows it to the policy and executes clip(ik + scale * mean)."""
    args = [*TINY, "--expert-type", "ik", "--control-mode", "pd_ee_delta_pos", "--residual-scale-mode", "adaptive",
            "--residual-scale", "0.5", "--residual-scale-min", "0.1", "--no-capture-video", "--output-dir",
            str(tmp_path)]
    proc = run_main("ppo.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [str(p) for p in tmp_path.glob("PickCube-v1__ppo__1__*")]
    events = EventAccumulator(run_dir)
    events.Reload()
    executed_scales = [e.value for e in events.Scalars("actions/residual_scale_abs_mean")]
    # the first iteration's 8 steps are the approach, free motion the expert is sure of: the scale at its minimum;
    # a confidence read the wrong way round, or ignored, would give 0.5
    assert len(executed_scales) == 2 and executed_scales[0] == pytest.approx(0.1), executed_scales
    assert 0.1 <= executed_scales[1] < 0.5, executed_scales

    checkpoint = torch.load(f"{run_dir}/final_ckpt.pt", weights_only=True)
    mean = torch.tensor([0.3, -0.2, 0.1, 0.9])
    checkpoint["model"]["actor_mean.6.weight"].zero_()
    checkpoint["model"]["actor_mean.6.bias"].copy_(mean)
    torch.save(checkpoint, tmp_path / "adaptive.pt")
    env = util.make_env("PickCube-v1", 3, "cpu", control_mode="pd_ee_delta_pos")
    try:
        model = experts.make_expert("model", "PickCube-v1", env, model_path=str(tmp_path / "adaptive.pt"))
        obs, _ = env.reset(seed=0)
        assert checkpoint["meta"]["obs_dim"] == util.flat_state(obs).shape[1] + 4 + 1, "the scale is a column"
        # the real observation, with the TCP and cube placed by hand: approach, closing on the cube, carrying
        scripted = pick_cube_state(tcp=[[0.0, 0.0, 0.2], [0.1, 0.1, 0.02], [0.1, 0.1, 0.02]],
                                   cube=[[0.1, 0.1, 0.02]] * 3, grasped=[False, False, True])
        obs["agent"]["qpos"][:, 7:] = scripted["agent"]["qpos"][:, 7:]
        for key in ("is_grasped", "tcp_pose", "obj_pose"):
            obs["extra"][key] = scripted["extra"][key]
        ik = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")(obs)
        # confidence 1, 0.5, 1 -> scale 0.1 + 0.4 * (1 - confidence) = 0.1, 0.3, 0.1
        want = (ik + torch.tensor([[0.1], [0.3], [0.1]]) * mean).clamp(-1, 1)
        torch.testing.assert_close(model(obs), want)
    finally:
        env.close()
