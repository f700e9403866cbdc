"""Data-parallel training under torchrun, on the CPU with gloo: two ranks train one policy."""

import glob
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY


def torchrun(script, args, cwd):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script", ["ppo.py", "ppo_fast.py"])
def test_two_ranks_keep_identical_weights_and_rank_0_alone_writes(script, tmp_path):
    # 2 ranks x 2 envs x 8 steps = 32 steps per iteration: 3 iterations, one eval and checkpoint at each; on the
    # CPU with gloo even where CUDA is visible (tests/test_gpu.py covers NCCL)
    proc = torchrun(script, [*TINY, "--total-timesteps", "96", "--no-capture-video", "--no-cuda", "--output-dir",
                             str(tmp_path / "runs")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "runs" / "*"))
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["world_size"] == 2 and summary["global_step"] == 96
    hashes = summary["parameter_hashes"]
    assert len(hashes) == 3 and all(rank0 == rank1 for rank0, rank1 in hashes), hashes
    assert len({rank0 for rank0, _ in hashes}) == 3, "every update changes the weights"

    # one writer: one event file, one final save, one eval line per evaluation, checkpoints of rank 0 only
    assert len(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))) == 1
    assert proc.stdout.count("saved ") == 1 and proc.stdout.count("eval @ 96 steps") == 1
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.pt"))) == \
        ["ckpt_1.pt", "ckpt_2.pt", "ckpt_3.pt", "final_ckpt.pt", "latest.pt"]


def test_evaluate_under_torchrun_is_refused(tmp_path):
    proc = torchrun("ppo_fast.py", [*TINY, "--no-cuda", "--evaluate", "--checkpoint", "x.pt", "--output-dir",
                                    str(tmp_path / "o")],
                    cwd=tmp_path)
    # each rank exits 2 with one line; torchrun then adds its own failure report, which names no script frame
    assert proc.returncode != 0 and proc.stderr.count("error: --evaluate runs in one process") == 2
    assert "ppo_fast.py\", line" not in proc.stderr
    assert not (tmp_path / "o").exists()
