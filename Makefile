# seekpipe: the two commands a fresh machine needs.
#   make demo   install what is missing, build, generate from the bundled tiny model
#   make test   install what is missing, build, run the whole test suite (ctest)
BUILD ?= build
JOBS ?= $(shell nproc)
# Debian packages the build and the tests use.
APT_PACKAGES := cmake ninja-build g++ make nlohmann-json3-dev libgtest-dev python3 openmpi-bin libopenmpi-dev procps clang-format

.PHONY: all deps build demo test sanitize clean

all: build

deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing; \
	fi

build: deps
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD) -j $(JOBS)

demo: build
	./$(BUILD)/seekpipe generate --model tests/data/tiny --prompt-ids 17,42,99,3,250 --max-tokens 24 --ignore-eos

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 1800

# AddressSanitizer + UndefinedBehaviorSanitizer build; every test except the mpirun ones (OpenMPI's
# own allocations would be reported as leaks).
sanitize: deps
	cmake -S . -B $(BUILD)-sanitize -G Ninja -DCMAKE_BUILD_TYPE=Debug \
	  -DCMAKE_CXX_FLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
	cmake --build $(BUILD)-sanitize -j $(JOBS)
	cd $(BUILD)-sanitize && ctest --output-on-failure -j $(JOBS) --timeout 1800 -E "mpi|pipeline_failure"

clean:
	rm -rf $(BUILD) $(BUILD)-sanitize
