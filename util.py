"""Shared pieces of the Expert+Residual PPO scripts.

Data path: backend -> ExpertResidualWrapper -> training script.

- A *backend* is a batched ManiSkill env with ManiSkillVectorEnv's interface and semantics
  (torch tensors in and out, same-step autoreset with ``final_observation`` / ``final_info`` /
  ``_final_info``, episode metrics under ``info["episode"]``). Two backends exist:
  ``GpuVectorEnv`` (ManiSkill's own ``physx_cuda`` vectorization) and ``CpuVectorEnv``
  (worker processes, each stepping several ``physx_cpu`` envs in turn, sharing memory with us).
  Backends always return the *structured* observation (``state_dict``, or ``state_dict+rgb`` for image
  runs), which experts read.
- ``ExpertResidualWrapper`` turns that into the policy's observation plus the expert actions, and
  turns the policy's action (residual, plus fusion logits with a learned mix of experts) into the
  executed action; ``ResidualSchedule`` sets its residual scale and probability from the global step.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import glob
import hashlib
import math
import multiprocessing as mp
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, NoReturn, Optional, Union

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import mani_skill.envs  # noqa: F401  (registers the ManiSkill tasks with gymnasium)
from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

Obs = Union[torch.Tensor, dict]


class UsageError(Exception):
    """Bad input from the user: the scripts print the message on one line and exit with code 2."""


class FatalError(RuntimeError):
    """The run cannot go on (a dead env worker, NaN or inf in training, a simulator that fails to start): one line
    on stderr, exit code 1. ``details`` (a traceback, e.g. from an env worker) or the chained cause's traceback is
    printed above that line."""

    def __init__(self, message: str, details: Optional[str] = None):
        super().__init__(message)
        self.details = details


class WorkerDied(FatalError):
    """A CPU env worker process exited."""


def run_cli(main: Callable[[], Any]) -> None:
    """Run a script's main function: a UsageError becomes one line on stderr and exit code 2, a FatalError
    one line and exit code 1."""
    try:
        main()
    except (UsageError, FatalError) as err:
        with tqdm.external_write_mode(file=sys.stderr):  # a line of its own, not the end of a progress bar
            details = getattr(err, "details", None)
            if details is None and isinstance(err, FatalError) and err.__cause__ is not None:
                details = "".join(traceback.format_exception(err.__cause__))
            if details:  # a runtime failure keeps its traceback; the cause is the last line
                print(details.rstrip(), file=sys.stderr)
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, UsageError) else 1)


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------
STOP_SIGNALS = {signal.SIGINT: 0, signal.SIGTERM: 143}  # signal -> the exit code of a clean stop


class GracefulStop:
    """SIGINT and SIGTERM ask the training loop to stop at a safe point instead of killing it.

    The loop polls ``requested``; with ``escalate``, a second signal gets the signal's previous handler, so a
    second Ctrl-C interrupts at once. Under torchrun Ctrl-C reaches each rank twice (from the terminal, then
    forwarded by torchrun), and torchrun kills the ranks itself 30 s after forwarding, so there the scripts
    pass ``escalate=False``. ``exit()`` ends the process with 0 after SIGINT and 143 after SIGTERM.
    """

    def __init__(self, escalate: bool = True):
        self.signum: Optional[int] = None
        self.escalate = escalate
        self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if self.escalate:
            for s, handler in self._previous.items():
                signal.signal(s, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exit(self, message: Optional[str] = None) -> NoReturn:
        """Print ``message`` (if any) and exit. Under torchrun a rank may stop for another rank's signal before
        its own arrives: it exits with 0."""
        if message is not None:
            cause = signal.Signals(self.signum).name if self.requested else "a signal to another rank"
            print(f"stopped by {cause}: {message}", flush=True)
        sys.exit(STOP_SIGNALS.get(self.signum, 0))


# ----------------------------------------------------------------------------------------------
# Validation shared by every script
# ----------------------------------------------------------------------------------------------
def check_flags(*rules: tuple) -> None:
    """Refuse, in one line, the first ``(flag, value, rule)`` whose value is not a finite number obeying ``rule``:
    "> 0", ">= 1", "in (0, 1]", "in [0, 1]" or "finite". An optional flag left unset (None) passes."""
    for flag, value, rule in rules:
        if value is not None and not (math.isfinite(value) and _obeys(value, rule)):
            raise UsageError(f"{flag} must be {rule}, got {value}")


def _obeys(value: float, rule: str) -> bool:
    if rule == "finite":
        return True
    if rule.startswith("in "):
        low, high = (float(bound) for bound in rule[4:-1].split(","))
        return (low < value if rule[3] == "(" else low <= value) and (value < high if rule[-1] == ")" else value <= high)
    op, bound = rule.split()
    return value > float(bound) if op == ">" else value >= float(bound)


def check_env_id(env_id: str) -> None:
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry.keys()), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see mani_skill.envs for the registered ids"
        raise UsageError(f"unknown env id '{env_id}': {hint}")


def resolve_sim_backend(sim_backend: str) -> str:
    """Map --sim-backend auto|gpu|cpu to 'gpu' or 'cpu'."""
    if sim_backend not in ("auto", "gpu", "cpu"):
        raise UsageError(f"--sim-backend must be auto, gpu or cpu, not '{sim_backend}'")
    if sim_backend == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if sim_backend == "gpu" and not torch.cuda.is_available():
        raise UsageError("--sim-backend gpu needs a CUDA device and none was found; use --sim-backend cpu (or auto)")
    return sim_backend


def check_writable(directory: str) -> None:
    """The output directory, or its nearest existing parent, must be writable."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"output directory '{directory}' is not writable (checked '{probe}')")


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
def available_cores() -> int:
    """The cores this process may run on (under torchrun on the CPU, this rank's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_env(
    env_id: str,
    num_envs: int,
    sim_backend: str = "auto",
    ignore_terminations: bool = False,
    num_workers: Optional[int] = None,
    restart_dead_workers: bool = False,
    **env_kwargs,
):
    """Build a batched ManiSkill env on the chosen backend.

    ``sim_backend`` is auto|gpu|cpu as on the command line, or ``"physx_cpu"``, which runs ManiSkill's
    own vector path (``GpuVectorEnv``) on the CPU simulator with one env: that is how the GPU code path
    is exercised on machines without CUDA. ``num_workers`` and ``restart_dead_workers`` concern the CPU
    backend only (the GPU backend has no worker processes). ``env_kwargs`` go to ``gym.make`` (``obs_mode``,
    ``control_mode``, ``max_episode_steps``, ...); ``obs_mode`` defaults to ``state_dict``.
    """
    check_env_id(env_id)
    if num_envs < 1:
        raise UsageError(f"the number of envs must be at least 1, got {num_envs}")
    env_kwargs.setdefault("obs_mode", "state_dict")
    env_kwargs.setdefault("render_mode", "rgb_array")
    env_kwargs.setdefault("human_render_camera_configs", dict(width=256, height=256))
    if sim_backend == "physx_cpu":
        if num_envs != 1:
            raise UsageError("ManiSkill's physx_cpu backend holds one env per process; use --sim-backend cpu")
        return GpuVectorEnv(env_id, 1, "physx_cpu", ignore_terminations, **env_kwargs)
    gpu = resolve_sim_backend(sim_backend) == "gpu"
    env_kwargs.setdefault("render_backend", render_backend(gpu, env_kwargs["obs_mode"]))
    if gpu:
        # the GPU this process trains on (under torchrun its local rank's): a bare "physx_cuda" is always the first
        return GpuVectorEnv(env_id, num_envs, f"physx_cuda:{torch.cuda.current_device()}", ignore_terminations,
                            **env_kwargs)
    return CpuVectorEnv(env_id, num_envs, ignore_terminations, num_workers=num_workers,
                        restart_dead_workers=restart_dead_workers, **env_kwargs)


NO_CUDA_VULKAN = ("SAPIEN finds no Vulkan device on this GPU, and ManiSkill renders GPU simulations there: install "
                  "NVIDIA's Vulkan driver (the libnvidia-gl package of the installed driver; in a container also "
                  "libxext6, and NVIDIA_DRIVER_CAPABILITIES must include graphics)")


def render_backend(gpu_simulation: bool, obs_mode: str) -> str:
    """ManiSkill's render_backend for a new env: the CUDA device this process uses when SAPIEN can render there,
    else Mesa's CPU driver. A GPU simulation cannot render on the CPU: without the NVIDIA Vulkan driver its state
    observations still work, unrendered ("none"), and image observations are refused with what to install."""
    if not torch.cuda.is_available():
        return "cpu"
    index = torch.cuda.current_device()
    if cuda_renders(index):
        return f"cuda:{index}"
    if not gpu_simulation:
        return "cpu"
    if obs_mode not in ("state", "state_dict"):
        raise UsageError(f"obs_mode {obs_mode} renders images: {NO_CUDA_VULKAN}")
    _warn_once(f"warning: {NO_CUDA_VULKAN}. State training goes on without rendering (no eval videos).")
    return "none"


@functools.lru_cache(maxsize=None)
def cuda_renders(index: int) -> bool:
    """Whether SAPIEN can render on CUDA device ``index`` (it needs NVIDIA's Vulkan driver; CUDA alone is not
    enough)."""
    import sapien

    try:
        sapien.render.RenderSystem(sapien.Device(f"cuda:{index}"))
    except RuntimeError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _max_episode_steps(env: gym.Env) -> int:
    return int(env.get_wrapper_attr("_max_episode_steps"))


class GpuVectorEnv(ManiSkillVectorEnv):
    """ManiSkill's own batched simulation: ``gym.make(num_envs=N, sim_backend=...)`` + ManiSkillVectorEnv."""

    worker_restarts = 0  # one process: no workers to lose

    def __init__(self, env_id: str, num_envs: int, sim_backend: str, ignore_terminations: bool, **env_kwargs):
        env = _gym_make(env_id, num_envs=num_envs, sim_backend=sim_backend, **env_kwargs)
        super().__init__(env, num_envs, ignore_terminations=ignore_terminations, record_metrics=True)
        self.max_episode_steps = _max_episode_steps(env)
        self.control_mode = self.base_env.control_mode
        self.image_policy_extra_keys = _image_policy_extra_keys(self.base_env)
        self.can_render = self.base_env.scene.can_render()  # False with render_backend="none"

    def get_episode_rng(self) -> list[dict]:
        """As ``CpuVectorEnv.get_episode_rng``."""
        return _episode_rng(self.base_env)

    def reset_to_episode_rng(self, state: list[dict]):
        """As ``CpuVectorEnv.reset_to_episode_rng``."""
        obs, info = self.reset(seed=[env_state["seed"] for env_state in state])
        _set_episode_streams(self.base_env, state)
        return obs, info


