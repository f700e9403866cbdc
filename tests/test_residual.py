"""Residual techniques in ppo.py: the residual scale schedule, critic warm-up, and the learning rate schedule."""

import glob
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import util
from conftest import TINY, run_main


def test_scale_schedule_gives_the_scale_at_chosen_steps():
    constant = util.ResidualSchedule(scale=0.3, total_steps=1000)
    assert [constant.scale_at(s) for s in (0, 500, 5000)] == [0.3, 0.3, 0.3]
    linear = util.ResidualSchedule(scale=0.1, schedule="linear", scale_final=0.5, total_steps=1000)
    assert [linear.scale_at(s) for s in (0, 250, 500, 1000, 3000)] == pytest.approx([0.1, 0.2, 0.3, 0.5, 0.5])
    warmup = util.ResidualSchedule(warmup_steps=1000)
    assert [warmup.residual_prob_at(s) for s in (0, 250, 1000, 3000)] == [0.0, 0.25, 1.0, 1.0]
    assert util.ResidualSchedule().residual_prob_at(0) == 1.0
    for bad, message in [(dict(schedule="cosine"), "constant, linear"),
                         (dict(schedule="linear"), "has a final scale"),
                         (dict(scale_final=0.5), "has a final scale"),
                         (dict(warmup_steps=-1), "must be >= 0"),
                         (dict(scale=float("nan")), "must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            util.ResidualSchedule(**bad)


def test_critic_warmup_freezes_the_actor(tmp_path):
    """4 iterations, the first 2 critic-only, over two experts with a learned mix (an action of 4 + 2); the learning
    rate anneals and the residual scale goes from 0.1 to 0.5."""
    args = [*TINY, "--total-timesteps", "64", "--critic-warmup-iters", "2", "--expert-type", "ik,zero",
            "--fusion", "learned", "--residual-warmup-steps", "32", "--no-capture-video", "--keep-checkpoints", "4",
            "--anneal-lr", "--residual-scale", "0.1", "--residual-scale-schedule", "linear", "--residual-scale-final",
            "0.5", "--output-dir", str(tmp_path)]
    proc = run_main("ppo.py", args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "PickCube-v1__ppo__1__*"))
    # ckpt_<i> follows iteration i: iterations 1 and 2 train the critic alone, 3 and 4 everything
    start, warmed, final = (torch.load(os.path.join(run_dir, name), map_location="cpu", weights_only=True)
                            for name in ("ckpt_1.pt", "ckpt_2.pt", "final_ckpt.pt"))
    assert start["meta"]["action_dim"] == 6
    actor = [k for k in start["model"] if not k.startswith("critic.")]
    assert "actor_logstd" in actor
    assert all(torch.equal(start["model"][k], warmed["model"][k]) for k in actor)
    # and where they were initialised: the initial log-std, the residual head's zero bias
    assert torch.equal(warmed["model"]["actor_logstd"], torch.full((1, 6), -0.5))
    assert torch.equal(warmed["model"]["actor_mean.6.bias"], torch.zeros(6))
    assert not torch.equal(start["model"]["critic.0.weight"], warmed["model"]["critic.0.weight"])
    assert not all(torch.equal(start["model"][k], final["model"][k]) for k in actor), "the actor trains after"
    # ...with Adam started afresh for it: fewer steps counted than for the critic, which trained throughout
    state, names = final["resume"]["optimizer"]["state"], list(final["model"])  # the parameters' order
    # 2 warm-up iterations x 4 epochs x 2 minibatches (a frozen actor's KL is 0: no epoch stops early)
    actor_steps, critic_steps = (state[names.index(k)]["step"] for k in ("actor_logstd", "critic.0.weight"))
    assert actor_steps > 0 and critic_steps - actor_steps == 2 * 4 * 2, (actor_steps, critic_steps)

    # each iteration's values, set at its start (steps 0, 16, 32, 48 of 64)
    events = EventAccumulator(run_dir)
    events.Reload()
    assert [e.value for e in events.Scalars("charts/learning_rate")] == pytest.approx([3e-4, 2.25e-4, 1.5e-4, 0.75e-4])
    assert [e.value for e in events.Scalars("charts/residual_scale")] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert final["meta"]["residual_scale"] == pytest.approx(0.5)  # at step 64, where the final eval ran
    assert final["resume"]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.75e-4)
