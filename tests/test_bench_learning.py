"""bench/learning.py's reading of a run's event log: its eval curve, and the time it spent running."""

import importlib.util
import os

import pytest
from torch.utils.tensorboard import SummaryWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def learning():
    spec = importlib.util.spec_from_file_location("learning_bench", os.path.join(ROOT, "bench", "learning.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_paused_and_resumed_run_counts_only_its_running_time(learning, tmp_path):
    """A run logs for 20 s, is paused 16 minutes, logs once more and is stopped; resumed from its checkpoint
    at step 200, it logs for 20 s. The resumed part replaces what the first part logged from step 200 on
    (the resumed writer's purge step), and the pause and the stop are left out: 10 + 10 + 10 s."""
    first = SummaryWriter(str(tmp_path), filename_suffix=".a")
    first.add_scalar("eval/success_once", 0.25, 0, walltime=1000.0)
    first.add_scalar("train/return", 1.0, 100, walltime=1010.0)
    first.add_scalar("train/return", 2.0, 200, walltime=1020.0)
    first.add_scalar("eval/success_once", 0.4, 200, walltime=1030.0)
    first.add_scalar("train/return", 3.0, 300, walltime=2000.0)  # after a 970 s pause
    first.close()
    resumed = SummaryWriter(str(tmp_path), purge_step=200, filename_suffix=".b")  # as util.RunOutput resumes
    resumed.add_scalar("eval/success_once", 0.5, 200, walltime=5000.0)
    resumed.add_scalar("train/return", 3.5, 300, walltime=5010.0)
    resumed.add_scalar("eval/success_once", 0.9, 400, walltime=5020.0)
    resumed.close()

    curve, running = learning.read_events(str(tmp_path))

    assert curve == [(0, 0.25), (200, 0.5), (400, pytest.approx(0.9))]
    assert running == pytest.approx(30.0)
