"""The experts on the real simulator: IK success, differential IK direction, model and custom experts."""

import math
import os
import textwrap

import pytest
import torch

import experts
import util
from conftest import TINY, pick_cube_state, run_main


def ik_successes(task, mode, episodes=10):
    env = util.make_env(task, episodes, "cpu", ignore_terminations=True, control_mode=mode)
    wrapped = util.ExpertResidualWrapper(env, experts.IKExpert(task, mode))
    try:
        wrapped.reset(seed=123)
        for _ in range(wrapped.max_episode_steps):
            _, _, _, _, info = wrapped.step(torch.zeros(episodes, wrapped.action_dim))
        return int(info["final_info"]["episode"]["success_once"].sum())
    finally:
        wrapped.close()


# the fewest successes in a few episodes that bench/RESULTS.md's success rates make likely (at least 98%)
CUBE_TASKS = ["PickCube-v1", "StackCube-v1", "PushCube-v1", "PullCube-v1"]


@pytest.mark.parametrize("task", CUBE_TASKS)
def test_ik_expert_solves_cube_tasks_in_default_mode(task):
    assert experts.ik_control_modes(task)[0] == "pd_ee_delta_pos"
    assert ik_successes(task, "pd_ee_delta_pos") >= 8


@pytest.mark.parametrize("task", CUBE_TASKS)
def test_ik_expert_solves_cube_tasks_in_joint_mode(task):
    assert ik_successes(task, "pd_joint_delta_pos") >= 6


# least: successes in 4 episodes that the expert table's success_once (bench/RESULTS.md) makes near certain
@pytest.mark.parametrize("task, mode, least", [
    ("PegInsertionSide-v1", "pd_ee_delta_pose", 3),
    ("PegInsertionSide-v1", "pd_joint_delta_pos", 3),
    ("LiftPegUpright-v1", "pd_ee_delta_pose", 2),
    ("PokeCube-v1", "pd_ee_delta_pose", 3),
    ("PlugCharger-v1", "pd_joint_delta_pos", 3),
])
def test_ik_expert_solves_tasks_turning_the_gripper(task, mode, least):
    assert ik_successes(task, mode, episodes=4) >= least


def test_expert_gets_privileged_state_next_to_camera_images():
    """The RGB scripts' setup: state_dict+rgb through the CPU backend; the expert reads object poses."""
    env = util.make_env("PickCube-v1", 2, "cpu", obs_mode="state_dict+rgb", control_mode="pd_ee_delta_pos")
    try:
        obs, _ = env.reset(seed=0)
        rgb = obs["sensor_data"]["base_camera"]["rgb"]
        assert rgb.dtype == torch.uint8 and rgb.shape == (2, 128, 128, 3) and rgb.float().std() > 0
        assert "obj_pose" in obs["extra"]
        action = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")(obs)
        assert (action[:, :3].abs().sum(dim=1) > 0).all(), "at reset the TCP is away from the cube: it moves"
        obs, *_ = env.step(action)
        assert obs["sensor_data"]["base_camera"]["rgb"].shape == (2, 128, 128, 3)
    finally:
        env.close()
    # the same episodes without cameras: the expert acts alike, so it read the privileged state, not the images
    state_only = util.make_env("PickCube-v1", 2, "cpu", obs_mode="state_dict", control_mode="pd_ee_delta_pos")
    try:
        torch.testing.assert_close(experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")(state_only.reset(seed=0)[0]),
                                   action)
    finally:
        state_only.close()


