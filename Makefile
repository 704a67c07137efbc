# mc2sim: `make demo` runs the main job, `make test` runs every check. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# Where pip takes torch from. Empty: pip's configured index (PyPI unless pip.conf says
# otherwise), whose Linux torch wheel is the CUDA build with several GB of NVIDIA packages;
# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build instead.
TORCH_INDEX ?=
NP     ?= 4

PY      := $(VENV)/bin/python
MPIEXEC := $(VENV)/bin/mpiexec
STAMP   := $(VENV)/.mc2sim-installed
# Oversubscribed ranks (4 on 2 cores) must not each start a pool of BLAS/OpenMP threads.
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1
# A stuck collective must fail the run, never hang it: pytest-timeout per test, and an
# outer bound on every mpiexec.
MPI_PYTEST := timeout 900 $(MPIEXEC) -n
PYTEST_MPI_OPTS := -m mpi --with-mpi -q -p no:cacheprovider --timeout=120 --timeout-method=thread

.PHONY: demo test lint unit mpi multinode e2e bench mutants clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first (from TORCH_INDEX when set), so the project's torch requirement is already met
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,dev]"
	touch $(STAMP)

# The main job: a scenario run for real on $(NP) ranks (every tiling, golden-checked, timed),
# this machine calibrated on the same ranks in the same rounds (run --calibrate), the run
# simulated on the fit and compared with the measurement, then the same plans predicted on the
# target hardware (Atlas A3). The fit is made in every demo (about 90 s on 2 cores), its calls
# and the run's tilings interleaved: a stored fit holds only while the machine runs at the pace
# it was fitted at, and a shared host's pace moves by up to 2x from hour to hour, and within a
# minute here; once more where its speed probe moved over 15% during the fit's rounds
# (--fits 2), the steadier of the two kept, with its rounds of the tilings.
# `make demo DEMO_TOPOLOGY=topologies/this_machine_4ranks.yaml` skips the fit and uses a stored one.
DEMO ?= seed_gmm_alltoallv_ep4
DEMO_TOPOLOGY ?=
DEMO_FIT := results/demo-fit.yaml
demo: $(STAMP)
	$(MPIEXEC) -n $(NP) $(PY) -m mc2sim info
	$(MPIEXEC) -n $(NP) $(PY) -m mc2sim run $(DEMO) --set scale=small --out results/demo --overwrite \
		$(if $(DEMO_TOPOLOGY),,--calibrate $(DEMO_FIT) --name this_machine_$(NP)ranks --fits 2)
	$(PY) -m mc2sim simulate $(DEMO) --set scale=small --ranks $(NP) \
		--topology $(or $(DEMO_TOPOLOGY),$(DEMO_FIT)) --measured results/demo --out results/demo-sim --overwrite
	$(PY) -m mc2sim report results/demo results/demo-sim --out results/demo-report
	# the same plans on the target hardware: what MC2 tiling buys on an Atlas A3
	$(PY) -m mc2sim simulate $(DEMO) --set scale=small --ranks $(NP) \
		--topology topologies/atlas_a3_superpod_16.yaml --out results/demo-a3 --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff check mc2sim tests scripts
	$(VENV)/bin/ruff format --check mc2sim tests scripts
	$(VENV)/bin/mypy
	# every planted mutant still names code that exists (make mutants runs them)
	$(PY) scripts/mutants.py --check

# The single-process tier: unit and kernel tests (the fused ops on thread ranks, no mpiexec);
# the reference kernels must stay >= 95% line-covered.
unit: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not mpi and not multinode" tests/unit tests/kernels \
		--cov=mc2sim.kernels --cov-report=term:skip-covered --cov-fail-under=95

# End to end: the command line as a user launches it (mpiexec, torchrun), its error lines,
# the watchdog and Ctrl-C.
e2e: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not mpi and not multinode" tests/e2e

mpi: $(STAMP)
	$(MPI_PYTEST) 2 $(PY) -m pytest $(PYTEST_MPI_OPTS) tests
	$(MPI_PYTEST) 4 $(PY) -m pytest $(PYTEST_MPI_OPTS) tests

# Ranks on separate hosts: network namespaces joined by veth pairs on a bridge, MPI and gloo
# over TCP between them (tests/multinode, mc2sim/cluster.py). Needs root, ip and tc (iproute2)
# and unshare; skipped with the reason otherwise. Leaves no namespace, link or file behind.
multinode: $(STAMP)
	timeout 1200 $(PY) -m pytest -q -p no:cacheprovider -m multinode tests/multinode

test: lint unit e2e mpi multinode

# Semantic bugs planted one at a time in a copy of the tree (tests/mutants/mutants.yaml); each
# must make its tests fail. Prints `mutants caught K/N` last; fails unless every one is caught.
mutants: $(STAMP)
	$(PY) scripts/mutants.py

bench: $(STAMP)
	$(MPIEXEC) -n 2 $(PY) scripts/bench_comm.py
	$(MPIEXEC) -n 4 $(PY) scripts/bench_comm.py
	$(PY) scripts/bench_kernels.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
