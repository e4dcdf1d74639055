# Helpers for the end-to-end scripts: run the real binary and check what it prints.
set -u
fail() { echo "FAIL: $*" >&2; exit 1; }
# expect_error CODE REGEX -- cmd...: the command must exit with CODE and print REGEX on stderr.
expect_error() {
  local code=$1 re=$2; shift 3
  local out rc
  out=$("$@" 2>&1 >/dev/null); rc=$?
  [ "$rc" = "$code" ] || fail "expected exit $code, got $rc from: $* -- $out"
  echo "$out" | grep -Eq -- "$re" || fail "expected message matching '$re' from: $* -- got: $out"
  echo "ok: $re"
}
hash_of() { grep -o 'logits_hash=[0-9a-f]*' <<<"$1"; }
# OpenMPI as root (CI runs as root) and with more ranks than cores.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
MPIRUN="mpirun --oversubscribe"
num_layers() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['num_hidden_layers'])" "$1/config.json"; }
