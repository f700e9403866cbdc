import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a ppo.py run small enough for CI: 2 CPU envs, 2 iterations of 8 steps, an eval (and video) every iteration, eval
# envs that keep their scene (rebuilding it at every reset costs a CPU run more than a second)
TINY = ["--sim-backend", "cpu", "--num-envs", "2", "--num-eval-envs", "1", "--num-steps", "8",
        "--num-minibatches", "2", "--total-timesteps", "32", "--eval-freq", "1", "--eval-reconfiguration-freq", "0"]


def run_script(script, args, cwd, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def tiny_run(script, out, *extra):
    """Train `script` with TINY (and `extra` flags) into `out`: (run directory, finished process)."""
    proc = run_script(script, [*TINY, "--output-dir", str(out), *extra], cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(out / f"PickCube-v1__{script[:-3]}__1__*"))
    return run_dir, proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny ppo.py training run shared by the tests: (run directory, finished process)."""
    return tiny_run("ppo.py", tmp_path_factory.mktemp("runs"))
