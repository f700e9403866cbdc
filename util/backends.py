"""The backends: batched ManiSkill envs with ManiSkillVectorEnv's interface and semantics (torch tensors in and
out, same-step autoreset with ``final_observation`` / ``final_info`` / ``_final_info``, episode metrics under
``info["episode"]``), returning the *structured* observation (``state_dict``, or ``state_dict+rgb`` for image
runs) that experts read.

- ``NativeVectorEnv``: ManiSkill's own vectorization (``physx_cuda`` on a GPU; ``physx_cpu`` with one env).
- ``CpuVectorEnv``: worker processes, each stepping several ``physx_cpu`` envs in turn, sharing memory with
  the trainer.

``make_env`` builds either from the command line's ``--sim-backend``.
"""

from __future__ import annotations

import atexit
import difflib
import functools
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import traceback
import weakref
from multiprocessing.connection import Connection
from typing import Any, Optional, Union

import gymnasium as gym
import numpy as np
import torch

import mani_skill.envs  # noqa: F401  (registers the ManiSkill tasks with gymnasium)
from mani_skill.utils.registration import REGISTERED_ENVS
from mani_skill.vector.wrappers.gymnasium import ManiSkillVectorEnv

from .run import STOP_SIGNALS, FatalError, UsageError, WorkerDied, first_line, random_state, saveable_random_state


def check_env_id(env_id: str) -> None:
    """``env_id`` must be a ManiSkill task: gymnasium's registry also holds tasks (CartPole-v1) that
    ManiSkill's backends cannot build."""
    if env_id not in REGISTERED_ENVS:
        close = difflib.get_close_matches(env_id, list(REGISTERED_ENVS), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see mani_skill.envs for the registered ids"
        problem = "is not a ManiSkill task" if env_id in gym.registry else "is unknown"
        raise UsageError(f"env id '{env_id}' {problem}: {hint}")


def check_reward_mode(env_id: str, reward_mode: Optional[str]) -> None:
    """``--reward-mode`` must be one the task computes (None: the task's default, the first it lists)."""
    supported = REGISTERED_ENVS[env_id].cls.SUPPORTED_REWARD_MODES if env_id in REGISTERED_ENVS else None
    if reward_mode is not None and supported is not None and reward_mode not in supported:
        raise UsageError(f"--reward-mode for {env_id} must be one of {', '.join(supported)}, not '{reward_mode}'")


def resolve_sim_backend(sim_backend: str) -> str:
    """Map --sim-backend auto|gpu|cpu to 'gpu' or 'cpu'."""
    if sim_backend not in ("auto", "gpu", "cpu"):
        raise UsageError(f"--sim-backend must be auto, gpu or cpu, not '{sim_backend}'")
    if sim_backend == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if sim_backend == "gpu" and not torch.cuda.is_available():
        raise UsageError("--sim-backend gpu needs a CUDA device and none was found; use --sim-backend cpu (or auto)")
    return sim_backend


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
    restart_dead_workers: bool = False,
    **env_kwargs,
):
    """Build a batched ManiSkill env on the chosen backend.

    ``sim_backend`` is auto|gpu|cpu as on the command line, or ``"physx_cpu"``, which runs ManiSkill's
    own vector path (``NativeVectorEnv``) on the CPU simulator with one env: that is how the GPU code path
    is exercised on machines without CUDA. ``restart_dead_workers`` concerns the CPU backend only (the GPU
    backend has no worker processes). ``env_kwargs`` go to ``gym.make`` (``obs_mode``,
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
        # as the CPU backend's workers render; ManiSkill's own default would ask for CUDA, which cannot render
        # without NVIDIA's Vulkan driver
        env_kwargs.setdefault("render_backend", render_backend(False, env_kwargs["obs_mode"]))
        return NativeVectorEnv(env_id, 1, "physx_cpu", ignore_terminations, **env_kwargs)
    gpu = resolve_sim_backend(sim_backend) == "gpu"
    env_kwargs.setdefault("render_backend", render_backend(gpu, env_kwargs["obs_mode"]))
    if gpu:
        # the GPU this process trains on (under torchrun its local rank's): a bare "physx_cuda" is always the first
        return NativeVectorEnv(env_id, num_envs, f"physx_cuda:{torch.cuda.current_device()}", ignore_terminations,
                               **env_kwargs)
    return CpuVectorEnv(env_id, num_envs, ignore_terminations, restart_dead_workers=restart_dead_workers, **env_kwargs)


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


class NativeVectorEnv(ManiSkillVectorEnv):
    """ManiSkill's own batched simulation, ``gym.make(num_envs=N, sim_backend=...)`` + ManiSkillVectorEnv: on a
    GPU (``physx_cuda:N``), or on the CPU simulator with one env (``physx_cpu``)."""

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


def flatten_paths(tree: Union[dict, torch.Tensor], prefix: tuple = ()) -> dict[tuple, Any]:
    """{'a': {'b': x}} -> {('a', 'b'): x}; keeps insertion order, so the flat state stays ManiSkill's.
    A bare tensor (obs_mode="state") is the single leaf at path ()."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_paths(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat


