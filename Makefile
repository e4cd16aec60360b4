# The two contract commands: `make demo` (the main job on built-in data) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PARITY_VENV := .venv-parity
PPY    := $(PARITY_VENV)/bin/python
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
export PYTHONUNBUFFERED := 1

# Which JAX build `make install` puts in the venv: auto (default: detected by
# scripts/detect_accelerator.sh — an NVIDIA GPU answering nvidia-smi, a TPU VM, else the CPU),
# or one of cpu, cuda12, cuda13, tpu. E.g. `make install JAX_ACCELERATOR=cuda12`.
JAX_ACCELERATOR ?= auto
ACCELERATORS := cpu cuda12 cuda13 tpu
ACCEL := $(if $(filter auto,$(JAX_ACCELERATOR)),$(shell sh scripts/detect_accelerator.sh),$(JAX_ACCELERATOR))
ifeq ($(filter $(ACCEL),$(ACCELERATORS)),)
$(error JAX_ACCELERATOR=$(JAX_ACCELERATOR) is not supported; accepted: auto, $(ACCELERATORS))
endif
# the extra installed next to requirements.txt (same jax version range): jax[cuda12] etc.
JAX_EXTRA := $(if $(filter cpu,$(ACCEL)),,"jax[$(ACCEL)]$(shell sed -n 's/^jax\([<>=!~][^ ]*\).*/\1/p' requirements.txt)")
# one stamp per build, so switching JAX_ACCELERATOR reinstalls (the CPU stamp is unchanged)
STAMP := $(VENV)/.installed$(if $(filter cpu,$(ACCEL)),,.$(ACCEL))

.PHONY: install lint test test-slow test-multiprocess demo bench parity clean ablations

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	@echo "installing the JAX build for: $(ACCEL) (JAX_ACCELERATOR=$(JAX_ACCELERATOR))"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt $(JAX_EXTRA)
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -c "import jax; print('JAX', jax.__version__, 'backend:', jax.default_backend(), jax.devices())"
	touch $@

# Lint (ruff, configured in pyproject.toml: E, F, W and the sets the code keeps; no formatting).
lint: install
	$(VENV)/bin/ruff check .

test: install lint
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: install
	$(PY) -m pytest -q -m slow

# Several JAX processes on this machine (2 × 2 CPU devices) against one (1 × 4): every command
# a pod slice runs (docs/multihost.md, "Try it on one machine").
test-multiprocess: install
	$(PY) -m pytest -q -m multiprocess

demo: install
	$(VENV)/bin/unclip-jax demo --workdir $(DEMO_DIR) $(DEMO_ARGS)

# The papers' ablations at small scale (experiments/ablations/README.md): each script writes
# its row group into experiments/RESULTS.md. Needs `make demo` (and the extra runs listed there).
ablations: install
	nice -n 10 $(VENV)/bin/unclip-jax train experiments/shapes/prior_ar.py \
		--workdir $(DEMO_DIR)/prior_ar --set model.embeddings_dir=$(DEMO_DIR)/embeddings
	for s in prior guidance sampler prior_k dalle; do \
		nice -n 10 $(PY) experiments/ablations/$$s.py || exit 1; done

bench: install
	$(PY) benchmarks/run_all.py

# Reference implementations (PyTorch, CPU build pinned: an unpinned torch pulls GBs of CUDA
# packages) live in their own environment and are never imported by the library.
$(PARITY_VENV)/.installed: requirements.txt requirements-dev.txt requirements-parity.txt
	$(PYTHON) -m venv $(PARITY_VENV)
	$(PPY) -m pip install -q --upgrade pip
	$(PPY) -m pip install -q -r requirements.txt -r requirements-dev.txt -r requirements-parity.txt
	# open_clip imports torchvision, whose PyPI build cannot load on CPU torch: only its
	# tokenizer module is used (loaded from its file), so install it without dependencies.
	$(PPY) -m pip install -q --no-deps open-clip-torch==3.3.0
	# dall_e (the dVAE reference) lists torchvision and tools it never imports: no deps either.
	$(PPY) -m pip install -q --no-deps dall-e==0.1
	$(PPY) -m pip install -q --no-deps -e .
	touch $@

parity: $(PARITY_VENV)/.installed
	$(PPY) -m pytest -q -m parity

clean:
	rm -rf $(VENV) $(PARITY_VENV) *.egg-info
