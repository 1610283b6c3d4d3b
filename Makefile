# Two commands a user needs: `make demo` and `make test`. Each creates .venv and installs the
# project with every extra on first use; later runs reuse it (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stdeploy-installed
export PYTHONUNBUFFERED := 1

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt stdeploy/install_lava.py
	@command -v aarch64-linux-gnu-g++ >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu >/dev/null) || \
		echo "note: install g++-aarch64-linux-gnu to cross-compile TVM host code for Jetson boards"; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[lava,tvm,dev,interop]'
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --no-deps norse==1.1.0 spikingjelly==2.0.0
	$(PY) -m stdeploy.install_lava
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m stdeploy.demo

# Two pytest-xdist workers, whole files each (module fixtures built once; tests/conftest.py shares
# the session's trained model between workers and starts the heaviest files first). TEST_WORKERS=0
# runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV) runs
