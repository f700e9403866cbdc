import glob
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# a ppo.py run small enough for CI: 2 CPU envs, 2 iterations of 8 steps, an eval (and video) every iteration, eval
# envs that keep their scene (rebuilding it at every reset is slow on the CPU)
TINY = ["--sim-backend", "cpu", "--num-envs", "2", "--num-eval-envs", "1", "--num-steps", "8",
        "--num-minibatches", "2", "--total-timesteps", "32", "--eval-freq", "1", "--eval-reconfiguration-freq", "0"]


# the session-scoped training runs below; under pytest-xdist (`make test` runs three workers) each one's users share a
# worker, so that no run is trained twice. The marks must be in place before xdist's own hook reads them.
SHARED_RUNS = ("trained", "ik_run")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        for name in SHARED_RUNS:
            if name in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(name))
                break


def run_script(script, args, cwd, timeout=600):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def tiny_run(script, out, *extra):
    """Train `script` with TINY (and `extra` flags) into `out`: (run directory, finished process). In this process
    (run_main), except with --compile: the graphs it compiles would stay in this process for the tests after it."""
    run = run_script if "--compile" in extra else run_main
    proc = run(script, [*TINY, "--output-dir", str(out), *extra], cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(out / f"PickCube-v1__{script[:-3]}__1__*"))
    return run_dir, proc


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny ppo.py training run shared by the tests: (run directory, finished process)."""
    return tiny_run("ppo.py", tmp_path_factory.mktemp("runs"))


# the IK-expert runs, one per script, each with the flags its tests need besides the expert at scale 0.2
IK_RUN_FLAGS = {
    "ppo.py": ["--keep-checkpoints", "1", "--no-capture-video"],
    "ppo_rgb.py": ["--critic-warmup-iters", "2", "--total-timesteps", "48"],  # 3 iterations, with videos
    "ppo_fast.py": ["--compile", "--cudagraphs", "--verbose", "--no-capture-video"],
    "ppo_rgb_fast.py": ["--compile", "--no-capture-video"],
}
SMALL_CAMERA = ["--camera-width", "36", "--camera-height", "36"]


@pytest.fixture(scope="session")
def ik_run(tmp_path_factory):
    """ik_run(script): on first use, a tiny run of `script` over the IK expert at residual scale 0.2, with
    IK_RUN_FLAGS[script] (image scripts with 36x36 cameras): (run directory, finished process)."""
    runs = {}

    def run(script):
        if script not in runs:
            camera = SMALL_CAMERA if "rgb" in script else []
            runs[script] = tiny_run(script, tmp_path_factory.mktemp(script[:-3]), "--expert-type", "ik",
                                    "--residual-scale", "0.2", *IK_RUN_FLAGS[script], *camera)
        return runs[script]

    return run


def with_head(path, out, bias):
    """A copy of checkpoint ``path`` whose policy mean is ``bias`` everywhere: the last actor layer's weights zero
    and its bias ``bias``."""
    payload = torch.load(path, weights_only=True)
    last = max((k for k in payload["model"] if k.startswith("actor_mean.") and k.endswith(".weight")),
               key=lambda k: int(k.split(".")[1]))
    payload["model"][last].zero_()
    payload["model"][last.replace("weight", "bias")].copy_(torch.as_tensor(bias))
    torch.save(payload, out)
    return str(out)


def load_file(path):
    """The module in `path` under the repository, for files not importable by name, such as bench/learning.py."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script, args, cwd):
    """Run `script`'s command line (a path under the repository) in this process, as `python script args` would run
    it (util.run_cli, exit code included). It saves what a new interpreter costs every run: importing torch and
    ManiSkill, and starting the CPU backend's fork server, which stays up for the runs after. What a run changes in
    the process is put back: the working directory, argv, the signal handlers, torch's thread count and the
    distributions' argument checks. Runs that are signalled or killed need a process of their own (run_script).
    Returns a CompletedProcess."""
    import contextlib
    import importlib
    import io
    import signal
    import traceback

    import util

    module = load_file(script) if os.sep in script else importlib.import_module(script[:-3])
    out, err = io.StringIO(), io.StringIO()
    argv, here, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    validate_args = torch.distributions.Distribution._validate_args
    sys.argv = [script, *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                util.run_cli(module.main)
                code = 0
            except SystemExit as exit:
                code = 0 if exit.code is None else exit.code if isinstance(exit.code, int) else 1
            except Exception:
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(here)
        torch.set_num_threads(threads)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.distributions.Distribution.set_default_validate_args(validate_args)
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


class RecordingEnv:
    """Forwards to a real backend and records the actions it is asked to execute."""

    def __init__(self, env):
        self.env, self.executed = env, []

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        self.executed.append(action.clone())
        return self.env.step(action)


def pick_cube_state(tcp, cube, grasped, finger=0.04):
    """PickCube-v1's state_dict, written by hand, one env per entry: the TCP and the cube (identity rotations)."""
    n = len(tcp)
    identity = torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(n, 1)
    qpos = torch.zeros(n, 9)
    qpos[:, 7:] = finger
    return dict(agent=dict(qpos=qpos, qvel=torch.zeros(n, 9)),
                extra=dict(is_grasped=torch.tensor(grasped), tcp_pose=torch.cat([torch.tensor(tcp), identity], 1),
                           goal_pos=torch.tensor([[0.0, 0.0, 0.3]]).repeat(n, 1),
                           obj_pose=torch.cat([torch.tensor(cube), identity], 1)))
