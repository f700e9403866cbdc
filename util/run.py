"""Run plumbing shared by the scripts: errors and the command-line entry point, flag checks, signals,
per-iteration bookkeeping, data-parallel training under torchrun, checkpoints and resuming, random streams,
numerical checks and videos. It imports nothing else of this package."""

from __future__ import annotations

import errno
import glob
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, NoReturn, Optional, Union

import numpy as np
import torch
from tqdm import tqdm


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
    one line and exit code 1. Running out of GPU memory in training is a FatalError with a hint."""
    try:
        try:
            main()
        except torch.OutOfMemoryError as err:  # creating the envs has its own hint (backends._gym_make)
            raise FatalError(f"out of GPU memory: {first_line(err)}; try fewer --num-envs or --num-eval-envs, "
                             f"or more --num-minibatches") from err
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
def first_line(err: BaseException) -> str:
    """An exception's message in one line (its type's name when it has none), for one-line errors."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


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


def check_track(track: bool) -> None:
    """--track logs to Weights & Biases, which requirements.txt leaves out: refuse it before a run starts."""
    if track and importlib.util.find_spec("wandb") is None:
        raise UsageError("--track needs wandb, which is not installed (pip install wandb)")


def check_writable(directory: str) -> None:
    """The output directory, or its nearest existing parent, must take a new directory. Tried, not asked of
    os.access: root passes every permission check, also where nothing can be made (/proc, a read-only mount)."""
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        if not os.path.isdir(probe):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=probe))
    except OSError as e:
        raise UsageError(f"output directory '{directory}' is not writable (checked '{probe}': {e.strerror})") from None


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

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.local_world_size = local_world_size  # the ranks on this machine
        self.enabled = world_size > 1
        self.is_main = rank == 0
        if self.enabled:  # a collective is a boundary for compiled code, not something to trace; wrapped here,
            # since importing the compiler takes seconds that a single-process run need not spend
            self._all_reduce_sum = torch.compiler.disable(_all_reduce_sum)
            self._all_reduce_mean = torch.compiler.disable(_all_reduce_mean)

    def average_gradients(self, module: torch.nn.Module) -> None:
        """Replace each gradient by its mean over the ranks: one all-reduce of one flat buffer."""
        if self.enabled:
            self._all_reduce_mean([p.grad for p in module.parameters() if p.grad is not None])

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
        return self._all_reduce_sum(value.detach().clone()) / self.world_size

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


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(tensor)
    return tensor


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
    return Distributed(rank, world_size, local_rank, local_world)


# ----------------------------------------------------------------------------------------------
# Checkpoints, resuming, numerical checks and videos
# ----------------------------------------------------------------------------------------------
def write_atomically(path: str, write: Callable[[Any], None]) -> None:
    """``write(f)`` into a temporary binary file, fsync, then rename, so a crash never leaves a torn file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    f = open(tmp, "wb")
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a failed write (disk full, a signal) leaves path as it was and no temporary file
        os.remove(tmp)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(directory, os.O_RDONLY)  # and the rename itself survives a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str, payload: dict) -> None:
    write_atomically(path, lambda f: torch.save(payload, f))


def save_json(path: str, data) -> None:
    """Write ``data`` as indented JSON, atomically: records that a later run reads are never half-written."""
    write_atomically(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


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
        raise UsageError(f"checkpoint '{path}' cannot be loaded ({first_line(err)}); expected a .pt file written by ppo*.py") from None
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


def check_checkpoint_flags(checkpoint: Optional[str], evaluate: bool, resume: bool) -> None:
    """--checkpoint is read by --evaluate or by --resume, never both; loading it into a new run would start that run
    from a trained residual whose first eval is still labelled the expert alone. (--resume without --checkpoint:
    resume_args, which reads the checkpoint first.)"""
    if evaluate and checkpoint is None:
        raise UsageError("--evaluate needs --checkpoint PATH")
    if evaluate and resume:
        raise UsageError("--evaluate and --resume exclude each other: evaluate a checkpoint, or resume its run")
    if checkpoint is not None and not (evaluate or resume):
        raise UsageError(f"--checkpoint is read only with --evaluate or --resume; to build on a trained policy, "
                         f"make it the expert: --expert-type model --model-path {checkpoint}")


def resume_args(path: Optional[str], fields) -> dict:
    """The arguments a run was started with, read from its checkpoint: --resume starts from them, and flags
    given on the command line override them. ``fields``: the script's Args (unknown keys are dropped)."""
    if path is None:
        raise UsageError("--resume needs --checkpoint PATH (e.g. runs/<run>/latest.pt)")
    saved = load_checkpoint(path)["meta"].get("args", {})
    return {k: v for k, v in saved.items() if k in fields.__dataclass_fields__}


