"""ExpertResidualWrapper arithmetic on ManiSkill's native vector path (physx_cpu, one env)."""

import pytest
import torch

import util
from conftest import RecordingEnv
from experts import ZeroExpert

ENV_ID = "PickCube-v1"


class ConstantExpert:
    """Returns a fixed action and counts its calls."""

    def __init__(self, action):
        self.action = torch.as_tensor(action, dtype=torch.float32)
        self.calls = 0

    def __call__(self, obs):
        self.calls += 1
        assert isinstance(obs, dict) and "extra" in obs, "experts receive the structured observation"
        n = obs["agent"]["qpos"].shape[0]
        return self.action.expand(n, -1).clone()


@pytest.fixture(scope="module")
def native_env():
    env = util.make_env(ENV_ID, 1, sim_backend="physx_cpu", control_mode="pd_joint_delta_pos", max_episode_steps=4)
    yield env
    env.close()


EXPERT = [0.5, -0.5, 0.9, 0.0, 0.2, -0.9, 0.1, 1.0]


def test_executed_action_is_clipped_scaled_sum(native_env):
    rec = RecordingEnv(native_env)
    wrapper = util.ExpertResidualWrapper(rec, ConstantExpert(EXPERT), residual_scale=0.5)
    wrapper.reset(seed=0)
    residual = torch.tensor([[0.2, 0.2, 0.4, -4.0, 0.0, -0.4, 0.0, 0.6]])
    wrapper.step(residual)
    want = torch.tensor([[0.6, -0.4, 1.0, -1.0, 0.2, -1.0, 0.1, 1.0]])  # clip(expert + 0.5 * residual)
    torch.testing.assert_close(rec.executed[-1], want)

    unclipped = util.ExpertResidualWrapper(rec, ConstantExpert(EXPERT), residual_scale=0.5, clip_final_action=False)
    unclipped.reset(seed=0)
    unclipped.step(residual)
    torch.testing.assert_close(rec.executed[-1], torch.tensor(EXPERT) + 0.5 * residual)


def test_policy_observation_is_state_then_expert_action(native_env):
    wrapper = util.ExpertResidualWrapper(native_env, ConstantExpert(EXPERT))
    raw_obs, _ = native_env.reset(seed=3)
    obs, _ = wrapper.reset(seed=3)
    state = util.flat_state(raw_obs)
    assert obs.shape == (1, state.shape[1] + 8)
    torch.testing.assert_close(obs[:, :state.shape[1]], state)
    torch.testing.assert_close(obs[:, state.shape[1]:], torch.tensor([EXPERT]))


def test_expert_called_once_per_step_and_shown_action_is_executed(native_env):
    calls = []

    def expert(obs):  # depends on the observation, so a stale or recomputed action would show
        calls.append(1)
        return torch.tanh(obs["agent"]["qpos"][:, :8] * 3)

    rec = RecordingEnv(native_env)
    wrapper = util.ExpertResidualWrapper(rec, expert, residual_scale=0.0)
    obs, _ = wrapper.reset(seed=1)
    assert len(calls) == 1
    ends = 0
    for step in range(6):  # max_episode_steps=4: one episode end, whose final obs also gets an expert action
        shown = obs[:, -8:].clone()
        obs, _, _, trunc, info = wrapper.step(torch.zeros(1, 8))
        torch.testing.assert_close(rec.executed[-1], shown.clamp(-1, 1))
        ends += int("final_info" in info)
        assert len(calls) == 1 + (step + 1) + ends
    assert ends == 1


def test_final_observation_carries_expert_action(native_env):
    wrapper = util.ExpertResidualWrapper(native_env, ConstantExpert(EXPERT))
    wrapper.reset(seed=2)
    for _ in range(4):
        _, _, _, trunc, info = wrapper.step(torch.zeros(1, 8))
    assert trunc.all() and "final_observation" in info
    assert info["final_observation"].shape == (1, wrapper.reset()[0].shape[1])
    torch.testing.assert_close(info["final_observation"][:, -8:], torch.tensor([EXPERT]))


