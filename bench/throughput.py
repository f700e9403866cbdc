"""Env and training throughput on this machine (a benchmark, not a test).

Measures, on one task with state observations and random actions:
  single_env_sps        one physx_cpu env stepped in this process
  cpu_vec_sps           util.CpuVectorEnv with --num-envs envs
  maniskill_recipe_sps  ManiSkill's documented CPU recipe: gymnasium AsyncVectorEnv, one env per process,
                        each in CPUGymWrapper, with --num-envs envs
  wrapped_zero_sps      CpuVectorEnv under ExpertResidualWrapper with the zero expert
  train_sps             ppo.py training (rollout + update, evaluation excluded) on the CPU backend
  train_env_step_sps    the same run's env steps per second spent inside envs.step (wrapper included)
  fast_train_sps        ppo_fast.py training at the same settings, eager
  fast_compiled_train_sps  ppo_fast.py --compile, compilation excluded
  compile_seconds       that run's compilation, with an empty inductor cache (what a first run costs)
  ddp2_train_sps        ppo.py under torchrun with 2 ranks, each with half the envs and half the cores (one
                        CPU worker on 2 cores, where this measures the overhead of data parallelism)
The training runs are interleaved --train-repeats times and each reports its median, so that drift in
the machine's speed affects them alike.
  policy_step_eager_us, policy_step_compiled_us  ppo_fast.py's rollout policy step (Agent.act) at --num-envs,
                        one thread, eager and under torch.compile
and, with one 128x128 camera (obs_mode="state_dict+rgb"), at --rgb-num-envs envs:
  rgb_single_env_sps, rgb_cpu_vec_sps, rgb_train_sps (ppo_rgb.py), rgb_buffer_bytes_per_env_step

--sections picks a subset (env, train, policy, rgb). Prints a table, checks the targets whose figures
were measured, and writes JSON to --out.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import gymnasium as gym
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402
import util  # noqa: E402
from experts import ZeroExpert  # noqa: E402


SECTIONS = ("env", "train", "policy", "rgb")


@dataclass
class Args:
    out: str = "bench/out/throughput.json"
    """where to write the JSON results"""
    env_id: str = "PickCube-v1"
    """the task to step"""
    control_mode: str = "pd_joint_delta_pos"
    """the control mode of the robot"""
    num_envs: int = 8
    """envs for the vectorized measurements"""
    steps: int = 600
    """batched steps per vectorized measurement (single env: steps x num_envs / 4)"""
    train_timesteps: int = 24_000
    """env steps of each state training run (ppo.py, ppo_fast.py, ppo_fast.py --compile, ppo.py under torchrun)"""
    train_repeats: int = 3
    """interleaved repeats of the four state training runs"""
    rgb_num_envs: int = 4
    """envs for the RGB measurements (128x128 camera)"""
    rgb_steps: int = 100
    """env steps of the single-env RGB measurement (the vector one takes twice as many)"""
    rgb_train_timesteps: int = 1_600
    """env steps of the ppo_rgb.py run"""
    sections: list[str] = field(default_factory=lambda: list(SECTIONS))
    """what to measure: env (the backends), train (the four state training runs), policy (ppo_fast.py's
    policy step, eager and compiled), rgb"""


def timed_steps(step, num_steps: int, batch: int) -> float:
    for _ in range(10):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(num_steps):
        step()
    return num_steps * batch / (time.perf_counter() - start)


def single_env_sps(args: Args) -> float:
    env = gym.make(args.env_id, num_envs=1, sim_backend="physx_cpu", obs_mode="state_dict",
                   control_mode=args.control_mode)
    env.reset(seed=0)

    def step():
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term.any() or trunc.any():
            env.reset()

    sps = timed_steps(step, args.steps * args.num_envs // 4, 1)
    env.close()
    return sps


def vector_sps(env, args: Args) -> tuple[float, float]:
    """SPS of the backend alone and under the wrapper with the zero expert, measured in alternating rounds
    on the same envs, so that drift in the machine's speed does not bias their ratio."""
    wrapped = util.ExpertResidualWrapper(env, ZeroExpert(env.single_action_space.shape[0]))
    wrapped.reset(seed=0)
    action_dim = env.single_action_space.shape[0]
    rounds, raw, wrap = 4, [], []
    for _ in range(rounds):
        raw.append(timed_steps(lambda: env.step(torch.rand(args.num_envs, action_dim) * 2 - 1),
                               args.steps // rounds, args.num_envs))
        wrap.append(timed_steps(lambda: wrapped.step(torch.rand(args.num_envs, action_dim) * 2 - 1),
                                args.steps // rounds, args.num_envs))
    env.close()
    return len(raw) / sum(1 / x for x in raw), len(wrap) / sum(1 / x for x in wrap)  # equal step counts


def _recipe_thunk(env_id: str, control_mode: str):
    def thunk():
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        import mani_skill.envs  # noqa: F401

        return CPUGymWrapper(gym.make(env_id, obs_mode="state", control_mode=control_mode))
    return thunk


def maniskill_recipe_sps(args: Args) -> float:
    # spawn: forking a process that has already initialised SAPIEN hangs the children
    env = gym.vector.AsyncVectorEnv([_recipe_thunk(args.env_id, args.control_mode) for _ in range(args.num_envs)],
                                    context="spawn")
    env.reset(seed=0)
    sps = timed_steps(lambda: env.step(env.action_space.sample()), args.steps, args.num_envs)
    env.close()
    return sps


def train_sps(args: Args, script: str = "ppo.py", num_envs: int = 0, timesteps: int = 0,
              extra: tuple = (), ranks: int = 1) -> tuple[float, dict]:
    """Training SPS of one of the scripts on the CPU backend (under torchrun with `ranks` > 1), and its summary. The
    network trains on the CPU too (--no-cuda), so that the figures are the CPU path's on any host, and two ranks
    do not ask for two GPUs."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks > 1 else [sys.executable]
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as cache:
        cmd = [*launcher, script, "--sim-backend", "cpu", "--env-id", args.env_id, "--control-mode", args.control_mode,
               "--num-envs", str((num_envs or args.num_envs) // ranks),
               "--total-timesteps", str(timesteps or args.train_timesteps),
               "--eval-freq", "100000", "--no-capture-video", "--no-save-model", "--num-eval-envs", "1",
               "--no-cuda", "--output-dir", out, *extra]
        # an empty inductor cache per run: compile_seconds is what a first run pays
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache),
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode:
            raise util.FatalError(f"{shlex.join(cmd[len(launcher):])} failed (exit code {proc.returncode})",
                                  details=proc.stderr)
        (run,) = os.listdir(out)
        summary = json.load(open(os.path.join(out, run, "summary.json")))
        return summary["train_sps"], summary


def state_policy_dims(args: Args) -> tuple[int, int]:
    """(obs_dim, action_dim) of the state scripts' policy with one expert: the state, then the expert action."""
    env = util.make_env(args.env_id, 1, "physx_cpu", control_mode=args.control_mode)
    obs, _ = env.reset(seed=0)
    action_dim = env.single_action_space.shape[0]
    env.close()
    return util.flat_state(obs).shape[1] + action_dim, action_dim


def all_reduce_bytes_per_step(dims: tuple[int, int]) -> int:
    """Bytes each rank all-reduces per gradient step of ppo.py: its parameter count x 4 (float32 gradients)."""
    agent = ppo.Agent(*dims)
    return 4 * sum(p.numel() for p in agent.parameters())


def rgb_single_env_sps(args: Args) -> float:
    env = gym.make(args.env_id, num_envs=1, sim_backend="physx_cpu", obs_mode="state_dict+rgb",
                   control_mode=args.control_mode)
    env.reset(seed=0)
    sps = timed_steps(lambda: env.step(env.action_space.sample()), args.rgb_steps, 1)
    env.close()
    return sps


def rgb_cpu_vec_sps(args: Args) -> float:
    env = util.make_env(args.env_id, args.rgb_num_envs, "cpu", obs_mode="state_dict+rgb",
                        control_mode=args.control_mode)
    env.reset(seed=0)
    action_dim = env.single_action_space.shape[0]
    sps = timed_steps(lambda: env.step(torch.rand(args.rgb_num_envs, action_dim) * 2 - 1),
                      args.rgb_steps // args.rgb_num_envs * 2, args.rgb_num_envs)
    env.close()
    return sps


def policy_step_us(args: Args, dims: tuple[int, int]) -> tuple[float, float]:
    """Microseconds per rollout policy step of ppo_fast.py (Agent.act at --num-envs, one thread, as on the CPU
    backend), eager and compiled, timed in alternating rounds."""
    import ppo_fast

    obs_dim, action_dim = dims
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    agent = ppo_fast.Agent(obs_dim, action_dim)
    x = torch.randn(args.num_envs, obs_dim)
    fns = dict(eager=agent.act, compiled=torch.compile(agent.act))
    calls_per_second = {name: [] for name in fns}
    with torch.no_grad():
        fns["compiled"](x)  # compiles
        for _ in range(5):
            for name, fn in fns.items():
                calls_per_second[name].append(timed_steps(lambda: fn(x), 2000, 1))
    torch.set_num_threads(threads)
    return tuple(1e6 / sorted(calls_per_second[name])[2] for name in fns)  # medians


def main():
    args = tyro.cli(Args)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        raise util.UsageError(f"unknown sections {sorted(unknown)}; valid: {', '.join(SECTIONS)}")
    util.check_env_id(args.env_id)
    util.check_flags(*((f"--{name.replace('_', '-')}", getattr(args, name), ">= 1")
                       for name in ("num_envs", "steps", "train_timesteps", "train_repeats", "rgb_num_envs",
                                    "rgb_steps", "rgb_train_timesteps")))
    util.check_writable(os.path.dirname(os.path.abspath(args.out)))  # before the bench, not after it
    steps = ppo.Args.num_steps  # the training runs' --num-steps: the scripts' default
    if "train" in args.sections and (args.num_envs % 2 or args.train_timesteps < args.num_envs * steps):
        raise util.UsageError(f"the training runs need an even --num-envs (two ranks share them) and --train-timesteps "
                              f">= one batch of --num-envs x {steps}; got {args.num_envs} and {args.train_timesteps}")
    if "rgb" in args.sections and args.rgb_train_timesteps < args.rgb_num_envs * steps:
        raise util.UsageError(f"--rgb-train-timesteps must be >= one batch of --rgb-num-envs x {steps}; got "
                              f"{args.rgb_train_timesteps}")
    dims = state_policy_dims(args)  # builds one env: a control mode the task lacks is refused here, in one line
    results = dict(cores=os.cpu_count(), num_envs=args.num_envs, env_id=args.env_id)
    if "env" in args.sections:
        results["single_env_sps"] = single_env_sps(args)
        results["cpu_vec_sps"], results["wrapped_zero_sps"] = vector_sps(
            util.make_env(args.env_id, args.num_envs, "cpu", control_mode=args.control_mode), args)
        results["maniskill_recipe_sps"] = maniskill_recipe_sps(args)
    if "train" in args.sections:
        runs = dict(train=("ppo.py", (), 1), fast_train=("ppo_fast.py", (), 1),
                    fast_compiled_train=("ppo_fast.py", ("--compile",), 1), ddp2_train=("ppo.py", (), 2))
        summaries = {name: [] for name in runs}
        for _ in range(args.train_repeats):
            for name, (script, extra, ranks) in runs.items():
                summaries[name].append(train_sps(args, script, extra=extra, ranks=ranks)[1])
        for name, runs_of_name in summaries.items():
            median = sorted(runs_of_name, key=lambda s: s["train_sps"])[len(runs_of_name) // 2]
            results[f"{name}_sps"] = median["train_sps"]
            results[f"{name}_sps_all"] = [s["train_sps"] for s in runs_of_name]
            results[f"{name}_seconds"] = median["seconds"]
        # env steps/s of envs.step inside training: the policy's motions cost the simulator more than random ones
        results["train_env_step_sps"] = args.train_timesteps / results["train_seconds"]["env_step"]
        results["compile_seconds"] = results["fast_compiled_train_seconds"]["compile"]
        results["ddp_all_reduce_bytes_per_gradient_step"] = all_reduce_bytes_per_step(dims)
    if "policy" in args.sections:
        results["policy_step_eager_us"], results["policy_step_compiled_us"] = policy_step_us(args, dims)
    if "rgb" in args.sections:
        results["rgb_single_env_sps"] = rgb_single_env_sps(args)
        results["rgb_cpu_vec_sps"] = rgb_cpu_vec_sps(args)
        results["rgb_train_sps"], summary = train_sps(args, "ppo_rgb.py", args.rgb_num_envs,
                                                      args.rgb_train_timesteps)
        results["rgb_train_seconds"] = summary["seconds"]
        results["rgb_buffer_bytes_per_env_step"] = summary["buffer_bytes_per_env_step"]

    r, cores = results, results["cores"]
    targets = [  # (name, needed keys, ratio, threshold): checked where this run measured the keys
        ("cpu_vec_sps >= 0.9 x cores x single_env_sps", ("cpu_vec_sps", "single_env_sps"),
         lambda: r["cpu_vec_sps"] / (cores * r["single_env_sps"]), 0.9),
        ("cpu_vec_sps >= 2.5 x maniskill_recipe_sps", ("cpu_vec_sps", "maniskill_recipe_sps"),
         lambda: r["cpu_vec_sps"] / r["maniskill_recipe_sps"], 2.5),
        ("wrapped_zero_sps >= 0.97 x cpu_vec_sps", ("wrapped_zero_sps", "cpu_vec_sps"),
         lambda: r["wrapped_zero_sps"] / r["cpu_vec_sps"], 0.97),
        ("train_sps >= 0.75 x cpu_vec_sps", ("train_sps", "cpu_vec_sps"),
         lambda: r["train_sps"] / r["cpu_vec_sps"], 0.75),
        ("fast_train_sps >= 1.0 x train_sps", ("fast_train_sps", "train_sps"),
         lambda: r["fast_train_sps"] / r["train_sps"], 1.0),
        ("fast_compiled_train_sps >= 1.0 x train_sps", ("fast_compiled_train_sps", "train_sps"),
         lambda: r["fast_compiled_train_sps"] / r["train_sps"], 1.0),
        ("ddp2_train_sps / train_sps (reported, no target)", ("ddp2_train_sps", "train_sps"),
         lambda: r["ddp2_train_sps"] / r["train_sps"], 0.0),
        ("rgb_cpu_vec_sps >= 0.85 x cores x rgb_single_env_sps", ("rgb_cpu_vec_sps", "rgb_single_env_sps"),
         lambda: r["rgb_cpu_vec_sps"] / (cores * r["rgb_single_env_sps"]), 0.85),
        ("rgb_train_sps >= 0.7 x rgb_cpu_vec_sps", ("rgb_train_sps", "rgb_cpu_vec_sps"),
         lambda: r["rgb_train_sps"] / r["rgb_cpu_vec_sps"], 0.7),
    ]
    print(f"\n{args.env_id}, state, {args.control_mode}, {args.num_envs} envs, {cores} cores")
    print(f"{'measurement':<24}{'env steps/s':>14}")
    for key in ("single_env_sps", "cpu_vec_sps", "maniskill_recipe_sps", "wrapped_zero_sps", "train_sps",
                "train_env_step_sps", "fast_train_sps", "fast_compiled_train_sps", "ddp2_train_sps", "rgb_single_env_sps",
                "rgb_cpu_vec_sps", "rgb_train_sps"):
        if key in r:
            print(f"{key:<24}{r[key]:>14.1f}")
    if "compile_seconds" in r:
        print(f"compile_seconds {r['compile_seconds']:.1f} (ppo_fast.py --compile, empty inductor cache)")
        print(f"ddp all-reduce per gradient step: {r['ddp_all_reduce_bytes_per_gradient_step']} bytes per rank")
    if "policy_step_eager_us" in r:
        print(f"ppo_fast.py policy step at {args.num_envs} envs, one thread: {r['policy_step_eager_us']:.0f} us eager, "
              f"{r['policy_step_compiled_us']:.0f} us compiled")
    if "rgb_buffer_bytes_per_env_step" in r:
        print(f"rgb_buffer_bytes_per_env_step {r['rgb_buffer_bytes_per_env_step']:.0f} "
              f"(image {128 * 128 * 3} bytes; RGB rows: 128x128 camera, {args.rgb_num_envs} envs)")
    print(f"\n{'target':<56}{'ratio':>8}  met")
    results["targets"] = {}
    for name, keys, ratio, need in targets:
        if all(k in r for k in keys):
            print(f"{name:<56}{ratio():>8.2f}  {'yes' if ratio() >= need else 'NO'}")
            results["targets"][name] = dict(ratio=ratio(), met=ratio() >= need)
    util.save_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    util.run_cli(main)
