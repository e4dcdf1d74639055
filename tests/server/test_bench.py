"""`seekpipe bench serve` against the real server: every request of a random dataset succeeds, the
counts and the JSON report add up, a request rate spreads the arrivals, and a server that is not
there is a clear error.

usage: test_bench.py SEEKPIPE MODEL_DIR
"""
import json
import subprocess
import sys
import tempfile

from harness import Server, free_port, run_tests

binary, model = sys.argv[1], sys.argv[2]
servers = []


def bench(port, *flags, timeout=300):
    return subprocess.run([binary, "bench", "serve", "--port", str(port), *flags],
                          capture_output=True, text=True, timeout=timeout)


def test_random_dataset_max_concurrency():
    srv = Server(binary, model, "--max-num-seqs", "4")
    servers.append(srv)
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        r = bench(srv.port, "--num-prompts", "8", "--max-concurrency", "3", "--random-input-len",
                  "24", "--random-output-len", "6", "--random-range-ratio", "0.25", "--seed", "3",
                  "--result-json", f.name)
        assert r.returncode == 0, r.stdout + r.stderr
        res = json.load(open(f.name))
    assert "Successful requests:" in r.stdout and "TTFT" in r.stdout and "ITL" in r.stdout, r.stdout
    assert res["successful"] == 8 and res["failed"] == 0, res
    # Output lengths are drawn in [6 * 0.75, 6 * 1.25] = [5, 8] and EOS is ignored.
    assert 8 * 5 <= res["total_output_tokens"] <= 8 * 8, res
    assert 8 * 18 <= res["total_input_tokens"] <= 8 * 30, res
    for k in ("ttft", "tpot", "itl", "e2e_latency"):
        s = res[k]
        assert 0 < s["median_ms"] <= s["p90_ms"] <= s["p99_ms"], (k, s)
    assert res["ttft"]["mean_ms"] <= res["e2e_latency"]["mean_ms"], res
    srv.wait_idle()
    assert srv.stop() == 0


def test_request_rate():
    srv = Server(binary, model)
    servers.append(srv)
    r = bench(srv.port, "--num-prompts", "6", "--request-rate", "4", "--random-input-len", "16",
              "--random-output-len", "4", "--seed", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.split("json: ", 1)[1].splitlines()[0])
    assert res["successful"] == 6 and res["total_output_tokens"] == 24, res
    # Six Poisson arrivals at 4/s take on the order of a second; all at once would not.
    assert res["duration_s"] > 0.3, res
    assert srv.stop() == 0


def test_no_server_is_an_error():
    r = bench(free_port(), "--num-prompts", "1", timeout=60)
    assert r.returncode == 2 and "error: cannot reach the server" in r.stderr, r.stderr


try:
    rc = run_tests([test_random_dataset_max_concurrency, test_request_rate,
                    test_no_server_is_an_error])
finally:
    for s in servers:
        s.stop()
sys.exit(rc)
