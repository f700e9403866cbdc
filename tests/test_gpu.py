"""The GPU path: ManiSkill's physx_cuda backend under the wrapper, every script on it, CUDA graphs and torch.compile
against eager, checkpoints across devices, NCCL. Skipped without CUDA (but for the CPU reference half of the backend
comparison); on one GPU they take a few minutes."""

import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import CudaGraphModule

import experts
import ppo_fast
import util
from conftest import ROOT, RecordingEnv, run_script

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# two iterations of 64 GPU envs x 8 steps, an eval (4 envs, one whole episode) and a checkpoint at each
GPU_TINY = ["--sim-backend", "gpu", "--num-envs", "64", "--num-eval-envs", "4", "--num-steps", "8",
            "--num-minibatches", "2", "--total-timesteps", "1024", "--eval-freq", "1", "--no-capture-video"]


# ---------------------------------------------------------------------------------------------------------------
# the backend: the same semantics as the CPU backend
# ---------------------------------------------------------------------------------------------------------------
def check_episode_semantics(backend: str, num_envs: int, steps: int = 80) -> tuple[int, set]:
    """Residual zero over the IK expert, so episodes end by success at different steps (partial resets). Checks
    every step against quantities the test tracks itself; returns how many episodes ended by success (a
    termination, before PickCube's 50-step limit), and the lengths of those episodes."""
    seen = []

    def expert(obs):  # the IK expert, recording every observation it is called on
        seen.append(obs)
        return ik(obs)

    env = RecordingEnv(util.make_env("PickCube-v1", num_envs, sim_backend=backend, control_mode="pd_ee_delta_pos"))
    ik = experts.IKExpert("PickCube-v1", env.control_mode)
    wrapper = util.ExpertResidualWrapper(env, expert, residual_scale=1.0)
    action_dim = wrapper.action_dim  # 4 in pd_ee_delta_pos: the TCP's x, y, z and the gripper
    try:
        obs, _ = wrapper.reset(seed=0)
        returns = torch.zeros(num_envs, device=wrapper.device)
        lengths = torch.zeros(num_envs, device=wrapper.device)
        ended_by_success, success_lengths = 0, set()
        for _ in range(steps):
            shown = obs[:, -action_dim:].clone()  # the expert action the policy sees ...
            seen.clear()
            residual = torch.zeros(num_envs, action_dim, device=wrapper.device)
            obs, reward, terminated, truncated, info = wrapper.step(residual)
            returns += reward
            lengths += 1
            # ... is what the expert returns for this step's observation, called once (plus once on the final
            # observations when episodes end)
            done = terminated | truncated
            assert len(seen) == (2 if done.any() else 1)
            torch.testing.assert_close(obs[:, -action_dim:], ik(seen[-1]))
            # what the policy was shown is what the env executed (a zero residual; pd_ee_delta_pos bounds are +-1)
            torch.testing.assert_close(env.executed[-1], shown.clamp(-1, 1))
            if not done.any():
                assert "final_info" not in info
                continue
            assert torch.equal(info["_final_info"], done)
            final = info["final_observation"]  # the policy observation of the ended episodes' last state
            assert final.shape == obs.shape
            torch.testing.assert_close(final[:, -action_dim:], ik(seen[0]))  # the expert on the final observation
            episode = info["final_info"]["episode"]
            torch.testing.assert_close(episode["return"][done], returns[done])
            torch.testing.assert_close(episode["episode_len"][done].float(), lengths[done])
            assert episode["success_once"][terminated].all()  # PickCube terminates on success
            # the envs that ended start over: a new episode's first observation, not the final one
            assert not torch.equal(obs[done, :-action_dim], final[done, :-action_dim])
            ended_by_success += int(terminated.sum())
            success_lengths.update(lengths[terminated].long().tolist())
            returns[done], lengths[done] = 0, 0
        return ended_by_success, success_lengths
    finally:
        wrapper.close()


def test_cpu_backend_episode_semantics():
    """The reference the GPU backend is held to; runs everywhere, so that the check itself is known to work. The IK
    expert solves PickCube in well under its 50 steps (bench/RESULTS.md, Experts: 1.00), so within 80 steps every
    env ends an episode by success, and not all at the same step."""
    ended_by_success, lengths = check_episode_semantics("cpu", 4)
    assert ended_by_success >= 4 and len(lengths) >= 2 and max(lengths) < 50


