"""bench/learning.py: reading a run's event log (its eval curve, and the time it spent running), when it
evaluates a final checkpoint, and the expert alone on the episodes of a run's evals; bench/outcome_sensitivity.py's
replay of those episodes; every bench's refusal of bad input."""

import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from conftest import load_file, run_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench(name):
    """bench/<name>.py as a module (bench/ is not a package)."""
    return load_file(f"bench/{name}.py")


@pytest.fixture(scope="module")
def learning():
    return load_bench("learning")


def test_a_paused_and_resumed_run_counts_only_its_running_time(learning, tmp_path):
    """A run logs for 20 s, is paused 16 minutes, logs once more and is stopped; resumed from its checkpoint
    at step 200, it logs once 10 s later and ends with an eval that takes 400 s. The resumed part replaces what
    the first part logged from step 200 on (the resumed writer's purge step), the pause and the stop are left
    out, and the long eval counts: 10 + 10 + 10 + 400 s."""
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
    resumed.add_scalar("eval/success_once", 0.9, 400, walltime=5420.0)
    resumed.close()

    curve, running = learning.read_events(str(tmp_path))

    assert curve == [(0, 0.25), (200, 0.5), (400, pytest.approx(0.9))]
    assert running == pytest.approx(430.0)


def test_a_stop_and_restart_shorter_than_the_longest_gap_is_not_running_time(learning, tmp_path):
    """Started at 990 s, a run logs to 1110 s and is stopped; resumed at 1300 s from its checkpoint at step 300, it
    logs at 1400 s and 1450 s. The 290 s gap spans the restart, so only 10 + 100 + 50 s ran; without the launch
    times it would count as running, being under LONGEST_GAP."""
    first = SummaryWriter(str(tmp_path), filename_suffix=".a")
    first.add_scalar("eval/success_once", 0.25, 0, walltime=1000.0)
    first.add_scalar("train/return", 1.0, 100, walltime=1010.0)
    first.add_scalar("eval/success_once", 0.4, 200, walltime=1110.0)
    first.close()
    resumed = SummaryWriter(str(tmp_path), purge_step=300, filename_suffix=".b")
    resumed.add_scalar("train/return", 2.0, 300, walltime=1400.0)
    resumed.add_scalar("eval/success_once", 0.6, 400, walltime=1450.0)
    resumed.close()

    assert learning.read_events(str(tmp_path), launches=(990.0, 1300.0))[1] == pytest.approx(160.0)
    assert learning.read_events(str(tmp_path))[1] == pytest.approx(450.0)


def test_a_reused_run_reads_its_running_time_again_with_its_launches(learning, tmp_path):
    """A run recorded before its launches were: reused, its record's running time is read again from its event log,
    now leaving out the 290 s gap that spans its restart (the log of the test above: 10 + 100 + 50 s)."""
    committed = os.path.join(ROOT, "docs", "learning-PegInsertionSide-v1.json")
    with open(committed) as f:
        made_with = json.load(f)["args"]  # the eval settings are part of each recorded run's command
    args = learning.Args(task="PegInsertionSide-v1", out=str(tmp_path / "out"), train=False,
                         num_eval_envs=made_with["num_eval_envs"], eval_freq=made_with.get("eval_freq"),
                         total_timesteps=made_with["total_timesteps"])
    assert "zero:1" in learning.reuse_recorded(committed, args)
    run_dir = tmp_path / "run"
    first = SummaryWriter(str(run_dir), filename_suffix=".a")
    for value, step, walltime in ((0.25, 0, 1000.0), (0.3, 100, 1010.0), (0.4, 200, 1110.0)):
        first.add_scalar("eval/success_once", value, step, walltime=walltime)
    first.close()
    resumed = SummaryWriter(str(run_dir), purge_step=300, filename_suffix=".b")
    resumed.add_scalar("eval/success_once", 0.6, 300, walltime=1400.0)
    resumed.add_scalar("eval/success_once", 0.7, 400, walltime=1450.0)
    resumed.close()
    logs = tmp_path / "out" / "logs"
    record = json.loads((logs / "zero_s1.json").read_text())
    # a figure the log does not give: whichever the bench reports was read again
    (logs / "zero_s1.json").write_text(json.dumps(dict(record, run_dir=str(run_dir), running_seconds=999.0)))
    started = dict(command=record["command"], run_dir=str(run_dir))
    task = learning.TASKS["PegInsertionSide-v1"]

    (logs / "zero_s1.started.json").write_text(json.dumps(started))  # no launches recorded: the 15-minute rule
    assert learning.train("zero", 1, task, args)["running_seconds"] == pytest.approx(450.0)
    (logs / "zero_s1.started.json").write_text(json.dumps(dict(started, launches=[990.0, 1300.0])))
    reused = learning.train("zero", 1, task, args)
    assert reused["running_seconds"] == pytest.approx(160.0)
    assert reused["success_once"] == record["success_once"]  # the rest is the record's