def _image_policy_extra_keys(base_env) -> list[str]:
    """The ``extra`` keys this task returns in obs_mode="rgb", i.e. without privileged object state.

    Experts need privileged state, so image runs build their envs with "state_dict+rgb"; the image
    policy must see only what "rgb" would give it. ManiSkill decides that inside ``_get_obs_extra``
    from the env's obs mode, so we ask it once with the mode set to "rgb".
    """
    from mani_skill.envs.utils.observations import parse_obs_mode_to_struct

    saved = base_env._obs_mode, base_env.obs_mode_struct
    base_env._obs_mode, base_env.obs_mode_struct = "rgb", parse_obs_mode_to_struct("rgb")
    try:
        return list(base_env._get_obs_extra(base_env.get_info()))
    finally:
        base_env._obs_mode, base_env.obs_mode_struct = saved


def _flatten_paths(tree: Union[dict, torch.Tensor], prefix: tuple = ()) -> dict[tuple, Any]:
    """{'a': {'b': x}} -> {('a', 'b'): x}; keeps insertion order, so the flat state stays ManiSkill's.
    A bare tensor (obs_mode="state") is the single leaf at path ()."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_paths(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def _unflatten_paths(flat: dict[tuple, Any]) -> Union[dict, torch.Tensor]:
    if () in flat:
        return flat[()]
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _episode_seeds(seed: Union[int, list[int]], num_envs: int) -> list[int]:
    """Per-env episode seeds from one seed, the way ManiSkill derives them for a batched env."""
    if np.iterable(seed):
        seeds = [int(s) for s in seed]
        if len(seeds) != num_envs:
            raise ValueError(f"got {len(seeds)} seeds for {num_envs} envs")
        return seeds
    rest = np.random.RandomState(seed).randint(2**31, size=num_envs - 1).tolist()
    return [int(seed)] + rest


class _SharedArrays:
    """Named numpy arrays in one block of shared memory, attachable by name from another process."""

    def __init__(self, layout: dict[Any, tuple[tuple, str]], name: Optional[str] = None):
        from multiprocessing import shared_memory

        sizes = {k: int(np.prod(shape)) * np.dtype(dtype).itemsize for k, (shape, dtype) in layout.items()}
        total = max(1, sum(sizes.values()))
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(name=name, create=self.owner, size=total)
        self.arrays, offset = {}, 0
        for key, (shape, dtype) in layout.items():
            self.arrays[key] = np.ndarray(shape, dtype=dtype, buffer=self.shm.buf, offset=offset)
            offset += sizes[key]

    def close(self) -> None:
        self.arrays = {}
        self.shm.close()
        if self.owner:
            self.shm.unlink()


def _to_numpy(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _tensor_infos(info: dict) -> dict:
    """The per-env tensors of a ManiSkill info dict (drops flags such as ``reconfigure``)."""
    return {k: v for k, v in info.items() if isinstance(v, torch.Tensor)}


def _saveable_random_state(state: tuple) -> tuple:
    """``np.random.RandomState.get_state()`` with its key array as a tensor, which ``torch.load(weights_only=True)``
    accepts."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)


