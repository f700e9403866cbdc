"""The shared modules of the Expert+Residual PPO scripts, by who reads them.

Data path: backend -> ExpertResidualWrapper -> training script.

- ``util.backends``: the batched ManiSkill envs the scripts train on (``make_env``): ManiSkill's own
  vectorization, or CPU worker processes with the same interface.
- ``util.residual``: the residual idea: the policy's observation, the executed action, the residual scale
  schedule (constant, scheduled or adaptive), ``ExpertResidualWrapper`` and the critic's warm-up.
- ``util.run``: run plumbing: errors, flag checks, signals, torchrun, checkpoints, random streams, timing,
  videos.

``import util`` gives the names the scripts and benches use, so they write ``util.make_env`` and the like.
"""

from .backends import (NO_CUDA_VULKAN, CpuVectorEnv, NativeVectorEnv, available_cores, check_env_id, check_reward_mode,
                       cuda_renders, make_env, resolve_sim_backend)
from .residual import (SCALE_SCHEDULES, CriticWarmup, ExpertResidualWrapper, ResidualSchedule, check_fusion,
                       check_scale_mode, compose_action, experts_policy_obs, flat_state, image_policy_obs,
                       observe_experts, with_expert_action)
from .run import (STOP_SIGNALS, Distributed, EpisodeMetrics, FatalError, GracefulStop, PhaseTimer, UsageError,
                  check_checkpoint, check_checkpoint_flags, check_finite, check_flags, check_resume, check_track,
                  check_writable, first_line, full_episodes, init_distributed, load_checkpoint, load_optimizer_state,
                  peak_gpu_memory, resume_args, run_cli, save_checkpoint, save_json, save_run_checkpoint, step_where,
                  versions, RunOutput, close_run, eval_line, evaluate, restore_training, resume_command,
                  save_training_checkpoint, seed_everything, write_atomically)


__all__ = ["NO_CUDA_VULKAN", "CpuVectorEnv", "NativeVectorEnv", "available_cores", "check_env_id", "check_reward_mode",
           "cuda_renders", "make_env", "resolve_sim_backend", "SCALE_SCHEDULES", "CriticWarmup",
           "ExpertResidualWrapper", "ResidualSchedule", "check_fusion", "check_scale_mode",
           "compose_action", "experts_policy_obs", "flat_state", "image_policy_obs",
           "observe_experts", "with_expert_action", "STOP_SIGNALS", "Distributed", "EpisodeMetrics", "FatalError",
           "GracefulStop", "PhaseTimer", "UsageError", "check_checkpoint", "check_checkpoint_flags", "check_finite",
           "check_flags", "check_resume", "check_track", "check_writable", "first_line", "full_episodes",
           "init_distributed", "load_checkpoint", "load_optimizer_state", "peak_gpu_memory", "resume_args", "run_cli",
           "save_checkpoint", "save_json", "save_run_checkpoint", "step_where", "versions", "RunOutput", "close_run",
           "eval_line", "evaluate", "restore_training", "resume_command", "save_training_checkpoint", "seed_everything",
           "write_atomically"]
