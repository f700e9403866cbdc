"""ppo.py end to end on the CPU backend: train, checkpoint, tensorboard, video, --evaluate, bad input; and its
rollout policy step."""

import glob
import importlib
import importlib.util
import json
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ppo
import util
from conftest import TINY, run_main


def run(args, cwd):
    """ppo.py's command line on inputs it refuses before training (in this process: see conftest.run_main)."""
    return run_main("ppo.py", args, cwd)


def test_act_is_get_action_and_value_bit_for_bit():
    """The rollout samples with Agent.act and the update rescores with get_action_and_value. Under one seed they
    give the same action, log-probability and value to the last bit, so the first update's ratios are exactly 1."""
    torch.manual_seed(0)
    agent = ppo.Agent(obs_dim=20, action_dim=4)
    with torch.no_grad():
        agent.actor_logstd.copy_(torch.tensor([[-1.3, -0.5, 0.0, 0.4]]))  # a different std per dimension
    obs = torch.randn(64, 20)
    with torch.no_grad():
        torch.manual_seed(1)
        action, logprob, _, value = agent.get_action_and_value(obs)
        torch.manual_seed(1)
        lean = agent.act(obs)
    for name, got, want in zip(("action", "logprob", "value"), lean, (action, logprob, value)):
        assert torch.equal(got, want), name
    assert action.std(0).argsort().tolist() == [0, 1, 2, 3]  # the per-dimension stds are applied


