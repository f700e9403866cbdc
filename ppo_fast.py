"""Expert+Residual PPO on ManiSkill from state, built for speed: TensorDict rollout, torch.compile, CUDA graphs.

The algorithm, flags, residual semantics and checkpoints are those of ppo.py. What differs follows LeanRL's
compiled PPO: the rollout writes into one preallocated TensorDict, a rollout-only copy of the agent shares
the trained parameters, `--compile` compiles GAE and the update (and on CUDA the policy step), and
`--cudagraphs` replays the policy step and the update as CUDA graphs. Without CUDA, `--cudagraphs` is
skipped with a notice.
"""

import functools
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from tensordict import TensorDict, from_module
from tensordict.nn import CudaGraphModule, TensorDictModule
from torch.distributions.normal import Normal
from tqdm import tqdm

import experts
import util

SCRIPT = os.path.basename(__file__)
NETWORK = "mlp-state"  # the same network as ppo.py: checkpoints of either script load in both


@dataclass
class Args:
    exp_name: Optional[str] = None
    """the name of this experiment (default: the script name)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, the networks run on CUDA when it is available"""
    compile: bool = False
    """if toggled, compile GAE and the update with torch.compile, and on CUDA the policy step and value too"""
    cudagraphs: bool = False
    """if toggled, replay the policy step and the update as CUDA graphs (needs CUDA; skipped otherwise)"""
    track: bool = False
    """if toggled, log to Weights and Biases (wandb is imported only then)"""
    wandb_project_name: str = "ManiSkill"
    """the wandb project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of the wandb project"""
    capture_video: bool = True
    """if toggled, record an mp4 of the eval envs at every evaluation"""
    save_model: bool = True
    """if toggled, save a checkpoint at every evaluation and at the end"""
    evaluate: bool = False
    """if toggled, only evaluate the policy in --checkpoint"""
    checkpoint: Optional[str] = None
    """path to a checkpoint (.pt) to evaluate (with --evaluate) or to resume from (with --resume)"""
    resume: bool = False
    """if toggled, continue the run of --checkpoint in its own directory, from the iteration it saved"""
    keep_checkpoints: int = 3
    """numbered checkpoints kept besides latest.pt and final_ckpt.pt (older ones are deleted)"""
    output_dir: str = "runs"
    """directory that receives one folder per run (logs, checkpoints, videos)"""

    # Environment and expert
    env_id: str = "PickCube-v1"
    """the ManiSkill task id"""
    control_mode: Optional[str] = None
    """control mode (default: the IK expert's, else pd_joint_delta_pos); a model expert needs its training mode"""
    sim_backend: str = "auto"
    """auto | gpu | cpu: gpu is ManiSkill's physx_cuda simulation, cpu our multi-process backend"""
    expert_type: str = "zero"
    """the expert the residual corrects: zero | ik | model | custom, or a comma list (ik,zero) to fuse several"""
    ik_gain: float = 1.0
    """IK expert gain, 1: the whole error per step (tasks: Pick/Stack/Push/Pull/PokeCube, PegInsertionSide, LiftPegUpright, PlugCharger)"""
    ik_calibration_mm: float = 0.0
    """IK expert's calibration error: it perceives its task's target (goal, cube, hole, peg or charger's goal) this many millimetres off"""
    ik_calibration_deg: float = 0.0
    """IK expert's calibration error: and turned this many degrees about its own origin"""
    ik_calibration_seed: int = 0
    """draws the directions of the calibration error's shift and axis, fixed for the whole run"""
    model_path: Optional[str] = None
    """model expert: our checkpoint, a ManiSkill PPO state dict, or a TorchScript/torch.export file (code: trust it)"""
    expert_fn: Optional[str] = None
    """path/to/file.py:function or module:function, obs -> action (--expert-type custom)"""
    residual_scale: float = 1.0
    """the executed action is clip(expert + residual_scale * residual)"""
    expert_action_noise: float = 0.0
    """std of Gaussian noise added to the expert action while training (never in eval)"""
    clip_final_action: bool = True
    """if toggled, clip the executed action to the action bounds"""
    restart_dead_workers: bool = False
    """if toggled, the CPU backend replaces an env worker process that died and goes on (its episodes are cut)"""

    # Residual techniques (README_Expert_Residual.md, "Residual techniques")
    init_logstd: float = -0.5
    """initial log-std of the policy's actions (-1 or lower for residual runs: exp(this) x scale reaches the env)"""
    residual_warmup_steps: int = 0
    """progressive exploration: each training env applies the residual with probability min(step / this, 1); 0: always"""
    critic_warmup_iters: int = 0
    """the first this many iterations train only the value function; the actor stays frozen"""
    residual_scale_schedule: str = "constant"
    """constant | linear: linear moves the residual scale from --residual-scale to --residual-scale-final"""
    residual_scale_final: Optional[float] = None
    """the residual scale at the end of training (with --residual-scale-schedule linear)"""
    residual_scale_mode: str = "constant"
    """constant, or adaptive: each env's residual scale falls to --residual-scale-min as its expert is confident"""
    residual_scale_min: float = 0.0
    """the residual scale where the expert is fully confident (--residual-scale-mode adaptive)"""
    fusion: str = "mean"
    """how several experts form the base action: mean | learned (softmax weights the policy outputs)"""

    # Algorithm
    total_timesteps: int = 10_000_000
    """total env steps of training"""
    learning_rate: float = 3e-4
    """the learning rate of the optimizer"""
    num_envs: Optional[int] = None
    """parallel training envs (default: 512 on the GPU backend, 4 per core on the CPU backend)"""
    num_eval_envs: Optional[int] = None
    """parallel eval envs (default: 8 on the GPU backend, 2 per core on the CPU backend)"""
    num_steps: int = 50
    """steps per env per rollout"""
    num_eval_steps: Optional[int] = None
    """steps per evaluation (default: the task's episode length, so every eval env ends one episode)"""
    partial_reset: bool = True
    """if toggled, training episodes end on success or failure; otherwise only at the time limit"""
    reward_mode: Optional[str] = None
    """the env's reward: normalized_dense | dense | sparse (1 on success) | none (default: the task's own)"""
    reward_scale: float = 1.0
    """multiplier applied to rewards before PPO sees them"""
    anneal_lr: bool = False
    """if toggled, anneal the learning rate linearly to zero"""
    gamma: float = 0.8
    """the discount factor"""
    gae_lambda: float = 0.9
    """the lambda of generalized advantage estimation"""
    num_minibatches: Optional[int] = None
    """minibatches per epoch (default: 32 on the GPU backend, 2 on the CPU backend)"""
    update_epochs: int = 4
    """epochs over each batch"""
    norm_adv: bool = True
    """if toggled, normalize advantages per minibatch"""
    clip_coef: float = 0.2
    """the surrogate clipping coefficient"""
    clip_vloss: bool = False
    """if toggled, clip the value loss as in the PPO paper"""
    ent_coef: float = 0.0
    """coefficient of the entropy bonus"""
    vf_coef: float = 0.5
    """coefficient of the value loss"""
    max_grad_norm: float = 0.5
    """the maximum norm for gradient clipping"""
    target_kl: Optional[float] = 0.1
    """stop an update early when the approximate KL exceeds this"""
    eval_freq: int = 25
    """evaluate (and checkpoint) every this many iterations"""
    eval_reconfiguration_freq: int = 1
    """eval envs rebuild their scenes every this many resets, as ManiSkill's baselines do (tasks that randomise assets
    do it there); 0: never"""
    verbose: bool = False
    """if toggled, print where each iteration's time went (on a GPU, synchronising it so that the figures are true)"""


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, init_logstd: float = -0.5):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 256)), nn.Tanh(),
            layer_init(nn.Linear(256, 256)), nn.Tanh(),
            layer_init(nn.Linear(256, 256)), nn.Tanh(),
            layer_init(nn.Linear(256, 1)),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 256)), nn.Tanh(),
            layer_init(nn.Linear(256, 256)), nn.Tanh(),
            layer_init(nn.Linear(256, 256)), nn.Tanh(),
            # the residual head starts at exactly zero: the first eval is the expert alone
            layer_init(nn.Linear(256, action_dim), std=0.0),
        )
        self.actor_logstd = nn.Parameter(torch.ones(1, action_dim) * init_logstd)

    def get_value(self, x):
        return self.critic(x)

    def get_action(self, x):
        """The deterministic action, the policy's mean: for eval, and as a model expert."""
        return self.actor_mean(x)

    def act(self, x):
        """The rollout's policy step: the sampled action, its log-probability and the value, bit for bit as
        get_action_and_value gives them, without a distribution object or an entropy."""
        action_mean = self.actor_mean(x)
        action_std = torch.exp(self.actor_logstd.expand_as(action_mean))
        action = action_mean + action_std * torch.randn_like(action_mean)
        # Normal.log_prob's own expression, so that the update's first ratios are exactly 1
        logprob = -((action - action_mean) ** 2) / (2 * action_std**2) - action_std.log() \
            - math.log(math.sqrt(2 * math.pi))
        return action, logprob.sum(1), self.critic(x)

    def get_action_and_value(self, x, action=None):
        action_mean = self.actor_mean(x)
        probs = Normal(action_mean, torch.exp(self.actor_logstd.expand_as(action_mean)))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action).sum(1), probs.entropy().sum(1), self.critic(x)


