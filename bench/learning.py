"""Learning benchmark: residual PPO on top of an expert against plain PPO, on the CPU backend.

Runs ppo.py as subprocesses, one after the other, for a fixed budget of env steps per run, in the
configurations of a task (--task, see TASKS): three by default, any of them with --runs:

- ``zero``: plain PPO (the zero expert, residual scale 1);
- ``weak_ik``: residual PPO over an imperfect IK expert: on PickCube-v1 one at a reduced gain
  (``--ik-gain 0.28``), on PegInsertionSide-v1 one that perceives the hole 3 mm off
  (``--ik-calibration-mm 3``), both chosen to succeed in at most half the episodes alone;
- ``ik``: residual PPO over the good IK expert;
- ``weak_ik_adaptive``: ``weak_ik`` with adaptive residual scaling (``--residual-scale-mode adaptive``), not
  in the default list: ``--runs weak_ik:1 weak_ik_adaptive:1 ...`` compares the two;
- ``ik_sparse`` (PegInsertionSide-v1): ``ik`` trained on the task's sparse reward (``--reward-mode sparse``),
  not in the default list either;
- ``ik_long_horizon`` (PegInsertionSide-v1): ``ik`` with ManiSkill's discounting for this task
  (``--gamma 0.97 --gae-lambda 0.95``), not in the default list either;
- ``ik_long_horizon_low_lr`` (PegInsertionSide-v1): ``ik_long_horizon`` at a third of the learning rate
  (``--learning-rate 1e-4``), not in the default list either;
- ``ik_long_horizon_low_lr_half_scale`` (PegInsertionSide-v1): ``ik_long_horizon_low_lr`` at half the residual
  scale (``--residual-scale 0.1``), not in the default list either.

Each run's eval success_once against env steps comes from its tensorboard events. An eval of
--num-eval-envs episodes is a coarse measure, so each run's final checkpoint is also evaluated on
--final-episodes episodes (``ppo.py --evaluate``). Each IK expert is also measured alone (residual zero) on
--expert-episodes full episodes of --num-eval-envs envs, which keep the scenes they were built with (ppo.py's eval
envs build a new scene every episode; on PegInsertionSide-v1 the scene draws the peg's and the hole's sizes), and
the good one also on the very episodes of each eval of its runs (the eval envs of the run's seed, built as ppo.py
builds them), so that every eval point has a paired baseline.
Writes learning.csv, learning.png and learning.json to --out, and prints a table and the targets:

- ``weak_ik`` reaches eval success_once >= 0.9 within the budget with every seed;
- ``ik`` never falls more than 0.05 below its expert alone at any eval point: below the expert's success on
  --expert-episodes episodes, and below its success on that eval's own episodes.

Every finished run is recorded in --out/logs and reused by the next invocation with the same command,
so a bench that spans several sessions continues where it stopped; an unfinished one resumes from its
newest checkpoint. A clone without that --out (a fresh one) takes the finished runs from the committed
outputs with --reuse-from docs/learning-PegInsertionSide-v1.json (PickCube-v1's runs predate the JSON
and have only docs/learning.csv). A run's minutes are the time it spent running, read
from its event log, so pauses and stops are left out.
"""

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experts  # noqa: E402
import util  # noqa: E402

