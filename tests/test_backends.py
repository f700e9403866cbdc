"""Both backends against hand-stepped single ManiSkill envs, on the real simulator."""

import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import util
from conftest import ROOT
from test_reliability import descendants

ENV_ID = "PickCube-v1"
# enhanced_determinism: the CPU backend's default; the native path needs it to be comparable
KW = dict(control_mode="pd_joint_delta_pos", max_episode_steps=5, enhanced_determinism=True)
STEPS = 12  # crosses two autoresets


def flat(obs):
    return util.flat_state(obs)


def scripted_actions(num_envs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(num_envs, 8, generator=g) * 2 - 1 for _ in range(STEPS)]


def reference_rollout(seeds, actions):
    """Single physx_cpu envs stepped in turn by hand, reset by hand when their episode ends."""
    envs = [gym.make(ENV_ID, num_envs=1, sim_backend="physx_cpu", obs_mode="state_dict", **KW) for _ in seeds]
    obs = torch.cat([flat(env.reset(seed=s)[0]) for env, s in zip(envs, seeds)])
    out = dict(obs=[obs], rew=[], trunc=[], final_obs=[], returns=[], lens=[])
    returns = torch.zeros(len(seeds))
    for a in actions:
        step_obs, rews, truncs, finals = [], [], [], []
        for i, env in enumerate(envs):
            o, r, term, trunc, info = env.step(a[i:i + 1])
            finals.append(flat(o))
            returns[i] += r[0]
            if bool(trunc[0]) or bool(term[0]):
                out["returns"].append(returns[i].item())
                out["lens"].append(int(info["elapsed_steps"][0]))
                returns[i] = 0
                o, _ = env.reset()
            step_obs.append(flat(o))
            rews.append(r)
            truncs.append(trunc)
        out["obs"].append(torch.cat(step_obs))
        out["rew"].append(torch.cat(rews))
        out["trunc"].append(torch.cat(truncs))
        out["final_obs"].append(torch.cat(finals))
    for env in envs:
        env.close()
    return out


def backend_rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    out = dict(obs=[flat(obs)], rew=[], trunc=[], final_obs=[], returns=[], lens=[], final_info=0)
    for a in actions:
        o, r, term, trunc, info = env.step(a)
        assert not term.any()
        out["obs"].append(flat(o))
        out["rew"].append(r)
        out["trunc"].append(trunc)
        if "final_info" in info:
            mask = info["_final_info"]
            out["final_info"] += 1
            out["final_obs"].append(flat(info["final_observation"]))
            out["returns"] += info["final_info"]["episode"]["return"][mask].tolist()
            out["lens"] += info["final_info"]["episode"]["episode_len"][mask].tolist()
        else:
            assert "episode" in info and set(info["episode"]) >= {"return", "episode_len", "success_once"}
            out["final_obs"].append(flat(o))
    env.close()
    return out


def assert_same(got, want):
    for key in ("obs", "rew", "trunc", "final_obs"):
        assert len(got[key]) == len(want[key])
        for t, (g, w) in enumerate(zip(got[key], want[key])):
            torch.testing.assert_close(g.float(), w.float(), msg=f"{key} differs at step {t}")
    np.testing.assert_allclose(got["returns"], want["returns"], rtol=1e-5)
    assert got["lens"] == want["lens"] == [5] * len(want["lens"])


def test_cpu_backend_matches_single_envs_across_autoreset():
    actions = scripted_actions(3)
    env = util.CpuVectorEnv(ENV_ID, 3, num_workers=2, obs_mode="state_dict", **KW)
    assert env.slices == [(0, 2), (2, 3)] or env.slices == [(0, 1), (1, 3)]
    got = backend_rollout(env, 7, actions)
    # ManiSkill's batched seeding (BaseEnv._set_episode_rng): env 0 takes the seed, the others
    # np.random.RandomState(7).randint(2**31, size=2)
    want = reference_rollout([7, 327741615, 976413892], actions)
    assert got["final_info"] == 2
    assert_same(got, want)


def test_native_maniskill_path_matches_cpu_backend():
    """The GPU code path (gym.make + ManiSkillVectorEnv), run on physx_cpu with one env."""
    actions = scripted_actions(1, seed=1)
    native = util.make_env(ENV_ID, 1, sim_backend="physx_cpu", **KW)
    assert isinstance(native, util.NativeVectorEnv)
    got = backend_rollout(native, 3, actions)
    want = backend_rollout(util.CpuVectorEnv(ENV_ID, 1, obs_mode="state_dict", **KW), 3, actions)
    assert_same(got, want)
    assert got["final_info"] == want["final_info"] == 2


@pytest.mark.parametrize("ignore_terminations", [False, True])
def test_success_metrics_and_ignore_terminations(ignore_terminations):
    """Both backends report the same episode metrics; success_at_end only when terminations are ignored."""
    actions = scripted_actions(1, seed=2)
    expected = {"return", "episode_len", "success_once", "reward"} | ({"success_at_end"} if ignore_terminations else set())
    metrics = {}
    for backend in ("physx_cpu", "cpu"):
        env = util.make_env(ENV_ID, 1, sim_backend=backend, ignore_terminations=ignore_terminations, **KW)
        env.reset(seed=5)
        episodes = []
        for a in actions:
            _, _, term, trunc, info = env.step(a)
            if "final_info" in info:
                episodes.append({k: v.float() for k, v in info["final_info"]["episode"].items()})
        env.close()
        assert len(episodes) == 2 and all(set(e) == expected for e in episodes), (backend, episodes)
        assert [e["episode_len"].item() for e in episodes] == [5, 5]
        metrics[backend] = episodes
    for native, cpu in zip(metrics["physx_cpu"], metrics["cpu"]):
        for key in expected:
            torch.testing.assert_close(cpu[key], native[key], msg=key)