def unflatten_paths(flat: dict[tuple, Any]) -> Union[dict, torch.Tensor]:
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


def _episode_rng(base_env) -> list[dict]:
    """Per env: the seed of its current episode and the stream its next episode seeds come from."""
    return [dict(seed=int(seed), stream=saveable_random_state(rng.get_state()))
            for seed, rng in zip(base_env._episode_seed, base_env._batched_main_rng.rngs)]


def _set_episode_streams(base_env, state: list[dict]) -> None:
    for rng, env_state in zip(base_env._batched_main_rng.rngs, state):
        rng.set_state(random_state(env_state["stream"]))


# Step requests and replies are single bytes; everything else is a pickled (command, argument) pair.
_STEP, _OK, _ERROR, _BAD_CONFIG = b"s", b"k", b"E", b"U"


def _gym_make(env_id: str, **kwargs) -> gym.Env:
    """gym.make. ManiSkill answers a bad configuration (control mode, obs mode, keyword) with an assertion, a
    TypeError, a ValueError or a NotImplementedError: one UsageError line. Anything else is the simulator or the
    machine failing (CUDA out of memory, PhysX or Vulkan start-up): a FatalError that keeps the traceback."""
    try:
        return gym.make(env_id, **kwargs)
    except (AssertionError, TypeError, ValueError, NotImplementedError) as err:
        raise UsageError(f"cannot create {env_id}: {first_line(err)}") from None
    except Exception as err:
        reason = first_line(err)
        if "physical device" in reason or "Vulkan" in reason or "vk::" in reason:
            hint = NO_CUDA_VULKAN if torch.cuda.is_available() else "run scripts/ensure_vulkan.sh (make setup)"
        elif isinstance(err, torch.OutOfMemoryError) or "out of memory" in reason.lower():
            hint = "try fewer --num-envs"
        else:
            hint = "the traceback above shows where"
        raise FatalError(f"cannot create {env_id} ({kwargs.get('sim_backend')}): {reason}; {hint}") from err


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
            obs_layout={k: (tuple(v.shape[1:]), str(_to_numpy(v).dtype)) for k, v in flatten_paths(obs).items()},
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
            for path, value in flatten_paths(obs).items():
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


# Workers are forked from a server process that has imported this module, and with it torch and ManiSkill,
# once per trainer: a spawned worker would import them again, which takes longer than building its envs.
# Forking the trainer itself is not safe once it has initialised SAPIEN or torch. Every worker sees the
# environment variables the trainer had when its first worker started.
_WORKERS = mp.get_context("forkserver")


def _ensure_fork_server() -> None:
    """Start the fork server with this module imported, unless it runs. Python 3.11's fork server does not
    take the trainer's sys.path, so the folder holding this package reaches it through PYTHONPATH."""
    from multiprocessing import forkserver

    forkserver.set_forkserver_preload([__name__])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, previous) if p)
    try:
        forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous


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
        parent, child = _WORKERS.Pipe()
        env_id, ignore_terminations, env_kwargs = self._worker_config
        proc = _WORKERS.Process(target=_cpu_worker, daemon=True,
                                 args=(child, w, env_id, self.slices[w], ignore_terminations, env_kwargs))
        # The fork server, and so every worker, ignores SIGINT and SIGTERM from its first instruction on (an
        # ignored disposition survives exec and fork): Ctrl-C reaches the whole process group, and the trainer
        # decides how to stop. Workers exit on close() or when the trainer's end of the pipe closes. Only the
        # main thread may set handlers; a signal to the trainer during these few milliseconds is lost.
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS} if in_main_thread else {}
        try:
            _ensure_fork_server()
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
        return unflatten_paths(flat)

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
            final_obs = unflatten_paths({
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