def gae(next_value, next_done, container, gamma: float, gae_lambda: float):
    """Generalized advantage estimation over a rollout; writes "advantages" and "returns" into it.

    A finished episode bootstraps from the value of its last observation, held in "final_values",
    exactly as in ppo.py.
    """
    rewards, values, final_values = container["rewards"], container["vals"], container["final_values"]
    not_dones = 1.0 - container["dones"]
    next_not_done, next_values = 1.0 - next_done, next_value
    lastgaelam = torch.zeros_like(next_value)
    advantages = []
    for t in range(rewards.shape[0] - 1, -1, -1):
        real_next_values = next_not_done * next_values + final_values[t]
        delta = rewards[t] + gamma * real_next_values - values[t]
        lastgaelam = delta + gamma * gae_lambda * next_not_done * lastgaelam
        advantages.append(lastgaelam)
        next_not_done, next_values = not_dones[t], values[t]
    container["advantages"] = torch.stack(advantages[::-1])
    container["returns"] = container["advantages"] + values
    return container


def bootstrap_values(get_value, info: dict, device) -> torch.Tensor:
    """V(final observation) of each env whose episode ended at this step (``info["_final_info"]``), 0 elsewhere,
    as in ppo.py. The value is computed for every env and masked, which keeps the shapes static for compile and
    graphs."""
    with torch.no_grad():
        final_value = get_value(info["final_observation"].to(device)).flatten()
    return torch.where(info["_final_info"].to(device), final_value, 0.0)


