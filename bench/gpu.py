"""GPU check: the GPU tests, then training throughput and peak GPU memory of the scripts (needs CUDA).

Without CUDA it prints one line and exits with code 2. Otherwise it runs tests/test_gpu.py, then one short
training run per row, each a subprocess on PickCube-v1 (it needs no asset download) with the GPU backend,
in a fresh temporary output directory, for --iterations iterations of num_envs x 50 env steps, in this order:
  ppo.py           1024 envs, zero expert
  ppo_rgb.py       256 envs, zero expert (the task's 128x128 camera)
  ppo_rgb_fast.py  256 envs, zero expert (the same)
  ppo_fast.py      1024 and 4096 envs, zero and IK expert, each eager, --compile and --compile --cudagraphs
and reports for each:
  steps/s          train_sps of the run's summary.json: training env steps per second, evaluation and
                   compilation excluded (the first iteration, with its warm-up and graph capture, included)
  peak GPU MB      the whole process (PhysX allocates outside torch): the maximum of nvidia-smi's memory.used,
                   polled every 0.5 s during the run, minus its value just before the run
  peak torch MB    peak_gpu_memory_mb of summary.json (torch's allocator peak), where the script writes it
  status           ok | failed | timed out (after --run-timeout s) | skipped (--budget spent)

--rows picks a subset by name or shell pattern (e.g. 'ppo_fast-4096-*'), --no-tests skips the tests, so
that one row can be rerun. Prints a table and writes JSON to --out after every row (an interrupted check
keeps what it measured), and each subprocess's output to gpu_logs/ beside it. Exits with code 1 if the tests
or a run failed or timed out.
"""

import fnmatch
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import util  # noqa: E402

NUM_STEPS = 50  # the scripts' default rollout length, passed explicitly so that an iteration is num_envs x 50 steps
MODES = {"eager": [], "compile": ["--compile"], "compile+cudagraphs": ["--compile", "--cudagraphs"]}


class Row(NamedTuple):
    script: str
    num_envs: int
    expert: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.script[:-3]}-{self.num_envs}-{self.expert}-{self.mode}"


# every script first, so that a short budget still covers each once; compile and compile+cudagraphs of one
# configuration run back to back: the second finds the first's kernels in the inductor cache
ROWS = [Row("ppo.py", 1024, "zero", "eager"), Row("ppo_rgb.py", 256, "zero", "eager"),
        Row("ppo_rgb_fast.py", 256, "zero", "eager"),
        *(Row("ppo_fast.py", n, expert, mode) for n in (1024, 4096) for expert in ("zero", "ik") for mode in MODES)]


@dataclass
class Args:
    out: str = "bench/out/gpu.json"
    """where to write the JSON results (the subprocesses' output goes to gpu_logs/ beside it)"""
    rows: list[str] = field(default_factory=lambda: ["*"])
    """rows to run, by name or shell pattern (e.g. ppo_fast-1024-ik-compile, 'ppo_fast-4096-*')"""
    tests: bool = True
    """if toggled off (--no-tests), skip tests/test_gpu.py"""
    iterations: int = 4
    """training iterations per run (num_envs x 50 env steps each)"""
    num_eval_envs: int = 8
    """eval envs per run (each run evaluates at its first iteration and at the end)"""
    num_eval_steps: int = 10
    """env steps per evaluation"""
    run_timeout: float = 120.0
    """seconds a run may take before it is killed and recorded as timed out"""
    test_timeout: float = 300.0
    """seconds the tests may take before they are killed and recorded as failed"""
    budget: float = 460.0
    """seconds for the tests and all runs together: a run gets at most what is left, and is skipped when
    less than 30 s is left (so that `make gpu-check` ends within 8 minutes)"""


