"""The residual idea: the policy's observation (flat state, or images and non-privileged state, plus the
expert actions), the one function that composes the executed action, the residual scale schedule, and
``ExpertResidualWrapper``, which puts them between a backend and a training script."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch

from .backends import flatten_paths, make_env
from .run import PhaseTimer, UsageError

Obs = Union[torch.Tensor, dict]


# ----------------------------------------------------------------------------------------------
# Expert + residual
# ----------------------------------------------------------------------------------------------
def flat_state(obs: dict) -> torch.Tensor:
    """The policy observation of the state scripts: ManiSkill's ``state`` obs, i.e. the ``state_dict``
    leaves in order, each flattened per env and cast to float (what ``common.flatten_state_dict`` gives)."""
    leaves = flatten_paths(obs).values()
    # most leaves are [N, D] float32 already: this runs every step, so they skip the two no-op calls
    return torch.cat([leaf if leaf.dim() == 2 and leaf.dtype == torch.float32
                      else leaf.reshape(leaf.shape[0], -1).float() for leaf in leaves], dim=1)


def image_policy_obs(env, include_state: bool = True) -> Callable[[dict], dict]:
    """The policy observation of the image scripts, from a "state_dict+rgb" observation:
    ``{"rgb": uint8 [N, H, W, 3 * cameras], "state": float [N, D]}`` where ``state`` holds the robot's
    proprioception and the task's non-privileged extras (exactly ManiSkill's "rgb" mode), or nothing
    without ``include_state``. The wrapper appends the expert action to ``state``."""
    extra_keys = env.image_policy_extra_keys

    def policy_obs(obs: dict) -> dict:
        rgb = torch.cat([camera["rgb"] for camera in obs["sensor_data"].values()], dim=-1)
        if include_state:
            state = flat_state(dict(agent=obs["agent"], extra={k: obs["extra"][k] for k in extra_keys}))
        else:
            state = torch.zeros(rgb.shape[0], 0, device=rgb.device)
        return dict(rgb=rgb, state=state)

    return policy_obs


def with_expert_action(policy_obs: Obs, expert_action: torch.Tensor) -> Obs:
    """``[policy_obs, expert_action]``; for image policies the expert action joins the state part. Under adaptive
    residual scaling ``expert_action`` ends with the env's residual scale."""
    if isinstance(policy_obs, dict):
        return {**policy_obs, "state": torch.cat([policy_obs["state"], expert_action], dim=-1)}
    return torch.cat([policy_obs, expert_action], dim=-1)


FUSIONS = ("mean", "learned")
SCALE_SCHEDULES = ("constant", "linear")
SCALE_MODES = ("constant", "adaptive")


def check_scale_mode(mode: str, scale: float, scale_min: float) -> None:
    if mode not in SCALE_MODES:
        raise ValueError(f"--residual-scale-mode must be one of {', '.join(SCALE_MODES)}, not '{mode}'")
    if not 0 <= scale_min <= scale:
        raise ValueError(f"--residual-scale-min must be between 0 and --residual-scale ({scale}), got {scale_min}")


def consult(experts: list, obs: dict) -> tuple[list[torch.Tensor], list[Optional[torch.Tensor]]]:
    """Every expert's action for ``obs``, and the confidence of those that return ``(action, confidence)``."""
    outputs = [expert(obs) for expert in experts]
    pair = lambda out: isinstance(out, tuple) and len(out) == 2  # any other tuple is a wrong action, for the check
    return [out[0] if pair(out) else out for out in outputs], [out[1] if pair(out) else None for out in outputs]