def ppo_losses(agent: Agent, mb: dict, args: Args) -> dict:
    """The PPO objective on one minibatch ``mb`` (obs, actions, logprobs, advantages, returns, vals,
    residual_applied): the clipped surrogate, the value loss and the entropy, and the ratio's KL and clip
    statistics."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(mb["obs"], mb["actions"])
    logratio = newlogprob - mb["logprobs"]
    ratio = logratio.exp()
    with torch.no_grad():
        old_approx_kl = (-logratio).mean()
        approx_kl = ((ratio - 1) - logratio).mean()
        clipfrac = ((ratio - 1.0).abs() > args.clip_coef).float().mean()

    advantages = mb["advantages"]
    if args.norm_adv:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1 - args.clip_coef, 1 + args.clip_coef)
    # Progressive exploration: where the coin said "expert alone", the sampled action had no effect, so its
    # surrogate term has zero expectation; it is replaced by that zero, which removes only noise.
    pg_loss = (torch.max(pg_loss1, pg_loss2) * mb["residual_applied"]).mean()

    newvalue = newvalue.view(-1)
    if args.clip_vloss:
        v_loss_unclipped = (newvalue - mb["returns"]) ** 2
        v_clipped = mb["vals"] + torch.clamp(newvalue - mb["vals"], -args.clip_coef, args.clip_coef)
        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - mb["returns"]) ** 2).mean()
    else:
        v_loss = 0.5 * ((newvalue - mb["returns"]) ** 2).mean()
    return dict(pg_loss=pg_loss, v_loss=v_loss, entropy=entropy.mean(), approx_kl=approx_kl,
                old_approx_kl=old_approx_kl, clipfrac=clipfrac)


def make_update(agent: Agent, optimizer: optim.Optimizer, args: Args, warmup: util.CriticWarmup,
                step_enabled: torch.Tensor, distributed: util.Distributed = util.Distributed()) -> TensorDictModule:
    """One PPO gradient step on a minibatch, as a TensorDictModule so it compiles and graphs as a whole.
    ``warmup`` (util.CriticWarmup) weighs the policy terms and the actor's gradients: 0 during the critic
    warm-up. ``step_enabled`` (0-dim bool) lets the optimizer step happen (util.step_where). The update clears it
    when the minibatch's approximate KL exceeds --target-kl: that minibatch and the rest of the update then leave
    the weights and Adam's state as they are, which is ppo.py's early stop, decided without waiting for the GPU.
    Under torchrun the KL and the gradients are averaged over the ranks, so that the ranks decide alike."""

    def update(obs, actions, logprobs, advantages, returns, vals, residual_applied):
        optimizer.zero_grad()
        losses = ppo_losses(agent, dict(obs=obs, actions=actions, logprobs=logprobs, advantages=advantages,
                                        returns=returns, vals=vals, residual_applied=residual_applied), args)
        approx_kl = distributed.mean(losses["approx_kl"])
        if args.target_kl is not None:
            step_enabled.logical_and_(approx_kl <= args.target_kl)
        loss = warmup.weight * (losses["pg_loss"] - args.ent_coef * losses["entropy"]) + losses["v_loss"] * args.vf_coef

        loss.backward()
        distributed.average_gradients(agent)
        warmup.mask_gradients()
        grad_norm = nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
        util.step_where(optimizer, step_enabled)
        return (approx_kl, losses["v_loss"].detach(), losses["pg_loss"].detach(), losses["entropy"].detach(),
                losses["old_approx_kl"], losses["clipfrac"], grad_norm)

    return TensorDictModule(
        update,
        in_keys=["obs", "actions", "logprobs", "advantages", "returns", "vals", "residual_applied"],
        out_keys=["approx_kl", "v_loss", "pg_loss", "entropy_loss", "old_approx_kl", "clipfrac", "grad_norm"],
    )


def check_args(args: Args) -> None:
    """Reject bad input before any env is built or anything is written, in one line naming the flag."""
    util.check_env_id(args.env_id)
    util.check_reward_mode(args.env_id, args.reward_mode)
    experts.check_expert_args(args.expert_type, args.env_id, args.control_mode, args.model_path, args.expert_fn,
                              args.fusion)
    util.check_flags(
        ("--seed", args.seed, "in [0, 2147483647]"),  # numpy's seeds stop at 2**32 - 1; eval envs add 1,000,000
        ("--learning-rate", args.learning_rate, "> 0"),
        ("--gamma", args.gamma, "in (0, 1]"),
        ("--gae-lambda", args.gae_lambda, "in [0, 1]"),
        ("--clip-coef", args.clip_coef, "> 0"),
        ("--ent-coef", args.ent_coef, ">= 0"),
        ("--vf-coef", args.vf_coef, ">= 0"),
        ("--max-grad-norm", args.max_grad_norm, "> 0"),
        ("--target-kl", args.target_kl, "> 0"),
        ("--reward-scale", args.reward_scale, "> 0"),
        ("--init-logstd", args.init_logstd, "finite"),
        ("--residual-scale", args.residual_scale, ">= 0"),
        ("--residual-scale-final", args.residual_scale_final, ">= 0"),
        ("--residual-scale-min", args.residual_scale_min, ">= 0"),
        ("--expert-action-noise", args.expert_action_noise, ">= 0"),
        ("--ik-gain", args.ik_gain, "> 0"),
        ("--ik-calibration-mm", args.ik_calibration_mm, ">= 0"),
        ("--ik-calibration-deg", args.ik_calibration_deg, ">= 0"),
        ("--ik-calibration-seed", args.ik_calibration_seed, "in [0, 2147483647]"),
        ("--total-timesteps", args.total_timesteps, ">= 1"),
        ("--num-envs", args.num_envs, ">= 1"),
        ("--num-eval-envs", args.num_eval_envs, ">= 1"),
        ("--num-steps", args.num_steps, ">= 1"),
        ("--num-eval-steps", args.num_eval_steps, ">= 1"),
        ("--num-minibatches", args.num_minibatches, ">= 1"),
        ("--update-epochs", args.update_epochs, ">= 1"),
        ("--eval-freq", args.eval_freq, ">= 1"),
        ("--eval-reconfiguration-freq", args.eval_reconfiguration_freq, ">= 0"),
        ("--keep-checkpoints", args.keep_checkpoints, ">= 0"),
        ("--residual-warmup-steps", args.residual_warmup_steps, ">= 0"),
        ("--critic-warmup-iters", args.critic_warmup_iters, ">= 0"),
    )
    if args.residual_scale_schedule not in util.SCALE_SCHEDULES:
        raise util.UsageError(f"--residual-scale-schedule must be one of {', '.join(util.SCALE_SCHEDULES)}, "
                              f"not '{args.residual_scale_schedule}'")
    if args.residual_scale_schedule == "linear" and args.residual_scale_final is None:
        raise util.UsageError("--residual-scale-schedule linear needs --residual-scale-final")
    if args.residual_scale_schedule == "constant" and args.residual_scale_final is not None:
        raise util.UsageError("--residual-scale-final needs --residual-scale-schedule linear")
    try:  # the minimum holds under every scale the schedule reaches
        for scale in (args.residual_scale, args.residual_scale_final):
            util.check_scale_mode(args.residual_scale_mode, args.residual_scale if scale is None else scale,
                                  args.residual_scale_min)
    except ValueError as err:
        raise util.UsageError(str(err)) from None
    util.check_checkpoint_flags(args.checkpoint, args.evaluate, args.resume)
    util.check_track(args.track)
    batch_size = args.num_envs * args.num_steps
    if batch_size % args.num_minibatches:
        raise util.UsageError(f"--num-minibatches {args.num_minibatches} does not divide the batch of "
                              f"{batch_size} (= num_envs {args.num_envs} x num_steps {args.num_steps})")
    if args.norm_adv and batch_size == args.num_minibatches:  # one sample's advantage has no std to divide by
        raise util.UsageError(f"--num-minibatches {args.num_minibatches} leaves one sample per minibatch, whose "
                              f"advantage cannot be normalised; use fewer minibatches, or --no-norm-adv")
    if not args.evaluate and args.total_timesteps < batch_size:
        raise util.UsageError(f"--total-timesteps {args.total_timesteps} is less than one batch of {batch_size} "
                              f"(num_envs x num_steps)")
    util.check_writable(os.path.dirname(os.path.abspath(args.checkpoint)) if args.resume else args.output_dir)


def make_executables(args: Args, agent_inference: Agent, update, device: torch.device):
    """The rollout's policy step and value, GAE and the update: eager, or compiled with --compile (--cudagraphs
    wraps them once they are warm). On the CPU the per-step calls stay eager: at a few envs per call, a compiled
    function's call overhead exceeds what its fused kernels save; on CUDA fusion and fewer launches win. Returns
    (policy, get_value, advantage_fn, update, a description of what is compiled)."""
    policy, get_value = agent_inference.act, agent_inference.get_value
    advantage_fn = functools.partial(gae, gamma=args.gamma, gae_lambda=args.gae_lambda)
    compile_policy = args.compile and device.type == "cuda"
    if compile_policy:
        policy, get_value = torch.compile(policy), torch.compile(get_value)
    if args.compile:
        advantage_fn = torch.compile(advantage_fn, fullgraph=True)
        update = torch.compile(update)
    compiled_parts = "the policy step, value, GAE and update" if compile_policy \
        else "GAE and the update (the per-step policy and value stay eager on the CPU)"
    return policy, get_value, advantage_fn, update, compiled_parts


def parse_args() -> tuple[Args, str, util.Distributed, bool]:
    """The command line (on --resume the run's own arguments, overridden by the flags given now), checked; this
    process's place under torchrun; the defaults that depend on the backend and on this rank's cores. Returns
    (args, backend, distributed, whether the control mode is the expert's default)."""
    args = tyro.cli(Args)
    if args.resume:
        args = tyro.cli(Args, default=Args(**util.resume_args(args.checkpoint, Args)))
    backend = util.resolve_sim_backend(args.sim_backend)
    # under torchrun: this rank's place (its GPU, or its share of the cores); otherwise a single process
    distributed = util.init_distributed(cuda_training=args.cuda and torch.cuda.is_available(),
                                        gpu_simulation=backend == "gpu")
    cores = util.available_cores()
    if args.num_envs is None:
        args.num_envs = 512 if backend == "gpu" else 4 * cores
    if args.num_eval_envs is None:
        args.num_eval_envs = 8 if backend == "gpu" else 2 * cores
    if args.num_minibatches is None:
        args.num_minibatches = 32 if backend == "gpu" else 2
    if args.exp_name is None:
        args.exp_name = os.path.splitext(SCRIPT)[0]
    default_control_mode = args.control_mode is None
    if default_control_mode:
        args.control_mode = experts.default_control_mode(args.expert_type, args.env_id)
    check_args(args)
    if args.evaluate and distributed.enabled:
        raise util.UsageError("--evaluate runs in one process: start it with python, not torchrun")
    return args, backend, distributed, default_control_mode


def load_checkpoint(args: Args, distributed: util.Distributed) -> tuple[Optional[dict], Optional[dict]]:
    """--checkpoint (to evaluate or resume), checked against this script and run: (checkpoint, its resume state on
    --resume); (None, None) without one."""
    if args.checkpoint is None:
        return None, None
    checkpoint = util.load_checkpoint(args.checkpoint)
    util.check_checkpoint(checkpoint, args.checkpoint, network=NETWORK, env_id=args.env_id,
                          expert_type=args.expert_type)
    if not args.resume:
        return checkpoint, None
    util.check_resume(checkpoint, args.checkpoint, args, distributed.world_size)
    return checkpoint, checkpoint["resume"]


def make_envs(args: Args, backend: str, distributed: util.Distributed, seed: int):
    """Backend -> expert + residual wrapper, for training and for eval (under torchrun rank 0 alone evaluates; with
    --evaluate nothing trains). Returns (envs, eval_envs, the first observation)."""
    env_kwargs = dict(control_mode=args.control_mode, reward_mode=args.reward_mode, sim_backend=backend,
                      restart_dead_workers=args.restart_dead_workers)
    envs = eval_envs = None
    if distributed.is_main:
        eval_envs = util.make_env(args.env_id, args.num_eval_envs, ignore_terminations=True,
                                  reconfiguration_freq=args.eval_reconfiguration_freq, **env_kwargs)
    if not args.evaluate:
        envs = util.make_env(args.env_id, args.num_envs, ignore_terminations=not args.partial_reset, **env_kwargs)
    expert_fns = experts.make_experts(args.expert_type, args.env_id, envs if eval_envs is None else eval_envs,
                                      ik_gain=args.ik_gain, ik_calibration=experts.calibration(args),
                                      model_path=args.model_path, expert_fn=args.expert_fn)
    if eval_envs is not None:
        eval_envs = util.ExpertResidualWrapper(eval_envs, expert_fns, args.residual_scale, args.clip_final_action,
                                               fusion=args.fusion, residual_scale_mode=args.residual_scale_mode,
                                               residual_scale_min=args.residual_scale_min)
        obs, _ = eval_envs.reset(seed=args.seed + 1_000_000)
    if envs is not None:
        envs = util.ExpertResidualWrapper(envs, expert_fns, args.residual_scale, args.clip_final_action,
                                          expert_action_noise=args.expert_action_noise, fusion=args.fusion,
                                          residual_scale_mode=args.residual_scale_mode,
                                          residual_scale_min=args.residual_scale_min)
        obs, _ = envs.reset(seed=seed)  # training starts from this observation (a resumed run resets again)
    return envs, eval_envs, obs


def make_storage(args: Args, obs_dim: int, action_dim: int, device: torch.device) -> TensorDict:
    zeros = functools.partial(torch.zeros, args.num_steps, args.num_envs)
    return TensorDict(obs=zeros(obs_dim), actions=zeros(action_dim), logprobs=zeros(), rewards=zeros(), dones=zeros(),
                      vals=zeros(), final_values=zeros(), advantages=zeros(), returns=zeros(),
                      residual_applied=torch.ones(args.num_steps, args.num_envs),  # progressive exploration's coin
                      batch_size=(args.num_steps, args.num_envs), device=device)


def compile_and_capture(args: Args, device: torch.device, policy, get_value, advantage_fn, update,
                        container: TensorDict, next_obs, next_done, minibatch_size: int, step_enabled: torch.Tensor,
                        threads: tuple, timer: util.PhaseTimer):
    """--compile: trace every compiled function once now, at the run's shapes, so that training time excludes it
    (timed as "compile"). Dynamo specializes on the thread count, so each function is traced under the count it
    will run with. --cudagraphs: the policy step and the update replay as CUDA graphs. Returns (policy, update)."""
    rollout_threads, update_threads = threads
    if args.compile:
        timer.start("compile")
        if rollout_threads:
            torch.set_num_threads(rollout_threads)
        with torch.no_grad():
            if device.type == "cuda":  # where the policy step is compiled (make_executables)
                policy(next_obs)
            advantage_fn(get_value(next_obs).flatten(), next_done, container)
        if update_threads:
            torch.set_num_threads(update_threads)
        # the warm-up update must leave no trace: with its step switched off, the weights and Adam's state stay
        step_enabled.fill_(False)
        update(container.view(-1)[:minibatch_size], tensordict_out=TensorDict())
        timer.stop("compile")
    if args.cudagraphs:
        # the first warmup - 1 calls run eagerly (a compiled function may still recompile there), the next records
        graph_warmup = 3 if args.compile else 2
        policy = CudaGraphModule(policy, warmup=graph_warmup)
        update = CudaGraphModule(update, warmup=graph_warmup)
    return policy, update


def describe(args: Args, backend: str, distributed: util.Distributed, device: torch.device,
             default_control_mode: bool) -> str:
    """The run's first line: backend, envs, control mode, expert, device, compilation."""
    ranks = f" x {distributed.world_size} ranks" if distributed.enabled else ""
    return (f"backend: {backend} | envs: {'-' if args.evaluate else args.num_envs}{ranks} train, "
            f"{args.num_eval_envs} eval | control mode: {args.control_mode}"
            f"{f' (default for --expert-type {args.expert_type})' if default_control_mode else ''} | "
            f"expert: {args.expert_type} | device: {device} | compile: {args.compile} | cudagraphs: {args.cudagraphs}")


def main():
    args, backend, distributed, default_control_mode = parse_args()
    schedule = util.ResidualSchedule(args.residual_scale, args.residual_scale_schedule, args.residual_scale_final,
                                     args.total_timesteps, args.residual_warmup_steps)
    checkpoint, resume = load_checkpoint(args, distributed)

    batch_size = args.num_envs * args.num_steps  # per rank
    minibatch_size = batch_size // args.num_minibatches
    steps_per_iteration = batch_size * distributed.world_size  # global_step and SPS count every rank's steps
    num_iterations = args.total_timesteps // steps_per_iteration
    seed = args.seed + distributed.rank  # each rank explores differently; rank 0's weights are broadcast
    util.seed_everything(seed, args.torch_deterministic)
    device = torch.device("cuda", distributed.local_rank) if torch.cuda.is_available() and args.cuda \
        else torch.device("cpu")
    # On the CPU backend the env workers own the cores while they step, and idle OpenMP threads would
    # spin against them, so the rollout runs single-threaded; the update, while the workers wait, uses all.
    rollout_threads, update_threads = (1, torch.get_num_threads()) if backend == "cpu" else (None, None)
    if args.cudagraphs and device.type != "cuda":
        if distributed.is_main:
            print("CUDA graphs need a CUDA device; continuing without them")
        args.cudagraphs = False

    # ---- environments; agent: trained copy, rollout copy sharing its parameters, optimizer ----
    envs, eval_envs, obs = make_envs(args, backend, distributed, seed)
    # the policy's action: the residual, plus one fusion logit per expert with --fusion learned
    obs_dim, action_dim = obs.shape[1], (envs or eval_envs).policy_action_dim
    agent = Agent(obs_dim, action_dim, args.init_logstd).to(device)
    if checkpoint is not None:
        util.check_checkpoint(checkpoint, args.checkpoint, obs_dim=obs_dim, action_dim=action_dim,
                              control_mode=args.control_mode)
        agent.load_state_dict(checkpoint["model"])  # copies in place: loading never rebinds a parameter
    distributed.broadcast_parameters(agent)  # every rank starts from rank 0's weights
    # The rollout copy holds the same storage without autograd history, so the policy step stays a pure
    # inference graph while the update changes the weights it reads.
    agent_inference = Agent(obs_dim, action_dim, args.init_logstd).to(device)
    from_module(agent).data.to_module(agent_inference)
    # A tensor learning rate can be annealed in place under a captured graph; a graphed but uncompiled
    # optimizer step must be capturable. fused: one pass over all parameters.
    optimizer = optim.Adam(agent.parameters(), lr=torch.tensor(args.learning_rate, device=device), eps=1e-5,
                           fused=True, capturable=args.cudagraphs and not args.compile)
    if resume is not None:  # every rank loads it: the ranks' optimizers stay identical
        util.load_optimizer_state(optimizer, resume["optimizer"])
    warmup = util.CriticWarmup(agent, optimizer, args.critic_warmup_iters, device)
    step_enabled = torch.ones((), dtype=torch.bool, device=device)  # the optimizer steps while True (make_update)
    policy, get_value, advantage_fn, update, compiled_parts = make_executables(
        args, agent_inference, make_update(agent, optimizer, args, warmup, step_enabled, distributed), device)

    # ---- output: logs, checkpoints, videos (under torchrun, rank 0 alone writes) ----
    output = util.RunOutput(args, distributed.is_main, eval_envs is not None and eval_envs.can_render,
                            describe(args, backend, distributed, device, default_control_mode),
                            checkpoint)
    # agent is never compiled itself (only functions are), so its state dict has no _orig_mod. keys
    meta = dict(script=SCRIPT, network=NETWORK, env_id=args.env_id, obs_mode="state", control_mode=args.control_mode,
                obs_dim=obs_dim, action_dim=action_dim, expert_type=args.expert_type, args=asdict(args))

    def save(name: str, iteration: int) -> Optional[str]:  # every rank takes part; rank 0 writes
        return util.save_training_checkpoint(output, name, iteration, steps_per_iteration, agent, optimizer, envs,
                                             eval_envs, meta, args.keep_checkpoints, distributed)

    def evaluate(global_step: int) -> dict:
        return util.evaluate(eval_envs, lambda obs: agent_inference.get_action(obs.to(device)),
                             args.num_eval_steps or eval_envs.max_episode_steps, output.video_path(global_step))

    if args.evaluate:
        metrics = evaluate(0)
        print(util.eval_line(metrics, 0))
        output.write_summary(dict(checkpoint=args.checkpoint, eval=metrics))
        eval_envs.close()
        return

    # ---- storage: one preallocated TensorDict, written in place step by step, so shapes never change ----
    container = make_storage(args, obs_dim, action_dim, device)

    iterations_done, global_step, last_eval = 0, 0, {}
    timer = util.PhaseTimer(device, sync=args.verbose)  # seconds per phase; --verbose prints them per iteration
    envs.timer = timer
    train_metrics = util.EpisodeMetrics()  # the training episodes that ended, logged once per iteration
    next_obs = obs.to(device)
    next_done = torch.zeros(args.num_envs, device=device)
    parameter_hashes = []  # under torchrun: per iteration, the hash of every rank's weights

    policy, update = compile_and_capture(args, device, policy, get_value, advantage_fn, update, container, next_obs,
                                         next_done, minibatch_size, step_enabled, (rollout_threads, update_threads),
                                         timer)
    if args.compile and distributed.is_main:
        print(f"compiled {compiled_parts} in {timer.seconds['compile']:.1f} s")

    if resume is not None:  # ---- resume: counters, envs and seed streams, random streams ----
        iterations_done, global_step, next_obs = util.restore_training(resume, args.checkpoint, envs, eval_envs,
                                                                       distributed)
        next_obs = next_obs.to(device)
    steps_at_start = global_step

    progress = tqdm(total=num_iterations * steps_per_iteration, initial=global_step, unit="step", dynamic_ncols=True,
                    disable=not distributed.is_main)
    # SIGINT, SIGTERM: stop at the next safe point, checkpoint, exit. Under torchrun a second signal (Ctrl-C
    # arrives from the terminal and again from torchrun) does not interrupt: torchrun kills the ranks 30 s later.
    stop = util.GracefulStop(escalate=not distributed.enabled)

    for iteration in range(iterations_done + 1, num_iterations + 1):
        # a signal reaches the ranks at different moments: they decide together, once per iteration, to stop
        if distributed.any(stop.requested):
            break
        if rollout_threads:
            torch.set_num_threads(rollout_threads)
        schedule.apply(global_step, train=envs, evaluation=eval_envs)  # residual scale and probability
        # ---- eval ----
        if distributed.is_main and (iteration - 1) % args.eval_freq == 0 and not stop.requested:
            with timer("eval"):
                last_eval = evaluate(global_step)
            progress.write(output.log_eval(last_eval, global_step))

        if args.anneal_lr:
            optimizer.param_groups[0]["lr"].copy_((1.0 - (iteration - 1.0) / num_iterations) * args.learning_rate)

        # ---- rollout ----
        timer.start("rollout")
        container["final_values"].zero_()
        action_stats = defaultdict(float)  # summed as tensors; read once per iteration
        for step in range(args.num_steps):
            if stop.requested and not distributed.enabled:  # drop this rollout; the last finished iteration is saved below
                break
            if backend == "cpu":  # ManiSkill's CPU simulation raises on a nan action: check what the policy sees
                util.check_finite(iteration, output.dir, observations=next_obs)
            global_step += args.num_envs * distributed.world_size
            if args.cudagraphs:
                # a new graph step before each stochastic call: otherwise the replayed sampling noise repeats
                torch.compiler.cudagraph_mark_step_begin()
            with timer("policy"), torch.no_grad():
                action, logprob, value = policy(next_obs)
            # key by key into the preallocated container: cheaper on the CPU rollout than a new TensorDict a step
            container["obs"][step] = next_obs
            container["dones"][step] = next_done
            container["vals"][step] = value.flatten()
            container["actions"][step] = action
            container["logprobs"][step] = logprob

            with timer("env_step"):  # the wrapper's experts included
                next_obs, reward, terminations, truncations, infos = envs.step(action)
            next_obs = next_obs.to(device)
            next_done = (terminations | truncations).to(device, torch.float32)
            container["rewards"][step] = reward.to(device).view(-1) * args.reward_scale
            container["residual_applied"][step] = infos["residual_applied"].to(device, torch.float32)
            for k, v in infos.get("action_stats", {}).items():
                action_stats[k] += v / args.num_steps
            if distributed.is_main:
                train_metrics.add(infos)
            if "final_info" in infos:
                container["final_values"][step] = bootstrap_values(get_value, infos, device)

        if stop.requested and not distributed.enabled:
            break
        util.check_finite(iteration, output.dir, observations=container["obs"], rewards=container["rewards"])
        timer.stop("rollout")

        # ---- advantage (GAE) ----
        with timer("advantage"), torch.no_grad():
            container = advantage_fn(get_value(next_obs).flatten(), next_done, container)

        # ---- update ----
        timer.start("update")
        if update_threads:
            torch.set_num_threads(update_threads)
        warmup.start_iteration(iteration)
        container_flat = container.view(-1)
        update_logs = []
        step_enabled.fill_(True)
        for epoch in range(args.update_epochs):
            for minibatch in torch.randperm(batch_size, device=device).split(minibatch_size):
                # scalars: a batch-less output
                update_logs.append(update(container_flat[minibatch], tensordict_out=TensorDict()))
            # one wait per epoch, not per minibatch: once the KL crossed --target-kl, further epochs change nothing
            if args.target_kl is not None and not step_enabled:
                break
        logs = torch.stack(update_logs)
        # nan or inf in any minibatch: checked once here, outside the graph
        util.check_finite(iteration, output.dir, loss=torch.stack([logs["v_loss"], logs["pg_loss"]]),
                          gradients=logs["grad_norm"])

        timer.stop("update")
        if distributed.enabled:  # the ranks must hold the same weights after every update
            parameter_hashes.append(distributed.parameter_hashes(agent))
            if len(set(parameter_hashes[-1])) != 1:
                raise util.FatalError(f"the ranks' weights differ after iteration {iteration}: {parameter_hashes[-1]}")

        # ---- checkpoint: the model the next eval scores, and what resuming needs (every rank takes part) ----
        iterations_done = iteration
        if args.save_model and iteration % args.eval_freq == 0:
            save(f"ckpt_{iteration}.pt", iteration)

        # ---- log ----
        progress.update(steps_per_iteration)
        if not distributed.is_main:
            continue
        sps = int((global_step - steps_at_start) / timer.training_seconds())
        if args.verbose:
            progress.write(f"iteration {iteration}: {timer.since_last_report()}")
        y_pred, y_true = container["vals"].flatten().cpu().numpy(), container["returns"].flatten().cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y
        last = logs[-1]
        output.scalars({
            "charts/learning_rate": optimizer.param_groups[0]["lr"].item(),
            "losses/value_loss": last["v_loss"].item(),
            "losses/policy_loss": last["pg_loss"].item(),
            "losses/entropy": last["entropy_loss"].item(),
            "losses/old_approx_kl": last["old_approx_kl"].item(),
            "losses/approx_kl": last["approx_kl"].item(),
            "losses/clipfrac": logs["clipfrac"].mean().item(),
            "losses/grad_norm": logs["grad_norm"].mean().item(),
            "losses/explained_variance": explained_var,
            "charts/SPS": sps,
            "charts/residual_scale": envs.residual_scale,
            "charts/residual_prob": envs.residual_prob,
            "charts/worker_restarts": envs.env.worker_restarts,
            **{f"train/{k}": v for k, v in train_metrics.means().items()},
            **{f"actions/{k}_abs_mean": float(v) for k, v in action_stats.items()},
            **{f"time/{k}_seconds": v for k, v in timer.seconds.items()},
        }, global_step)
        progress.set_postfix(SPS=sps, eval_success=f"{last_eval.get('success_once', float('nan')):.2f}")

    progress.close()
    if distributed.any(stop.requested):  # ---- signal: checkpoint the last finished iteration, close, exit ----
        latest = save(f"ckpt_{iterations_done}.pt", iterations_done) if args.save_model else None
        util.close_run(output, envs, eval_envs, distributed)
        if not distributed.is_main:
            stop.exit()  # rank 0 reports
        stop.exit(f"resume with: {util.resume_command(SCRIPT, latest, distributed)}" if latest else "nothing saved")
    if rollout_threads:
        torch.set_num_threads(rollout_threads)
    # ---- final eval and checkpoint (every rank takes part in the save; rank 0 evaluates and writes) ----
    schedule.apply(global_step, train=envs, evaluation=eval_envs)
    if distributed.is_main:
        last_eval = evaluate(global_step)
        print(output.log_eval(last_eval, global_step))
    if args.save_model:
        save("final_ckpt.pt", iterations_done)
    if distributed.is_main:
        if args.save_model:
            print(f"saved {output.dir}/final_ckpt.pt")
        train_sps = (global_step - steps_at_start) / timer.training_seconds()
        summary = dict(global_step=global_step, train_sps=train_sps, seconds=timer.seconds, eval=last_eval,
                       **util.peak_gpu_memory(device))
        if distributed.enabled:
            summary.update(world_size=distributed.world_size, parameter_hashes=parameter_hashes)
        output.finish(summary)
    util.close_run(output, envs, eval_envs, distributed)


if __name__ == "__main__":
    util.run_cli(main)
