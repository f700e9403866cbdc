"""How well each IK expert solves its task alone (residual zero), and what it costs per call.

For every task and every control mode its plan acts in: --episodes episodes on the CPU backend with
ignore_terminations, so each episode runs to the time limit; success_once and success_at_end come from
the backend's episode metrics. The cost per call is the CPU time of the calling thread per batched call
(--num-envs envs, one torch thread), which other processes on the machine do not inflate. Then
wrapped-env SPS with the IK expert against the zero expert on PickCube-v1 (wall clock: run it alone).
Prints a table and writes JSON to --out (keys like "PickCube-v1/pd_ee_delta_pos/success_once").
"""

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import experts  # noqa: E402
import util  # noqa: E402


@dataclass
class Args:
    out: str = "bench/out/experts.json"
    """where to write the JSON results"""
    episodes: int = 100
    """episodes per task and control mode"""
    num_envs: int = 8
    """envs of the CPU backend"""
    tasks: list[str] = field(default_factory=lambda: list(experts.TASK_PLANS))
    """tasks to run"""
    control_modes: Optional[list[str]] = None
    """control modes to run (default: every mode the task's plan acts in)"""
    ik_gain: float = 1.0
    """the IK expert's gain"""
    sps_steps: int = 400
    """batched steps per SPS measurement"""
    overhead: bool = True
    """if toggled off (--no-overhead), skip the wall-clock SPS comparison (when other jobs share the cores)"""


def success_rates(task: str, mode: str, args: Args) -> dict:
    env = util.make_env(task, args.num_envs, "cpu", ignore_terminations=True, control_mode=mode)
    expert = experts.IKExpert(task, mode, args.ik_gain)
    cost = dict(seconds=0.0, calls=0)

    def timed(obs):
        start = time.thread_time()
        action = expert(obs)
        cost["seconds"] += time.thread_time() - start
        cost["calls"] += 1
        return action

    wrapped = util.ExpertResidualWrapper(env, timed)
    wrapped.reset(seed=0)
    zero = torch.zeros(args.num_envs, wrapped.action_dim)
    episodes = util.full_episodes(wrapped, zero, rounds=-(-args.episodes // args.num_envs))
    wrapped.close()
    rate = lambda key: torch.cat([e[key] for e in episodes])[:args.episodes].float().mean().item()
    return dict(success_once=rate("success_once"), success_at_end=rate("success_at_end"),
                ms_per_call=1000 * cost["seconds"] / cost["calls"])


def overhead(args: Args) -> dict:
    """Wrapped SPS with the IK expert and with the zero expert on the same envs. The zero-expert run
    replays the IK run's executed actions as its residual, so both runs simulate the same motion and
    differ only in the expert's computation."""
    task, mode = "PickCube-v1", "pd_ee_delta_pos"
    env = util.make_env(task, args.num_envs, "cpu", control_mode=mode)
    action_dim = env.single_action_space.shape[0]
    ik = util.ExpertResidualWrapper(env, experts.IKExpert(task, mode, args.ik_gain))
    zero = util.ExpertResidualWrapper(env, experts.ZeroExpert(action_dim))
    no_residual = torch.zeros(args.num_envs, action_dim)
    steps = args.sps_steps // 4
    ik.reset(seed=0)
    replay = []
    for _ in range(steps):
        replay.append(ik.expert_actions[:, 0].clone())
        ik.step(no_residual)
    seconds = dict(ik=0.0, zero=0.0)
    for _ in range(4):
        ik.reset(seed=0)
        start = time.perf_counter()
        for _ in range(steps):
            ik.step(no_residual)
        seconds["ik"] += time.perf_counter() - start
        zero.reset(seed=0)
        start = time.perf_counter()
        for action in replay:
            zero.step(action)
        seconds["zero"] += time.perf_counter() - start
    env.close()
    return {f"wrapped_{name}_sps": 4 * steps * args.num_envs / s for name, s in seconds.items()}


def main():
    args = tyro.cli(Args)
    util.check_flags(("--episodes", args.episodes, ">= 1"), ("--num-envs", args.num_envs, ">= 1"),
                     ("--ik-gain", args.ik_gain, "> 0"), ("--sps-steps", args.sps_steps, ">= 1"))
    for task in args.tasks:  # a task without a plan would fail in an env worker, after the tasks before it ran
        util.check_env_id(task)
        for mode in args.control_modes or experts.ik_control_modes(task):
            experts.check_expert_args("ik", task, mode, model_path=None, expert_fn=None)
    util.check_writable(os.path.dirname(os.path.abspath(args.out)))  # before the bench, not after it
    torch.set_num_threads(1)
    results = dict(episodes=args.episodes, ik_gain=args.ik_gain, num_envs=args.num_envs)
    print(f"{'task':<22}{'control mode':<22}{'success_once':>14}{'success_at_end':>16}{'ms per call':>13}")
    for task in args.tasks:
        for mode in args.control_modes or experts.ik_control_modes(task):
            rates = success_rates(task, mode, args)
            for k, v in rates.items():
                results[f"{task}/{mode}/{k}"] = v
            print(f"{task:<22}{mode:<22}{rates['success_once']:>14.2f}{rates['success_at_end']:>16.2f}"
                  f"{rates['ms_per_call']:>13.2f}", flush=True)
    if not args.overhead:
        return write(results, args)
    results.update(overhead(args))
    ratio = results["wrapped_ik_sps"] / results["wrapped_zero_sps"]
    results["ik_over_zero_sps"] = ratio
    print(f"\nwrapped SPS, PickCube-v1, pd_ee_delta_pos, {args.num_envs} envs: IK {results['wrapped_ik_sps']:.0f}, "
          f"zero {results['wrapped_zero_sps']:.0f}, ratio {ratio:.2f} (target >= 0.90)")
    write(results, args)


def write(results: dict, args: Args) -> None:
    util.save_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    util.run_cli(main)