def check_resume(payload: dict, path: str, args, world_size: int = 1) -> None:
    """A checkpoint to resume from must hold resume state, the run's batch layout (num_envs, num_steps), which
    the iteration count and the global step are measured in, and its number of torchrun ranks, each of which goes
    on with its own envs and random streams; and it must leave an iteration to run."""
    if "resume" not in payload:
        raise UsageError(f"checkpoint '{path}' holds no resume state (only the model); it can be evaluated "
                         f"(--evaluate) or used as an expert (--model-path), not resumed")
    saved = payload["meta"]["args"]
    for key in ("num_envs", "num_steps"):
        if saved[key] != getattr(args, key):
            raise UsageError(f"--resume keeps the run's batch layout: checkpoint '{path}' has {key}={saved[key]}, "
                             f"this run asks for {getattr(args, key)}")
    saved_ranks = 1 + len(payload["resume"].get("other_ranks", []))
    if saved_ranks != world_size:
        raise UsageError(f"--resume keeps the run's number of ranks: checkpoint '{path}' was saved by {saved_ranks}, "
                         f"this run has {world_size}")
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
    return dict(python=random.getstate(), numpy=saveable_random_state(np.random.get_state()),
                torch=torch.get_rng_state(), cuda=[torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``. The saved GPU stream goes to the GPU this process uses now, whichever index it
    has here (a machine may have fewer GPUs than the one that saved it); without a GPU it is not needed."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state(random_state(state["numpy"]))
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


def saveable_random_state(state: tuple) -> tuple:
    """``np.random.RandomState.get_state()`` with its key array as a tensor, which ``torch.load(weights_only=True)``
    accepts."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)


def random_state(saved: tuple) -> tuple:
    name, keys, pos, has_gauss, cached_gaussian = saved
    return name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian


# ----------------------------------------------------------------------------------------------
# A run's setup, outputs, evaluation and checkpoints, as every script does them
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, torch_deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic
    # nan and inf are caught once per iteration (check_finite) instead of by the distributions' argument checks,
    # which raise a traceback and cost a host sync at every call
    torch.distributions.Distribution.set_default_validate_args(False)


def _count(n: int) -> str:
    """300000 -> 300k, 1000000 -> 1M, 400 -> 400"""
    for unit, size in (("M", 1_000_000), ("k", 1000)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


class RunOutput:
    """Where a run writes: its directory (a new one, or on --resume the checkpoint's own), tensorboard events, eval
    videos and summary.json. ``writes`` False (torchrun ranks other than 0) writes nothing."""

    def __init__(self, args, writes: bool, can_render: bool, header: str, checkpoint: Optional[dict] = None):
        self.env_id, self.started = args.env_id, time.time()
        # a fresh run's first eval is its experts alone (the residual head starts at zero); a resumed run carries
        # that figure on in its checkpoints, so its summary still says where training started
        self.first_eval_is_expert = args.checkpoint is None and any(
            t.strip() != "zero" for t in args.expert_type.split(","))
        self.expert_alone = checkpoint["meta"].get("expert_alone") if args.resume else None
        resume_step = checkpoint["resume"]["global_step"] if args.resume else None
        self.last_eval: dict = {}
        if args.resume:
            self.dir = os.path.dirname(os.path.abspath(args.checkpoint))
        else:
            self.dir = os.path.join(args.output_dir, f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")
        # a GPU simulation without NVIDIA's Vulkan driver trains unrendered (util.backends.render_backend said so)
        self.video_dir = os.path.join(self.dir, "videos") if args.capture_video and can_render else None
        self.writer = None
        if not writes:
            return
        os.makedirs(self.dir, exist_ok=True)
        if args.track:
            import wandb

            wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                       config=vars(args), name=os.path.basename(self.dir), save_code=True)
        from torch.utils.tensorboard import SummaryWriter

        # on resume, hide what a crashed run logged after its checkpoint
        self.writer = SummaryWriter(self.dir, purge_step=resume_step)
        self.writer.add_text("hyperparameters",
                             "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))
        print(header)
        print(f"logs: {self.dir} (tensorboard --logdir {os.path.dirname(self.dir)})")
        if args.save_model and not args.evaluate:
            print(f"checkpoints: {self.dir}/latest.pt (the newest), ckpt_<iteration>.pt (the last "
                  f"{args.keep_checkpoints}) and final_ckpt.pt")
        if self.video_dir:
            print(f"videos: {self.video_dir}")

    def video_path(self, global_step: int) -> Optional[str]:
        return os.path.join(self.video_dir, f"eval_{global_step}.mp4") if self.video_dir else None

    def scalars(self, values: dict, global_step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, global_step)

    def log_eval(self, metrics: dict, global_step: int) -> str:
        """Log an eval's metrics and return its line; the first eval of a fresh run over an expert is labelled as
        that expert alone and remembered."""
        self.scalars({f"eval/{k}": v for k, v in metrics.items()}, global_step)
        self.last_eval = metrics
        if global_step == 0 and self.first_eval_is_expert:
            self.expert_alone = metrics
            return eval_line(metrics, global_step) + (" (the expert alone: the residual head starts at zero)"
                                                      if metrics else "")
        return eval_line(metrics, global_step)

    def finish(self, summary: dict) -> None:
        """Print where training started and where it ended, add the same figures to ``summary`` and write it."""
        metric = "success_once" if "success_once" in self.last_eval else "return"
        minutes = (time.time() - self.started) / 60
        ended = self.last_eval.get(metric, float("nan"))
        took = f"{_count(summary['global_step'])} env steps, " + \
            (f"{minutes:.0f} min" if minutes >= 1 else f"{minutes * 60:.0f} s")
        scope = f"{metric} ({took})"
        if not self.last_eval:
            print(f"{self.env_id}: no eval episode ended within --num-eval-steps ({took})")
        elif self.expert_alone is not None:
            started = self.expert_alone.get(metric, float("nan"))
            print(f"{self.env_id}: expert alone {started:.2f} -> with residual {ended:.2f} {scope}")
        else:
            print(f"{self.env_id}: {ended:.2f} {scope}")
        summary = dict(summary, metric=metric, expert_alone=self.expert_alone, wall_minutes=minutes)
        self.write_summary(summary)

    def write_summary(self, summary: dict) -> None:
        save_json(os.path.join(self.dir, "summary.json"), summary)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def evaluate(eval_envs, policy: Callable, num_steps: int, video_path: Optional[str] = None) -> dict:
    """Step the eval envs ``num_steps`` times with ``policy`` (observation -> action) and return the mean episode
    metrics of the episodes that ended (EpisodeMetrics); with ``video_path``, write the rendered frames there."""
    obs, _ = eval_envs.reset()
    episodes, frames = EpisodeMetrics(), []
    for _ in range(num_steps):
        with torch.no_grad():
            obs, _, _, _, info = eval_envs.step(policy(obs))
        if video_path:
            frames.append(eval_envs.render())
        episodes.add(info)
    if frames:
        save_video(frames, video_path)
    return episodes.means()


def full_episodes(envs, action: torch.Tensor, rounds: int, reset_each: bool = False) -> list[dict]:
    """``rounds`` rounds of one full episode per env under a constant ``action``, on envs whose episodes all end at
    the step limit together (ignore_terminations): each round's ``final_info["episode"]``. ``reset_each`` resets
    the envs before every round, as ``evaluate`` does; otherwise each round follows on from the one before."""
    episodes = []
    for _ in range(rounds):
        if reset_each:
            envs.reset()
        for _ in range(envs.max_episode_steps):
            _, _, _, _, info = envs.step(action)
        episodes.append(info["final_info"]["episode"])
    return episodes


def eval_line(metrics: dict, global_step: int) -> str:
    if not metrics:  # --num-eval-steps shorter than an episode
        return f"eval @ {global_step} steps: no episode ended within --num-eval-steps"
    return f"eval @ {global_step} steps: " + " ".join(
        f"{k}={metrics[k]:.3f}" for k in ("success_once", "success_at_end", "return") if k in metrics)


def save_training_checkpoint(output: RunOutput, name: str, iteration: int, steps_per_iteration: int, agent, optimizer,
                             envs, eval_envs, meta: dict, keep: int,
                             distributed: Optional["Distributed"] = None) -> Optional[str]:
    """Called by every rank at the same iteration: rank 0 writes, with every rank's envs and random streams,
    everything a resumed run needs to go on as this one would (schedules are functions of the step counts).
    Rank 0's streams sit where a single process keeps them, so either state script resumes the other's runs.
    Returns the path of latest.pt on rank 0, None elsewhere."""
    distributed = distributed or Distributed()
    own = dict(rng=rng_state(), env_rng=dict(train=envs.get_episode_rng()))
    ranks = distributed.gather(own)
    if not distributed.is_main:
        return None
    resume = dict(iteration=iteration, global_step=iteration * steps_per_iteration, optimizer=optimizer.state_dict(),
                  rng=own["rng"], env_rng=dict(train=own["env_rng"]["train"], eval=eval_envs.get_episode_rng()),
                  other_ranks=ranks[1:])
    meta = dict(meta, residual_scale=eval_envs.residual_scale, expert_alone=output.expert_alone, versions=versions())
    return save_run_checkpoint(output.dir, name, dict(model=agent.state_dict(), meta=meta, resume=resume), keep)


def restore_training(resume: dict, checkpoint_path: str, envs, eval_envs,
                     distributed: Optional["Distributed"] = None) -> tuple[int, int, Any]:
    """--resume: this rank's envs and seed streams, the eval envs', then this rank's random streams (after the
    resets, which may draw expert noise). Returns (iterations done, global step, the first observation)."""
    distributed = distributed or Distributed()
    own = resume if distributed.is_main else resume["other_ranks"][distributed.rank - 1]
    next_obs, _ = envs.reset_to_episode_rng(own["env_rng"]["train"])
    if eval_envs is not None:
        eval_envs.reset_to_episode_rng(resume["env_rng"]["eval"])
    set_rng_state(own["rng"])
    if distributed.is_main:
        print(f"resumed from {checkpoint_path} after iteration {resume['iteration']} ({resume['global_step']} steps)")
    return resume["iteration"], resume["global_step"], next_obs


def resume_command(script: str, checkpoint: str, distributed: Optional["Distributed"] = None) -> str:
    """The command that resumes a stopped run from ``checkpoint``; a torchrun job's, with its ranks (--resume
    refuses another number of them)."""
    distributed = distributed or Distributed()
    if not distributed.enabled:
        return f"python {script} --resume --checkpoint {checkpoint}"
    nodes = distributed.world_size // distributed.local_world_size
    launcher = (f"torchrun --standalone --nproc-per-node {distributed.world_size}" if nodes == 1 else
                f"torchrun --nnodes {nodes} --nproc-per-node {distributed.local_world_size} <the job's rendezvous>")
    return f"{launcher} {script} --resume --checkpoint {checkpoint}"


def close_run(output: RunOutput, envs, eval_envs, distributed: Optional["Distributed"] = None) -> None:
    """Close the logs, the envs (and their workers) and the process group."""
    output.close()
    for env in (envs, eval_envs):
        if env is not None:
            env.close()
    if distributed is not None:
        distributed.close()
