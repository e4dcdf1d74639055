# seekpipe: the two commands a fresh machine needs.
#   make demo   install what is missing, build, continue a text prompt with the bundled KJV model
#   make test   install what is missing, build, run the whole test suite (ctest)
BUILD ?= build
JOBS ?= $(shell nproc)
# Debian packages the build and the tests use.
APT_PACKAGES := cmake ninja-build g++ make nlohmann-json3-dev libgtest-dev python3 python3-venv openmpi-bin libopenmpi-dev procps iproute2 clang-format pkg-config libpcre2-dev libcpp-httplib-dev prometheus-cpp-dev
# PyPI packages the tests use as oracles and clients (pinned in tests/requirements.txt), in a
# virtual environment inside the build folder: nothing is installed into the system Python.
VENV := $(BUILD)/venv
# Fuzzing (make fuzz): clang's libFuzzer with ASan + UBSan, one target per parser of untrusted
# input; each runs FUZZ_SECONDS from the seed corpus in tests/fuzz/corpus/<target>/ (new inputs go
# to $(FUZZ_BUILD)/corpus/<target>/, crashes to $(FUZZ_BUILD)/crashes/).
FUZZ_APT_PACKAGES := clang libclang-rt-14-dev
FUZZ_SECONDS ?= 60
FUZZ_BUILD := $(BUILD)-fuzz
FUZZ_CXX ?= clang++
FUZZ_TARGETS := safetensors index config flags golden step_codec
FUZZ_CXXFLAGS := -std=c++20 -g -O1 -Isrc -fno-omit-frame-pointer -fsanitize=address,undefined \
  -fno-sanitize-recover=all
FUZZ_SOURCES := src/core/checked.cc src/core/dtype.cc src/model/strict_json.cc \
  src/model/safetensors.cc src/model/config.cc src/tools/flags.cc src/tools/golden.cc \
  src/engine/step_codec.cc
FUZZ_OBJS := $(patsubst %.cc,$(FUZZ_BUILD)/obj/%.o,$(FUZZ_SOURCES))
FUZZ_BINS := $(patsubst %,$(FUZZ_BUILD)/fuzz_%,$(FUZZ_TARGETS))
.SECONDARY: $(FUZZ_OBJS)

.PHONY: all deps pydeps build demo test sanitize clean fuzz fuzz-deps fuzz-build

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
	cd $(BUILD)-sanitize && ctest --output-on-failure -j $(JOBS) --timeout 1800 -E "mpi|pipeline_failure|watchdog|multihost|non_finite|memory_sum|fault_determinism"

fuzz-deps:
	@$(MAKE) --no-print-directory deps APT_PACKAGES="$(FUZZ_APT_PACKAGES)"

fuzz-build: fuzz-deps
	@$(MAKE) --no-print-directory $(FUZZ_BINS)

$(FUZZ_BUILD)/obj/%.o: %.cc $(wildcard src/*/*.h)
	@mkdir -p $(dir $@)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

$(FUZZ_BUILD)/fuzz_%: tests/fuzz/fuzz_%.cc $(FUZZ_OBJS)
	$(FUZZ_CXX) $(FUZZ_CXXFLAGS) -fsanitize=fuzzer $^ -o $@

# Runs every target for FUZZ_SECONDS; fails on the first crash, leak, timeout or trap.
fuzz: fuzz-build
	@mkdir -p $(FUZZ_BUILD)/crashes
	@set -e; for t in $(FUZZ_TARGETS); do \
	  mkdir -p $(FUZZ_BUILD)/corpus/$$t; \
	  echo "fuzz_$$t: $(FUZZ_SECONDS) s"; \
	  if ! $(FUZZ_BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	      -max_len=65536 -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/crashes/$$t- \
	      $(FUZZ_BUILD)/corpus/$$t tests/fuzz/corpus/$$t > $(FUZZ_BUILD)/fuzz_$$t.log 2>&1; then \
	    tail -n 40 $(FUZZ_BUILD)/fuzz_$$t.log; \
	    echo "fuzz_$$t found a crash: see $(FUZZ_BUILD)/crashes/ and $(FUZZ_BUILD)/fuzz_$$t.log"; exit 1; \
	  fi; \
	  grep -E "stat::number_of_executed_units|stat::new_units_added" $(FUZZ_BUILD)/fuzz_$$t.log; \
	done

clean:
	rm -rf $(BUILD) $(BUILD)-sanitize $(FUZZ_BUILD)