RESIDUAL_TECHNIQUES = "--init-logstd -2 --critic-warmup-iters 2 --residual-warmup-steps 50000"
LONG_HORIZON = "--gamma 0.97 --gae-lambda 0.95"  # ManiSkill's discounting for PegInsertionSide-v1
# per task: control mode, budget, ppo.py flags of every run, the runs in the order they are made (seed by
# seed, so that an interrupted bench already has every configuration), and each configuration's flags
TASKS = {
    "PickCube-v1": dict(
        control_mode="pd_ee_delta_pos", total_timesteps=300_000,
        ppo_flags="--num-steps 200 --num-minibatches 4 --eval-freq 6",  # an eval every 9600 env steps
        runs=[("weak_ik", 1), ("ik", 1), ("zero", 1), ("weak_ik", 2), ("ik", 2), ("zero", 2)],
        configs=dict(zero="--expert-type zero --residual-scale 1.0",
                     weak_ik=f"--expert-type ik --ik-gain 0.28 --residual-scale 0.5 {RESIDUAL_TECHNIQUES}",
                     ik=f"--expert-type ik --ik-gain 1.0 --residual-scale 0.2 {RESIDUAL_TECHNIQUES}",
                     weak_ik_adaptive=f"--expert-type ik --ik-gain 0.28 --residual-scale 0.5 {RESIDUAL_TECHNIQUES} "
                                      f"--residual-scale-mode adaptive --residual-scale-min 0.1")),
    "PegInsertionSide-v1": dict(
        control_mode="pd_ee_delta_pose", total_timesteps=1_000_000,
        ppo_flags="--num-steps 200 --num-minibatches 4 --eval-freq 20",  # an eval every 32000 env steps
        runs=[("weak_ik", 1), ("ik", 1), ("weak_ik", 2), ("ik", 2), ("zero", 1)],
        configs=dict(zero="--expert-type zero --residual-scale 1.0",
                     weak_ik=f"--expert-type ik --ik-calibration-mm 3 --residual-scale 0.2 {RESIDUAL_TECHNIQUES}",
                     ik=f"--expert-type ik --residual-scale 0.2 {RESIDUAL_TECHNIQUES}",
                     weak_ik_adaptive=f"--expert-type ik --ik-calibration-mm 3 --residual-scale 0.2 "
                                      f"{RESIDUAL_TECHNIQUES} --residual-scale-mode adaptive --residual-scale-min 0.05",
                     # the dense reward pays a peg stopped just short of the success depth nearly what it pays
                     # one inserted
                     ik_sparse=f"--expert-type ik --residual-scale 0.2 {RESIDUAL_TECHNIQUES} --reward-mode sparse",
                     # at gamma 0.8 a step's return looks about five steps ahead, shorter than the final push
                     ik_long_horizon=f"--expert-type ik --residual-scale 0.2 {RESIDUAL_TECHNIQUES} {LONG_HORIZON}",
                     # its residual drifted from the expert at 3e-4; smaller steps stay nearer the expert
                     ik_long_horizon_low_lr=f"--expert-type ik --residual-scale 0.2 {RESIDUAL_TECHNIQUES} "
                                            f"{LONG_HORIZON} --learning-rate 1e-4",
                     # the residual can move the executed action half as far from the expert's
                     ik_long_horizon_low_lr_half_scale=f"--expert-type ik --residual-scale 0.1 {RESIDUAL_TECHNIQUES} "
                                                       f"{LONG_HORIZON} --learning-rate 1e-4")),
}
# the configurations held to the good expert's target (never more than 0.05 below the expert alone)
GOOD_EXPERT_CONFIGS = ("ik", "ik_sparse", "ik_long_horizon", "ik_long_horizon_low_lr",
                       "ik_long_horizon_low_lr_half_scale")
LABELS = dict(zero="PPO (zero expert)", weak_ik="residual PPO, imperfect IK", ik="residual PPO, IK",
              weak_ik_adaptive="residual PPO, imperfect IK, adaptive scale",
              ik_sparse="residual PPO, IK, sparse reward", ik_long_horizon="residual PPO, IK, gamma 0.97",
              ik_long_horizon_low_lr="residual PPO, IK, gamma 0.97, LR 1e-4",
              ik_long_horizon_low_lr_half_scale="residual PPO, IK, gamma 0.97, LR 1e-4, scale 0.1")