def expert_confidence(experts: list, obs: dict, expert_actions: torch.Tensor, returned: list,
                      bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[N] in [0, 1]: how far the experts can be trusted on ``obs``. Each expert's own confidence (returned with its
    action, else its ``confidence(obs)``, else 1) averaged over the experts; with several, times their agreement,
    1 - their spread: the largest range across experts of any action entry, over the width of its bounds."""
    num_envs = expert_actions.shape[0]
    own = [c if c is not None else expert.confidence(obs) if hasattr(expert, "confidence")
           else torch.ones(num_envs, device=expert_actions.device) for expert, c in zip(experts, returned)]
    confidence = torch.stack([c.float() for c in own]).mean(dim=0)
    if len(experts) > 1:
        low, high = bounds
        spread = ((expert_actions.amax(dim=1) - expert_actions.amin(dim=1)) / (high - low)).amax(dim=1)
        confidence = confidence * (1 - spread.clamp(0, 1))
    return confidence.clamp(0, 1)


def adaptive_scale(confidence: torch.Tensor, scale: float, scale_min: float) -> torch.Tensor:
    """Per env, ``scale_min + (scale - scale_min) * (1 - confidence)``: a confident expert lets the residual
    only nudge it, an unsure one gives it full authority."""
    return scale_min + (scale - scale_min) * (1 - confidence)


def observe_experts(experts: list, obs: dict, bounds: tuple[torch.Tensor, torch.Tensor], scale_mode: str,
                    scale: float, scale_min: float, check: Optional[Callable] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The experts' actions for ``obs``, [N, experts, A], and under adaptive scaling each env's residual scale,
    [N, 1] (else None). ``check(expert, action, confidence)``, if given, sees each expert's output first."""
    actions, returned = consult(experts, obs)
    if check is not None:
        for expert, action, confidence in zip(experts, actions, returned):
            check(expert, action, confidence)
    actions = torch.stack(actions, dim=1)
    if scale_mode != "adaptive":
        return actions, None
    confidence = expert_confidence(experts, obs, actions, returned, bounds)
    return actions, adaptive_scale(confidence, scale, scale_min)[:, None]


def experts_policy_obs(policy_obs: Obs, expert_actions: torch.Tensor, env_scale: Optional[torch.Tensor]) -> Obs:
    """What the policy observes: ``policy_obs``, every expert's action and, under adaptive scaling, the env's
    residual scale."""
    shown = expert_actions.flatten(1) if env_scale is None else torch.cat([expert_actions.flatten(1), env_scale], 1)
    return with_expert_action(policy_obs, shown)


def check_fusion(fusion: str, num_experts: int) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, not '{fusion}'")
    if fusion == "learned" and num_experts < 2:
        raise ValueError("--fusion learned mixes several experts; give at least two, e.g. --expert-type ik,zero")


