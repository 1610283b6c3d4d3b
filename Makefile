# Two commands a user needs: `make demo` and `make test`. Each creates .venv and installs the
# project with every extra on first use; later runs reuse it (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stdeploy-installed
WHEELHOUSE := $(VENV)/wheelhouse
# the pinned packages a bundle for runtime $(1) installs on its device, e.g. numpy==2.3.5 onnxruntime==1.32.0
PINS    = $$($(PY) -c "from stdeploy.package import runtime_versions as v; print(*(f'{k}=={x}' for k, x in v('$(1)').items()))")
export PYTHONUNBUFFERED := 1

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt stdeploy/install_lava.py Makefile
	@command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
		{ command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq --no-install-recommends g++-aarch64-linux-gnu qemu-user >/dev/null) || \
		echo "note: install g++-aarch64-linux-gnu (TVM host code for Jetson boards) and qemu-user (runs it in the tests)"; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[lava,tvm,dev,interop]'
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps norse==1.1.0 spikingjelly==2.0.0
	$(PY) -m stdeploy.install_lava
	@# The wheels a device bundle's README installs (numpy + onnxruntime; numpy + TVM's runtime, also for aarch64), kept
	@# here so that the tests which play the device install them without a network (--no-index).
	$(PY) -m pip download -q --disable-pip-version-check -c constraints.txt -d $(WHEELHOUSE) $(call PINS,onnxruntime)
	$(PY) -m pip download -q --disable-pip-version-check --no-deps -d $(WHEELHOUSE) $(call PINS,tvm)
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
		--python-version 3.11 -d $(WHEELHOUSE)/aarch64 $(call PINS,tvm)
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m stdeploy.demo

# Two pytest-xdist workers, whole files each (module fixtures built once; tests/conftest.py shares
# the session's trained model between workers and starts the heaviest files first). TEST_WORKERS=0
# runs in one process. --durations lists the slowest setups and calls (the suite has a CI time budget).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

clean:
	rm -rf $(VENV) runs