def test_differential_ik_moves_and_turns_tcp_as_commanded():
    """Random displacements (orientation held) and random rotations (position held) through the 6-row
    Jacobian: the TCP moves along, and turns about, the commanded direction; the held part barely changes."""
    from mani_skill.utils.geometry.rotation_conversions import matrix_to_axis_angle, quaternion_to_matrix

    env = util.make_env("PickCube-v1", 1, sim_backend="physx_cpu", control_mode="pd_joint_delta_pos")
    ik = experts.DifferentialIK(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    obs, _ = env.reset(seed=0)
    hold = torch.cat([torch.zeros(1, 7), torch.ones(1, 1)], dim=1)
    zero = torch.zeros(1, 3)
    results = []
    for turning in [False] * 8 + [True] * 8:
        for _ in range(4):  # come to rest, so that the last motion does not carry over
            obs, *_ = env.step(hold)
        direction = torch.nn.functional.normalize(torch.randn(1, 3, generator=g), dim=1)
        before_p, before_r = obs["extra"]["tcp_pose"][:, :3], quaternion_to_matrix(obs["extra"]["tcp_pose"][:, 3:])
        for _ in range(3):  # 2 cm or 0.05 rad per step, the IK re-solved at every step
            command = (zero, 0.05 * direction) if turning else (0.02 * direction, zero)
            dq = ik(obs["agent"]["qpos"], *command) / experts.JOINT_STEP
            obs, *_ = env.step(torch.cat([dq.clamp(-1, 1), torch.ones(1, 1)], dim=1))
        moved = obs["extra"]["tcp_pose"][:, :3] - before_p
        turned = matrix_to_axis_angle(quaternion_to_matrix(obs["extra"]["tcp_pose"][:, 3:]) @ before_r.mT)
        along, held = (turned, moved) if turning else (moved, turned)
        results.append((turning, torch.nn.functional.cosine_similarity(along, direction).item(),
                        held.norm().item()))
    env.close()
    assert min(cosine for _, cosine, _ in results) > 0.9, results
    # held: under 5 mm of drift while turning 0.15 rad, under 0.05 rad of turn while moving 6 cm
    assert all(held < (0.005 if turning else 0.05) for turning, _, held in results), results


def test_unsupported_task_or_mode_names_the_supported_ones():
    with pytest.raises(ValueError, match="supported: PickCube-v1, StackCube-v1, PushCube-v1, PullCube-v1, "
                                         "PegInsertionSide-v1, LiftPegUpright-v1, PokeCube-v1, PlugCharger-v1"):
        experts.IKExpert("TurnFaucet-v1", "pd_ee_delta_pos")
    with pytest.raises(ValueError, match="supported: pd_ee_delta_pos, pd_ee_delta_pose, pd_joint_delta_pos"):
        experts.IKExpert("PickCube-v1", "pd_joint_vel")
    # the peg plans turn the gripper, which pd_ee_delta_pos cannot
    with pytest.raises(ValueError, match="PegInsertionSide-v1 in control mode pd_ee_delta_pos; supported: "
                                         "pd_ee_delta_pose, pd_joint_delta_pos"):
        experts.IKExpert("PegInsertionSide-v1", "pd_ee_delta_pos")


def test_model_expert_acts_as_the_trained_actor_mean(trained):
    from ppo import Agent

    run_dir, _ = trained
    path = os.path.join(run_dir, "final_ckpt.pt")
    env = util.make_env("PickCube-v1", 2, "cpu", control_mode="pd_joint_delta_pos")
    try:
        expert = experts.make_expert("model", "PickCube-v1", env, model_path=path)
        obs, _ = env.reset(seed=4)
        for _ in range(3):
            obs, *_ = env.step(torch.rand(2, 8) * 2 - 1)
        ckpt = torch.load(path, weights_only=True)
        agent = Agent(ckpt["meta"]["obs_dim"], ckpt["meta"]["action_dim"])
        agent.load_state_dict(ckpt["model"])
        with torch.no_grad():  # trained with the zero expert and residual scale 1
            mean = agent.get_action(torch.cat([util.flat_state(obs), torch.zeros(2, 8)], dim=1))
        torch.testing.assert_close(expert(obs), mean.clamp(-1, 1))
    finally:
        env.close()


def test_model_expert_refuses_mismatched_and_corrupt_checkpoints(trained, tmp_path):
    run_dir, _ = trained
    good = os.path.join(run_dir, "final_ckpt.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(good, "rb").read()[:2000])
    cases = [
        (["--env-id", "PushCube-v1", "--model-path", good], "env_id=PickCube-v1"),
        (["--control-mode", "pd_ee_delta_pos", "--model-path", good], "control_mode=pd_joint_delta_pos"),
        (["--model-path", str(truncated)], "cannot be loaded"),
    ]
    for extra, message in cases:
        proc = run_main("ppo.py", [*TINY, "--expert-type", "model", *extra, "--output-dir", str(tmp_path / "o")],
                          cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert not (tmp_path / "o").exists()


def test_custom_expert_from_file_reaches_the_env(tmp_path):
    source = tmp_path / "my_expert.py"
    source.write_text(textwrap.dedent("""
        import torch

        def lift(obs):
            n = obs["agent"]["qpos"].shape[0]
            return torch.tensor([[0.0, 0.0, 0.5, 1.0]]).repeat(n, 1)
    """))
    fn = experts.load_expert_fn(f"{source}:lift")
    env = util.make_env("PickCube-v1", 1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos")
    wrapped = util.ExpertResidualWrapper(env, fn)
    obs, _ = wrapped.reset(seed=0)
    z0 = env.base_env.agent.tcp.pose.p[0, 2].item()
    for _ in range(5):
        obs, *_ = wrapped.step(torch.zeros(1, 4))
    assert torch.equal(obs[:, -4:], torch.tensor([[0.0, 0.0, 0.5, 1.0]]))
    assert env.base_env.agent.tcp.pose.p[0, 2].item() > z0 + 0.05, "the expert's lift must move the TCP up"
    wrapped.close()
    with pytest.raises(util.UsageError, match="has no function 'drop'"):
        experts.load_expert_fn(f"{source}:drop")
    # the wrapper calls an expert with the observation alone; keyword-only extras with defaults are fine
    source.write_text(textwrap.dedent("""
        def two(obs, gain):
            return obs

        def tuned(obs, *, gain=1.0):
            return obs
    """))
    with pytest.raises(util.UsageError) as refused:
        experts.load_expert_fn(f"{source}:two")
    assert str(refused.value) == (f"--expert-fn: {source}:two must take one argument, the observation; "
                                  f"its signature is two(obs, gain)")
    assert experts.load_expert_fn(f"{source}:tuned").__name__ == "tuned"


def test_calibration_error_displaces_the_target_by_the_flags():
    """--ik-calibration-mm 3 --ik-calibration-deg 2: the perceived target moves 3 mm and turns 2 degrees about its own
    origin, in directions fixed by --ik-calibration-seed; the expert then steers to the displaced target."""
    error = experts.calibration(dict(ik_calibration_mm=3.0, ik_calibration_deg=2.0, ik_calibration_seed=0))
    assert math.isclose(error.shift.norm().item(), 0.003, rel_tol=1e-5)
    turned = math.degrees(torch.arccos((torch.trace(error.rotation) - 1) / 2).item())  # a rotation matrix's angle
    assert math.isclose(turned, 2.0, rel_tol=1e-3)
    assert torch.equal(experts.CalibrationError(3.0, 2.0, 0).shift, error.shift), "the seed fixes the directions"
    assert (experts.CalibrationError(3.0, 2.0, 1).shift - error.shift).norm() > 1e-3, "another seed, another one"
    assert experts.calibration(dict(ik_calibration_mm=0.0, ik_calibration_deg=0.0)) is None

    pose = torch.tensor([[0.1, 0.2, 0.3, 1.0, 0.0, 0.0, 0.0]])  # identity orientation (w, x, y, z)
    seen = error(pose)
    torch.testing.assert_close(seen[0, :3], pose[0, :3] + error.shift)
    assert math.isclose(2 * math.degrees(math.acos(seen[0, 3].abs().item())), 2.0, rel_tol=1e-3)

    # carrying the cube 2 cm below the goal: at gain 1 the expert asks for the whole remaining displacement, at
    # 0.1 m per unit action, so the error adds shift / 0.1 to its motion
    carrying = pick_cube_state(tcp=[[0.0, 0.0, 0.28]], cube=[[0.0, 0.0, 0.28]], grasped=[True], finger=0.02)
    plain = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")(carrying)
    calibrated = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos", calibration=error)(carrying)
    torch.testing.assert_close(plain, torch.tensor([[0.0, 0.0, 0.2, -1.0]]))
    torch.testing.assert_close(calibrated[:, :3] - plain[:, :3], error.shift[None] / 0.1)
    assert calibrated[0, 3] == plain[0, 3], "the gripper keeps holding"
