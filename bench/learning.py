"""Learning benchmark: residual PPO on top of an expert against plain PPO, PickCube-v1 on the CPU backend.

Runs ppo.py as subprocesses, one after the other, for a fixed budget of env steps in three
configurations, each with every seed in --seeds:

- ``zero``: plain PPO (the zero expert, residual scale 1);
- ``weak_ik``: residual PPO over a deliberately weak IK expert (``--weak-ik-gain``, at which the expert
  alone reaches success_once <= 0.4);
- ``ik``: residual PPO over the default IK expert (gain 1.0).

All runs use pd_ee_delta_pos. Each run's eval success_once against env steps comes from its
tensorboard events. Each IK expert is also measured alone (residual zero) on --expert-episodes
episodes, evaluated as ppo.py evaluates. Writes learning.csv, learning.png and learning.json to
--out, and prints a table and the targets:

- ``weak_ik`` reaches eval success_once >= 0.9 within the budget with every seed;
- ``ik`` never falls more than 0.05 below its expert alone at any eval point.
"""

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experts  # noqa: E402
import util  # noqa: E402

ENV_ID = "PickCube-v1"
CONTROL_MODE = "pd_ee_delta_pos"


@dataclass
class Args:
    out: str = "bench/out/learning"
    """directory for learning.csv, learning.png, learning.json, the runs and their logs"""
    total_timesteps: int = 300_000
    """env steps of training per run"""
    seeds: list[int] = field(default_factory=lambda: [1, 2])
    """seeds of every configuration"""
    configs: list[str] = field(default_factory=lambda: ["weak_ik", "ik", "zero"])
    """configurations to run: zero | weak_ik | ik"""
    weak_ik_gain: float = 0.28
    """the weak expert's --ik-gain: the largest with success_once <= 0.4 alone (measured: 0.27 -> 0.23,
    0.28 -> 0.31, 0.29 -> 0.45, 0.3 -> 0.56 with bench/experts.py)"""
    num_envs: int = 8
    """training envs per run"""
    num_eval_envs: int = 32
    """eval envs per run: one episode each per eval"""
    ppo_flags: str = "--num-steps 200 --num-minibatches 4 --eval-freq 6"
    """ppo.py flags of every run: batches of 1600 env steps, an eval every 9600 env steps"""
    weak_ik_flags: str = ("--residual-scale 0.5 --init-logstd -2 --critic-warmup-iters 2 "
                          "--residual-warmup-steps 50000")
    """ppo.py flags of the weak_ik configuration (residual techniques and scale)"""
    ik_flags: str = "--residual-scale 0.2 --init-logstd -2 --critic-warmup-iters 2 --residual-warmup-steps 50000"
    """ppo.py flags of the ik configuration (residual techniques and scale)"""
    expert_episodes: int = 200
    """episodes on which each IK expert is measured alone"""
    train: bool = True
    """if toggled off (--no-train), report only the runs already recorded in --out (e.g. while a bench runs)"""
    rerun: bool = False
    """if toggled, rerun every training run; otherwise a run already recorded in --out with the same
    command is reused (so an interrupted bench, or one with a configuration added, continues)"""


def config_flags(config: str, args: Args) -> list[str]:
    if config == "zero":
        return ["--expert-type", "zero", "--residual-scale", "1.0"]
    if config == "weak_ik":
        return ["--expert-type", "ik", "--ik-gain", str(args.weak_ik_gain), *shlex.split(args.weak_ik_flags)]
    return ["--expert-type", "ik", "--ik-gain", "1.0", *shlex.split(args.ik_flags)]


