"""How many eval outcomes a negligible residual changes: the resolution of bench/learning.py's paired target.

bench/learning.py holds a run over the good IK expert to "never more than 0.05 below the expert alone on the
same episodes", eval by eval. A trained residual is never exactly zero, so this bench asks what a residual that
should change nothing does: it replays ppo.py's eval episodes for --seed with the IK expert plus a constant
residual of each size in --residuals (0 is the expert alone), at --residual-scale, and pairs every episode with
the expert alone's. Per size it prints the episodes gained and lost, how many evals fell more than 0.05 below
the expert alone (2 or more of 32 episodes), and the largest fall at any eval, in episodes.

A residual r moves every executed action entry by residual_scale * r of its normalized range; in
pd_ee_delta_pose that is 0.1 m and 0.1 rad, so r = 0.001 at scale 0.2 shifts each step's target by 0.02 mm and
0.02 mrad. Each finished size is recorded in --out and reused by the next invocation with the same settings.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import experts  # noqa: E402
import util  # noqa: E402


@dataclass
class Args:
    task: str = "PegInsertionSide-v1"
    """the task"""
    control_mode: str = "pd_ee_delta_pose"
    """the IK expert's control mode"""
    seed: int = 1
    """the training seed whose eval episodes are replayed (ppo.py seeds its eval envs with seed + 1000000)"""
    num_eval_envs: int = 32
    """eval envs, one episode each per eval, as in bench/learning.py"""
    evals: int = 16
    """evals replayed per residual size"""
    residual_scale: float = 0.2
    """the residual scale of bench/learning.py's good-expert configurations"""
    residuals: list[float] = field(default_factory=lambda: [0.0, 0.001, 0.01])
    """constant residuals, one replay each (0: the expert alone, the pairing's reference)"""
    out: str = "bench/out/outcome_sensitivity.json"
    """JSON with every replay's per-episode successes and returns"""


def replay(args: Args, residual: float) -> dict:
    """success_once and return of every episode of ``args.evals`` evals, each [eval][env], with the expert plus
    ``residual``."""
    env = util.make_env(args.task, args.num_eval_envs, "cpu", ignore_terminations=True, reconfiguration_freq=1,
                        control_mode=args.control_mode)  # ppo.py's eval envs
    wrapped = util.ExpertResidualWrapper(env, experts.IKExpert(args.task, args.control_mode),
                                         residual_scale=args.residual_scale)
    action = torch.full((args.num_eval_envs, wrapped.action_dim), residual)
    try:
        wrapped.reset(seed=args.seed + 1_000_000)
        episodes = util.full_episodes(wrapped, action, args.evals, reset_each=True)  # as ppo.py's evals
    finally:
        wrapped.close()
    return dict(outcomes=[e["success_once"].bool().tolist() for e in episodes],
                returns=[e["return"].tolist() for e in episodes])


def main() -> None:
    args = tyro.cli(Args)
    if 0.0 not in args.residuals:
        raise util.UsageError("--residuals must include 0, the expert alone every other size is paired with")
    util.check_flags(*(("--residuals", r, "in [-1, 1]") for r in args.residuals), ("--evals", args.evals, ">= 1"),
                     ("--num-eval-envs", args.num_eval_envs, ">= 1"), ("--residual-scale", args.residual_scale, ">= 0"))
    util.check_env_id(args.task)
    experts.check_expert_args("ik", args.task, args.control_mode, model_path=None, expert_fn=None)
    util.check_writable(os.path.dirname(os.path.abspath(args.out)))  # before the replays, not after them
    settings = dict(task=args.task, control_mode=args.control_mode, seed=args.seed,
                    num_eval_envs=args.num_eval_envs, evals=args.evals, residual_scale=args.residual_scale)
    recorded = {}
    if os.path.isfile(args.out):  # the replays an earlier invocation recorded with the same settings are kept
        try:
            with open(args.out) as f:
                earlier = json.load(f)
            same = earlier["settings"] == settings
            recorded = dict(earlier["replays"]) if same else {}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise util.UsageError(f"--out {args.out} exists and is not this bench's JSON ({util.first_line(err)}); "
                                  f"give another path, or remove it") from None
    for residual in args.residuals:
        if str(residual) not in recorded:
            start = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] residual {residual}: {args.evals} evals of "
                  f"{args.num_eval_envs} episodes", flush=True)
            recorded[str(residual)] = dict(replay(args, residual), seconds=time.time() - start)
            util.save_json(args.out, dict(settings=settings, replays=recorded))

    reference = torch.tensor(recorded["0.0"]["outcomes"])
    threshold = 0.05 * args.num_eval_envs
    print(f"\n{args.task}, IK expert plus a constant residual at scale {args.residual_scale}; seed {args.seed}'s "
          f"eval episodes, {args.evals} evals of {args.num_eval_envs}")
    print(f"{'residual':>9} | {'successes':>12} | {'gained':>6} | {'lost':>4} | "
          f"{'evals > 0.05 below':>18} | {'largest fall':>12}")
    for residual in args.residuals:
        outcomes = torch.tensor(recorded[str(residual)]["outcomes"])
        per_eval = outcomes.sum(dim=1) - reference.sum(dim=1)
        gained, lost = int((outcomes & ~reference).sum()), int((~outcomes & reference).sum())
        successes = f"{int(outcomes.sum())} of {outcomes.numel()}"
        below = f"{int((per_eval < -threshold).sum())} of {args.evals}"
        print(f"{residual:>9} | {successes:>12} | {gained:>6} | {lost:>4} | {below:>18} | "
              f"{max(0, -int(per_eval.min())):>12}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    util.run_cli(main)