def test_a_final_evaluation_is_made_once_and_never_while_only_reporting(learning, tmp_path):
    """A recorded final evaluation at the requested episode count is reused as it stands; under --no-train a
    run without one gets none (None), and nothing is started: its run directory does not even exist."""
    made = dict(requested_episodes=320, episodes=320, success_once=0.9, success_at_end=0.8, command="")
    record = dict(config="weak_ik", seed=1, command="ppo.py --output-dir runs --exp-name weak_ik_s1",
                  run_dir=str(tmp_path / "missing"), final_eval=made)
    args = learning.Args(task="PickCube-v1", out=str(tmp_path), final_episodes=320)
    assert learning.final_eval(record, args) is made

    report_only = learning.Args(task="PickCube-v1", out=str(tmp_path), final_episodes=64, train=False)
    assert learning.final_eval(record, report_only) is None  # recorded for 320 episodes, not 64
    assert learning.final_eval(dict(record, final_eval=None), report_only) is None
    assert not os.path.exists(tmp_path / "final_eval")


def test_a_final_evaluation_needs_the_runs_final_checkpoint(learning, tmp_path):
    record = dict(config="ik", seed=2, command="ppo.py --output-dir runs --exp-name ik_s2", run_dir=str(tmp_path))
    with pytest.raises(learning.util.FatalError, match=r"ik seed 2: no .*final_ckpt.pt to evaluate"):
        learning.final_eval(record, learning.Args(task="PickCube-v1", out=str(tmp_path)))


def test_a_run_stopped_by_a_signal_is_not_taken_as_finished(learning, tmp_path):
    # ppo.py stopped by SIGINT exits 0, by SIGTERM 143, having saved its last iteration but no final checkpoint;
    # killed by SIGKILL, Popen gives -9
    for code in (0, 143):
        with pytest.raises(learning.util.FatalError, match=rf"ik_s1 was stopped before its end \(exit code {code}\); "
                                                           r"the same command resumes it"):
            learning.check_finished(code, str(tmp_path), "ik_s1", "ik_s1.log")
    with pytest.raises(learning.util.FatalError, match=r"ik_s1 failed \(exit code 1\); see ik_s1.log"):
        learning.check_finished(1, str(tmp_path), "ik_s1", "ik_s1.log")
    with pytest.raises(learning.util.FatalError, match=r"ik_s1 was killed by signal 9 before its end; the same "
                                                       r"command resumes it"):
        learning.check_finished(-9, str(tmp_path), "ik_s1", "ik_s1.log")
    (tmp_path / "final_ckpt.pt").write_bytes(b"")
    for code in (0, 143):  # a stop that came after the final checkpoint was written
        learning.check_finished(code, str(tmp_path), "ik_s1", "ik_s1.log")
    with pytest.raises(learning.util.FatalError, match=r"ik_s1 failed \(exit code 1\)"):
        learning.check_finished(1, str(tmp_path), "ik_s1", "ik_s1.log")