def _random_state(saved: tuple) -> tuple:
    name, keys, pos, has_gauss, cached_gaussian = saved
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian


def _episode_rng(base_env) -> list[dict]:
    """Per env: the seed of its current episode and the stream its next episode seeds come from."""
    return [dict(seed=int(seed), stream=_saveable_random_state(rng.get_state()))
            for seed, rng in zip(base_env._episode_seed, base_env._batched_main_rng.rngs)]


def _set_episode_streams(base_env, state: list[dict]) -> None:
    for rng, env_state in zip(base_env._batched_main_rng.rngs, state):
        rng.set_state(_random_state(env_state["stream"]))


# Step requests and replies are single bytes; everything else is a pickled (command, argument) pair.
_STEP, _OK, _ERROR, _BAD_CONFIG = b"s", b"k", b"E", b"U"


def _gym_make(env_id: str, **kwargs) -> gym.Env:
    """gym.make. ManiSkill answers a bad configuration (control mode, obs mode, keyword) with an assertion, a
    TypeError, a ValueError or a NotImplementedError: one UsageError line. Anything else is the simulator or the
    machine failing (CUDA out of memory, PhysX or Vulkan start-up): a FatalError that keeps the traceback."""
    try:
        return gym.make(env_id, **kwargs)
    except (AssertionError, TypeError, ValueError, NotImplementedError) as err:
        raise UsageError(f"cannot create {env_id}: {_first_line(err)}") from None
    except Exception as err:
        reason = _first_line(err)
        if "physical device" in reason or "Vulkan" in reason or "vk::" in reason:
            hint = NO_CUDA_VULKAN if torch.cuda.is_available() else "run scripts/ensure_vulkan.sh (make setup)"
        elif isinstance(err, torch.OutOfMemoryError) or "out of memory" in reason.lower():
            hint = "try fewer --num-envs"
        else:
            hint = "the traceback above shows where"
        raise FatalError(f"cannot create {env_id} ({kwargs.get('sim_backend')}): {reason}; {hint}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _cpu_worker(conn: Connection, worker_index: int, env_id: str, env_slice: tuple[int, int],
                ignore_terminations: bool, env_kwargs: dict) -> None:
    """Holds envs[start:stop]; steps them in turn and autoresets them, writing into shared memory."""
    torch.set_num_threads(1)  # one worker per core already
    # likewise lavapipe, which would otherwise start a rasterizer thread per core inside this one-core process
    os.environ.setdefault("LP_NUM_THREADS", "1")
    if hasattr(os, "sched_setaffinity"):  # one core each: workers sharing a core stall the whole batch
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[worker_index % len(cpus)]})
    start, stop = env_slice
    envs = []
    try:
        try:
            envs = [_gym_make(env_id, num_envs=1, sim_backend="physx_cpu", **env_kwargs)
                    for _ in range(start, stop)]
        except UsageError as err:
            conn.send_bytes(_BAD_CONFIG + str(err).encode())
            return
        obs, info = envs[0].reset(seed=0)
        conn.send(dict(
            obs_layout={k: (tuple(v.shape[1:]), str(_to_numpy(v).dtype)) for k, v in _flatten_paths(obs).items()},
            info_layout={k: (tuple(v.shape[1:]), str(_to_numpy(v).dtype)) for k, v in _tensor_infos(info).items()},
            single_action_space=envs[0].unwrapped.single_action_space,
            max_episode_steps=_max_episode_steps(envs[0]),
            control_mode=envs[0].unwrapped.control_mode,
            image_policy_extra_keys=_image_policy_extra_keys(envs[0].unwrapped),
        ))
        shared_name, layout = conn.recv()
        shared = _SharedArrays(layout, name=shared_name)
        bufs = {k: torch.from_numpy(v) for k, v in shared.arrays.items()}
        info_keys = [k[1] for k in layout if k[0] == "info"]

        def write(i: int, obs: dict, key: str = "obs") -> None:
            for path, value in _flatten_paths(obs).items():
                bufs[(key, path)][i] = value[0]

        def write_info(i: int, info: dict) -> None:
            for k in info_keys:
                bufs[("info", k)][i] = info[k][0]

        while True:
            request = conn.recv_bytes()
            if request == _STEP:
                for j, env in enumerate(envs):
                    i = start + j
                    obs, rew, term, trunc, info = env.step(bufs["action"][i:i + 1])
                    term = bool(term[0]) and not ignore_terminations
                    done = term or bool(trunc[0])
                    bufs["reward"][i], bufs["terminated"][i], bufs["truncated"][i] = rew[0], term, trunc[0]
                    write_info(i, info)  # before a reset overwrites the tensors it may share
                    if done:
                        write(i, obs, "final_obs")
                        obs, _ = env.reset()
                    write(i, obs)
                conn.send_bytes(_OK)
                continue
            cmd, arg = pickle.loads(request)
            if cmd == "reset":
                for j, env in enumerate(envs):
                    obs, info = env.reset(seed=None if arg is None else arg[j])
                    write(start + j, obs)
                    write_info(start + j, info)
                conn.send_bytes(_OK)
            elif cmd == "render":
                conn.send([_to_numpy(env.render())[0] for env in envs])
            elif cmd == "episode_rng":
                conn.send([state for env in envs for state in _episode_rng(env.unwrapped)])
            elif cmd == "set_episode_streams":
                for env, env_state in zip(envs, arg):
                    _set_episode_streams(env.unwrapped, [env_state])
                conn.send_bytes(_OK)
            elif cmd == "close":
                break
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the trainer went away: exit quietly, leaving no orphan
    except Exception:
        try:
            conn.send_bytes(_ERROR + traceback.format_exc().encode())
        except OSError:
            pass
    finally:
        for env in envs:
            env.close()
        if "shared" in locals():
            shared.close()


