# Quick start: `make train` (the main job) and `make test`. Each installs whatever is missing first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

# The main job: a flawed expert fixed by the residual. The IK expert on PickCube-v1 at a reduced gain
# (--ik-gain 0.28) fails most episodes alone; residual PPO, with the bench's settings (bench/learning.py,
# configuration weak_ik), learns to succeed (bench/RESULTS.md has the figures). The first eval is the expert alone.
# CPU: our multi-process backend with a fixed 8 envs, so the run is the same on any machine (its time is in
# the README). GPU: ManiSkill's batched simulation.
TRAIN_ARGS ?= --env-id PickCube-v1 --expert-type ik --ik-gain 0.28 --residual-scale 0.5 --init-logstd -2 \
	--critic-warmup-iters 2 --residual-warmup-steps 50000 --num-minibatches 4 --num-eval-envs 32
TRAIN_GPU_ARGS ?= --sim-backend gpu --num-envs 1024 --num-steps 50 --eval-freq 10 --total-timesteps 3000000
TRAIN_CPU_ARGS ?= --sim-backend cpu --num-envs 8 --num-steps 200 --eval-freq 6 --total-timesteps 300000
# eval videos, on by default in every script, are off for the CPU run: rendering 32 eval envs at every eval is
# slow there; `make train CPU_VIDEO=` records them
CPU_VIDEO ?= --no-capture-video

.PHONY: setup train test bench bench-learning gpu-check clean

# pip byte-compiles what it installs on one core; compileall uses every core (it reports the few files written for
# a newer Python, which pip skips in silence, hence the `|| true`)
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $(STAMP)

setup: $(STAMP)
	@bash scripts/ensure_vulkan.sh $(PY)

train: setup
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(PY) ppo.py $(TRAIN_ARGS) $(TRAIN_GPU_ARGS); \
	else \
		$(PY) ppo.py $(TRAIN_ARGS) $(TRAIN_CPU_ARGS) $(CPU_VIDEO); \
	fi

# Tests run in TEST_WORKERS processes (pytest-xdist): a test mostly drives one simulator process at a time and
# waits on it, so even two at a time leave a 2-core CI machine partly idle; a third fills much of that.
# TEST_WORKERS=0 runs them one at a time. The slowest ten are listed at the end, for keeping the suite within
# its 15 minutes.
TEST_WORKERS ?= 3

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=10 tests

bench: setup
	$(PY) bench/throughput.py --out bench/out/throughput.json
	$(PY) bench/experts.py --out bench/out/experts.json

# Residual PPO against plain PPO on PickCube-v1 (CPU, 8 envs, 6 runs of 300k steps; its time is in bench/RESULTS.md).
bench-learning: setup
	$(PY) bench/learning.py --out bench/out/learning

# On a CUDA GPU: tests/test_gpu.py, then steps/s and peak GPU memory of short training runs (8 minutes at most).
gpu-check: setup
	$(PY) bench/gpu.py --out bench/out/gpu.json

clean:
	rm -rf $(VENV) runs bench/out