def test_the_expert_alone_is_measured_on_the_episodes_of_each_eval_of_a_run(learning, tmp_path):
    """With its residual scaled to nothing a run executes its expert alone, so each of its evals is the expert's
    on that eval's episodes. Rebuilding the run's eval envs for its seed, the bench must find every eval's
    return again; the three evals' returns differ, so a bench that measured other episodes would not."""
    flags = "--expert-type ik --ik-gain 0.28"
    proc = run_main("ppo.py", ["--sim-backend", "cpu", "--env-id", "PickCube-v1", "--control-mode", "pd_ee_delta_pos",
                               "--seed", "3", "--num-envs", "2", "--num-eval-envs", "2", "--num-steps", "8",
                               "--num-minibatches", "2", "--total-timesteps", "32", "--eval-freq", "1",
                               "--no-capture-video", "--output-dir", str(tmp_path / "runs"), "--residual-scale", "0",
                               *flags.split()], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    run_returns = [e.value for e in events.Scalars("eval/return")]
    assert len(run_returns) == 3 and len(set(run_returns)) == 3  # after iterations 1 and 2, and at the end

    (tmp_path / "logs").mkdir()
    task = dict(control_mode="pd_ee_delta_pos", configs=dict(weak=flags))
    args = learning.Args(task="PickCube-v1", out=str(tmp_path), num_eval_envs=2)
    metrics = learning.expert_on_eval_episodes("weak", 3, 3, task, args)

    assert [m["return"] for m in metrics] == pytest.approx(run_returns, rel=1e-5)
    assert [m["episodes"] for m in metrics] == [2, 2, 2]


def test_the_outcome_sensitivity_bench_replays_the_same_episodes_and_applies_its_residual(learning, tmp_path):
    """bench/outcome_sensitivity.py pairs episode by episode with the expert alone on ppo.py's eval episodes:
    its zero residual must give, eval by eval, the returns bench/learning.py's replay finds there (those match
    a run's own evals, above), and a residual of 0.5 must change them."""
    out = tmp_path / "sensitivity.json"
    proc = run_main("bench/outcome_sensitivity.py", ["--task", "PickCube-v1", "--control-mode", "pd_ee_delta_pos",
                                                     "--seed", "3", "--num-eval-envs", "2", "--evals", "3",
                                                     "--residuals", "0.0", "0.5", "--out", str(out)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    replays = json.load(open(out))["replays"]

    (tmp_path / "logs").mkdir()
    task = dict(control_mode="pd_ee_delta_pos", configs=dict(ik="--expert-type ik"))
    args = learning.Args(task="PickCube-v1", out=str(tmp_path), num_eval_envs=2)
    want = [m["return"] for m in learning.expert_on_eval_episodes("ik", 3, 3, task, args)]
    assert len(set(want)) == 3, "the evals differ, so a replay of other episodes would not match"
    assert [sum(r) / 2 for r in replays["0.0"]["returns"]] == pytest.approx(want, rel=1e-5)
    assert [sum(r) / 2 for r in replays["0.5"]["returns"]] != pytest.approx(want, rel=1e-3)
    assert all(len(e) == 2 for e in replays["0.5"]["outcomes"])


@pytest.mark.parametrize("name", ["learning-PegInsertionSide-v1", "learning-PegInsertionSide-v1-eval128",
                                  "learning-PegInsertionSide-v1-eval128-half-scale", "adaptive-PegInsertionSide-v1"])
def test_a_fresh_clone_reports_the_committed_runs_again_from_their_json(name, tmp_path):
    """The committed outputs were written from the bench's own records; an --out without them (a fresh clone),
    given the committed learning.json, must write the same CSV and reach the same targets, without
    training or evaluating a checkpoint."""
    committed = os.path.join(ROOT, "docs", f"{name}.json")
    with open(committed) as f:
        earlier = json.load(f)
    made_with = earlier["args"]  # the eval settings are part of each recorded run's command
    eval_flags = ["--num-eval-envs", str(made_with["num_eval_envs"])]
    eval_flags += ["--eval-freq", str(made_with["eval_freq"])] if made_with.get("eval_freq") else []
    proc = run_main("bench/learning.py", ["--task", earlier["env_id"], "--runs", *made_with["runs"], *eval_flags,
                                          "--no-train", "--reuse-from", committed, "--out", str(tmp_path)], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "learning.csv") as f, open(os.path.join(ROOT, "docs", f"{name}.csv")) as g:
        assert f.read() == g.read()
    with open(tmp_path / "learning.json") as f:
        assert json.load(f)["targets"] == earlier["targets"]
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "final_eval")


def test_an_out_folders_own_records_are_kept_over_an_earlier_json(learning, tmp_path):
    committed = os.path.join(ROOT, "docs", "learning-PegInsertionSide-v1.json")
    (tmp_path / "logs").mkdir()
    own = tmp_path / "logs" / "ik_s1.json"
    own.write_text('{"mine": true}')
    args = learning.Args(task="PegInsertionSide-v1", out=str(tmp_path))
    taken = learning.reuse_recorded(committed, args)
    assert "ik:1" not in taken and "ik:2" in taken
    assert json.loads(own.read_text()) == {"mine": True}
    with open(tmp_path / "logs" / "expert_alone_weak_ik_200ep.json") as f:
        assert json.load(f) == dict(gain=1.0, calibration_mm=3.0, episodes=200, success_once=0.25)


def test_a_recorded_run_is_reused_only_for_the_same_training(learning):
    recorded = "ppo.py --seed 1 --output-dir /elsewhere/runs --gamma 0.97"
    assert learning._same_training(recorded, "ppo.py --seed 1 --output-dir bench/out/runs --gamma 0.97")
    assert not learning._same_training(recorded, "ppo.py --seed 2 --output-dir /elsewhere/runs --gamma 0.97")
    assert not learning._same_training(recorded, "ppo.py --seed 1 --output-dir /elsewhere/runs --gamma 0.8")


@pytest.mark.parametrize("bench", ["learning.py", "experts.py", "throughput.py", "outcome_sensitivity.py", "gpu.py"])
def test_every_bench_refuses_an_output_path_it_cannot_write_before_it_runs(bench, tmp_path):
    """A bench that found out only when it wrote its results would lose hours of measurements."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    out = a_file / "results" / "out.json"
    parent = out if bench == "learning.py" else out.parent  # learning.py's --out is a directory, the others' a file
    proc = run_main(f"bench/{bench}", ["--out", str(out)], cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: output directory '{parent}' is not writable (checked '{a_file}': Not a directory)"]


def gpu_rows():
    return load_bench("gpu").ROWS


BENCH_BAD_INPUT = [
    ("experts.py", ["--tasks", "TurnFaucet-v1"], "the IK expert has no plan for TurnFaucet-v1; supported: PickCube-v1, "
     "StackCube-v1, PushCube-v1, PullCube-v1, PegInsertionSide-v1, LiftPegUpright-v1, PokeCube-v1, PlugCharger-v1"),
    ("experts.py", ["--tasks", "PickCube-v1", "--control-modes", "pd_ee_pose"], "the IK expert cannot act on "
     "PickCube-v1 in control mode pd_ee_pose; supported: pd_ee_delta_pos, pd_ee_delta_pose, pd_joint_delta_pos"),
    ("experts.py", ["--episodes", "0"], "--episodes must be >= 1, got 0"),
    ("throughput.py", ["--steps", "-1"], "--steps must be >= 1, got -1"),
    ("throughput.py", ["--sections", "train", "--num-envs", "3"], "the training runs need an even --num-envs (two "
     "ranks share them) and --train-timesteps >= one batch of --num-envs x 50; got 3 and 24000"),
    ("throughput.py", ["--sections", "train", "--train-timesteps", "100"], "the training runs need an even --num-envs "
     "(two ranks share them) and --train-timesteps >= one batch of --num-envs x 50; got 8 and 100"),
    ("throughput.py", ["--sections", "rgb", "--rgb-train-timesteps", "100"], "--rgb-train-timesteps must be >= one "
     "batch of --rgb-num-envs x 50; got 100"),
    ("throughput.py", ["--control-mode", "pd_foo"], "cannot create PickCube-v1: pd_foo not in supported modes: "
     "['pd_joint_delta_pos', 'pd_joint_pos', 'pd_ee_delta_pos', 'pd_ee_delta_pose', 'pd_ee_pose', "
     "'pd_joint_target_delta_pos', 'pd_ee_target_delta_pos', 'pd_ee_target_delta_pose', 'pd_joint_vel', "
     "'pd_joint_pos_vel', 'pd_joint_delta_pos_vel']"),
    ("throughput.py", ["--env-id", "CartPole-v1"], "env id 'CartPole-v1' is not a ManiSkill task: did you mean "
     "MS-CartpoleSwingUp-v1, MS-CartpoleBalance-v1, PlugCharger-v1?"),
    ("learning.py", ["--total-timesteps", "-5"], "--total-timesteps must be >= 1, got -5"),
    ("learning.py", ["--num-eval-envs", "0"], "--num-eval-envs must be >= 1, got 0"),
    ("learning.py", ["--eval-freq", "0"], "--eval-freq must be >= 1, got 0"),
    ("learning.py", ["--final-episodes", "-5"], "--final-episodes must be >= 0, got -5"),
    ("outcome_sensitivity.py", ["--residuals", "0", "1.5"], "--residuals must be in [-1, 1], got 1.5"),
    ("outcome_sensitivity.py", ["--residuals", "0.5"], "--residuals must include 0, the expert alone every "
     "other size is paired with"),
    ("outcome_sensitivity.py", ["--residual-scale", "nan"], "--residual-scale must be >= 0, got nan"),
    ("outcome_sensitivity.py", ["--task", "LiftPegUpright-v1", "--control-mode", "pd_joint_delta_pos"],
     "the IK expert cannot act on LiftPegUpright-v1 in control mode pd_joint_delta_pos; supported: pd_ee_delta_pose"),
    ("gpu.py", ["--iterations", "0"], "--iterations must be >= 1, got 0"),
    ("gpu.py", ["--budget", "nan"], "--budget must be > 0, got nan"),
    ("gpu.py", ["--rows", "ppo-*", "tpu*"], "--rows tpu* match no row; rows: " + " ".join(r.name for r in gpu_rows())),
]


def test_the_outcome_sensitivity_bench_refuses_an_out_file_that_is_not_its_json(tmp_path):
    for text in ("not json", "[1, 2]", '{"replays": {}}'):
        out = tmp_path / "results.json"
        out.write_text(text)
        proc = run_main("bench/outcome_sensitivity.py", ["--out", str(out)], cwd=ROOT)
        assert proc.returncode == 2, (text, proc.stderr[-2000:])
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: --out {out} exists and is not this bench's JSON (") and line.endswith(
            "); give another path, or remove it"), line
        assert out.read_text() == text  # left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without CUDA")
def test_the_gpu_check_refuses_a_machine_without_cuda_in_one_line(tmp_path):
    proc = run_main("bench/gpu.py", ["--out", str(tmp_path / "out" / "gpu.json")], cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: bench/gpu.py needs a CUDA GPU and none is visible "
                                                "(torch.cuda.is_available() is False); nothing was run"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bench, extra, message", BENCH_BAD_INPUT)
def test_benches_refuse_bad_input_in_one_line_before_they_run(bench, extra, message, tmp_path):
    out = tmp_path / "out" / "out.json"
    proc = run_main(f"bench/{bench}", [*extra, "--out", str(out)], cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "out").exists()


def test_an_unusable_earlier_json_is_refused_in_one_line(learning, tmp_path):
    out = tmp_path / "out"
    proc = run_main("bench/learning.py", ["--task", "PegInsertionSide-v1", "--no-train", "--reuse-from",
                                          str(tmp_path / "missing.json"), "--out", str(out)], cwd=ROOT)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --reuse-from: {tmp_path / 'missing.json'} is not a learning.json")
    assert not out.exists()  # refused before anything is written
    # readable JSON that lacks a part the bench writes: refused before any record is written
    committed = json.load(open(os.path.join(ROOT, "docs", "learning-PegInsertionSide-v1.json")))
    for broken in ({k: v for k, v in committed.items() if k != "expert_alone"},
                   dict(committed, runs=[{k: v for k, v in committed["runs"][0].items() if k != "seed"}]),
                   dict(committed, args={k: v for k, v in committed["args"].items() if k != "num_eval_envs"})):
        path = tmp_path / "broken.json"
        path.write_text(json.dumps(broken))
        proc = run_main("bench/learning.py", ["--task", "PegInsertionSide-v1", "--no-train", "--reuse-from",
                                              str(path), "--out", str(out)], cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: --reuse-from: {path} is not a learning.json written by this bench (KeyError")
        assert not out.exists()
    other_task = learning.Args(task="PickCube-v1", out=str(tmp_path))
    with pytest.raises(learning.util.UsageError, match="holds runs of PegInsertionSide-v1, not of --task PickCube-v1"):
        learning.reuse_recorded(os.path.join(ROOT, "docs", "learning-PegInsertionSide-v1.json"), other_task)