def compose_action(expert_actions: torch.Tensor, policy_action: torch.Tensor,
                   residual_scale: Union[float, torch.Tensor],
                   fusion: str = "mean", applied: Optional[torch.Tensor] = None,
                   bounds: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The executed action ``clip(base + residual_scale * residual)`` and its base: the one place the action is
    composed (the wrapper for training and eval, the model expert for a checkpoint's own expert).

    ``expert_actions`` is [N, E, A], one action per expert; ``residual_scale`` a number, or [N, 1] per env under
    adaptive scaling. ``policy_action`` is [N, A] (the residual), followed
    by E fusion logits with ``fusion="learned"``. The base is the experts' mean, or with "learned" their
    ``softmax(logits)``-weighted mix; zero logits give the mean. Envs where ``applied`` is False ignore the whole
    policy action and execute the experts' mean alone. ``bounds`` (low, high) clips the action; None leaves it.
    """
    action_dim = expert_actions.shape[2]
    residual = policy_action[:, :action_dim]
    mean = expert_actions.mean(dim=1)
    if fusion == "learned":
        weights = torch.softmax(policy_action[:, action_dim:], dim=1)
        base = (weights[:, :, None] * expert_actions).sum(dim=1)
    else:
        base = mean
    if applied is not None:
        base = torch.where(applied[:, None], base, mean)
        residual = torch.where(applied[:, None], residual, torch.zeros_like(residual))
    action = base + residual_scale * residual
    if bounds is not None:
        action = torch.clamp(action, *bounds)
    return action, base


@dataclass
class ResidualSchedule:
    """How much residual the executed action gets, as a function of the global env step alone (so a
    resumed run needs only its step). The scripts apply it to their wrappers once per iteration.

    - Scale curriculum: ``constant`` keeps ``scale``; ``linear`` moves it from ``scale`` at step 0 to
      ``scale_final`` at ``total_steps``.
    - Progressive exploration (Policy Decorator): while training, each env applies its residual with
      probability ``min(step / warmup_steps, 1)`` and otherwise executes the expert alone. Eval always
      applies it.
    """

    scale: float = 1.0
    schedule: str = "constant"
    scale_final: Optional[float] = None
    total_steps: int = 1
    warmup_steps: int = 0

    def __post_init__(self) -> None:  # the scripts' check_args names the flags; this guards other callers
        if self.schedule not in SCALE_SCHEDULES:
            raise ValueError(f"unknown residual scale schedule '{self.schedule}'; valid: {', '.join(SCALE_SCHEDULES)}")
        if (self.schedule == "linear") != (self.scale_final is not None):
            raise ValueError("a linear residual scale schedule, and only it, has a final scale")
        if not (self.scale >= 0 and (self.scale_final is None or self.scale_final >= 0) and self.warmup_steps >= 0):
            raise ValueError(f"residual scales and warm-up steps must be >= 0, got {self.scale}, {self.scale_final} "
                             f"and {self.warmup_steps}")

    def scale_at(self, step: int) -> float:
        if self.schedule == "constant":
            return self.scale
        progress = min(step / self.total_steps, 1.0)
        return self.scale + progress * (self.scale_final - self.scale)

    def residual_prob_at(self, step: int) -> float:
        return min(step / self.warmup_steps, 1.0) if self.warmup_steps > 0 else 1.0

    def apply(self, step: int, train: Optional["ExpertResidualWrapper"],
              evaluation: Optional["ExpertResidualWrapper"]) -> None:
        """Set both wrappers for ``step``: the same scale, the residual probability on the training envs only.
        Either may be None (no training envs with --evaluate; under torchrun, eval envs on rank 0 only)."""
        if train is not None:
            train.residual_scale = self.scale_at(step)
            train.residual_prob = self.residual_prob_at(step)
        if evaluation is not None:
            evaluation.residual_scale = self.scale_at(step)


class ExpertResidualWrapper:
    """Executes ``clip(base + residual_scale * residual)`` and shows the policy ``[obs, expert actions]``.

    ``base`` is the expert action, or with several experts their mean or learned mix (``compose_action``).
    The experts are called once per step, on the structured observation the env returned, and the
    expert actions appended to the policy observation are exactly the ones executed on the next step.
    When episodes end, they are also called on ``final_observation`` so the critic can bootstrap from it.
    PPO keeps the unclipped action it sampled; only the action sent to the env is clipped.

    The policy's action has ``policy_action_dim`` entries: the residual (``action_dim``), then one fusion
    logit per expert with ``fusion="learned"``. ``residual_scale`` and ``residual_prob`` may change
    between steps (``ResidualSchedule.apply``); ``info["residual_applied"]`` says which envs applied
    the policy's action on this step.

    Build it from a backend (``env=make_env(...)``) or from ``env_id`` plus ``make_env`` keyword args.
    ``expert_policy_fn`` is a callable, structured observation -> [num_envs, action_dim] tensor (or
    ``(action, confidence)``), or a list of them.

    ``residual_scale_mode="adaptive"``: each env's scale is ``adaptive_scale(confidence)`` between
    ``residual_scale_min`` and ``residual_scale``, from the experts' confidence in the observation the policy
    acts on; it joins the policy observation after the expert actions, and is the scale the env executes.
    """

    def __init__(
        self,
        env=None,
        expert_policy_fn: Union[None, Callable[[dict], torch.Tensor], list[Callable[[dict], torch.Tensor]]] = None,
        residual_scale: float = 1.0,
        clip_final_action: bool = True,
        expert_action_noise: float = 0.0,
        policy_obs_fn: Callable[[dict], Obs] = flat_state,
        fusion: str = "mean",
        residual_scale_mode: str = "constant",
        residual_scale_min: float = 0.0,
        env_id: Optional[str] = None,
        num_envs: int = 1,
        **env_kwargs,
    ):
        if not residual_scale >= 0:
            raise ValueError(f"the residual scale must be >= 0, got {residual_scale}")
        if env is None:
            if env_id is None:
                raise ValueError("give either env or env_id")
            env = make_env(env_id, num_envs, **env_kwargs)
        self.env = env
        self.num_envs = env.num_envs
        self.device = torch.device(env.device)
        self.single_action_space = env.single_action_space
        self.max_episode_steps = env.max_episode_steps
        self.control_mode = env.control_mode
        self.can_render = env.can_render
        self.action_dim = int(np.prod(self.single_action_space.shape))
        self.low = torch.as_tensor(self.single_action_space.low, device=self.device, dtype=torch.float32)
        self.high = torch.as_tensor(self.single_action_space.high, device=self.device, dtype=torch.float32)
        if expert_policy_fn is None:
            raise ValueError("give the expert (expert_policy_fn), e.g. experts.ZeroExpert(action_dim) for none")
        self.experts = list(expert_policy_fn) if isinstance(expert_policy_fn, (list, tuple)) else [expert_policy_fn]
        check_fusion(fusion, len(self.experts))
        check_scale_mode(residual_scale_mode, residual_scale, residual_scale_min)
        self.fusion, self.scale_mode, self.scale_min = fusion, residual_scale_mode, residual_scale_min
        self.policy_action_dim = self.action_dim + (len(self.experts) if fusion == "learned" else 0)
        self.residual_scale = residual_scale
        self.residual_prob = 1.0
        self.clip_final_action = clip_final_action
        self.expert_action_noise = expert_action_noise
        self.policy_obs_fn = policy_obs_fn
        self.timer = PhaseTimer(self.device)  # the experts' time, under "expert" (a script sets its own timer)
        self.expert_actions: Optional[torch.Tensor] = None  # [N, experts, A] for the current observation
        self.env_scale: Optional[torch.Tensor] = None  # [N, 1] under adaptive scaling, for the current observation
        self._experts_checked = False

    def _observe(self, obs: dict, noise: bool = True) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The experts' actions for ``obs`` and, under adaptive scaling, each env's residual scale."""
        with self.timer("expert"):
            # the outputs are checked at the first call only: the finiteness check waits for the GPU
            check = None if self._experts_checked else self._check_expert_output
            actions, scale = observe_experts(self.experts, obs, (self.low, self.high), self.scale_mode,
                                             self.residual_scale, self.scale_min, check)
            self._experts_checked = True
            if noise and self.expert_action_noise > 0:
                actions = actions + self.expert_action_noise * torch.randn_like(actions)
            return actions, scale

    def _check_expert_output(self, expert, action, confidence) -> None:
        """A user's expert that returns the wrong thing is named in one line, before the env sees its action: the
        action, and the confidence of an expert that returns ``(action, confidence)``."""
        def wrong(value, shape, dtypes, unit=False):
            if not isinstance(value, torch.Tensor):
                return type(value).__name__
            if value.shape != shape or value.dtype not in dtypes or value.device != self.device:
                return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
            if not torch.isfinite(value).all():
                return f"non-finite values (nan or inf): {value.tolist()}"[:300]
            if unit and ((value < 0) | (value > 1)).any():
                return f"values outside [0, 1]: {value.tolist()}"[:300]
            return None

        name = getattr(expert, "__qualname__", type(expert).__qualname__)
        expert_name = f"{getattr(expert, '__module__', '') or type(expert).__module__}.{name}"
        got = wrong(action, (self.num_envs, self.action_dim), (torch.float32,))
        if got:
            raise UsageError(f"expert {expert_name} must return a float32 tensor of shape ({self.num_envs}, "
                             f"{self.action_dim}) on {self.device}, or (that action, confidence); it returned {got}")
        got = confidence is not None and wrong(confidence, (self.num_envs,), (torch.float32, torch.float64), True)
        if got:
            raise UsageError(f"expert {expert_name}'s confidence must be a float tensor of shape ({self.num_envs},) "
                             f"on {self.device}, in [0, 1]; it returned {got}")

    def _policy_obs(self, obs: dict, expert_actions: torch.Tensor, scale: Optional[torch.Tensor]) -> Obs:
        return experts_policy_obs(self.policy_obs_fn(obs), expert_actions, scale)

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.expert_actions, self.env_scale = self._observe(obs)
        return self._policy_obs(obs, self.expert_actions, self.env_scale), info

    def get_episode_rng(self) -> list[dict]:
        return self.env.get_episode_rng()

    def reset_to_episode_rng(self, state: list[dict]):
        """Resume: restart the envs' episodes and seed streams as ``get_episode_rng()`` saved them."""
        obs, info = self.env.reset_to_episode_rng(state)
        self.expert_actions, self.env_scale = self._observe(obs)
        return self._policy_obs(obs, self.expert_actions, self.env_scale), info

    def step(self, policy_action: torch.Tensor):
        policy_action = policy_action.to(self.device)
        # every env applies its residual unless progressive exploration flips coins (which draws randomness)
        applied = None if self.residual_prob >= 1.0 else \
            torch.rand(self.num_envs, device=self.device) < self.residual_prob
        scale = self.residual_scale if self.env_scale is None else self.env_scale
        action, base = compose_action(self.expert_actions, policy_action, scale, self.fusion, applied,
                                      (self.low, self.high) if self.clip_final_action else None)
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["residual_applied"] = torch.ones(self.num_envs, dtype=torch.bool, device=self.device) \
            if applied is None else applied
        residual = policy_action[:, :self.action_dim]
        expert_abs, residual_abs, final_abs = torch.stack([base, residual, action]).abs().mean((1, 2))
        info["action_stats"] = dict(expert=expert_abs, residual=residual_abs, final=final_abs)
        if self.env_scale is not None:  # the mean scale the envs executed (logged as actions/residual_scale_...)
            info["action_stats"]["residual_scale"] = self.env_scale.mean()
        if "final_observation" in info:
            final_obs = info["final_observation"]
            info["final_observation"] = self._policy_obs(final_obs, *self._observe(final_obs, noise=False))
        self.expert_actions, self.env_scale = self._observe(obs)
        return self._policy_obs(obs, self.expert_actions, self.env_scale), reward, terminated, truncated, info

    def render(self) -> torch.Tensor:
        return self.env.render()

    def close(self) -> None:
        self.env.close()


class CriticWarmup:
    """--critic-warmup-iters K: the first K iterations train only the value function, and everything the actor
    depends on (its layers and log-std, and in the image scripts the encoders it shares with the critic) stays
    bit-identical.

    One mechanism serves eager, compiled and graphed updates, with no branch to retrace: the update multiplies the
    policy terms of its loss, and the gradients of every parameter outside the critic head (``mask_gradients``),
    by ``weight``, a 0-dim tensor that ``start_iteration`` sets in place to 0 during the warm-up and 1 after it.
    With zero gradients from the start, Adam's moments stay zero and the parameters do not move; Adam still counts
    the steps, so their Adam state is zeroed before the first update after the warm-up, which then starts afresh.
    """

    def __init__(self, agent: torch.nn.Module, optimizer: torch.optim.Optimizer, iters: int,
                 device: Union[str, torch.device] = "cpu"):
        self.params = [p for name, p in agent.named_parameters() if not name.startswith("critic.")]
        self.optimizer, self.iters = optimizer, iters
        self.weight = torch.ones((), device=device)

    def start_iteration(self, iteration: int) -> None:
        self.weight.fill_(0.0 if iteration <= self.iters else 1.0)
        if iteration == self.iters + 1 > 1:
            for param in self.params:
                for value in self.optimizer.state[param].values():
                    value.zero_()

    def mask_gradients(self) -> None:
        for param in self.params:
            if param.grad is not None:
                param.grad.mul_(self.weight)