@dataclass
class Args:
    task: str = "PickCube-v1"
    """the task: PickCube-v1 | PegInsertionSide-v1"""
    out: Optional[str] = None
    """directory for learning.csv, learning.png, learning.json, the runs and their logs
    (default: bench/out/learning for PickCube-v1, bench/out/learning-<task> otherwise)"""
    total_timesteps: Optional[int] = None
    """env steps of training per run (default: the task's, 300k for PickCube-v1 and 1M for PegInsertionSide-v1)"""
    runs: Optional[list[str]] = None
    """the runs to make, as config:seed (weak_ik:1 ik:1 ...; default: the task's list)"""
    num_envs: int = 8
    """training envs per run"""
    num_eval_envs: int = 32
    """eval envs per run: one episode each per eval"""
    eval_freq: Optional[int] = None
    """iterations between evals (default: the task's, every 9600 env steps on PickCube-v1, 32000 on
    PegInsertionSide-v1)"""
    expert_episodes: int = 200
    """episodes on which each IK expert is measured alone"""
    final_episodes: int = 320
    """episodes on which each run's final checkpoint is evaluated after training, rounded up to a whole number
    per eval env (0: not at all)"""
    train: bool = True
    """if toggled off (--no-train), report only the runs already recorded in --out (e.g. while a bench runs)"""
    rerun: bool = False
    """if toggled, rerun every training run; otherwise a run already recorded in --out with the same
    command is reused (so an interrupted bench, or one with a configuration added, continues)"""
    reuse_from: Optional[str] = None
    """an earlier learning.json (e.g. the committed docs/learning-PegInsertionSide-v1.json) whose finished runs
    and expert measurements count as recorded in --out wherever --out has no record of its own (a fresh clone)"""


def _ik_settings(config: str, task: dict) -> tuple[float, float]:
    """A configuration's IK expert: its gain and its calibration error in millimetres."""
    flags = shlex.split(task["configs"][config])
    value = lambda flag, default: type(default)(flags[flags.index(flag) + 1]) if flag in flags else default
    return value("--ik-gain", 1.0), value("--ik-calibration-mm", 0.0)


def _ik_expert_on(env, config: str, task: dict, args: Args) -> "util.ExpertResidualWrapper":
    """``env`` wrapped with a configuration's IK expert, to be stepped with a zero residual."""
    gain, millimetres = _ik_settings(config, task)
    calibration = experts.CalibrationError(millimetres, 0.0, 0) if millimetres else None
    return util.ExpertResidualWrapper(env, experts.IKExpert(args.task, task["control_mode"], gain, calibration))