@needs_cuda
def test_gpu_backend_has_the_cpu_backends_episode_semantics():
    ended_by_success, lengths = check_episode_semantics("gpu", 64)
    assert ended_by_success >= 64 and len(lengths) >= 2 and max(lengths) < 50


@needs_cuda
def test_gpu_backend_runs_on_this_processes_gpu_and_eval_envs_reconfigure():
    env = util.make_env("PickCube-v1", 4, sim_backend="gpu", reconfiguration_freq=1, ignore_terminations=True)
    try:
        assert env.device == torch.device("cuda", torch.cuda.current_device())
        assert env.base_env.reconfiguration_freq == 1
        assert env.can_render == util.cuda_renders(torch.cuda.current_device())
    finally:
        env.close()


# ---------------------------------------------------------------------------------------------------------------
# every script, two iterations with eval and a checkpoint
# ---------------------------------------------------------------------------------------------------------------
def train(script, tmp_path, *extra):
    out = tmp_path / "runs"
    proc = run_script(script, [*GPU_TINY, "--output-dir", str(out), *extra], cwd=tmp_path)
    return proc, out


def assert_trained(proc, out):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval @ 1024 steps: success_once=" in proc.stdout and "device: cuda" in proc.stdout
    (run_dir,) = glob.glob(str(out / "*"))
    assert os.path.exists(os.path.join(run_dir, "final_ckpt.pt"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["global_step"] == 1024 and summary["peak_gpu_memory_mb"] > 0
    return run_dir


@pytest.mark.parametrize("flags", [[], ["--compile"], ["--cudagraphs"], ["--compile", "--cudagraphs"]],
                         ids=["eager", "compile", "cudagraphs", "compile+cudagraphs"])
@needs_cuda
def test_ppo_fast_on_the_gpu(flags, tmp_path):
    proc, out = train("ppo_fast.py", tmp_path, "--expert-type", "ik", *flags)
    assert_trained(proc, out)
    assert "CUDA graphs need a CUDA device" not in proc.stdout
    assert f"cudagraphs: {'--cudagraphs' in flags}" in proc.stdout


@needs_cuda
def test_ppo_on_the_gpu_checkpoint_loads_on_the_cpu_and_resumes(tmp_path):
    proc, out = train("ppo.py", tmp_path, "--expert-type", "ik")
    run_dir = assert_trained(proc, out)
    saved = torch.load(os.path.join(run_dir, "ckpt_1.pt"), weights_only=True)
    assert all(t.device.type == "cuda" for t in saved["model"].values()), "a checkpoint of a GPU run"
    payload = torch.load(os.path.join(run_dir, "ckpt_1.pt"), map_location="cpu", weights_only=True)
    agent = ppo_fast.Agent(payload["meta"]["obs_dim"], payload["meta"]["action_dim"])
    agent.load_state_dict(payload["model"])  # either state script's network
    resumed = run_script("ppo.py", ["--resume", "--checkpoint", os.path.join(run_dir, "ckpt_1.pt")], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "after iteration 1 (512 steps)" in resumed.stdout
    assert "eval @ 1024 steps" in resumed.stdout


@needs_cuda
@pytest.mark.parametrize("script", ["ppo_rgb.py", "ppo_rgb_fast.py"])
def test_image_scripts_on_the_gpu(script, tmp_path):
    proc, out = train(script, tmp_path, "--expert-type", "ik", "--camera-width", "64", "--camera-height", "64")
    if util.cuda_renders(torch.cuda.current_device()):
        assert_trained(proc, out)
    else:  # CUDA without NVIDIA's Vulkan driver: one line saying what to install
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"error: obs_mode state_dict+rgb renders images: " \
                                                       f"{util.NO_CUDA_VULKAN}"


# ---------------------------------------------------------------------------------------------------------------
# graphs and compile against eager
# ---------------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["graphed", "compiled+graphed"])
def test_graphed_policy_step_draws_fresh_noise(compiled):
    torch.manual_seed(0)
    agent = ppo_fast.Agent(10, 4, init_logstd=-0.7).cuda()
    act = torch.compile(agent.act) if compiled else agent.act
    policy = CudaGraphModule(act, warmup=3 if compiled else 2)  # as ppo_fast.py builds it
    obs = torch.randn(1, 10, device="cuda").expand(4096, -1).contiguous()  # one observation, 4096 times
    samples = []
    for _ in range(5):  # warm-up, capture, then replays
        torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            samples.append(policy(obs)[0])
    assert not torch.equal(samples[-1], samples[-2]), "a replay repeated the previous noise"
    std = samples[-1].std(dim=0)
    want = agent.actor_logstd.exp().detach().flatten()
    assert ((std - want).abs() / want).max() < 0.05, (std, want)


@needs_cuda
@pytest.mark.parametrize("compiled", [False, True], ids=["graphed", "compiled+graphed"])
def test_graphed_update_equals_eager(compiled):
    """Six minibatches: with ppo_fast.py's warm-up count, the first one or two calls run eagerly, the next records
    the graph and at least three replay it. The weights agree to rtol 1e-5, atol 1e-6 (the graphed Adam is capturable, the
    eager one not, so the last bits of the bias correction may differ)."""
    torch.manual_seed(0)
    obs_dim, action_dim, batch = 12, 4, 256
    args = ppo_fast.Args(ent_coef=0.01, target_kl=None)
    agents = [ppo_fast.Agent(obs_dim, action_dim).cuda()]
    agents.append(copy.deepcopy(agents[0]))
    optimizers = [torch.optim.Adam(agents[0].parameters(), lr=torch.tensor(1e-3, device="cuda"), eps=1e-5, fused=True),
                  torch.optim.Adam(agents[1].parameters(), lr=torch.tensor(1e-3, device="cuda"), eps=1e-5, fused=True,
                               capturable=not compiled)]
    flags = [(util.CriticWarmup(a, o, 0, "cuda"), torch.ones((), dtype=torch.bool, device="cuda"))
             for a, o in zip(agents, optimizers)]
    eager = ppo_fast.make_update(agents[0], optimizers[0], args, *flags[0])
    graphed = ppo_fast.make_update(agents[1], optimizers[1], args, *flags[1])
    graphed = CudaGraphModule(torch.compile(graphed) if compiled else graphed, warmup=3 if compiled else 2)

    obs = torch.randn(6 * batch, obs_dim, device="cuda")
    with torch.no_grad():
        actions, logprobs, _, values = agents[0].get_action_and_value(obs)
    data = TensorDict(obs=obs, actions=actions, logprobs=logprobs + 0.1 * torch.randn_like(logprobs),
                      advantages=torch.randn_like(logprobs), returns=values.flatten() + torch.randn_like(logprobs),
                      vals=values.flatten(), residual_applied=torch.ones_like(logprobs), batch_size=(6 * batch,))
    for i in range(6):
        minibatch = data[i * batch:(i + 1) * batch]
        outs = [update(minibatch.clone(), tensordict_out=TensorDict()) for update in (eager, graphed)]
        torch.testing.assert_close(outs[1]["v_loss"], outs[0]["v_loss"], rtol=1e-5, atol=1e-6)
        for (name, p_eager), p_graphed in zip(agents[0].named_parameters(), agents[1].parameters()):
            torch.testing.assert_close(p_graphed, p_eager, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# several GPUs
# ---------------------------------------------------------------------------------------------------------------
@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_on_nccl_keep_identical_weights(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(ROOT, "ppo_fast.py"), *GPU_TINY, "--total-timesteps", "2048",
                           "--output-dir", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["world_size"] == 2 and len(summary["parameter_hashes"]) == 2
    assert all(rank0 == rank1 for rank0, rank1 in summary["parameter_hashes"])
    assert len({rank0 for rank0, _ in summary["parameter_hashes"]}) == 2, "every update changes the weights"


@needs_cuda
def test_more_ranks_than_gpus_is_refused(tmp_path):
    ranks = torch.cuda.device_count() + 1
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(ranks), os.path.join(ROOT, "ppo_fast.py"), *GPU_TINY, "--output-dir",
                           str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # each rank refuses with one line (torchrun may stop the others once the first has exited)
    assert proc.returncode != 0 and f"error: torchrun started {ranks} ranks on this machine" in proc.stderr
    assert "ppo_fast.py\", line" not in proc.stderr
    assert not (tmp_path / "runs").exists()
