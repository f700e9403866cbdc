"""Each script's copy of PPO's maths against values worked out by hand: GAE, the clipped surrogate, the value
loss, progressive exploration's mask, and the bootstrap from final observations on the real simulator."""

import copy
import importlib
import math

import pytest
import torch
from tensordict import TensorDict

import util

SCRIPTS = ["ppo", "ppo_rgb", "ppo_fast", "ppo_rgb_fast"]
STATE_DIM, ACTION_DIM = 6, 3
RGB_SHAPE = (36, 36, 3)  # the smallest image NatureCNN takes


def agent_and_obs(name, batch):
    """(module, agent, a batch of observations of the kind the script's agent takes)."""
    module = importlib.import_module(name)
    g = torch.Generator().manual_seed(0)
    if "rgb" in name:
        agent = module.Agent(RGB_SHAPE, STATE_DIM, ACTION_DIM)
        obs = dict(rgb=torch.randint(0, 256, (batch, *RGB_SHAPE), dtype=torch.uint8, generator=g),
                   state=torch.randn(batch, STATE_DIM, generator=g))
    else:
        agent = module.Agent(STATE_DIM, ACTION_DIM)
        obs = torch.randn(batch, STATE_DIM, generator=g)
    return module, agent, obs


# ---------------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------------
def test_gae_by_hand():
    """Two envs, three steps, gamma 0.9, lambda 0.8. Env 0 terminates after step 0 (final value 4) and goes on;
    env 1 is truncated after step 2 (final value 10), so the next observation's value (100) belongs to a new
    episode and must not count.

    env 0: t=2: d = 3 + 0.9 * 2 - 1.5 = 3.3                         A = 3.3
           t=1: d = 2 + 0.9 * 1.5 - 1 = 2.35                        A = 2.35 + 0.72 * 3.3 = 4.726
           t=0: d = 1 + 0.9 * 4 - 0.5 = 4.1 (bootstrap from final)  A = 4.1 (the episode ended)
    env 1: t=2: d = 1 + 0.9 * 10 - 2 = 8                            A = 8
           t=1: d = 0.5 + 0.9 * 2 - 2 = 0.3                         A = 0.3 + 0.72 * 8 = 6.06
           t=0: d = 0.3                                             A = 0.3 + 0.72 * 6.06 = 4.6632
    """
    rewards = torch.tensor([[1.0, 0.5], [2.0, 0.5], [3.0, 1.0]])
    values = torch.tensor([[0.5, 2.0], [1.0, 2.0], [1.5, 2.0]])
    dones = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # dones[t]: observation t starts a new episode
    final_values = torch.tensor([[4.0, 0.0], [0.0, 0.0], [0.0, 10.0]])
    next_value, next_done = torch.tensor([2.0, 100.0]), torch.tensor([0.0, 1.0])
    want = torch.tensor([[4.1, 4.6632], [4.726, 6.06], [3.3, 8.0]])

    for name in SCRIPTS:
        module = importlib.import_module(name)
        if "fast" in name:
            container = TensorDict(rewards=rewards, vals=values, dones=dones, final_values=final_values,
                                   batch_size=(3, 2))
            out = module.gae(next_value, next_done, container, gamma=0.9, gae_lambda=0.8)
            advantages, returns = out["advantages"], out["returns"]
        else:
            advantages, returns = module.gae(rewards, values, dones, final_values, next_value[None], next_done,
                                             gamma=0.9, gae_lambda=0.8)
        torch.testing.assert_close(advantages, want, msg=name)
        torch.testing.assert_close(returns, want + values, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------------------
def minibatch(agent, obs, advantages, logprob_shift=0.0, applied=None, return_offset=0.0):
    """A minibatch of the agent's own samples: its actions, their log-probabilities (minus ``logprob_shift``, so
    that the ratio is exp(logprob_shift)), and returns ``return_offset`` above its values."""
    with torch.no_grad():
        actions, logprobs, _, values = agent.get_action_and_value(obs)
    n = advantages.shape[0]
    return dict(obs=obs, actions=actions, logprobs=logprobs - logprob_shift, advantages=advantages,
                returns=values.flatten() + return_offset, vals=values.flatten(),
                residual_applied=torch.ones(n) if applied is None else applied)


def rows(mb: dict, selection) -> dict:
    return {k: ({n: x[selection] for n, x in v.items()} if isinstance(v, dict) else v[selection]) for k, v in mb.items()}


def actor_grads(agent, loss):
    agent.zero_grad()
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in agent.named_parameters() if not n.startswith("critic.")]