def expert_alone(gain: float, args: Args) -> float:
    """success_once of the IK expert with a zero residual, in full episodes as ppo.py evaluates
    (recorded in --out like the runs, and reused unless --rerun)."""
    record_path = os.path.join(args.out, "logs", f"expert_alone_gain{gain}_{args.expert_episodes}ep.json")
    if not args.rerun and os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)["success_once"]
    env = util.make_env(ENV_ID, args.num_eval_envs, "cpu", ignore_terminations=True, control_mode=CONTROL_MODE)
    wrapped = util.ExpertResidualWrapper(env, experts.IKExpert(ENV_ID, CONTROL_MODE, gain))
    wrapped.reset(seed=12345)
    zero = torch.zeros(args.num_eval_envs, wrapped.action_dim)
    successes = []
    for _ in range(-(-args.expert_episodes // args.num_eval_envs)):
        for _ in range(wrapped.max_episode_steps):
            _, _, _, _, info = wrapped.step(zero)
        successes.append(info["final_info"]["episode"]["success_once"])
    wrapped.close()
    success_once = torch.cat(successes)[:args.expert_episodes].float().mean().item()
    with open(record_path, "w") as f:
        json.dump(dict(gain=gain, episodes=args.expert_episodes, success_once=success_once), f)
    return success_once


def eval_curve(run_dir: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return [(int(e.step), float(e.value)) for e in events.Scalars("eval/success_once")]


def train(config: str, seed: int, args: Args) -> Optional[dict]:
    runs = os.path.join(args.out, "runs")
    exp_name = f"{config}_s{seed}"
    command = [sys.executable, os.path.join(ROOT, "ppo.py"), "--sim-backend", "cpu", "--env-id", ENV_ID,
               "--control-mode", CONTROL_MODE, "--seed", str(seed), "--num-envs", str(args.num_envs),
               "--num-eval-envs", str(args.num_eval_envs), "--total-timesteps", str(args.total_timesteps),
               "--no-capture-video", "--exp-name", exp_name, "--output-dir", runs, *shlex.split(args.ppo_flags),
               *config_flags(config, args)]
    log_path = os.path.join(args.out, "logs", f"{exp_name}.log")
    record_path = os.path.join(args.out, "logs", f"{exp_name}.json")
    if not args.rerun and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["command"] == shlex.join(command[1:]):
            print(f"{config} seed {seed}: reusing {record['run_dir']}", flush=True)
            return record
    if not args.train:
        return None
    print(f"[{time.strftime('%H:%M:%S')}] {config} seed {seed}: {shlex.join(command[1:])}", flush=True)
    start = time.time()
    # One OpenMP thread: on a machine shared with other jobs, a second thread spinning at every barrier
    # made the update tens of times slower, and a batch of 400 samples gains nothing from it.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise util.FatalError(f"{exp_name} failed (exit code {proc.returncode}); see {log_path}")
    run_dir = max((os.path.join(runs, d) for d in os.listdir(runs) if d.startswith(f"{ENV_ID}__{exp_name}__")),
                  key=os.path.getmtime)
    curve = eval_curve(run_dir)
    print(f"  {seconds / 60:.1f} min, eval success_once: " + " ".join(f"{v:.2f}" for _, v in curve), flush=True)
    record = dict(config=config, seed=seed, command=shlex.join(command[1:]), run_dir=run_dir, seconds=seconds,
                  steps=[s for s, _ in curve], success_once=[v for _, v in curve])
    with open(record_path, "w") as f:
        json.dump(record, f, indent=2)
    return record


def plot(runs: list[dict], alone: dict, path: str, args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zero="tab:gray", weak_ik="tab:orange", ik="tab:blue")
    labels = dict(zero="PPO (zero expert)", weak_ik=f"residual PPO, weak IK (gain {args.weak_ik_gain})",
                  ik="residual PPO, IK (gain 1.0)")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        first = run["seed"] == args.seeds[0]
        ax.plot(run["steps"], run["success_once"], color=colors[run["config"]], marker=".",
                linestyle="-" if first else "--", label=f"{labels[run['config']]}, seed {run['seed']}")
    for config, value in alone.items():
        ax.axhline(value, color=colors[config], linestyle=":", linewidth=1, label=f"{config} expert alone ({value:.2f})")
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval success_once")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{ENV_ID}, CPU backend, {args.num_envs} envs, {args.num_eval_envs} eval episodes per point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = tyro.cli(Args)
    unknown = set(args.configs) - {"zero", "weak_ik", "ik"}
    if unknown:
        raise util.UsageError(f"unknown configurations {sorted(unknown)}; valid: zero, weak_ik, ik")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    bench_start = time.time()

    alone = {}
    for config, gain in (("weak_ik", args.weak_ik_gain), ("ik", 1.0)):
        if config in args.configs:
            alone[config] = expert_alone(gain, args)
            print(f"{config} expert alone (gain {gain}): success_once {alone[config]:.3f} "
                  f"on {args.expert_episodes} episodes", flush=True)

    # seed by seed, so that an interrupted bench already has every configuration
    runs = [run for seed in args.seeds for config in args.configs if (run := train(config, seed, args))]

    with open(os.path.join(args.out, "learning.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "seed", "env_steps", "success_once"])
        for run in runs:
            writer.writerows([run["config"], run["seed"], s, v] for s, v in zip(run["steps"], run["success_once"]))
    plot(runs, alone, os.path.join(args.out, "learning.png"), args)

    summary = {}
    print(f"\n{'config':<9}{'seed':>5}{'final':>8}{'max':>7}{'min':>7}{'first >= 0.9':>14}{'minutes':>9}")
    for run in runs:
        reached = [s for s, v in zip(run["steps"], run["success_once"]) if v >= 0.9]
        run.update(final=run["success_once"][-1], max=max(run["success_once"]), min=min(run["success_once"]),
                   first_step_at_0_9=reached[0] if reached else None)
        print(f"{run['config']:<9}{run['seed']:>5}{run['final']:>8.2f}{run['max']:>7.2f}{run['min']:>7.2f}"
              f"{str(run['first_step_at_0_9']):>14}{run['seconds'] / 60:>9.1f}")
    by_config = {c: [r for r in runs if r["config"] == c] for c in args.configs}
    if by_config.get("weak_ik"):
        summary["weak_ik_seeds"] = len(by_config["weak_ik"])
        summary["weak_ik_reaches_0.9_every_seed"] = all(r["first_step_at_0_9"] is not None for r in by_config["weak_ik"])
    if by_config.get("ik"):
        summary["ik_seeds"] = len(by_config["ik"])
        summary["ik_worst_eval"] = min(r["min"] for r in by_config["ik"])
        summary["ik_never_below_expert_minus_0.05"] = summary["ik_worst_eval"] >= alone["ik"] - 0.05
    for target, value in summary.items():
        print(f"{target}: {value}")
    result = dict(env_id=ENV_ID, control_mode=CONTROL_MODE, args=vars(args), expert_alone=alone, targets=summary,
                  wall_clock_seconds=time.time() - bench_start,
                  training_seconds_total=sum(r["seconds"] for r in runs), runs=runs)
    with open(os.path.join(args.out, "learning.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}/learning.csv, learning.png, learning.json "
          f"({(time.time() - bench_start) / 60:.0f} min in all)")


if __name__ == "__main__":
    util.run_cli(main)