def test_training_writes_checkpoint_events_and_video(trained):
    run_dir, proc = trained
    assert "eval @ 32 steps: success_once=" in proc.stdout
    assert glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    # 2 iterations of 2 envs x 8 steps, an eval at the start of each and one at the end
    videos = sorted(glob.glob(os.path.join(run_dir, "videos", "*.mp4")))
    assert [os.path.basename(v) for v in videos] == ["eval_0.mp4", "eval_16.mp4", "eval_32.mp4"]
    assert all(os.path.getsize(v) > 1000 for v in videos)
    events = EventAccumulator(run_dir)
    events.Reload()
    assert [e.step for e in events.Scalars("eval/success_once")] == [0, 16, 32]
    assert [e.step for e in events.Scalars("losses/value_loss")] == [16, 32]
    assert not glob.glob(os.path.join(run_dir, "*.tmp*")), "atomic save leaves no temporary files"
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["global_step"] == 32 and "success_once" in summary["eval"]

    ckpt = torch.load(os.path.join(run_dir, "final_ckpt.pt"), map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    assert meta["env_id"] == "PickCube-v1" and meta["control_mode"] == "pd_joint_delta_pos"
    assert (meta["obs_dim"], meta["action_dim"]) == (50, 8)
    assert meta["network"] == "mlp-state" and meta["args"]["num_envs"] == 2
    assert meta["versions"]["torch"] == torch.__version__ and set(meta["versions"]) == {"torch", "mani_skill", "python"}
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert ckpt["model"]["actor_mean.6.weight"].shape == (8, 256)


BAD_INPUTS = [
    (["--num-envs", "0"], "--num-envs must be >= 1, got 0"),
    (["--total-timesteps", "8"], "less than one batch"),
    (["--num-minibatches", "3"], "does not divide"),
    (["--residual-scale", "-0.5"], "--residual-scale must be >= 0, got -0.5"),
    (["--control-mode", "pd_foo"], "pd_foo not in supported modes"),
    (["--expert-type", "ik", "--control-mode", "pd_joint_pos"], "cannot act on PickCube-v1 in control mode pd_joint_pos"),
    (["--expert-type", "model"], "needs --model-path"),
    (["--expert-type", "model", "--model-path", "nowhere.pt"], "does not exist"),
    (["--expert-type", "custom", "--expert-fn", "nowhere.py:act"], "no file 'nowhere.py'"),
    (["--expert-type", "ik,oracle"], "unknown expert type 'oracle'"),
    (["--fusion", "learned"], "give at least two"),
    (["--residual-scale-schedule", "linear"], "needs --residual-scale-final"),
    (["--expert-type", "model", "--model-path", "."], "is a directory"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be >= 0"),
    (["--eval-reconfiguration-freq", "-1"], "--eval-reconfiguration-freq must be >= 0"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_2(extra, message, tmp_path):
    out = tmp_path / "runs"
    proc = run([*TINY, "--output-dir", str(out), *extra], cwd=tmp_path)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip() and "WARNING" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists(), "bad input must not write anything"


def test_corrupt_and_foreign_checkpoints_are_refused(trained, tmp_path):
    run_dir, _ = trained
    good = open(os.path.join(run_dir, "final_ckpt.pt"), "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    other_env = tmp_path / "other_env.pt"
    ckpt = torch.load(os.path.join(run_dir, "final_ckpt.pt"), weights_only=True)
    ckpt["meta"]["env_id"] = "PushCube-v1"
    torch.save(ckpt, other_env)
    for path, message in [(truncated, "cannot be loaded"), (foreign, "not a checkpoint"),
                          (other_env, "env_id=PushCube-v1")]:
        proc = run([*TINY, "--evaluate", "--checkpoint", str(path), "--output-dir", str(tmp_path / "runs")],
                   cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_checkpoint_and_output_misuse_is_refused(trained, tmp_path):
    """--model-path and --resume with checkpoints that do not fit, and an output directory that cannot exist."""
    run_dir, _ = trained
    good = os.path.join(run_dir, "final_ckpt.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    other_obs_dim = tmp_path / "other_obs_dim.pt"  # a consistent checkpoint for a 51-dim observation
    from ppo import Agent
    ckpt = torch.load(good, weights_only=True)
    ckpt["model"], ckpt["meta"]["obs_dim"] = Agent(51, 8).state_dict(), 51
    torch.save(ckpt, other_obs_dim)
    model_only = tmp_path / "model_only" / "model_only.pt"
    model_only.parent.mkdir()
    torch.save(dict(model=ckpt["model"], meta=ckpt["meta"]), model_only)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    model = ["--expert-type", "model", "--model-path"]
    cases = [
        ([*model, str(text)], "cannot be loaded"),
        ([*model, str(foreign)], "has an unknown layout (keys weights"),
        ([*model, str(other_obs_dim)], "trained on observations {'obs_dim': 51} but PickCube-v1 gives {'obs_dim': 50}"),
        (["--resume", "--checkpoint", str(model_only)], "holds no resume state"),
        (["--resume", "--checkpoint", good, "--env-id", "PushCube-v1"], "env_id=PickCube-v1"),
        (["--resume", "--checkpoint", good, "--num-envs", "4"], "keeps the run's batch layout"),
        (["--resume", "--checkpoint", good, "--evaluate"], "exclude each other"),
        (["--resume", "--checkpoint", good], "give a larger --total-timesteps"),
        (["--output-dir", str(a_file / "runs")], "is not writable (checked '%s': Not a directory)" % a_file),
        # root passes os.access everywhere; nothing can be made under /proc
        (["--output-dir", "/proc/runs"], "output directory '/proc/runs' is not writable (checked '/proc':"),
    ]
    before = sorted(os.listdir(run_dir))
    for extra, message in cases:
        out = tmp_path / "out"
        proc = run([*TINY, "--output-dir", str(out), *extra], cwd=tmp_path)
        lines = [l for l in proc.stderr.replace("\r", "\n").splitlines() if l.strip() and "WARNING" not in l]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (extra, proc.stderr[-2000:])
        assert not out.exists(), "bad input must not write anything"
    assert sorted(os.listdir(run_dir)) == before, "a refused resume must not touch the run"


# every numeric flag of every script: a finite number in its range
BAD_NUMBERS = [
    (["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0"),
    (["--gamma", "2"], "--gamma must be in (0, 1], got 2.0"),
    (["--gamma", "0"], "--gamma must be in (0, 1], got 0.0"),
    (["--gae-lambda", "1.5"], "--gae-lambda must be in [0, 1], got 1.5"),
    (["--residual-scale", "nan"], "--residual-scale must be >= 0, got nan"),
    (["--residual-scale-min", "-0.1"], "--residual-scale-min must be >= 0, got -0.1"),
    (["--residual-scale-mode", "adaptive", "--residual-scale", "0.5", "--residual-scale-min", "0.6"],
     "--residual-scale-min must be between 0 and --residual-scale (0.5), got 0.6"),
    (["--residual-scale-schedule", "linear", "--residual-scale-final", "0.1", "--residual-scale-min", "0.2"],
     "--residual-scale-min must be between 0 and --residual-scale (0.1), got 0.2"),
    (["--residual-scale-mode", "sometimes"], "--residual-scale-mode must be one of constant, adaptive, not 'sometimes'"),
    (["--ik-calibration-mm", "-1"], "--ik-calibration-mm must be >= 0, got -1.0"),
    (["--ik-calibration-deg", "nan"], "--ik-calibration-deg must be >= 0, got nan"),
    (["--ik-calibration-seed", "-1"], "--ik-calibration-seed must be in [0, 2147483647], got -1"),
    (["--residual-scale", "inf"], "--residual-scale must be >= 0, got inf"),
    (["--init-logstd", "-inf"], "--init-logstd must be finite, got -inf"),
    (["--clip-coef", "0"], "--clip-coef must be > 0, got 0.0"),
    (["--ent-coef", "-0.01"], "--ent-coef must be >= 0, got -0.01"),
    (["--vf-coef", "nan"], "--vf-coef must be >= 0, got nan"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be > 0, got 0.0"),
    (["--target-kl", "0"], "--target-kl must be > 0, got 0.0"),
    (["--reward-scale", "-1"], "--reward-scale must be > 0, got -1.0"),
    (["--expert-action-noise", "-0.1"], "--expert-action-noise must be >= 0, got -0.1"),
    (["--ik-gain", "0"], "--ik-gain must be > 0, got 0.0"),
    (["--residual-scale-schedule", "linear", "--residual-scale-final", "-1"],
     "--residual-scale-final must be >= 0, got -1.0"),
    (["--residual-scale-schedule", "cosine"], "--residual-scale-schedule must be one of constant, linear, not 'cosine'"),
    (["--num-eval-steps", "0"], "--num-eval-steps must be >= 1, got 0"),
    (["--num-eval-envs", "0"], "--num-eval-envs must be >= 1, got 0"),
    (["--num-steps", "0"], "--num-steps must be >= 1, got 0"),
    (["--num-minibatches", "0"], "--num-minibatches must be >= 1, got 0"),
    (["--eval-freq", "0"], "--eval-freq must be >= 1, got 0"),
    (["--residual-scale-final", "0.5"], "--residual-scale-final needs --residual-scale-schedule linear"),
    (["--update-epochs", "0"], "--update-epochs must be >= 1, got 0"),
    (["--residual-warmup-steps", "-5"], "--residual-warmup-steps must be >= 0, got -5"),
    (["--critic-warmup-iters", "-1"], "--critic-warmup-iters must be >= 0, got -1"),
    (["--seed", "-1"], "--seed must be in [0, 2147483647], got -1"),
    (["--reward-mode", "shaped"], "--reward-mode for PickCube-v1 must be one of normalized_dense, dense, sparse, none, "
                                  "not 'shaped'"),
    (["--env-id", "PlugCharger-v1", "--reward-mode", "dense"],
     "--reward-mode for PlugCharger-v1 must be one of none, sparse, not 'dense'"),
]


# refused alike by every script, before anything is built
BAD_CHOICES = [
    (["--env-id", "PickCub-v1"], "env id 'PickCub-v1' is unknown: did you mean PickCube-v1, PickCubeSO100-v1, PokeCube-v1?"),
    # registered with gymnasium, but not a task ManiSkill's backends can build
    (["--env-id", "CartPole-v1"], "env id 'CartPole-v1' is not a ManiSkill task: did you mean "
                                    "MS-CartpoleSwingUp-v1, MS-CartpoleBalance-v1, PlugCharger-v1?"),
    (["--expert-type", "oracle"],
     "unknown expert type 'oracle'; valid: zero, ik, model, custom, or a comma list of them such as ik,zero"),
    (["--expert-type", "ik", "--env-id", "PushT-v1"],
     "the IK expert has no plan for PushT-v1; supported: PickCube-v1, StackCube-v1, PushCube-v1, PullCube-v1, "
     "PegInsertionSide-v1, LiftPegUpright-v1, PokeCube-v1, PlugCharger-v1"),
    (["--sim-backend", "tpu"], "--sim-backend must be auto, gpu or cpu, not 'tpu'"),
    (["--evaluate"], "--evaluate needs --checkpoint PATH"),
    (["--evaluate", "--checkpoint", "missing.pt"], "checkpoint 'missing.pt' does not exist"),
    (["--resume"], "--resume needs --checkpoint PATH (e.g. runs/<run>/latest.pt)"),
    # loading weights into a new run would start it from a trained residual that its first eval calls the expert alone
    (["--checkpoint", "policy.pt"], "--checkpoint is read only with --evaluate or --resume; to build on a trained "
                                    "policy, make it the expert: --expert-type model --model-path policy.pt"),
    # TINY's batch is 2 envs x 8 steps
    (["--num-minibatches", "16"], "--num-minibatches 16 leaves one sample per minibatch, whose advantage cannot be "
                                  "normalised; use fewer minibatches, or --no-norm-adv"),
    # requirements.txt leaves wandb out; where a user installed it, --track is valid
    *([(["--track"], "--track needs wandb, which is not installed (pip install wandb)")]
      if importlib.util.find_spec("wandb") is None else []),
]


@pytest.mark.parametrize("script", ["ppo.py", "ppo_rgb.py", "ppo_fast.py", "ppo_rgb_fast.py"])
def test_flags_are_checked_in_every_script(script, tmp_path):
    cases = BAD_NUMBERS + BAD_CHOICES + ([(["--camera-width", "20"], "--camera-width must be >= 36, got 20"),
                                          (["--camera-height", "20"], "--camera-height must be >= 36, got 20")]
                                         if "rgb" in script else [])
    for extra, message in cases:
        out = tmp_path / "runs"
        proc = run_main(script, [*TINY, "--output-dir", str(out), *extra], cwd=tmp_path)
        lines = [l for l in proc.stderr.splitlines() if l.strip() and "WARNING" not in l]
        assert proc.returncode == 2 and lines == [f"error: {message}"], (script, extra, proc.stderr)
        assert not out.exists()


@pytest.mark.parametrize("script", ["ppo.py", "ppo_rgb.py", "ppo_fast.py", "ppo_rgb_fast.py"])
def test_reward_mode_reaches_the_envs_in_every_script(script):
    """--reward-mode sparse gives ManiSkill's sparse reward, exactly 0 until the task succeeds; PickCube's default,
    normalized dense reward is strictly positive (it pays the gripper's approach) on those steps."""
    module = importlib.import_module(script[:-3])
    sizes = dict(camera_width=64, camera_height=64) if "rgb" in script else {}
    args = module.Args(env_id="PickCube-v1", sim_backend="cpu", control_mode="pd_ee_delta_pos", expert_type="ik",
                       reward_mode="sparse", evaluate=True, num_envs=1, num_eval_envs=1, eval_reconfiguration_freq=0,
                       **sizes)
    made = module.make_envs(args, "cpu") if "rgb" in script else module.make_envs(args, "cpu", util.Distributed(), 1)
    eval_envs = made[1]
    rewards, successes = [], []
    for _ in range(5):  # the IK expert needs far more steps than these to lift the cube to the goal
        _, reward, _, _, info = eval_envs.step(torch.zeros(1, eval_envs.policy_action_dim))
        rewards.append(reward)
        successes.append(info["success"])
    eval_envs.close()
    assert not torch.stack(successes).any()
    assert torch.equal(torch.stack(rewards), torch.zeros(5, 1))
