"""ppo_fast.py and ppo_rgb_fast.py: GAE and the compiled update against their references, tiny CPU runs,
the residual techniques and reliability features carried over from ppo.py."""

import copy
import functools
import glob
import os
import signal
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import experts
import ppo
import ppo_fast
import util
from conftest import ROOT, TINY, run_main, run_script, with_head
from test_reliability import ENDLESS, assert_gone, descendants, load, wait_for

CUDA_NOTICE = "CUDA graphs need a CUDA device; continuing without them"
COMPILE_LINE = "compiled the policy step, value, GAE and update in" if torch.cuda.is_available() \
    else "compiled GAE and the update (the per-step policy and value stay eager on the CPU) in"


def random_rollout(num_steps=16, num_envs=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    dones = (torch.rand(num_steps, num_envs, generator=g) < 0.25).float()
    next_done = (torch.rand(num_envs, generator=g) < 0.25).float()
    # a finished episode has a final value exactly where the next observation starts a new one
    ends = torch.cat([dones[1:], next_done[None]])
    return dict(rewards=torch.rand(num_steps, num_envs, generator=g),
                values=torch.randn(num_steps, num_envs, generator=g),
                dones=dones,
                final_values=torch.randn(num_steps, num_envs, generator=g) * ends,
                next_value=torch.randn(num_envs, generator=g),
                next_done=next_done)


def test_gae_matches_ppo_eager_and_compiled():
    r = random_rollout()
    advantages, returns = ppo.gae(r["rewards"], r["values"], r["dones"], r["final_values"], r["next_value"][None],
                                  r["next_done"], gamma=0.8, gae_lambda=0.9)
    container = TensorDict(rewards=r["rewards"], vals=r["values"], dones=r["dones"], final_values=r["final_values"],
                           advantages=torch.zeros_like(r["rewards"]), returns=torch.zeros_like(r["rewards"]),
                           batch_size=r["rewards"].shape)
    fast_gae = functools.partial(ppo_fast.gae, gamma=0.8, gae_lambda=0.9)
    for fn in (fast_gae, torch.compile(fast_gae, fullgraph=True)):
        out = fn(r["next_value"], r["next_done"], container.clone())
        torch.testing.assert_close(out["advantages"], advantages, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["returns"], returns, rtol=1e-6, atol=1e-6)
    assert advantages.abs().min() > 0, "every step carries an advantage"


def state_and_rgb_agents(batch):
    """(agent, observations) for ppo_fast.py's and ppo_rgb_fast.py's networks, with per-dimension log-stds."""
    import ppo_rgb_fast

    state = ppo_fast.Agent(12, 4)
    rgb = ppo_rgb_fast.Agent((64, 64, 3), 12, 4)
    for agent in (state, rgb):
        agent.actor_logstd.data = torch.tensor([[-1.5, -0.5, 0.0, 0.4]])
    rgb_obs = dict(rgb=torch.randint(0, 256, (batch, 64, 64, 3), dtype=torch.uint8), state=torch.randn(batch, 12))
    return [(state, torch.randn(batch, 12)), (rgb, rgb_obs)]


def test_act_samples_the_distribution_get_action_and_value_scores():
    """The rollout's lean policy step: its log-probability and value are those the update recomputes, and its
    samples follow the policy's Gaussian."""
    torch.manual_seed(0)
    for agent, obs in state_and_rgb_agents(batch=2048):
        with torch.no_grad():
            action, logprob, value = agent.act(obs)
            _, ref_logprob, _, ref_value = agent.get_action_and_value(obs, action)
            mean = agent.get_action(obs)
        torch.testing.assert_close(logprob, ref_logprob, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(value, ref_value)
        z = (action - mean) / agent.actor_logstd.exp()
        assert z.mean(0).abs().max() < 0.1 and (z.std(0) - 1).abs().max() < 0.06, (z.mean(0), z.std(0))


def test_compiled_update_matches_eager():
    torch.manual_seed(0)
    obs_dim, action_dim, batch = 12, 4, 64
    args = ppo_fast.Args(ent_coef=0.01, clip_vloss=True)
    agents = [ppo_fast.Agent(obs_dim, action_dim)]
    agents.append(copy.deepcopy(agents[0]))
    optimizers = [torch.optim.Adam(a.parameters(), lr=torch.tensor(1e-3), eps=1e-5, fused=True) for a in agents]
    args.target_kl = None  # every step applies (early stopping is test_update_stops_where_ppo_stops)
    warmups = [util.CriticWarmup(a, o, 0) for a, o in zip(agents, optimizers)]
    step_enabled = torch.ones((), dtype=torch.bool)
    eager = ppo_fast.make_update(agents[0], optimizers[0], args, warmups[0], step_enabled)
    compiled = torch.compile(ppo_fast.make_update(agents[1], optimizers[1], args, warmups[1], step_enabled))

    obs = torch.randn(batch, obs_dim)
    with torch.no_grad():
        actions, logprobs, _, values = agents[0].get_action_and_value(obs)
    data = TensorDict(obs=obs, actions=actions, logprobs=logprobs + 0.1 * torch.randn(batch),
                      advantages=torch.randn(batch), returns=values.flatten() + torch.randn(batch),
                      vals=values.flatten(), residual_applied=(torch.rand(batch) < 0.7).float(), batch_size=(batch,))
    for _ in range(3):  # several steps, so Adam's moments take part
        outs = [update(data.clone(), tensordict_out=TensorDict()) for update in (eager, compiled)]
        for key in ("v_loss", "pg_loss", "entropy_loss", "approx_kl", "clipfrac", "grad_norm"):
            torch.testing.assert_close(outs[1][key], outs[0][key], rtol=1e-5, atol=1e-6)
        for (name, p_eager), p_compiled in zip(agents[0].named_parameters(), agents[1].parameters()):
            torch.testing.assert_close(p_compiled, p_eager, rtol=1e-5, atol=1e-6, msg=name)
    start = ppo_fast.Agent(obs_dim, action_dim)
    assert outs[0]["v_loss"] > 0 and not torch.equal(agents[0].actor_logstd, start.actor_logstd)


def test_update_stops_where_ppo_stops():
    """--target-kl: ppo.py stops before the step of the first minibatch whose approximate KL exceeds it. The fast
    update decides without waiting for the GPU and must end in the same state: minibatch 1 (the rollout's own
    weights: ratio 1, KL exactly 0) is applied; minibatches 2 and 3, after the weights moved, are not."""
    torch.manual_seed(0)
    obs_dim, action_dim, batch = 12, 4, 32
    start = ppo_fast.Agent(obs_dim, action_dim)
    obs = torch.randn(3 * batch, obs_dim)
    with torch.no_grad():
        actions, logprobs, _, values = start.get_action_and_value(obs)
    data = TensorDict(obs=obs, actions=actions, logprobs=logprobs, advantages=torch.randn(3 * batch),
                      returns=values.flatten() + 1, vals=values.flatten(), residual_applied=torch.ones(3 * batch),
                      batch_size=(3 * batch,))

    def train(target_kl, minibatches):
        agent = copy.deepcopy(start)
        optimizer = torch.optim.Adam(agent.parameters(), lr=torch.tensor(1e-2), eps=1e-5, fused=True)
        step_enabled = torch.ones((), dtype=torch.bool)
        update = ppo_fast.make_update(agent, optimizer, ppo_fast.Args(target_kl=target_kl),
                                      util.CriticWarmup(agent, optimizer, 0),
                                      step_enabled)
        outs = [update(data[i * batch:(i + 1) * batch], tensordict_out=TensorDict()) for i in range(minibatches)]
        return agent, optimizer, step_enabled, outs

    one_step, one_step_optimizer, _, _ = train(None, 1)
    stopped, optimizer, step_enabled, outs = train(1e-6, 3)
    unstopped, _, _, _ = train(None, 3)
    assert outs[0]["approx_kl"] == 0 and outs[1]["approx_kl"] > 1e-6 and not step_enabled
    for p, p_one, p_three in zip(stopped.parameters(), one_step.parameters(), unstopped.parameters()):
        assert torch.equal(p, p_one)
        assert torch.equal(optimizer.state[p]["step"], torch.tensor(1.0))
    for p, p_one in zip(stopped.parameters(), one_step.parameters()):
        assert torch.equal(optimizer.state[p]["exp_avg"], one_step_optimizer.state[p_one]["exp_avg"])
    assert not all(torch.equal(p, q) for p, q in zip(stopped.parameters(), unstopped.parameters()))

    # a step switched off before the optimizer ever stepped (the compile warm-up) leaves no trace: the weights
    # stay, Adam's state is all zeros, and the next step is a first step
    agent = copy.deepcopy(start)
    optimizer = torch.optim.Adam(agent.parameters(), lr=0.1, fused=True)
    for p in agent.parameters():
        p.grad = torch.ones_like(p)
    util.step_where(optimizer, torch.tensor(False))
    assert all(torch.equal(p, q) for p, q in zip(agent.parameters(), start.parameters()))
    assert all(not v.any() for p in agent.parameters() for v in optimizer.state[p].values())
    util.step_where(optimizer, torch.tensor(True))
    # Adam's first step moves every weight by lr against the sign of its gradient
    for p, q in zip(agent.parameters(), start.parameters()):
        torch.testing.assert_close(p, q - 0.1, rtol=0, atol=1e-6)


def test_ppo_fast_compile_cudagraphs(ik_run):
    run_dir, proc = ik_run("ppo_fast.py")  # --compile --cudagraphs --verbose
    assert proc.stdout.count(CUDA_NOTICE) == (0 if torch.cuda.is_available() else 1)
    assert COMPILE_LINE in proc.stdout
    # --verbose: where each iteration's time went, the compilation in the first iteration's line
    timings = [line for line in proc.stderr.replace("\r", "\n").splitlines() + proc.stdout.splitlines()
               if line.startswith("iteration ")]
    assert [line.split(":")[0] for line in timings] == ["iteration 1", "iteration 2"], proc.stdout + proc.stderr
    for phase in ("rollout", "env step", "expert", "policy", "advantage", "update", "eval"):
        assert all(f"{phase} " in line for line in timings), (phase, timings)
    assert "compile " in timings[0] and "compile " not in timings[1]
    assert "eval @ 32 steps: success_once=" in proc.stdout
    payload = torch.load(os.path.join(run_dir, "final_ckpt.pt"), weights_only=True)
    assert payload["meta"]["network"] == "mlp-state" and payload["meta"]["script"] == "ppo_fast.py"
    assert not any(k.startswith("_orig_mod.") for k in payload["model"])


def test_ppo_rgb_fast_compile_and_its_image_model_expert(ik_run, tmp_path):
    run_dir, proc = ik_run("ppo_rgb_fast.py")  # --compile, 36x36 camera
    assert COMPILE_LINE in proc.stdout
    ckpt = os.path.join(run_dir, "final_ckpt.pt")
    payload = torch.load(ckpt, weights_only=True)
    assert payload["meta"]["network"] == "cnn-rgb-state" and payload["meta"]["rgb_shape"] == [36, 36, 3]
    assert not any(k.startswith("_orig_mod.") for k in payload["model"])

    # an image expert acts from the run's cameras: clip(IK + 0.2 x the agent's mean on the same images and state)
    env = util.make_env("PickCube-v1", 1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos",
                        obs_mode="state_dict+rgb", sensor_configs=dict(width=36, height=36))
    try:
        import ppo_rgb

        # the image scripts hand their network to the model expert
        expert = experts.make_expert("model", "PickCube-v1", env, model_path=ckpt, image_agent=ppo_rgb.Agent)
        obs, _ = env.reset(seed=3)
        ik = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")(obs)
        agent = ppo_rgb.Agent([36, 36, 3], payload["meta"]["state_dim"], payload["meta"]["action_dim"])
        agent.load_state_dict(payload["model"])
        with torch.no_grad():
            mean = agent.get_action(util.with_expert_action(util.image_policy_obs(env)(obs), ik))
        torch.testing.assert_close(expert(obs), (ik + 0.2 * mean).clamp(-1, 1))
        # and independently of the network: a head whose mean is a known constant
        head = torch.tensor([0.5, -2.0, 0.25, 3.0])
        biased = experts.make_expert("model", "PickCube-v1", env, image_agent=ppo_rgb.Agent,
                                     model_path=with_head(ckpt, tmp_path / "head.pt", head))
        torch.testing.assert_close(biased(obs), (ik + 0.2 * head).clamp(-1, 1))
    finally:
        env.close()


@pytest.mark.parametrize("script,extra", [("ppo.py", []), ("ppo_fast.py", ["--cudagraphs"]),
                                          ("ppo_rgb_fast.py", ["--cudagraphs"])])
def test_gpu_backend_needs_cuda(script, extra, tmp_path):
    run = run_script if torch.cuda.is_available() else run_main
    proc = run(script, [*TINY, "--sim-backend", "gpu", *extra, "--no-capture-video",
                        "--output-dir", str(tmp_path / "o")], cwd=tmp_path)
    if not torch.cuda.is_available():  # one line, exit 2, nothing written
        assert proc.returncode == 2 and "needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr
        assert not (tmp_path / "o").exists()
    elif script == "ppo_rgb_fast.py" and not util.cuda_renders(torch.cuda.current_device()):
        assert proc.returncode == 2 and proc.stderr.strip().endswith(util.NO_CUDA_VULKAN)
    else:  # with CUDA: ManiSkill's GPU simulation, graphed where asked
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "backend: gpu" in proc.stdout and "device: cuda" in proc.stdout
        assert CUDA_NOTICE not in proc.stdout and ("cudagraphs: True" in proc.stdout) == bool(extra)


# ---------------------------------------------------------------------------------------------------------------
# residual techniques and reliability, as in ppo.py (eager: compiling every run would dominate these tests)
# ---------------------------------------------------------------------------------------------------------------
def test_ppo_fast_critic_warmup_progressive_exploration_and_learned_fusion(tmp_path):
    """3 iterations of 16 steps, the first 2 critic-only; the residual probability is 0, 0.25, 0.5; the learning
    rate anneals, which the update reads from a tensor changed in place; the residual scale goes from 0.5 to 0.2."""
    args = [*TINY, "--total-timesteps", "48", "--critic-warmup-iters", "2", "--keep-checkpoints", "5",
            "--expert-type", "ik,zero", "--fusion", "learned", "--residual-warmup-steps", "64", "--residual-scale", "0.5",
            "--residual-scale-schedule", "linear", "--residual-scale-final", "0.2", "--anneal-lr",
            "--control-mode", "pd_ee_delta_pos", "--no-capture-video", "--output-dir", str(tmp_path)]
    proc = run_main("ppo_fast.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "PickCube-v1__ppo_fast__1__*"))
    warm1, warm2, final = (load(os.path.join(run_dir, name)) for name in ("ckpt_1.pt", "ckpt_2.pt", "final_ckpt.pt"))
    assert warm1["meta"]["action_dim"] == 4 + 2, "the residual and one fusion logit per expert"

    # the actor is where it started after the warm-up, bit for bit; the critic is not
    actor = [k for k in final["model"] if not k.startswith("critic.")]
    assert all(torch.equal(warm1["model"][k], warm2["model"][k]) for k in actor)
    assert torch.equal(warm2["model"]["actor_logstd"], torch.full((1, 6), -0.5))
    assert torch.equal(warm2["model"]["actor_mean.6.bias"], torch.zeros(6))
    assert not torch.equal(warm1["model"]["critic.0.weight"], warm2["model"]["critic.0.weight"])
    assert not all(torch.equal(warm2["model"][k], final["model"][k]) for k in actor), "the actor trains after"
    # ...and Adam starts afresh for it, as if it had skipped the actor during the warm-up as ppo.py's does
    state, names = final["resume"]["optimizer"]["state"], list(final["model"])  # the parameters' order
    # 2 warm-up iterations x 4 epochs x 2 minibatches (a frozen actor's KL is 0: no epoch stops early)
    actor_steps, critic_steps = (state[names.index(k)]["step"] for k in ("actor_logstd", "critic.0.weight"))
    assert actor_steps > 0 and critic_steps - actor_steps == 2 * 4 * 2, (actor_steps, critic_steps)

    # progressive exploration: no env applied its residual in iteration 1, so its surrogate is exactly zero
    events = EventAccumulator(run_dir)
    events.Reload()
    policy_loss = {e.step: e.value for e in events.Scalars("losses/policy_loss")}
    assert policy_loss[16] == 0.0 and policy_loss[32] != 0.0
    assert [e.value for e in events.Scalars("charts/residual_prob")] == [0.0, 0.25, 0.5]
    # each iteration's values, set at its start (steps 0, 16, 32 of 48)
    assert [e.value for e in events.Scalars("charts/learning_rate")] == pytest.approx([3e-4, 2e-4, 1e-4])
    assert [e.value for e in events.Scalars("charts/residual_scale")] == pytest.approx([0.5, 0.4, 0.3])
    assert final["meta"]["residual_scale"] == pytest.approx(0.2)  # at step 48, where the final eval ran
    # the update ran at the annealed rate: Adam's saved rate is the last iteration's
    assert final["resume"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)

    # as a model expert it executes its learned mix: softmax(logits)-weighted IK and zero experts plus the scaled
    # residual, computed here by hand from a mean set to residual (0.3, -0.2, 0.1, 0.9) and logits (2, -1)
    mean = torch.tensor([0.3, -0.2, 0.1, 0.9, 2.0, -1.0])
    final["model"]["actor_mean.6.weight"].zero_()
    final["model"]["actor_mean.6.bias"].copy_(mean)
    torch.save(final, tmp_path / "mix.pt")
    env = util.make_env("PickCube-v1", 1, sim_backend="physx_cpu", control_mode="pd_ee_delta_pos")
    try:
        expert = experts.make_expert("model", "PickCube-v1", env, model_path=str(tmp_path / "mix.pt"))
        obs, _ = env.reset(seed=1)
        ik = experts.IKExpert("PickCube-v1", "pd_ee_delta_pos")(obs)
        w_ik = torch.exp(torch.tensor(2.0)) / (torch.exp(torch.tensor(2.0)) + torch.exp(torch.tensor(-1.0)))
        scale = final["meta"]["residual_scale"]
        torch.testing.assert_close(expert(obs), (w_ik * ik + scale * mean[:4]).clamp(-1, 1))
    finally:
        env.close()


def test_ppo_fast_sigint_checkpoints_closes_workers_and_exits_0(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "ppo_fast.py"), *ENDLESS, "--output-dir", str(tmp_path)],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    latest = wait_for(tmp_path / "*" / "latest.pt", proc)
    workers = descendants(proc.pid)
    assert len(workers) >= 5, workers  # 2 train workers, 1 eval worker, the fork server, the resource tracker
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole process group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped by SIGINT: resume with: python ppo_fast.py --resume --checkpoint " in out
    resume = load(latest)["resume"]
    assert resume["global_step"] == 8 * resume["iteration"] > 0
    assert_gone(workers)


@pytest.mark.parametrize("script", ["ppo_rgb.py", "ppo_rgb_fast.py"])
def test_image_scripts_refuse_torchrun(script, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each rank
    proc = run_main(script, ["--output-dir", str(tmp_path / "o")], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: {script} trains in one process; data-parallel training (torchrun) is in ppo.py and ppo_fast.py"
    assert not (tmp_path / "o").exists()