def test_action_stats_and_noise(native_env):
    rec = RecordingEnv(native_env)
    wrapper = util.ExpertResidualWrapper(rec, ConstantExpert(EXPERT), residual_scale=1.0)
    wrapper.reset(seed=0)
    _, _, _, _, info = wrapper.step(torch.full((1, 8), 0.25))
    stats = info["action_stats"]
    assert set(stats) == {"expert", "residual", "final"}
    # mean |EXPERT| = 4.1 / 8; mean |clip(EXPERT + 0.25)| = (0.75+0.25+1+0.25+0.45+0.65+0.35+1) / 8 = 4.7 / 8
    assert stats["expert"].item() == pytest.approx(4.1 / 8)
    assert stats["residual"].item() == pytest.approx(0.25)
    assert stats["final"].item() == pytest.approx(4.7 / 8)

    noisy = util.ExpertResidualWrapper(rec, ConstantExpert(EXPERT), residual_scale=1.0, expert_action_noise=0.3)
    obs, _ = noisy.reset(seed=0)
    for _ in range(4):  # max_episode_steps=4: the last step ends the episode
        shown = obs[:, -8:].clone()
        assert not torch.allclose(shown, torch.tensor([EXPERT])), "noise must reach the shown expert action"
        obs, _, _, trunc, info = noisy.step(torch.full((1, 8), 0.25))
        # the noisy action the policy saw is the one executed, and the one the stats call the expert's
        torch.testing.assert_close(rec.executed[-1], (shown + 0.25).clamp(-1, 1))
        assert info["action_stats"]["expert"].item() == pytest.approx(shown.abs().mean().item())
    assert trunc.all()
    # the final observation bootstraps the value, so it shows the expert's action without noise
    assert torch.equal(info["final_observation"][:, -8:], torch.tensor([EXPERT]))


def nan_expert(obs):
    return torch.full((1, 8), float("nan"))


def test_bad_expert_output_is_reported_on_first_call(native_env):
    """Named, with what it returned, before the env executes anything."""
    want = r"must return a float32 tensor of shape \(1, 8\) on cpu, or \(that action, confidence\); it returned "
    want_confidence = r"'s confidence must be a float tensor of shape \(1,\) on cpu, in \[0, 1\]; it returned "
    zeros = torch.zeros(1, 8)
    for expert, got in [(lambda obs: torch.zeros(1, 3), want + r"a torch.float32 tensor of shape \(1, 3\)"),
                        (lambda obs: torch.zeros(1, 8, dtype=torch.float64), want + "a torch.float64 tensor"),
                        (lambda obs: [0.0] * 8, want + "list"),
                        (lambda obs: (zeros,), want + "tuple"),
                        (nan_expert, want + r"non-finite values \(nan or inf\): \[\[nan, "),
                        (lambda obs: (zeros, 0.5), want_confidence + "float"),
                        (lambda obs: (zeros, torch.ones(1, 1)), want_confidence + r"a torch.float32 tensor of shape "
                                                                                  r"\(1, 1\)"),
                        (lambda obs: (zeros, torch.tensor([float("nan")])), want_confidence + "non-finite"),
                        (lambda obs: (zeros, torch.tensor([1.5])), want_confidence + r"values outside \[0, 1\]: "
                                                                                     r"\[1.5\]")]:
        wrapper = util.ExpertResidualWrapper(RecordingEnv(native_env), expert)
        with pytest.raises(util.UsageError, match=got) as refusal:
            wrapper.reset(seed=0)
        assert "expert test_wrapper." in str(refusal.value)
        if expert is nan_expert:
            assert "test_wrapper.nan_expert must" in str(refusal.value)
    # a well-formed confidence passes
    obs, _ = util.ExpertResidualWrapper(RecordingEnv(native_env), lambda obs: (zeros, torch.ones(1))).reset(seed=0)
    assert torch.equal(obs[:, -8:], zeros)
    with pytest.raises(ValueError, match="residual scale"):
        util.ExpertResidualWrapper(native_env, ZeroExpert(8), residual_scale=-1)


def test_env_id_form_builds_its_own_backend():
    wrapper = util.ExpertResidualWrapper(env_id=ENV_ID, expert_policy_fn=ZeroExpert(8), num_envs=2,
                                         residual_scale=0.5, sim_backend="cpu", control_mode="pd_joint_delta_pos")
    try:
        obs, _ = wrapper.reset(seed=0)
        assert isinstance(wrapper.env, util.CpuVectorEnv)
        assert obs.shape == (2, 50) and torch.all(obs[:, -8:] == 0)
    finally:
        wrapper.close()


