# seekpipe: the two commands a fresh machine needs.
#   make demo   install what is missing, build, continue a text prompt with the bundled KJV model
#   make test   install what is missing, build, run the whole test suite (ctest)
BUILD ?= build
JOBS ?= $(shell nproc)
# Debian packages the build and the tests use.
APT_PACKAGES := cmake ninja-build g++ make nlohmann-json3-dev libgtest-dev python3 python3-venv openmpi-bin libopenmpi-dev procps clang-format pkg-config libpcre2-dev libcpp-httplib-dev prometheus-cpp-dev
# PyPI packages the tests use as oracles and clients (pinned in tests/requirements.txt), in a
# virtual environment inside the build folder: nothing is installed into the system Python.
VENV := $(BUILD)/venv

.PHONY: all deps pydeps build demo test sanitize clean

all: build

deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

# Re-installs only when tests/requirements.txt changes.
pydeps: $(VENV)/.installed
$(VENV)/.installed: tests/requirements.txt | deps
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r tests/requirements.txt
	touch $@

build: deps
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DSP_TEST_PYTHON=$(abspath $(VENV))/bin/python
	cmake --build $(BUILD) -j $(JOBS)

# The bundled trained model (FP8 / FP4 weights, models/README.md) continues a text prompt.
demo: build
	./$(BUILD)/seekpipe generate --model models/kjv-v4-tiny-fp8 --prompt "And Jesus said unto them," --max-tokens 40 --ignore-eos

test: build pydeps
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 1800

# AddressSanitizer + UndefinedBehaviorSanitizer build; every test except the mpirun ones (OpenMPI's
# own allocations would be reported as leaks).
sanitize: deps pydeps
	cmake -S . -B $(BUILD)-sanitize -G Ninja -DCMAKE_BUILD_TYPE=Debug -DSP_CUDA=OFF -DSP_TEST_PYTHON=$(abspath $(VENV))/bin/python \
	  -DCMAKE_CXX_FLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
	cmake --build $(BUILD)-sanitize -j $(JOBS)
	cd $(BUILD)-sanitize && ctest --output-on-failure -j $(JOBS) --timeout 1800 -E "mpi|pipeline_failure"

clean:
	rm -rf $(BUILD) $(BUILD)-sanitize