class CpuVectorEnv:
    """ManiSkillVectorEnv's interface and semantics over CPU worker processes.

    ``physx_cpu`` allows one env per process, and one process per env wastes the machine, so each of at
    most ``cores`` workers holds several envs and steps them in turn. Actions, observations, rewards,
    flags and info scalars all travel through shared memory; the pipes carry one byte per step.
    """

    def __init__(self, env_id: str, num_envs: int, ignore_terminations: bool = False,
                 num_workers: Optional[int] = None, restart_dead_workers: bool = False, **env_kwargs):
        self.num_envs = num_envs
        self.can_render = True  # every worker has a Vulkan device: NVIDIA's, or Mesa's on the CPU
        self.restart_dead_workers = restart_dead_workers
        self.worker_restarts = 0
        self.ignore_terminations = ignore_terminations
        self.device = torch.device("cpu")
        # Unseeded resets draw task randomness from the process's global torch RNG, which here depends on
        # how envs are spread over workers; reseeding it from each env's own episode seed makes every
        # episode a function of the seed given to reset() alone.
        env_kwargs.setdefault("enhanced_determinism", True)
        cores = available_cores()
        num_workers = max(1, min(num_envs, num_workers or cores))
        bounds = np.linspace(0, num_envs, num_workers + 1).round().astype(int)
        self.slices = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self._ctx = mp.get_context("spawn")  # forking a process that has initialised SAPIEN or torch is not safe
        self._worker_config = (env_id, ignore_terminations, env_kwargs)
        self.conns, self.procs, self.shared = [], [], None
        _LIVE_CPU_ENVS.add(self)
        for w in range(num_workers):
            self._spawn(w)
        try:
            spec = [pickle.loads(self._recv(w)) for w in range(num_workers)][0]
        except Exception:
            self.close()
            raise
        self.single_action_space = spec["single_action_space"]
        self.max_episode_steps = spec["max_episode_steps"]
        self.control_mode = spec["control_mode"]
        self.image_policy_extra_keys = spec["image_policy_extra_keys"]
        action_dim = int(np.prod(self.single_action_space.shape))
        layout = {"action": ((num_envs, action_dim), "float32"), "reward": ((num_envs,), "float32"),
                  "terminated": ((num_envs,), "bool"), "truncated": ((num_envs,), "bool")}
        for key in ("obs", "final_obs"):
            for path, (shape, dtype) in spec["obs_layout"].items():
                layout[(key, path)] = ((num_envs, *shape), dtype)
        for name, (shape, dtype) in spec["info_layout"].items():
            layout[("info", name)] = ((num_envs, *shape), dtype)
        self.shared = _SharedArrays(layout)
        self._layout = layout
        self.buffers = {k: torch.from_numpy(v) for k, v in self.shared.arrays.items()}
        for conn in self.conns:
            conn.send((self.shared.shm.name, layout))
        self._obs_paths = list(spec["obs_layout"])
        self._info_keys = list(spec["info_layout"])
        self._last_obs: dict = {}  # what the last reset or step returned: a restarted worker's envs end there
        self._last_info: dict = {}
        self.returns = torch.zeros(num_envs)
        self.success_once = torch.zeros(num_envs, dtype=torch.bool)
        self.fail_once = torch.zeros(num_envs, dtype=torch.bool)

    # -- plumbing ------------------------------------------------------------------------------
    def _spawn(self, w: int) -> None:
        """Start worker w (again) on its slice of envs."""
        parent, child = self._ctx.Pipe()
        env_id, ignore_terminations, env_kwargs = self._worker_config
        proc = self._ctx.Process(target=_cpu_worker, daemon=True,
                                 args=(child, w, env_id, self.slices[w], ignore_terminations, env_kwargs))
        # Workers ignore SIGINT and SIGTERM from their first instruction on (an ignored disposition survives
        # exec): Ctrl-C reaches the whole process group, and the trainer decides how to stop. Workers exit
        # on close() or when the trainer's end of the pipe closes. Only the main thread may set handlers; a
        # signal to the trainer during these few milliseconds is lost.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS} if in_main_thread else {}
        try:
            proc.start()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        child.close()  # so that a dead worker shows up as EOF on our end
        if w < len(self.procs):
            self.conns[w], self.procs[w] = parent, proc
        else:
            self.conns.append(parent)
            self.procs.append(proc)

    def _recv(self, w: int) -> bytes:
        try:
            msg = self.conns[w].recv_bytes()
        except (EOFError, OSError):
            a, b = self.slices[w]
            self.procs[w].join(timeout=1)
            raise WorkerDied(f"CPU env worker {w} (envs {a}..{b - 1}) died "
                             f"(exit code {self.procs[w].exitcode})") from None
        if msg.startswith(_ERROR):
            details = msg[1:].decode()
            raise FatalError(f"CPU env worker {w} failed: {details.strip().splitlines()[-1]}", details=details)
        if msg.startswith(_BAD_CONFIG):
            raise UsageError(msg[1:].decode())
        return msg

    def _send(self, w: int, message: bytes) -> None:
        try:
            self.conns[w].send_bytes(message)
        except OSError:  # broken pipe: the worker is gone; _recv names it and its exit code
            self._recv(w)
            raise WorkerDied(f"CPU env worker {w} stopped taking commands") from None

    def _exchange(self, messages: list[bytes], restartable: bool = False) -> tuple[list, list[int]]:
        """Send worker w ``messages[w]``, then collect every reply. A dead worker raises WorkerDied naming it
        and its envs, unless ``restartable`` and ``restart_dead_workers``: then it is listed in the second
        return value (its reply is None) for the caller to restart."""
        dead = []
        for w, message in enumerate(messages):
            try:
                self._send(w, message)
            except WorkerDied:
                if not (restartable and self.restart_dead_workers):
                    raise
                dead.append(w)
        replies = []
        for w in range(len(messages)):
            try:
                replies.append(None if w in dead else self._recv(w))
            except WorkerDied:
                if not (restartable and self.restart_dead_workers):
                    raise
                dead.append(w)
                replies.append(None)
        return replies, dead

    def _request(self, cmd: str, args: Optional[list] = None, restartable: bool = False) -> tuple[list, list[int]]:
        return self._exchange([pickle.dumps((cmd, None if args is None else args[w])) for w in range(len(self.conns))],
                              restartable)

    def _restart(self, w: int, seeds: list[int]) -> None:
        """Replace dead worker w by a new one and reset its envs with ``seeds``."""
        a, b = self.slices[w]
        exitcode = self.procs[w].exitcode
        self.conns[w].close()
        self._spawn(w)
        pickle.loads(self._recv(w))  # its spec: the same as the first worker's
        self.conns[w].send((self.shared.shm.name, self._layout))
        self._send(w, pickle.dumps(("reset", seeds)))
        self._recv(w)
        self.worker_restarts += 1
        print(f"warning: CPU env worker {w} (envs {a}..{b - 1}) died (exit code {exitcode}) and was restarted "
              f"({self.worker_restarts} restart(s) so far)", file=sys.stderr, flush=True)

    def _read(self, key: str) -> dict:
        flat = {p: self.buffers[(key, p)].clone() for p in self._obs_paths}
        if key == "obs":
            self._last_obs = flat
        return _unflatten_paths(flat)

    def _read_info(self) -> dict:
        self._last_info = {k: self.buffers[("info", k)].clone() for k in self._info_keys}
        return dict(self._last_info)

    # -- the ManiSkillVectorEnv interface ------------------------------------------------------
    def reset(self, *, seed: Union[None, int, list[int]] = None, options: Optional[dict] = None):
        if options:  # partial resets happen inside the workers, at the end of each env's episode
            raise NotImplementedError(f"CpuVectorEnv.reset takes no options, got {sorted(options)}")
        seeds = None if seed is None else _episode_seeds(seed, self.num_envs)
        _, dead = self._request("reset", None if seeds is None else [seeds[a:b] for a, b in self.slices],
                                restartable=True)
        for w in dead:
            a, b = self.slices[w]
            self._restart(w, None if seeds is None else seeds[a:b])
        self.returns.zero_()
        self.success_once.zero_()
        self.fail_once.zero_()
        return self._read("obs"), self._read_info()

    def step(self, actions: torch.Tensor):
        self.buffers["action"].copy_(actions.detach().reshape(self.num_envs, -1))
        _, dead = self._exchange([_STEP] * len(self.conns), restartable=True)
        for w in dead:
            # The envs of a dead worker restart with new episodes. The step they lost is reported as a
            # truncation with reward 0 whose final observation (and episode metrics) are those of the last
            # step they completed, so the trainer bootstraps from the state it last saw.
            a, b = self.slices[w]
            self._restart(w, np.random.RandomState(self.worker_restarts).randint(2**31, size=b - a).tolist())
            self.buffers["reward"][a:b] = 0
            self.buffers["terminated"][a:b], self.buffers["truncated"][a:b] = False, True
            for path in self._obs_paths:
                self.buffers[("final_obs", path)][a:b] = self._last_obs[path][a:b]
            for k in self._info_keys:
                self.buffers[("info", k)][a:b] = self._last_info[k][a:b]
        rew = self.buffers["reward"].clone()
        terminations = self.buffers["terminated"].clone()
        truncations = self.buffers["truncated"].clone()
        info = self._read_info()

        # episode metrics, exactly as ManiSkillVectorEnv(record_metrics=True) computes them
        episode = {}
        self.returns += rew
        if "success" in info:
            self.success_once |= info["success"]
            episode["success_once"] = self.success_once.clone()
        if "fail" in info:
            self.fail_once |= info["fail"]
            episode["fail_once"] = self.fail_once.clone()
        episode["return"] = self.returns.clone()
        episode["episode_len"] = info["elapsed_steps"].clone()
        episode["reward"] = episode["return"] / episode["episode_len"]
        if self.ignore_terminations:
            for key in ("success", "fail"):
                if key in info:
                    episode[f"{key}_at_end"] = info[key].clone()
        info["episode"] = episode

        obs = self._read("obs")
        done = terminations | truncations  # terminations are already masked under ignore_terminations
        if done.any():
            # the workers already reset the finished envs (same-step autoreset)
            final_obs = _unflatten_paths({
                p: torch.where(_expand_as(done, leaf), leaf, _get_path(obs, p))
                for p in self._obs_paths for leaf in [self.buffers[("final_obs", p)]]})
            self.returns[done] = 0
            self.success_once[done] = False
            self.fail_once[done] = False
            info = dict(final_observation=final_obs, final_info=info, _final_info=done,
                        _final_observation=done, _elapsed_steps=done)
        return obs, rew, terminations, truncations, info

    def render(self) -> torch.Tensor:
        frames = [f for reply in self._request("render")[0] for f in pickle.loads(reply)]
        return torch.from_numpy(np.stack(frames))

    def get_episode_rng(self) -> list[dict]:
        """Per env: its current episode's seed and the state of the stream that seeds its next episodes."""
        return [state for reply in self._request("episode_rng")[0] for state in pickle.loads(reply)]

    def reset_to_episode_rng(self, state: list[dict]):
        """Restart every env's current episode from its seed and continue its seed stream from ``state``
        (``get_episode_rng()``): envs saved at episode starts continue exactly as they would have."""
        obs, info = self.reset(seed=[env_state["seed"] for env_state in state])
        self._request("set_episode_streams", [state[a:b] for a, b in self.slices])
        return obs, info

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("close", None))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.conns, self.procs = [], []
        if self.shared is not None:
            self.buffers = {}
            self.shared.close()
            self.shared = None

    def __del__(self):
        if getattr(self, "procs", None):
            self.close()


