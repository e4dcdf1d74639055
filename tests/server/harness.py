"""Starts the real `seekpipe serve` on a free loopback port and runs test functions against it.

Every wait is bounded (a hang fails the test instead of stalling the suite); the server's log is
printed when something fails. The closing line is 'N passed, N failed'.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback

from prometheus_client.parser import text_string_to_metric_families

MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, binary, model, *flags, pp=1, mpi=False, api_key=None, startup_s=120,
                 max_model_len=512):
        self.port = free_port()
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="seekpipe-serve-", suffix=".log")
        cmd = [binary, "serve", "--device", "cpu", "--model", model, "--port", str(self.port),
               "--threads", "1", "--max-model-len", str(max_model_len), *flags]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ)
        if mpi:
            cmd = ["mpirun", "--oversubscribe", "-np", str(pp)] + cmd
            env.update(MPI_ENV)
        elif pp > 1:
            cmd += ["--pp", str(pp)]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + startup_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("seekpipe serve exited with %s:\n%s" % (self.proc.returncode, self.output()))
            try:
                status, _, _ = self.request("GET", "/health", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("seekpipe serve not healthy after %d s:\n%s" % (startup_s, self.output()))
            time.sleep(0.1)
        self.base_url = "http://127.0.0.1:%d/v1" % self.port

    def output(self):
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()[-6000:]

    def request(self, method, path, body=None, headers=None, timeout=60):
        """Raw HTTP: (status, headers dict, body bytes)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = "Bearer " + self.api_key
        h.update(headers or {})
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, dict(r.getheaders()), data

    def post(self, path, body, **kw):
        status, headers, data = self.request("POST", path, body, **kw)
        try:
            return status, headers, json.loads(data)
        except ValueError:
            return status, headers, data

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=self.api_key or "none", timeout=120,
                             max_retries=0, **kw)

    def metrics(self):
        status, _, data = self.request("GET", "/metrics")
        assert status == 200, status
        out = {}
        for fam in text_string_to_metric_families(data.decode()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name, **labels):
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_idle(self, stages=1, timeout=30):
        """Until no request runs or waits and no state block is held on any stage."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            used = [m.get(("seekpipe_state_blocks_used", (("stage", str(s)),)), -1) for s in range(stages)]
            busy = m[("seekpipe_num_requests_running", ())] + m[("seekpipe_num_requests_waiting", ())]
            if busy == 0 and all(u == 0 for u in used):
                return m
            if time.time() > deadline:
                raise AssertionError("server not idle after %d s: running+waiting %s, blocks used %s" % (timeout, busy, used))
            time.sleep(0.1)

    def stop(self):
        """SIGTERM (an orderly shutdown); returns the exit code (0 unless something went wrong)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.proc.returncode != 0 and not self.log.closed:
            print("server exited with %s:\n%s" % (self.proc.returncode, self.output()), flush=True)
        if not self.log.closed:
            self.log.close()
        return self.proc.returncode


def generate_text(binary, model, prompt, max_tokens, extra=()):
    """`seekpipe generate`'s continuation of a text prompt (greedy, EOS ignored)."""
    out = subprocess.run([binary, "generate", "--device", "cpu", "--model", model, "--prompt", prompt,
                          "--max-tokens", str(max_tokens), "--ignore-eos", "--threads", "1",
                          "--max-model-len", "512", *extra],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    for line in out.splitlines():
        if line.startswith("prompt 0 text: ") or line.startswith("prompt 0 chat: "):
            return json.loads(line.split(" -> ", 1)[1])
    raise AssertionError("no continuation in generate's output:\n" + out)


def run_tests(tests, server=None):
    passed = failed = 0
    for t in tests:
        t0 = time.time()
        try:
            t()
            passed += 1
            print("ok   %s (%.1f s)" % (t.__name__, time.time() - t0), flush=True)
        except Exception:
            failed += 1
            print("FAIL %s" % t.__name__, flush=True)
            traceback.print_exc()
            if server is not None:
                print("--- server log (tail) ---\n" + server.output(), flush=True)
    print("%d passed, %d failed" % (passed, failed), flush=True)
    return 0 if failed == 0 else 1