def expert_alone(config: str, task: dict, args: Args) -> float:
    """success_once of a configuration's IK expert with a zero residual, in full episodes on envs that keep their
    scenes (recorded in --out like the runs, and reused unless --rerun)."""
    gain, millimetres = _ik_settings(config, task)
    record_path = _expert_alone_path(args, config, args.expert_episodes)
    if not args.rerun and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if (record["gain"], record.get("calibration_mm", 0.0)) == (gain, millimetres):
            return record["success_once"]
    wrapped = _ik_expert_on(util.make_env(args.task, args.num_eval_envs, "cpu", ignore_terminations=True,
                                          control_mode=task["control_mode"]), config, task, args)
    wrapped.reset(seed=12345)
    zero = torch.zeros(args.num_eval_envs, wrapped.action_dim)
    episodes = util.full_episodes(wrapped, zero, rounds=-(-args.expert_episodes // args.num_eval_envs))
    wrapped.close()
    success_once = torch.cat([e["success_once"] for e in episodes])[:args.expert_episodes].float().mean().item()
    util.save_json(record_path, dict(gain=gain, calibration_mm=millimetres, episodes=args.expert_episodes,
                                  success_once=success_once))
    return success_once


def expert_on_eval_episodes(config: str, seed: int, evals: int, task: dict, args: Args) -> list[dict]:
    """A configuration's IK expert alone (residual zero) on the episodes of a run's first ``evals`` evals:
    ppo.py's eval envs for ``seed``, built, seeded and evaluated as ppo.py does, so that eval k here and eval
    k of the run see the same episodes. Each eval's metrics (success_once, return, ...); recorded in --out
    and reused unless --rerun."""
    record_path = _expert_on_evals_path(args, config, seed)
    if not args.rerun and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if ((record["flags"], record["num_eval_envs"]) == (task["configs"][config], args.num_eval_envs)
                and len(record["evals"]) >= evals):
            return record["evals"][:evals]
    env = util.make_env(args.task, args.num_eval_envs, "cpu", ignore_terminations=True,
                        reconfiguration_freq=1, control_mode=task["control_mode"])  # ppo.py's eval envs
    wrapped = _ik_expert_on(env, config, task, args)
    wrapped.reset(seed=seed + 1_000_000)
    zero = torch.zeros(args.num_eval_envs, wrapped.action_dim)
    metrics = [util.evaluate(wrapped, lambda obs: zero, wrapped.max_episode_steps) for _ in range(evals)]
    wrapped.close()
    util.save_json(record_path, dict(flags=task["configs"][config], num_eval_envs=args.num_eval_envs,
                                     evals=metrics))
    return metrics


LONGEST_GAP = 900.0  # seconds between two logged events beyond which a run counts as paused (a suspended
# machine); an eval of 128 PegInsertionSide episodes on two busy cores takes less


def read_events(run_dir: str, launches: tuple = ()) -> tuple[list[tuple[int, float]], float]:
    """A run's eval curve (step, success_once), and the seconds it spent running: the gaps between its
    consecutive logged events, leaving out those over LONGEST_GAP and, however short, those that span one of
    its ``launches`` (wall-clock times it was started or resumed at: the gap holds a stop and a restart; the
    steps a stopped run made after its last checkpoint are dropped from the log, and their time with them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    times = sorted(e.wall_time for tag in events.Tags()["scalars"] for e in events.Scalars(tag))
    running = sum(b - a for a, b in zip(times, times[1:])
                  if b - a <= LONGEST_GAP and not any(a < launch <= b for launch in launches))
    return [(int(e.step), float(e.value)) for e in events.Scalars("eval/success_once")], running


def _from_root(path: str) -> str:
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def _new_run_dir(runs: str, before: set, prefix: str, proc: subprocess.Popen) -> str:
    """The directory ppo.py creates for the run just launched (it names it by the clock)."""
    while True:
        new = [d for d in (os.listdir(runs) if os.path.isdir(runs) else []) if d.startswith(prefix) and d not in before]
        if new:
            return os.path.join(runs, new[0])
        if proc.poll() is not None:
            raise util.FatalError(f"the run {prefix}* ended without creating its directory in {runs}")
        time.sleep(1)


def _record_path(args: Args, config: str, seed: int) -> str:
    return os.path.join(args.out, "logs", f"{config}_s{seed}.json")


def _expert_alone_path(args: Args, config: str, episodes: int) -> str:
    return os.path.join(args.out, "logs", f"expert_alone_{config}_{episodes}ep.json")


def _expert_on_evals_path(args: Args, config: str, seed: int) -> str:
    return os.path.join(args.out, "logs", f"expert_on_evals_{config}_s{seed}.json")


def _start_ppo(argv: list[str], log) -> subprocess.Popen:
    """ppo.py with ``argv``, from the repository's root, its output to ``log``."""
    # One OpenMP thread: on a machine shared with other jobs, a second thread spins at every barrier while
    # the other is descheduled.
    return subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT)


def _same_training(recorded: str, command: str) -> bool:
    """Whether two ppo.py commands train alike: the same but for where they write their run."""
    drop_output_dir = lambda argv: _set_flag(argv, "--output-dir", "") if "--output-dir" in argv else argv
    return drop_output_dir(shlex.split(recorded)) == drop_output_dir(shlex.split(command))


def train(config: str, seed: int, task: dict, args: Args) -> Optional[dict]:
    runs = os.path.join(args.out, "runs")
    exp_name = f"{config}_s{seed}"
    # run from the repository's root, with paths relative to it where they can be, so that the record (which
    # holds the command) matches the same run made from another clone
    command = [sys.executable, "ppo.py", "--sim-backend", "cpu", "--env-id", args.task,
               "--control-mode", task["control_mode"], "--seed", str(seed), "--num-envs", str(args.num_envs),
               "--num-eval-envs", str(args.num_eval_envs), "--total-timesteps", str(args.total_timesteps),
               "--no-capture-video", "--exp-name", exp_name, "--output-dir", _from_root(runs),
               *shlex.split(task["ppo_flags"]), *(["--eval-freq", str(args.eval_freq)] if args.eval_freq else []),
               *shlex.split(task["configs"][config])]
    log_path = os.path.join(args.out, "logs", f"{exp_name}.log")
    record_path = _record_path(args, config, seed)
    started_path = os.path.join(args.out, "logs", f"{exp_name}.started.json")
    started = None
    if not args.rerun and os.path.isfile(started_path):
        with open(started_path) as f:
            started = json.load(f)
    if not args.rerun and os.path.isfile(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if _same_training(record["command"], shlex.join(command[1:])):
            print(f"{config} seed {seed}: reusing {record['run_dir']}", flush=True)
            if os.path.isdir(record["run_dir"]):  # read again: its launches may have been recorded since
                own = started if started and started["run_dir"] == record["run_dir"] else {}
                record["running_seconds"] = read_events(record["run_dir"], own.get("launches", []))[1]
            return record
    if not args.train:
        return None
    # A run that an earlier invocation started with this command and did not finish (a session that ended, a
    # machine that went down) goes on from its newest checkpoint, in its own directory.
    resume_from, launches = None, []
    if started and started["command"] == shlex.join(command[1:]) \
            and os.path.isfile(os.path.join(started["run_dir"], "latest.pt")):
        resume_from, launches = os.path.join(started["run_dir"], "latest.pt"), started.get("launches", [])
    runs_before = set(os.listdir(runs)) if os.path.isdir(runs) else set()
    launch = command + (["--resume", "--checkpoint", resume_from] if resume_from else [])
    print(f"[{time.strftime('%H:%M:%S')}] {config} seed {seed}: {shlex.join(launch[1:])}", flush=True)
    start = time.time()
    launches.append(start)
    with open(log_path, "a" if resume_from else "w") as log:
        proc = _start_ppo(launch[1:], log)
        run_dir = (os.path.dirname(resume_from) if resume_from
                   else _new_run_dir(runs, runs_before, f"{args.task}__{exp_name}__", proc))
        util.save_json(started_path, dict(command=shlex.join(command[1:]), run_dir=run_dir, launches=launches))
        proc.wait()
    seconds = time.time() - start
    check_finished(proc.returncode, run_dir, exp_name, log_path)
    curve, running = read_events(run_dir, launches)
    print(f"  {running / 60:.1f} min running, eval success_once: " + " ".join(f"{v:.2f}" for _, v in curve), flush=True)
    record = dict(config=config, seed=seed, command=shlex.join(command[1:]), run_dir=run_dir, seconds=seconds,
                  running_seconds=running, steps=[s for s, _ in curve], success_once=[v for _, v in curve])
    if resume_from:  # seconds is then the last invocation's only; running_seconds covers them all
        record["resumed_from"] = resume_from
    util.save_json(record_path, record)
    return record


def check_finished(returncode: int, run_dir: str, exp_name: str, log_path: str) -> None:
    """A FatalError unless ppo.py ran to its end. A run stopped by SIGINT or SIGTERM saves its last iteration and
    exits with 0 or 143, so only its final checkpoint tells it from a finished one."""
    if returncode < 0:  # killed outright; its newest checkpoint is whole, as checkpoints are written atomically
        raise util.FatalError(f"{exp_name} was killed by signal {-returncode} before its end; the same command "
                              f"resumes it from its newest checkpoint")
    if returncode in util.STOP_SIGNALS.values():
        if not os.path.isfile(os.path.join(run_dir, "final_ckpt.pt")):
            raise util.FatalError(f"{exp_name} was stopped before its end (exit code {returncode}); the same "
                                  f"command resumes it from its newest checkpoint")
    elif returncode != 0:
        raise util.FatalError(f"{exp_name} failed (exit code {returncode}); see {log_path}")


DERIVED = ("final", "max", "min", "first_step_at_0_9", "lowest_after_0_9", "expert_on_same_episodes")


def reuse_recorded(path: str, args: Args) -> list[str]:
    """Write the records that an earlier learning.json holds (its runs, its experts alone, and the good expert
    on the episodes of its runs' evals) into --out/logs, except where --out has its own. A run is then reused
    only if its command is still the one the bench would launch, and an expert measurement only if its flags
    still match. The runs taken, as config:seed."""
    try:
        with open(path) as f:
            earlier = json.load(f)
        env_id = earlier.get("env_id")
        writes, taken = _recorded_writes(earlier, args)  # all read before any is written
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise util.UsageError(f"--reuse-from: {path} is not a learning.json written by this bench "
                              f"({type(e).__name__}: {e})") from None
    if env_id != args.task:
        raise util.UsageError(f"--reuse-from: {path} holds runs of {env_id}, not of --task {args.task}")
    for record_path, record in writes:
        util.save_json(record_path, record)
    return taken


def _recorded_writes(earlier: dict, args: Args) -> tuple[list[tuple[str, dict]], list[str]]:
    """The records of an earlier learning.json that --out/logs lacks, as (path, record), and the runs among them."""
    runs, configs, earlier_args = earlier["runs"], earlier["configs"], earlier["args"]
    writes, taken = [], []
    for run in runs:
        record_path = _record_path(args, run["config"], run["seed"])
        if not os.path.isfile(record_path):
            writes.append((record_path, {k: v for k, v in run.items() if k not in DERIVED}))
            taken.append(f"{run['config']}:{run['seed']}")
        same = _expert_on_evals_path(args, "ik", run["seed"])
        if run.get("expert_on_same_episodes") and not os.path.isfile(same):
            writes.append((same, dict(flags=configs["ik"], num_eval_envs=earlier_args["num_eval_envs"],
                                      evals=[dict(success_once=v) for v in run["expert_on_same_episodes"]])))
    for config, success_once in earlier["expert_alone"].items():
        record_path = _expert_alone_path(args, config, earlier_args["expert_episodes"])
        if not os.path.isfile(record_path):
            gain, millimetres = _ik_settings(config, dict(configs=configs))
            writes.append((record_path, dict(gain=gain, calibration_mm=millimetres,
                                             episodes=earlier_args["expert_episodes"], success_once=success_once)))
    return writes, taken


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]


def final_eval(record: dict, args: Args) -> Optional[dict]:
    """A finished run's final checkpoint under ``ppo.py --evaluate`` on --final-episodes episodes, with the run's
    own flags and seed (the same command with ``--residual-scale 0`` scores the expert alone on the same
    episodes). Kept in the run's record and reused;
    None under --no-train when not yet made, so that a report made while a bench runs starts nothing."""
    made = record.get("final_eval")
    if made and made["requested_episodes"] == args.final_episodes:
        return made
    if not args.train:
        return None
    import gymnasium as gym

    checkpoint = os.path.join(record["run_dir"], "final_ckpt.pt")
    if not os.path.isfile(checkpoint):
        raise util.FatalError(f"{record['config']} seed {record['seed']}: no {checkpoint} to evaluate")
    evals = os.path.join(args.out, "final_eval")
    exp_name = f"{record['config']}_s{record['seed']}_final"
    per_env = -(-args.final_episodes // args.num_eval_envs)
    argv = _set_flag(_set_flag(shlex.split(record["command"]), "--output-dir", _from_root(evals)),
                     "--exp-name", exp_name)
    argv += ["--evaluate", "--checkpoint", checkpoint,
             "--num-eval-steps", str(per_env * gym.spec(args.task).max_episode_steps)]
    before = set(os.listdir(evals)) if os.path.isdir(evals) else set()
    log_path = os.path.join(args.out, "logs", f"{exp_name}.log")
    print(f"[{time.strftime('%H:%M:%S')}] {record['config']} seed {record['seed']}: {shlex.join(argv)}", flush=True)
    with open(log_path, "w") as log:
        proc = _start_ppo(argv, log)
        eval_dir = _new_run_dir(evals, before, f"{args.task}__{exp_name}__", proc)
        proc.wait()
    if proc.returncode != 0:
        raise util.FatalError(f"the final evaluation of {record['config']} seed {record['seed']} failed "
                              f"(exit code {proc.returncode}); see {log_path}")
    with open(os.path.join(eval_dir, "summary.json")) as f:
        metrics = json.load(f)["eval"]
    record["final_eval"] = dict(requested_episodes=args.final_episodes, episodes=metrics["episodes"],
                                success_once=metrics["success_once"], success_at_end=metrics["success_at_end"],
                                command=shlex.join(argv))
    print(f"  final checkpoint: success_once {metrics['success_once']:.3f} on {metrics['episodes']} episodes",
          flush=True)
    util.save_json(_record_path(args, record["config"], record["seed"]), record)
    return record["final_eval"]


def plot(runs: list[dict], alone: dict, path: str, task: dict, args: Args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zero="tab:gray", weak_ik="tab:orange", ik="tab:blue", weak_ik_adaptive="tab:green",
                  ik_sparse="tab:purple", ik_long_horizon="tab:cyan", ik_long_horizon_low_lr="tab:olive",
                  ik_long_horizon_low_lr_half_scale="tab:brown")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run in runs:
        first = run["seed"] == min(r["seed"] for r in runs if r["config"] == run["config"])
        ax.plot(run["steps"], run["success_once"], color=colors[run["config"]], marker=".",
                linestyle="-" if first else "--", label=f"{LABELS[run['config']]}, seed {run['seed']}")
    for config, value in alone.items():
        ax.axhline(value, color=colors[config], linestyle=":", linewidth=1, label=f"{config} expert alone ({value:.2f})")
    ax.set_xlabel("env steps")
    ax.set_ylabel("eval success_once")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"{args.task}, {task['control_mode']}, CPU backend, {args.num_envs} envs, "
                 f"{args.num_eval_envs} eval episodes per point", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def planned_runs(task: dict, args: Args) -> list[tuple[str, int]]:
    if args.runs is None:
        return task["runs"]
    planned = []
    for spec in args.runs:
        config, sep, seed = spec.partition(":")
        if config not in task["configs"] or not sep or not seed.isdigit():
            raise util.UsageError(f"--runs: '{spec}' is not config:seed with config one of "
                                  f"{', '.join(task['configs'])}")
        planned.append((config, int(seed)))
    return planned


def main():
    args = tyro.cli(Args)
    if args.task not in TASKS:
        raise util.UsageError(f"unknown --task '{args.task}'; valid: {', '.join(TASKS)}")
    util.check_flags(("--total-timesteps", args.total_timesteps, ">= 1"), ("--num-envs", args.num_envs, ">= 1"),
                     ("--num-eval-envs", args.num_eval_envs, ">= 1"), ("--eval-freq", args.eval_freq, ">= 1"),
                     ("--expert-episodes", args.expert_episodes, ">= 1"),
                     ("--final-episodes", args.final_episodes, ">= 0"))
    task = TASKS[args.task]
    args.out = os.path.abspath(args.out or os.path.join(
        ROOT, "bench/out/learning" if args.task == "PickCube-v1" else f"bench/out/learning-{args.task}"))
    util.check_writable(args.out)
    args.total_timesteps = args.total_timesteps or task["total_timesteps"]
    planned = planned_runs(task, args)
    bench_start = time.time()
    if args.reuse_from:  # before anything is written, so that an unusable file leaves --out as it was
        taken = reuse_recorded(args.reuse_from, args)
        print(f"from {args.reuse_from}: {' '.join(taken) or 'no run that --out did not already hold'}", flush=True)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)

    alone = {}
    for config, users in (("weak_ik", ("weak_ik", "weak_ik_adaptive")),
                          ("ik", GOOD_EXPERT_CONFIGS)):
        if any(c in users for c, _ in planned):
            alone[config] = expert_alone(config, task, args)
            print(f"{config} expert alone ({task['configs'][config].split(' --residual')[0]}): success_once "
                  f"{alone[config]:.3f} on {args.expert_episodes} episodes", flush=True)

    runs = [run for config, seed in planned if (run := train(config, seed, task, args))]
    finals = [final_eval(run, args) if args.final_episodes else None for run in runs]
    for run in runs:  # the good expert alone on the episodes of each of its runs' evals, for a paired comparison
        if run["config"] in GOOD_EXPERT_CONFIGS:
            print(f"{run['config']} seed {run['seed']}: the ik expert alone on the episodes of its "
                  f"{len(run['steps'])} evals", flush=True)
            same = expert_on_eval_episodes("ik", run["seed"], len(run["steps"]), task, args)
            run["expert_on_same_episodes"] = [m["success_once"] for m in same]

    with open(os.path.join(args.out, "learning.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["config", "seed", "env_steps", "success_once", "expert_alone_on_these_episodes"])
        for run in runs:
            same = run.get("expert_on_same_episodes", [""] * len(run["steps"]))
            writer.writerows([run["config"], run["seed"], s, v, e]
                             for s, v, e in zip(run["steps"], run["success_once"], same))
    if runs:
        plot(runs, alone, os.path.join(args.out, "learning.png"), task, args)

    summary = {}
    width = max([len("config"), *(len(run["config"]) for run in runs)]) + 2
    print(f"\n{'config':<{width}}{'seed':>5}{'final':>8}{'max':>7}{'min':>7}{'first >= 0.9':>14}{'lowest after':>14}"
          f"{'minutes':>9}{'final checkpoint':>24}")
    for run, final in zip(runs, finals):
        reached = [s for s, v in zip(run["steps"], run["success_once"]) if v >= 0.9]
        after = [v for s, v in zip(run["steps"], run["success_once"]) if reached and s > reached[0]]
        run.update(final=run["success_once"][-1], max=max(run["success_once"]), min=min(run["success_once"]),
                   first_step_at_0_9=reached[0] if reached else None, lowest_after_0_9=min(after) if after else None)
        print(f"{run['config']:<{width}}{run['seed']:>5}{run['final']:>8.2f}{run['max']:>7.2f}{run['min']:>7.2f}"
              f"{'-' if run['first_step_at_0_9'] is None else run['first_step_at_0_9']:>14}"
              f"{'-' if run['lowest_after_0_9'] is None else '%.3f' % run['lowest_after_0_9']:>14}"
              f"{run.get('running_seconds', run['seconds']) / 60:>9.1f}"
              f"{'-' if final is None else '%.3f on %d ep' % (final['success_once'], final['episodes']):>24}")
    by_config = {c: [r for r in runs if r["config"] == c] for c in task["configs"]}
    if by_config["weak_ik"]:
        summary["weak_ik_seeds"] = len(by_config["weak_ik"])
        summary["weak_ik_reaches_0.9_every_seed"] = all(r["first_step_at_0_9"] is not None for r in by_config["weak_ik"])
    for config in GOOD_EXPERT_CONFIGS:
        if by_config.get(config):
            summary[f"{config}_seeds"] = len(by_config[config])
            summary[f"{config}_worst_eval"] = min(r["min"] for r in by_config[config])
            summary[f"{config}_never_below_expert_minus_0.05"] = summary[f"{config}_worst_eval"] >= alone["ik"] - 0.05
            drop = max(expert - policy for r in by_config[config]
                       for policy, expert in zip(r["success_once"], r["expert_on_same_episodes"]))
            summary[f"{config}_largest_drop_below_expert_on_the_same_episodes"] = drop
            summary[f"{config}_never_below_expert_on_the_same_episodes_minus_0.05"] = drop <= 0.05
    missing = [f"{c}:{s}" for c, s in planned if not any(r["config"] == c and r["seed"] == s for r in runs)]
    if missing:
        summary["runs_not_yet_made"] = missing
    for target, value in summary.items():
        print(f"{target}: {value}")
    result = dict(env_id=args.task, control_mode=task["control_mode"], configs=task["configs"],
                  ppo_flags=task["ppo_flags"], args=vars(args), expert_alone=alone, targets=summary,
                  wall_clock_seconds=time.time() - bench_start,
                  training_seconds_total=sum(r.get("running_seconds", r["seconds"]) for r in runs), runs=runs)
    util.save_json(os.path.join(args.out, "learning.json"), result)
    print(f"wrote {args.out}/learning.csv, learning.png, learning.json "
          f"({(time.time() - bench_start) / 60:.0f} min in all)")


if __name__ == "__main__":
    util.run_cli(main)