_LIVE_CPU_ENVS: "weakref.WeakSet[CpuVectorEnv]" = weakref.WeakSet()


@atexit.register
def _close_cpu_envs() -> None:
    # Runs before multiprocessing's exit handler (registered earlier, so called later), which would send the
    # workers SIGTERM, which they ignore, and then wait for them forever.
    for env in list(_LIVE_CPU_ENVS):
        env.close()


def _expand_as(mask: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (leaf.dim() - 1)))


def _get_path(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------------------------
# Expert + residual
# ----------------------------------------------------------------------------------------------
def flat_state(obs: dict) -> torch.Tensor:
    """The policy observation of the state scripts: ManiSkill's ``state`` obs, i.e. the ``state_dict``
    leaves in order, each flattened per env and cast to float (what ``common.flatten_state_dict`` gives)."""
    leaves = _flatten_paths(obs).values()
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
    """``[policy_obs, expert_action]``; for image policies the expert action joins the state part."""
    if isinstance(policy_obs, dict):
        return {**policy_obs, "state": torch.cat([policy_obs["state"], expert_action], dim=-1)}
    return torch.cat([policy_obs, expert_action], dim=-1)


FUSIONS = ("mean", "learned")
SCALE_SCHEDULES = ("constant", "linear")


def check_fusion(fusion: str, num_experts: int) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {', '.join(FUSIONS)}, not '{fusion}'")
    if fusion == "learned" and num_experts < 2:
        raise ValueError("--fusion learned mixes several experts; give at least two, e.g. --expert-type ik,zero")


def fused_action(expert_actions: torch.Tensor, policy_action: torch.Tensor, residual_scale: float,
                 fusion: str = "mean", applied: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The executed action before clipping: ``base + residual_scale * residual`` (see ``fused_parts``)."""
    base, residual = fused_parts(expert_actions, policy_action, fusion, applied)
    return base + residual_scale * residual


def fused_parts(expert_actions: torch.Tensor, policy_action: torch.Tensor, fusion: str = "mean",
                applied: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The base action and the residual that ``fused_action`` combines.

    ``expert_actions`` is [N, E, A], one action per expert. ``policy_action`` is [N, A] (the residual),
    followed by E fusion logits with ``fusion="learned"``. The base is the experts' mean, or with
    "learned" their ``softmax(logits)``-weighted mix; zero logits give the mean. Envs where ``applied``
    is False ignore the whole policy action and execute the experts' mean alone.
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
    return base, residual


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

    ``base`` is the expert action, or with several experts their mean or learned mix (``fused_action``).
    The experts are called once per step, on the structured observation the env returned, and the
    expert actions appended to the policy observation are exactly the ones executed on the next step.
    When episodes end, they are also called on ``final_observation`` so the critic can bootstrap from it.
    PPO keeps the unclipped action it sampled; only the action sent to the env is clipped.

    The policy's action has ``policy_action_dim`` entries: the residual (``action_dim``), then one fusion
    logit per expert with ``fusion="learned"``. ``residual_scale`` and ``residual_prob`` may change
    between steps (``ResidualSchedule.apply``); ``info["residual_applied"]`` says which envs applied
    the policy's action on this step.

    Build it from a backend (``env=make_env(...)``) or from ``env_id`` plus ``make_env`` keyword args.
    ``expert_policy_fn`` is a callable, structured observation -> [num_envs, action_dim] tensor, or a
    list of them.
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
        timer: Optional["PhaseTimer"] = None,
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
        self.fusion = fusion
        self.policy_action_dim = self.action_dim + (len(self.experts) if fusion == "learned" else 0)
        self.residual_scale = residual_scale
        self.residual_prob = 1.0
        self.clip_final_action = clip_final_action
        self.expert_action_noise = expert_action_noise
        self.policy_obs_fn = policy_obs_fn
        self.timer = timer or PhaseTimer(self.device)  # the experts' time, under "expert"
        self.expert_actions: Optional[torch.Tensor] = None  # [N, experts, A] for the current observation
        self._experts_checked = False

    def _expert_actions(self, obs: dict, noise: bool = True) -> torch.Tensor:
        with self.timer("expert"):
            return self._call_experts(obs, noise)

    def _call_experts(self, obs: dict, noise: bool) -> torch.Tensor:
        actions = [expert(obs) for expert in self.experts]
        if not self._experts_checked:  # at the first call only: the finiteness check waits for the GPU
            for expert, action in zip(self.experts, actions):
                self._check_expert_action(expert, action)
            self._experts_checked = True
        actions = torch.stack(actions, dim=1)
        if noise and self.expert_action_noise > 0:
            actions = actions + self.expert_action_noise * torch.randn_like(actions)
        return actions

    def _check_expert_action(self, expert, action) -> None:
        """A user's expert that returns the wrong thing is named in one line, before the env sees its action."""
        want = f"a float32 tensor of shape ({self.num_envs}, {self.action_dim}) on {self.device}"
        if not isinstance(action, torch.Tensor):
            got = type(action).__name__
        elif action.shape != (self.num_envs, self.action_dim) or action.dtype != torch.float32 \
                or action.device != self.device:
            got = f"a {action.dtype} tensor of shape {tuple(action.shape)} on {action.device}"
        elif not torch.isfinite(action).all():
            got = f"non-finite values (nan or inf): {action.tolist()}"[:300]
        else:
            return
        name = getattr(expert, "__qualname__", type(expert).__qualname__)
        module = getattr(expert, "__module__", "") or type(expert).__module__
        raise UsageError(f"expert {module}.{name} must return {want}; it returned {got}")

    def _policy_obs(self, obs: dict, expert_actions: torch.Tensor) -> Obs:
        return with_expert_action(self.policy_obs_fn(obs), expert_actions.flatten(1))

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self.expert_actions = self._expert_actions(obs)
        return self._policy_obs(obs, self.expert_actions), info

    def get_episode_rng(self) -> list[dict]:
        return self.env.get_episode_rng()

    def reset_to_episode_rng(self, state: list[dict]):
        """Resume: restart the envs' episodes and seed streams as ``get_episode_rng()`` saved them."""
        obs, info = self.env.reset_to_episode_rng(state)
        self.expert_actions = self._expert_actions(obs)
        return self._policy_obs(obs, self.expert_actions), info

    def step(self, policy_action: torch.Tensor):
        policy_action = policy_action.to(self.device)
        # every env applies its residual unless progressive exploration flips coins (which draws randomness)
        applied = None if self.residual_prob >= 1.0 else \
            torch.rand(self.num_envs, device=self.device) < self.residual_prob
        base, applied_residual = fused_parts(self.expert_actions, policy_action, self.fusion, applied)
        action = base + self.residual_scale * applied_residual
        if self.clip_final_action:
            action = torch.clamp(action, self.low, self.high)
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["residual_applied"] = torch.ones(self.num_envs, dtype=torch.bool, device=self.device) \
            if applied is None else applied
        residual = policy_action[:, :self.action_dim]
        expert_abs, residual_abs, final_abs = torch.stack([base, residual, action]).abs().mean((1, 2))
        info["action_stats"] = dict(expert=expert_abs, residual=residual_abs, final=final_abs)
        if "final_observation" in info:
            final_obs = info["final_observation"]
            info["final_observation"] = self._policy_obs(final_obs, self._expert_actions(final_obs, noise=False))
        self.expert_actions = self._expert_actions(obs)
        return self._policy_obs(obs, self.expert_actions), reward, terminated, truncated, info

    def render(self) -> torch.Tensor:
        return self.env.render()

    def close(self) -> None:
        self.env.close()


# ----------------------------------------------------------------------------------------------
# Per-iteration bookkeeping that never waits for the GPU
# ----------------------------------------------------------------------------------------------
class EpisodeMetrics:
    """The mean of each episode metric (``info["final_info"]["episode"]``) over the episodes that ended.

    ``add`` keeps sums on the env's device, so a rollout step never waits for the GPU; ``means`` reads them
    all at once, and starts over."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count: Optional[torch.Tensor] = None

    def add(self, info: dict) -> None:
        if "final_info" not in info:
            return
        done = info["_final_info"]
        for k, v in info["final_info"]["episode"].items():
            total = torch.where(done, v.float(), 0.0).sum()
            self.sums[k] = self.sums[k] + total if k in self.sums else total
        self.count = done.sum() if self.count is None else self.count + done.sum()

    def means(self) -> dict[str, float]:
        """{metric: mean over the episodes added since the last call, "episodes": their number}; {} if none."""
        if self.count is None:
            return {}
        keys = list(self.sums)
        *sums, count = torch.stack([self.sums[k] for k in keys] + [self.count.float()]).tolist()  # one sync
        self.sums, self.count = {}, None
        return {**{k: total / count for k, total in zip(keys, sums)}, "episodes": int(count)}


class PhaseTimer:
    """Wall-clock seconds spent in each phase of training (rollout, env_step, expert, policy, advantage, update,
    eval, compile), summed over the run.

    With ``sync`` on a CUDA device (--verbose), each phase waits for the GPU at its start and end, so the GPU work
    a phase launched is counted in that phase; without it, timing adds no synchronisation."""

    def __init__(self, device: Union[str, torch.device] = "cpu", sync: bool = False):
        self.device = torch.device(device)
        self.sync = sync and self.device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self._started: dict[str, float] = {}
        self._reported: dict[str, float] = {}

    def start(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)
        self._started[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - self._started.pop(phase)

    @contextmanager
    def __call__(self, phase: str):
        self.start(phase)
        try:
            yield
        finally:
            self.stop(phase)

    def since_last_report(self) -> str:
        """The seconds of each phase since the previous call, nested as the phases are, on one line."""
        s = {k: v - self._reported.get(k, 0.0) for k, v in self.seconds.items()}
        self._reported = dict(self.seconds)
        parts = [f"rollout {s.get('rollout', 0):.3f} s (env step {s.get('env_step', 0):.3f} s, of which expert "
                 f"{s.get('expert', 0):.3f} s; policy {s.get('policy', 0):.3f} s)"]
        parts += [f"{k} {s[k]:.3f} s" for k in ("advantage", "update", "eval") if k in s]
        if s.get("compile"):
            parts.append(f"compile {s['compile']:.1f} s")
        return " | ".join(parts)

    def training_seconds(self) -> float:
        """Rollout, advantage and update: what steps per second count (evaluation and compilation excluded)."""
        return sum(self.seconds.get(k, 0.0) for k in ("rollout", "advantage", "update"))


def peak_gpu_memory(device: torch.device) -> dict:
    """For summary.json: the peak memory torch allocated on ``device`` (PhysX's own allocations not included)."""
    if device.type != "cuda":
        return {}
    return dict(peak_gpu_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20)


def step_where(optimizer: torch.optim.Optimizer, apply: torch.Tensor) -> None:
    """``optimizer.step()`` where the 0-dim bool tensor ``apply`` is True; where it is False, the parameters and the
    optimizer's state keep their values, as if the step never ran. Both outcomes are computed and one is kept,
    because compiled and graphed code cannot branch on a tensor without waiting for it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = params + [v for p in params for v in optimizer.state[p].values() if isinstance(v, torch.Tensor)]
    before = [t.detach().clone() for t in kept]
    optimizer.step()
    with torch.no_grad():
        for t, old in zip(kept, before):
            t.copy_(torch.where(apply, t, old))
        # state the step created (Adam's first step): an optimizer that never stepped holds zeros
        known = {id(t) for t in kept}
        for p in params:
            for v in optimizer.state[p].values():
                if isinstance(v, torch.Tensor) and id(v) not in known:
                    v.copy_(torch.where(apply, v, torch.zeros_like(v)))


# ----------------------------------------------------------------------------------------------
# Data-parallel training under torchrun
# ----------------------------------------------------------------------------------------------
class Distributed:
    """This process's place in a torchrun job; one process of one when not launched by torchrun."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.enabled = world_size > 1
        self.is_main = rank == 0

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Replace each gradient by its mean over the ranks: one all-reduce of one flat buffer."""
        if self.enabled:
            _all_reduce_mean([p.grad for p in module.parameters() if p.grad is not None])

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's parameters (after initialisation or loading)."""
        if self.enabled:
            for p in module.parameters():
                torch.distributed.broadcast(p.data, src=0)

    def parameter_hashes(self, module: torch.nn.Module) -> list[int]:
        """A hash of the exact parameter bytes of every rank (on every rank); equal hashes mean the ranks
        hold bitwise-identical parameters."""
        flat = torch.cat([p.detach().flatten() for p in module.parameters()]).cpu()
        digest = int.from_bytes(hashlib.sha256(flat.numpy().tobytes()).digest()[:8], "little", signed=True)
        if not self.enabled:
            return [digest]
        # NCCL gathers CUDA tensors into CUDA buffers; gloo, CPU tensors
        mine = torch.tensor([digest], device=_collective_device())
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, mine)
        return [int(h) for h in gathered]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the ranks, so that decisions taken on it agree on every rank."""
        if not self.enabled:
            return value
        return _all_reduce_sum(value.detach().clone()) / self.world_size

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank, on every rank: e.g. a stop signal that reached the ranks at
        different moments, so that they all stop after the same iteration."""
        if not self.enabled:
            return flag
        return bool(self.mean(torch.tensor(float(flag), device=_collective_device())) > 0)

    def gather(self, obj: Any) -> Optional[list]:
        """Every rank's ``obj``, in rank order, on rank 0; None on the other ranks."""
        if not self.enabled:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, gathered, dst=0)
        return gathered

    def close(self) -> None:
        if self.enabled:
            torch.distributed.destroy_process_group()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")


@torch.compiler.disable  # a collective is a boundary for compiled code, not something to trace
def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


@torch.compiler.disable
def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    flat = torch.cat([t.flatten() for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def init_distributed(cuda_training: bool, gpu_simulation: bool) -> Distributed:
    """Join the torchrun job this process belongs to, if any.

    Each local rank uses its own GPU for whatever runs on CUDA. ``cuda_training``: the networks and their
    gradients live there, and the ranks talk over NCCL; otherwise over gloo. Without ``gpu_simulation`` the CPU
    backend's env workers run here, so the ranks split the cores between them and each rank's workers and update
    threads keep to their own cores.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if cuda_training or gpu_simulation:
        if local_world > torch.cuda.device_count():
            raise UsageError(f"torchrun started {local_world} ranks on this machine, which has "
                             f"{torch.cuda.device_count()} GPU(s): give --nproc-per-node "
                             f"{torch.cuda.device_count()} or fewer")
        torch.cuda.set_device(local_rank)
    torch.distributed.init_process_group("nccl" if cuda_training else "gloo")
    if not gpu_simulation and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        share = cpus[local_rank::local_world] or [cpus[local_rank % len(cpus)]]
        os.sched_setaffinity(0, share)
        torch.set_num_threads(len(share))
    return Distributed(rank, world_size, local_rank)


# ----------------------------------------------------------------------------------------------
# Checkpoints, resuming, numerical checks and videos
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str, payload: dict) -> None:
    """Write atomically: a temporary file, fsync, then rename, so a crash never leaves a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)  # and the rename itself survives a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_run_checkpoint(run_dir: str, name: str, payload: dict, keep: int) -> str:
    """Save ``run_dir/name`` atomically, make ``run_dir/latest.pt`` the same file (atomically too), and keep
    only the newest ``keep`` numbered ``ckpt_<iteration>.pt``. Returns the path of latest.pt."""
    path, latest = os.path.join(run_dir, name), os.path.join(run_dir, "latest.pt")
    save_checkpoint(path, payload)
    tmp = f"{latest}.tmp{os.getpid()}"
    try:
        os.link(path, tmp)  # a second name for the same bytes: nothing written twice
        os.replace(tmp, latest)
    except OSError:  # a file system without hard links
        save_checkpoint(latest, payload)
    for stale in glob.glob(os.path.join(glob.escape(run_dir), "*.pt.tmp*")):  # left by a save that was killed
        os.remove(stale)
    numbered = {int(m.group(1)): f for f in os.listdir(run_dir) if (m := re.fullmatch(r"ckpt_(\d+)\.pt", f))}
    for iteration in sorted(numbered)[:max(0, len(numbered) - keep)]:
        os.remove(os.path.join(run_dir, numbered[iteration]))
    return latest


def load_checkpoint(path: str, map_location: Union[str, torch.device] = "cpu") -> dict:
    """Load a checkpoint written by one of the scripts, or raise a one-line UsageError saying why not."""
    if os.path.isdir(path):
        raise UsageError(f"checkpoint '{path}' is a directory; give a .pt file in it, e.g. "
                         f"{os.path.join(path, 'latest.pt')}")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, unreadable file ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"checkpoint '{path}' cannot be loaded ({reason}); expected a .pt file written by ppo*.py") from None
    if not isinstance(payload, dict) or "model" not in payload or "meta" not in payload:
        raise UsageError(f"'{path}' is not a checkpoint of these scripts (no 'model' and 'meta' entries)")
    return payload


def check_checkpoint(payload: dict, path: str, **expected) -> None:
    """Compare a checkpoint's metadata with what the caller needs (network, env_id, obs_dim, ...)."""
    meta = payload["meta"]
    for key, want in expected.items():
        have = meta.get(key)
        if have != want:
            script = f" (written by {meta['script']})" if key == "network" and "script" in meta else ""
            raise UsageError(f"checkpoint '{path}' has {key}={have}{script} but this run needs {key}={want}")


def resume_args(path: Optional[str], fields) -> dict:
    """The arguments a run was started with, read from its checkpoint: --resume starts from them, and flags
    given on the command line override them. ``fields``: the script's Args (unknown keys are dropped)."""
    if path is None:
        raise UsageError("--resume needs --checkpoint PATH (e.g. runs/<run>/latest.pt)")
    saved = load_checkpoint(path)["meta"].get("args", {})
    return {k: v for k, v in saved.items() if k in fields.__dataclass_fields__}


def check_resume(payload: dict, path: str, args) -> None:
    """A checkpoint to resume from must hold resume state and the run's batch layout (num_envs, num_steps),
    which the iteration count and the global step are measured in, and leave an iteration to run."""
    if "resume" not in payload:
        raise UsageError(f"checkpoint '{path}' holds no resume state (only the model); it can be evaluated "
                         f"(--evaluate) or used as an expert (--model-path), not resumed")
    saved = payload["meta"]["args"]
    for key in ("num_envs", "num_steps"):
        if saved[key] != getattr(args, key):
            raise UsageError(f"--resume keeps the run's batch layout: checkpoint '{path}' has {key}={saved[key]}, "
                             f"this run asks for {getattr(args, key)}")
    if payload["resume"]["global_step"] + args.num_envs * args.num_steps > args.total_timesteps:
        raise UsageError(f"checkpoint '{path}' is at step {payload['resume']['global_step']}, which leaves no "
                         f"iteration before --total-timesteps {args.total_timesteps}; give a larger --total-timesteps")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Resume an optimizer whose learning rate is a tensor (the fast scripts'): load the saved moments and step
    counts, and the saved learning rate into that same tensor, which compiled and graphed steps read in place.
    The optimizer keeps its own settings (fused, capturable), whatever the saved run used."""
    own = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, own):
        saved_lr = float(group["lr"])
        group.update(settings)
        group["lr"].fill_(saved_lr)


def rng_state() -> dict:
    """The trainer's random streams (python, numpy, torch, and the stream of the GPU this process uses, if any), in
    a form torch.load(weights_only=True) accepts."""
    return dict(python=random.getstate(), numpy=_saveable_random_state(np.random.get_state()),
                torch=torch.get_rng_state(), cuda=[torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``. The saved GPU stream goes to the GPU this process uses now, whichever index it
    has here (a machine may have fewer GPUs than the one that saved it); without a GPU it is not needed."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state(_random_state(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0].cpu())


def check_finite(iteration: int, run_dir: str, **quantities: torch.Tensor) -> None:
    """Stop the run (FatalError) if a quantity holds nan or inf, naming the iteration and the quantity. One host
    sync per call: meant for whole buffers or per-iteration sums, checked before anything of the iteration is
    saved, so the last checkpoint on disk stays the last good one."""
    finite = torch.stack([torch.isfinite(v).all() for v in quantities.values()]).tolist()
    for name, ok in zip(quantities, finite):
        if not ok:
            latest = os.path.join(run_dir, "latest.pt")
            kept = f"the last good checkpoint is {latest}" if os.path.exists(latest) else "no checkpoint was saved yet"
            raise FatalError(f"iteration {iteration}: non-finite {name} (nan or inf); stopped without saving this "
                             f"iteration ({kept})")


def versions() -> dict:
    import mani_skill

    return dict(torch=str(torch.__version__), mani_skill=str(mani_skill.__version__), python=sys.version.split()[0])


def save_video(frames: list[torch.Tensor], path: str, fps: int = 20) -> None:
    """Write a list of [num_envs, H, W, 3] uint8 frames as one mp4, the envs tiled side by side."""
    from mani_skill.utils.visualization.misc import images_to_video, tile_images

    tiled = [tile_images([f[i].cpu().numpy() for i in range(f.shape[0])]) for f in frames]
    images_to_video(tiled, os.path.dirname(path), os.path.splitext(os.path.basename(path))[0], fps=fps,
                    verbose=False)