def memory_used_mb(gpu: str) -> Optional[int]:
    """memory.used of the GPU in MiB from nvidia-smi; None where nvidia-smi is missing or gives no number."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", gpu],
                              capture_output=True, text=True, timeout=10)
        return int(proc.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


class PeakMemory:
    """The maximum of memory_used_mb(gpu), polled about every 0.5 s in a background thread inside the with block."""

    def __init__(self, gpu: str):
        self.gpu, self.peak, self._stop = gpu, None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while True:
            used = memory_used_mb(self.gpu)
            if used is not None:
                self.peak = used if self.peak is None else max(self.peak, used)
            if self._stop.wait(0.5):
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in re.split(r"[\r\n]", f.read()) if line.strip()]  # \r: progress bars
    return lines[-1][:300] if lines else ""


def run_process(cmd: list[str], timeout: float, log: str) -> Optional[int]:
    """Run cmd in the repository root, its output to log.out and log.err: its exit code, None if it timed out."""
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        # no stdin: a prompt (ManiSkill asking to download an asset) fails at once instead of waiting;
        # a session of its own: a timeout or Ctrl-C here ends the compile workers it started too
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_tests(timeout: float, logs: str) -> dict:
    log = os.path.join(logs, "tests")
    start = time.time()
    code = run_process([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py"], timeout, log)
    with open(f"{log}.out", errors="replace") as out, open(f"{log}.err", errors="replace") as err:
        tail = (out.read().strip() or err.read().strip()).splitlines()[-10:]  # stderr only if pytest wrote nothing
    print("\n".join(["tests/test_gpu.py:", *tail]), flush=True)
    if code is None:
        print(f"tests/test_gpu.py timed out after {timeout:.0f} s", flush=True)
    return dict(passed=code == 0, exit_code=code, timed_out=code is None, summary=tail[-1] if tail else "",
                seconds=time.time() - start)


def command(row: Row, args: Args, output_dir: str) -> list[str]:
    return [sys.executable, row.script, "--env-id", "PickCube-v1", "--sim-backend", "gpu",
            "--num-envs", str(row.num_envs), "--expert-type", row.expert, "--num-steps", str(NUM_STEPS),
            "--total-timesteps", str(args.iterations * row.num_envs * NUM_STEPS), "--eval-freq", "1000000",
            "--num-eval-envs", str(args.num_eval_envs), "--num-eval-steps", str(args.num_eval_steps),
            "--no-capture-video", "--no-save-model", "--output-dir", output_dir, *MODES[row.mode]]


def run_row(row: Row, args: Args, timeout: float, gpu: Optional[str], logs: str) -> dict:
    result = dict(name=row.name, **row._asdict(), status="failed", steps_per_s=None, peak_gpu_mb=None,
                  peak_torch_mb=None, error=None)
    log = os.path.join(logs, re.sub(r"[^\w.-]", "_", row.name))
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as output_dir:
        cmd = command(row, args, output_dir)
        result["command"] = shlex.join(cmd[1:])
        print(f"[{time.strftime('%H:%M:%S')}] {row.name}: {result['command']}", flush=True)
        start, before = time.time(), memory_used_mb(gpu) if gpu else None
        with PeakMemory(gpu) if before is not None else nullcontext() as memory:
            code = run_process(cmd, timeout, log)
        result["wall_seconds"] = time.time() - start
        if memory is not None and memory.peak is not None:
            result["peak_gpu_mb"] = memory.peak - before
        summaries = glob.glob(os.path.join(output_dir, "*", "summary.json"))
        if code == 0 and len(summaries) == 1:
            with open(summaries[0]) as f:
                summary = json.load(f)
            seconds = summary.get("seconds")
            result.update(status="ok", steps_per_s=summary["train_sps"],
                          peak_torch_mb=summary.get("peak_gpu_memory_mb"),
                          compile_seconds=seconds.get("compile") if isinstance(seconds, dict) else None)
        else:
            result["status"] = "timed out" if code is None else "failed"
            result["error"] = last_line(f"{log}.err") or (f"exit code {code}, no summary.json" if code is not None
                                                         else f"killed after {timeout:.0f} s")
    return result


def print_table(rows: list[dict]) -> None:
    print(f"\n{'script':<17}{'envs':>6}  {'expert':<7}{'mode':<20}{'steps/s':>10}{'peak GPU MB':>13}"
          f"{'peak torch MB':>15}  status")
    for r in rows:
        cells = [f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("steps_per_s", "peak_gpu_mb", "peak_torch_mb")]
        print(f"{r['script']:<17}{r['num_envs']:>6}  {r['expert']:<7}{r['mode']:<20}{cells[0]:>10}{cells[1]:>13}"
              f"{cells[2]:>15}  {r['status']}")
    for r in rows:
        if r["error"]:
            print(f"{r['name']}: {r['error']}")
    print("peak GPU MB: the whole process, by nvidia-smi; peak torch MB: torch's allocator")


def main():
    args = tyro.cli(Args)
    unmatched = [p for p in args.rows if not any(fnmatch.fnmatchcase(row.name, p) for row in ROWS)]
    if unmatched:
        raise util.UsageError(f"--rows {' '.join(unmatched)} match no row; rows: {' '.join(r.name for r in ROWS)}")
    util.check_flags(("--iterations", args.iterations, ">= 1"), ("--num-eval-envs", args.num_eval_envs, ">= 1"),
                     ("--num-eval-steps", args.num_eval_steps, ">= 1"), ("--run-timeout", args.run_timeout, "> 0"),
                     ("--test-timeout", args.test_timeout, "> 0"), ("--budget", args.budget, "> 0"))
    util.check_writable(os.path.dirname(os.path.abspath(args.out)))
    with warnings.catch_warnings():  # a broken driver warns here; the line below says what matters
        warnings.simplefilter("ignore")
        cuda = torch.cuda.is_available()
    if not cuda:
        raise util.UsageError("bench/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is "
                              "False); nothing was run")
    rows = [row for row in ROWS if any(fnmatch.fnmatchcase(row.name, p) for p in args.rows)]
    deadline = time.monotonic() + args.budget
    logs = os.path.join(os.path.dirname(os.path.abspath(args.out)), "gpu_logs")
    os.makedirs(logs, exist_ok=True)

    # nvidia-smi names the GPU by its UUID, which holds whatever CUDA_VISIBLE_DEVICES and CUDA's device order are
    uuid = str(torch.cuda.get_device_properties(0).uuid)
    gpu = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    if memory_used_mb(gpu) is None:
        print(f"nvidia-smi is missing or gives no memory.used for {gpu}: reporting torch's peak only", flush=True)
        gpu = None
    results = dict(gpu=torch.cuda.get_device_name(0), **util.versions(), args=vars(args), tests=None, rows=[])

    def write():  # after every row, atomically, so that an interrupted check keeps the rows it finished
        util.save_json(args.out, results)

    if args.tests:
        results["tests"] = run_tests(max(1.0, min(args.test_timeout, deadline - time.monotonic())), logs)
        write()
    for row in rows:
        left = deadline - time.monotonic()
        if left < 30:
            results["rows"].append(dict(name=row.name, **row._asdict(), status="skipped", steps_per_s=None,
                                        peak_gpu_mb=None, peak_torch_mb=None,
                                        error=f"--budget of {args.budget:.0f} s spent; rerun with --rows {row.name}"))
        else:
            results["rows"].append(run_row(row, args, min(args.run_timeout, left), gpu, logs))
        write()

    print_table(results["rows"])
    print(f"{results['gpu']}, torch {results['torch']}, mani_skill {results['mani_skill']}")
    print(f"wrote {args.out}")
    failed = [r["name"] for r in results["rows"] if r["status"] in ("failed", "timed out")]
    if results["tests"] is not None and not results["tests"]["passed"]:
        failed.insert(0, "tests/test_gpu.py")
    if failed:
        raise util.FatalError(f"{len(failed)} failed: {' '.join(failed)}")


if __name__ == "__main__":
    util.run_cli(main)