def test_bad_sizes_and_ids_are_usage_errors():
    with pytest.raises(util.UsageError, match="at least 1"):
        util.make_env(ENV_ID, 0, sim_backend="cpu")
    with pytest.raises(util.UsageError, match="PickCube-v1"):
        util.make_env("PickCub-v1", 1, sim_backend="cpu")


def test_flat_state_is_maniskills_state_observation():
    kw = dict(num_envs=1, sim_backend="physx_cpu", control_mode="pd_joint_delta_pos")
    structured = gym.make(ENV_ID, obs_mode="state_dict", **kw)
    flat_env = gym.make(ENV_ID, obs_mode="state", **kw)
    action = torch.full((1, 8), 0.3)
    for env in (structured, flat_env):
        env.reset(seed=11)
    for _ in range(3):
        obs_dict = structured.step(action)[0]
        obs_flat = flat_env.step(action)[0]
    assert obs_dict["extra"]["is_grasped"].dtype == torch.bool  # a leaf that must be cast
    torch.testing.assert_close(util.flat_state(obs_dict), obs_flat)
    structured.close()
    flat_env.close()


def test_dead_worker_is_named_instead_of_hanging():
    env = util.CpuVectorEnv(ENV_ID, 4, num_workers=2, obs_mode="state_dict", **KW)
    try:
        env.reset(seed=0)
        env.procs[1].kill()
        env.procs[1].join()
        with pytest.raises(RuntimeError, match=r"CPU env worker 1 \(envs 2\.\.3\) died"):
            env.step(torch.zeros(4, 8))
    finally:
        env.close()


def test_workers_exit_when_the_trainer_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "trainer.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import util\n"
        "if __name__ == '__main__':\n"
        "    env = util.CpuVectorEnv('PickCube-v1', 2, num_workers=2)\n"
        "    print(' '.join(str(p.pid) for p in env.procs), flush=True)\n"
        "    time.sleep(600)\n")
    trainer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in trainer.stdout.readline().split()]
    pids = descendants(trainer.pid)  # the workers, the fork server, the resource tracker
    assert len(workers) == 2 and set(workers) < set(pids), (workers, pids)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    deadline = time.time() + 10
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in _state(p)]
    assert not alive, f"orphaned processes {alive}"


def _state(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:")).lower()
    except (OSError, StopIteration):
        return "gone"


def test_simulator_failures_keep_their_traceback_and_bad_configurations_do_not():
    with pytest.raises(util.UsageError, match="pd_foo not in supported modes"):
        util.backends._gym_make("PickCube-v1", num_envs=1, sim_backend="physx_cpu", control_mode="pd_foo")
    missing_gpu = f"physx_cuda:{torch.cuda.device_count()}"  # one index past the last GPU: no machine has it
    with pytest.raises(util.FatalError) as failure:
        util.backends._gym_make("PickCube-v1", num_envs=1, sim_backend=missing_gpu)
    assert isinstance(failure.value.__cause__, RuntimeError)

    # a script's entry point prints the cause's traceback, then the cause in one line, and exits with 1
    program = ("import util\n"
               f"util.run_cli(lambda: util.backends._gym_make('PickCube-v1', num_envs=1, sim_backend='{missing_gpu}'))\n")
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "RuntimeError" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot create PickCube-v1 ({missing_gpu}): ") and "cuda" in last, proc.stderr


def test_running_out_of_gpu_memory_in_training_ends_with_a_hint(capsys):
    def train():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(SystemExit) as stopped:
        util.run_cli(train)
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in train" in err
    assert err.strip().splitlines()[-1] == ("error: out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB; "
                                            "try fewer --num-envs or --num-eval-envs, or more --num-minibatches")


def test_episode_metrics_average_the_episodes_that_ended():
    metrics = util.EpisodeMetrics()
    assert metrics.means() == {}
    # env 0 and 2 end, then nothing ends, then env 1 ends: three episodes
    metrics.add(dict(final_info=dict(episode=dict(success_once=torch.tensor([True, True, False]),
                                                  ret=torch.tensor([1.0, 5.0, 3.0]))),
                     _final_info=torch.tensor([True, False, True])))
    metrics.add(dict(episode=dict(success_once=torch.tensor([True, True, True]), ret=torch.ones(3))))
    metrics.add(dict(final_info=dict(episode=dict(success_once=torch.tensor([False, False, True]),
                                                  ret=torch.tensor([9.0, 2.0, 7.0]))),
                     _final_info=torch.tensor([False, True, False])))
    means = metrics.means()
    assert means["episodes"] == 3
    assert means["success_once"] == pytest.approx(1 / 3) and means["ret"] == pytest.approx((1 + 3 + 2) / 3)
    assert metrics.means() == {}, "each call starts over"