def sgd_step(agent, loss, lr=0.01):
    agent.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in agent.parameters():
            if p.grad is not None:
                p -= lr * p.grad


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_policy_step_follows_the_advantage(name):
    """A plain gradient step on the surrogate raises the log-probability of an action with a positive advantage
    and lowers it with a negative one."""
    module, start, obs = agent_and_obs(name, 1)
    args = module.Args(norm_adv=False)
    for advantage in (1.0, -1.0):
        agent = copy.deepcopy(start)
        torch.manual_seed(0)
        mb = minibatch(agent, obs, torch.tensor([advantage]))
        sgd_step(agent, module.ppo_losses(agent, mb, args)["pg_loss"])
        with torch.no_grad():
            _, after, _, _ = agent.get_action_and_value(obs, mb["actions"])
        assert (after - mb["logprobs"]).sign() == advantage, (advantage, after, mb["logprobs"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_surrogate_is_clipped_and_masked(name):
    module, agent, obs = agent_and_obs(name, 2)
    args = module.Args(norm_adv=False, clip_coef=0.2)
    torch.manual_seed(0)
    with torch.no_grad():
        agent.actor_logstd.fill_(-0.7)

    # ratio e (stored log-probabilities 1 lower): with advantage +1 the objective is clipped at 1.2 and gives no
    # gradient; with advantage -1 the unclipped e * -1 is the pessimistic term and does
    pos = module.ppo_losses(agent, minibatch(agent, obs, torch.tensor([1.0, 1.0]), logprob_shift=1.0), args)
    torch.testing.assert_close(pos["pg_loss"], torch.tensor(-1.2))
    assert pos["clipfrac"] == 1.0
    # log-ratio 1: the KL estimators -log r = -1 and (r - 1) - log r = e - 2
    torch.testing.assert_close(pos["old_approx_kl"], torch.tensor(-1.0))
    torch.testing.assert_close(pos["approx_kl"], torch.tensor(math.e - 2))
    # a diagonal Gaussian's entropy: per dimension 0.5 * ln(2 pi e) + log std
    torch.testing.assert_close(pos["entropy"], torch.tensor(ACTION_DIM * (0.5 * math.log(2 * math.pi * math.e) - 0.7)))
    assert all(not g.any() for g in actor_grads(agent, pos["pg_loss"]))
    neg = module.ppo_losses(agent, minibatch(agent, obs, torch.tensor([-1.0, -1.0]), logprob_shift=1.0), args)
    torch.testing.assert_close(neg["pg_loss"], torch.tensor(torch.e))
    assert any(g.any() for g in actor_grads(agent, neg["pg_loss"]))

    # progressive exploration: a row whose residual was not applied adds nothing to the policy gradient; the mean
    # over two rows halves the one applied row's gradient
    mb = minibatch(agent, obs, torch.tensor([0.7, -1.3]), applied=torch.tensor([1.0, 0.0]))
    masked = actor_grads(agent, module.ppo_losses(agent, mb, args)["pg_loss"])
    alone = actor_grads(agent, module.ppo_losses(agent, rows(mb, slice(0, 1)), args)["pg_loss"])
    for got, want in zip(masked, alone):
        torch.testing.assert_close(got, want / 2)
    none = minibatch(agent, obs, torch.tensor([0.7, -1.3]), applied=torch.zeros(2))
    assert all(not g.any() for g in actor_grads(agent, module.ppo_losses(agent, none, args)["pg_loss"]))


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_value_loss_pulls_the_value_towards_the_return(name):
    module, agent, obs = agent_and_obs(name, 2)
    args = module.Args(clip_vloss=False)
    torch.manual_seed(0)
    mb = minibatch(agent, obs, torch.zeros(2), return_offset=2.0)
    v_loss = module.ppo_losses(agent, mb, args)["v_loss"]
    torch.testing.assert_close(v_loss, torch.tensor(2.0))  # 0.5 * 2 ** 2
    sgd_step(agent, v_loss)
    with torch.no_grad():
        values = agent.get_value(obs).flatten()
    # the gap was 2 for every sample; a step of the value loss's gradient (lr 0.01) closes more than half of it,
    # where a step that did nothing, or pushed the wrong way, leaves 2 or more
    assert ((mb["returns"] - values).abs() < 1.0).all(), values


@pytest.mark.parametrize("name", SCRIPTS)
def test_advantages_are_normalized_and_the_value_loss_clipped(name):
    """The defaults --norm-adv and (when asked) --clip-vloss, by hand."""
    module, agent, obs = agent_and_obs(name, 2)
    torch.manual_seed(0)
    # ratio e; advantages [1, 3] normalize to [-1, 1] / sqrt 2 (their sample std is sqrt 2). The pessimistic terms
    # are e / sqrt 2 (unclipped, above 1.2 / sqrt 2) and -1.2 / sqrt 2 (clipped), their mean (e - 1.2) / (2 sqrt 2);
    # unnormalized the loss would be -2.4
    mb = minibatch(agent, obs, torch.tensor([1.0, 3.0]), logprob_shift=1.0)
    pg_loss = module.ppo_losses(agent, mb, module.Args(norm_adv=True, clip_coef=0.2))["pg_loss"]
    torch.testing.assert_close(pg_loss, torch.tensor((math.e - 1.2) / (2 * math.sqrt(2))))

    # the values now 0.5 above those the rollout stored and 0.5 below the returns: clipped to a 0.2 move, the old
    # value's error is 0.8, which is larger than 0.5, so the loss is 0.5 * 0.8 ** 2; unclipped 0.5 * 0.5 ** 2
    mb = minibatch(agent, obs, torch.zeros(2), return_offset=0.5)
    mb["vals"] = mb["vals"] - 0.5
    clipped = module.ppo_losses(agent, mb, module.Args(clip_vloss=True, clip_coef=0.2))["v_loss"]
    torch.testing.assert_close(clipped, torch.tensor(0.32))
    unclipped = module.ppo_losses(agent, mb, module.Args(clip_vloss=False, clip_coef=0.2))["v_loss"]
    torch.testing.assert_close(unclipped, torch.tensor(0.125))


# ---------------------------------------------------------------------------------------------------------------
# the bootstrap from final observations, on the real simulator
# ---------------------------------------------------------------------------------------------------------------
class Recorder:
    """Forwards to a backend and keeps the last info it returned (with the structured final observation)."""

    def __init__(self, env):
        self.env, self.info = env, None

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        *rest, info = self.env.step(action)
        self.info = {**info, "final_observation": info.get("final_observation")}
        return (*rest, info)


def expert(obs):
    """Depends on the observation, so a final value computed from a wrong observation would show."""
    return torch.tanh(obs["extra"]["tcp_pose"][:, :3].repeat(1, 3)[:, :8] * 5)


@pytest.mark.parametrize("image", [False, True], ids=["state", "rgb"])
def test_final_values_are_the_values_of_the_final_observations(image):
    """Two CPU-backend envs truncated at their third step; each script's bootstrap against the value of the
    structured final observation the backend returned, made into the policy's observation by hand."""
    kwargs = dict(obs_mode="state_dict+rgb", sensor_configs=dict(width=36, height=36)) if image else {}
    env = util.make_env("PickCube-v1", 2, sim_backend="cpu", control_mode="pd_joint_delta_pos",
                        max_episode_steps=3, **kwargs)
    recorder = Recorder(env)
    policy_obs_fn = util.image_policy_obs(env) if image else util.flat_state
    wrapper = util.ExpertResidualWrapper(recorder, expert, policy_obs_fn=policy_obs_fn)
    try:
        obs, _ = wrapper.reset(seed=0)
        for step in range(3):
            next_obs, _, _, _, info = wrapper.step(torch.rand(2, 8) * 2 - 1)
            assert ("final_info" in info) == (step == 2)
        assert info["_final_info"].all()
        raw = recorder.info["final_observation"]
        seen = policy_obs_fn(raw)  # the policy's view, then the expert's action appended to its state
        final_obs = dict(seen, state=torch.cat([seen["state"], expert(raw)], 1)) if image \
            else torch.cat([seen, expert(raw)], 1)
        for name in [s for s in SCRIPTS if ("rgb" in s) == image]:
            module = importlib.import_module(name)
            torch.manual_seed(0)
            agent = module.Agent(RGB_SHAPE, obs["state"].shape[1], 8) if image else module.Agent(obs.shape[1], 8)
            got = module.bootstrap_values(agent.get_value, info, torch.device("cpu"))
            with torch.no_grad():
                want = agent.get_value(final_obs).flatten()
                assert not torch.equal(want, agent.get_value(next_obs).flatten()), "the reset observation differs"
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
            # an env whose episode goes on bootstraps nothing
            got = module.bootstrap_values(agent.get_value, {**info, "_final_info": torch.tensor([True, False])},
                                          torch.device("cpu"))
            assert got[1] == 0, name
            torch.testing.assert_close(got[0], want[0], msg=name)
    finally:
        wrapper.close()