# ---- residual techniques: progressive exploration and fusion ----
def test_progressive_exploration_at_step_zero_executes_the_expert_alone(native_env):
    rec = RecordingEnv(native_env)
    train = util.ExpertResidualWrapper(rec, ConstantExpert(EXPERT), residual_scale=0.5)
    evaluation = util.ExpertResidualWrapper(native_env, ConstantExpert(EXPERT), residual_scale=0.5)
    schedule = util.ResidualSchedule(scale=0.5, total_steps=10**6, warmup_steps=10**6)
    schedule.apply(0, train=train, evaluation=evaluation)
    assert train.residual_prob == 0.0 and evaluation.residual_prob == 1.0
    train.reset(seed=0)
    residual = torch.full((1, 8), 0.3)
    for _ in range(5):
        _, _, _, _, info = train.step(residual)
        torch.testing.assert_close(rec.executed[-1], torch.tensor([EXPERT]))
        assert not info["residual_applied"].any()

    train.residual_prob = 0.5  # mixes: each step either the expert alone or the expert plus the residual
    applied = []
    for _ in range(40):
        _, _, _, _, info = train.step(residual)
        applied.append(bool(info["residual_applied"]))
        want = torch.tensor([EXPERT]) + (0.5 * residual if applied[-1] else 0)
        torch.testing.assert_close(rec.executed[-1], want.clamp(-1, 1))
    assert 5 < sum(applied) < 35


def test_fusion_mean_of_two_identical_experts_equals_one_expert(native_env):
    rec = RecordingEnv(native_env)
    one = util.ExpertResidualWrapper(rec, ConstantExpert(EXPERT), residual_scale=0.5)
    two = util.ExpertResidualWrapper(rec, [ConstantExpert(EXPERT), ConstantExpert(EXPERT)], residual_scale=0.5)
    assert two.policy_action_dim == 8
    obs_one, _ = one.reset(seed=0)
    obs_two, _ = two.reset(seed=0)
    torch.testing.assert_close(obs_two, torch.cat([obs_one, torch.tensor([EXPERT])], dim=1))  # both are shown
    residual = torch.tensor([[0.2, 0.2, 0.4, -4.0, 0.0, -0.4, 0.0, 0.6]])
    one.step(residual)
    two.step(residual)
    assert torch.equal(rec.executed[-1], rec.executed[-2])


def test_learned_fusion_starts_at_the_mean_and_logits_pick_an_expert(native_env):
    rec = RecordingEnv(native_env)
    low, high = [0.1] * 8, [0.5] * 8
    wrapper = util.ExpertResidualWrapper(rec, [ConstantExpert(low), ConstantExpert(high)], residual_scale=0.5,
                                         fusion="learned")
    assert wrapper.policy_action_dim == 8 + 2
    wrapper.reset(seed=0)
    wrapper.step(torch.zeros(1, 10))  # zero logits: the mean
    torch.testing.assert_close(rec.executed[-1], torch.full((1, 8), 0.3))
    wrapper.step(torch.cat([torch.full((1, 8), 0.2), torch.tensor([[-30.0, 30.0]])], dim=1))
    torch.testing.assert_close(rec.executed[-1], torch.full((1, 8), 0.5 + 0.5 * 0.2))
    with pytest.raises(ValueError, match="at least two"):
        util.ExpertResidualWrapper(native_env, ConstantExpert(EXPERT), fusion="learned")


def test_compose_action_by_hand():
    """The one place the action is composed: two experts, a residual and fusion logits, worked out by hand."""
    experts_actions = torch.tensor([[[0.2, -0.4], [0.6, 0.0]]] * 2)  # [env, expert, dim]; their mean (0.4, -0.2)
    policy = torch.tensor([[0.5, 0.5, -30.0, 30.0]] * 2)  # residual, then logits that pick the second expert
    action, base = util.compose_action(experts_actions, policy[:, :2], 0.4)
    torch.testing.assert_close(base, torch.tensor([[0.4, -0.2]] * 2))
    torch.testing.assert_close(action, torch.tensor([[0.6, 0.0]] * 2))  # mean + 0.4 * 0.5
    per_env = util.compose_action(experts_actions, policy[:, :2], torch.tensor([[0.4], [1.0]]))[0]
    torch.testing.assert_close(per_env, torch.tensor([[0.6, 0.0], [0.9, 0.3]]))
    # learned fusion; env 1's coin said "expert alone": it executes the plain mean, ignoring residual and logits
    action, base = util.compose_action(experts_actions, policy, 0.4, "learned", torch.tensor([True, False]),
                                       (torch.full((2,), -0.5), torch.full((2,), 0.5)))
    torch.testing.assert_close(base, torch.tensor([[0.6, 0.0], [0.4, -0.2]]))
    torch.testing.assert_close(action, torch.tensor([[0.5, 0.2], [0.4, -0.2]]))  # env 0: (0.8, 0.2) clipped
