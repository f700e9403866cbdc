"""Experts: callables from the structured (privileged) observation to a [num_envs, action_dim] action.

Every expert satisfies one interface, ``expert(obs: dict) -> torch.Tensor``, where ``obs`` is the
``state_dict`` observation the backend returned (``{"agent": {...}, "extra": {...}}``, batched tensors).
``ExpertResidualWrapper`` calls it once per step; any plain function with that signature works too.
"""

from __future__ import annotations

from typing import Callable

import torch

from util import UsageError

ExpertFn = Callable[[dict], torch.Tensor]


def _batch_size(obs: dict) -> tuple[int, torch.device]:
    leaf = obs
    while isinstance(leaf, dict):
        leaf = next(iter(leaf.values()))
    return leaf.shape[0], leaf.device


class ZeroExpert:
    """No prior knowledge: the residual is the whole action (plain PPO with a wider observation)."""

    def __init__(self, action_dim: int):
        self.action_dim = action_dim

    def __call__(self, obs: dict) -> torch.Tensor:
        num_envs, device = _batch_size(obs)
        return torch.zeros(num_envs, self.action_dim, device=device)


EXPERT_TYPES = ("zero",)


def make_expert(expert_type: str, env) -> ExpertFn:
    """Build the expert named on the command line for a backend env (``util.make_env``)."""
    action_dim = int(torch.Size(env.single_action_space.shape).numel())
    if expert_type == "zero":
        return ZeroExpert(action_dim)
    raise UsageError(f"unknown expert type '{expert_type}'; valid: {', '.join(EXPERT_TYPES)}")


def check_expert_type(expert_type: str) -> None:
    """Fail before any env is built or anything is written."""
    if expert_type not in EXPERT_TYPES:
        raise UsageError(f"unknown expert type '{expert_type}'; valid: {', '.join(EXPERT_TYPES)}")
