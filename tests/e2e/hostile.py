#!/usr/bin/env python3
"""Hostile inputs for `generate`, `verify` and `inspect`.

Every case must be refused: exit code 2, an `error: ...` line on stderr, within a timeout (a hang
fails), and no crash (signal, sanitizer report, CHECK failure, std::terminate). The classes:
special files where a file is expected (symlink loops, FIFOs, devices, directories), oversized
files, deeply nested and duplicate-key JSON, integer overflow and truncation (config fields, flags,
token ids in tid2eid and golden files), values outside the documented config ranges, ambiguous
safetensors headers (duplicate names, an overlap hidden by an empty tensor, NUL padding, misaligned
golden data), output files (--trace), and exhausted resources (ulimit -v).

usage: hostile.py SEEKPIPE DATA_DIR [--sanitized]
"""
import concurrent.futures
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile

BIN, DATA = sys.argv[1], sys.argv[2]
SANITIZED = "--sanitized" in sys.argv[3:]
TIMEOUT = 120 if SANITIZED else 30
TINY = os.path.join(DATA, "tiny")
GOLDEN = os.path.join(TINY, "golden.safetensors")
CRASH_MARKS = ("Sanitizer", "runtime error:", "CHECK failed", "terminate called", "Aborted",
               "Segmentation fault", "core dumped")


def read_st(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + n]), b[8 + n:]


def st_bytes(header, data, pad=b" ", align=8, raw_header=None):
    """A safetensors image; header padded with `pad` to a multiple of `align`."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    while len(h) % align:
        h += pad
    return struct.pack("<Q", len(h)) + h + data


TINY_HEADER, TINY_DATA = read_st(os.path.join(TINY, "model.safetensors"))
GOLD_HEADER, GOLD_DATA = read_st(GOLDEN)
TINY_CONFIG = json.load(open(os.path.join(TINY, "config.json")))

root = tempfile.mkdtemp(prefix="sp_hostile_")
cases = []  # (name, argv, check_fn or None)


def new_dir(name):
    d = os.path.join(root, name)
    os.makedirs(d)
    return d


def model_dir(name, config=None, config_text=None, st=None, files=None):
    """A model directory: tiny's config and weights unless replaced. `files` maps a file name to
    bytes, or to a callable that creates the file at the given path (FIFOs, links, ...)."""
    d = new_dir(name)
    files = dict(files or {})
    if "config.json" not in files:
        if config_text is not None:
            files["config.json"] = config_text.encode()
        else:
            files["config.json"] = json.dumps(config if config is not None else TINY_CONFIG).encode()
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        if st is not None:
            files["model.safetensors"] = st
        else:
            files["model.safetensors"] = lambda p: os.symlink(os.path.join(TINY, "model.safetensors"), p)
    for fname, content in files.items():
        p = os.path.join(d, fname)
        if callable(content):
            content(p)
        else:
            open(p, "wb").write(content)
    return d


def fifo(p):
    os.mkfifo(p)


def loop(p):
    d = os.path.dirname(p)
    os.symlink(os.path.join(d, "loop_b"), os.path.join(d, "loop_a"))
    os.symlink(os.path.join(d, "loop_a"), os.path.join(d, "loop_b"))
    os.symlink(os.path.join(d, "loop_a"), p)


def directory(p):
    os.mkdir(p)


def dev_zero(p):
    os.symlink("/dev/zero", p)


def sparse(size):
    def make(p):
        with open(p, "wb") as f:
            f.truncate(size)
    return make


def all_commands(name, d, extra=(), inspect=True):
    """The three commands on model directory d (inspect reads no tensor data)."""
    if inspect:
        cases.append((f"{name} [inspect]", ["inspect", "--model", d, *extra], None))
    cases.append((f"{name} [generate]",
                  ["generate", "--model", d, "--prompt-ids", "1,2,3", "--max-tokens", "2", *extra],
                  None))
    cases.append((f"{name} [verify]", ["verify", "--model", d, "--golden", GOLDEN, *extra], None))


def config_case(name, **changes):
    c = dict(TINY_CONFIG)
    c.update(changes)
    all_commands(f"config {name}", model_dir(f"cfg_{name}", config=c))


# --- special files where a file is expected -------------------------------------------------------
for kind, make in [("symlink-loop", loop), ("fifo", fifo), ("directory", directory),
                   ("dev-zero", dev_zero)]:
    all_commands(f"config.json is a {kind}", model_dir(f"cfg_{kind}", files={"config.json": make}))
    all_commands(f"model.safetensors is a {kind}",
                 model_dir(f"st_{kind}", files={"model.safetensors": make}))
    all_commands(f"index.json is a {kind}",
                 model_dir(f"idx_{kind}", files={"model.safetensors.index.json": make}))
    idx = json.dumps({"weight_map": {k: "shard.safetensors" for k in TINY_HEADER
                                     if k != "__metadata__"}}).encode()
    all_commands(f"shard is a {kind}",
                 model_dir(f"shard_{kind}", files={"model.safetensors.index.json": idx,
                                                   "shard.safetensors": make}))
    g = os.path.join(new_dir(f"golden_{kind}"), "golden.safetensors")
    make(g)
    cases.append((f"golden is a {kind} [verify]", ["verify", "--model", TINY, "--golden", g], None))

# --- oversized files ------------------------------------------------------------------------------
all_commands("config.json of 2 GiB", model_dir("cfg_huge", files={"config.json": sparse(2 << 30)}))
all_commands("index.json of 2 GiB",
             model_dir("idx_huge", files={"model.safetensors.index.json": sparse(2 << 30)}))
all_commands("safetensors header length 2^40",
             model_dir("st_hugelen", st=struct.pack("<Q", 1 << 40) + b"{}"))

# --- hostile JSON ---------------------------------------------------------------------------------
deep = "[" * 100000 + "]" * 100000
all_commands("config.json nested 100k deep", model_dir("cfg_deep", config_text=deep))
# In a field the parser reads: its error message would print the value.
all_commands("config field nested 100k deep",
             model_dir("cfg_deep_field", config_text=json.dumps(TINY_CONFIG).replace(
                 '"hc_mult": 4', '"hc_mult": ' + deep)))
all_commands("index.json nested 100k deep",
             model_dir("idx_deep", files={"model.safetensors.index.json": deep.encode()}))
all_commands("safetensors header nested 100k deep",
             model_dir("st_deep", st=st_bytes(None, b"", raw_header=("{\"a\":" + deep + "}").encode())))
all_commands("config.json with a duplicate key",
             model_dir("cfg_dup", config_text='{"hc_mult": 4, ' + json.dumps(TINY_CONFIG)[1:]))
all_commands("config number 1e400", model_dir("cfg_inf", config_text=json.dumps(TINY_CONFIG).replace(
    '"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e400')))
all_commands("config.json with a 1 MiB string",
             model_dir("cfg_longstr", config_text='{"model_type": "' + "x" * (1 << 20) + '"}'))

# --- integer overflow, truncation and absurd values in config.json --------------------------------
config_case("num_hidden_layers-2^32+5", num_hidden_layers=2**32 + 5)
config_case("hidden_size-2^31", hidden_size=2**31)
config_case("hc_mult-100000", hc_mult=100000)
config_case("hc_mult-17", hc_mult=17)
config_case("index_topk-2^31-1", index_topk=2**31 - 1)
config_case("hc_sinkhorn_iters-2^31-1", hc_sinkhorn_iters=2**31 - 1)
config_case("n_routed_experts-2^31-1", n_routed_experts=2**31 - 1)
config_case("vocab_size-2^63", vocab_size=2**63)
config_case("vocab_size-2^64+256", vocab_size=2**64 + 256)
config_case("rms_norm_eps-1e30", rms_norm_eps=1e30)
config_case("hc_eps-1e30", hc_eps=1e30)
config_case("routed_scaling_factor-1e30", routed_scaling_factor=1e30)
config_case("swiglu_limit-1e30", swiglu_limit=1e30)
config_case("rms_norm_eps-1e-300", rms_norm_eps=1e-300)
config_case("eos_token_id-2^40", eos_token_id=2**40)
config_case("compress_rate-2^32+16",
            compress_rates={"compressed_sparse_attention": 4,
                            "heavily_compressed_attention": 2**32 + 16})
config_case("rope_theta-1e300", rope_parameters={
    "main": {"rope_theta": 1e300, "rope_type": "default", "partial_rotary_factor": 0.25},
    "compress": {"rope_theta": 160000.0, "rope_type": "default", "partial_rotary_factor": 0.25}})

# --- ambiguous or wrong safetensors headers -------------------------------------------------------
# Duplicate tensor name: the second entry of a norm points at another norm's bytes (last wins).
h = json.dumps(TINY_HEADER)[:-1]
alt = TINY_HEADER["layers.0.ffn_norm.weight"]
dup = h + ', "layers.0.attn_norm.weight": ' + json.dumps(alt) + "}"
all_commands("duplicate tensor name", model_dir("st_dup", st=st_bytes(None, TINY_DATA, raw_header=dup.encode())))
# Overlap hidden by empty tensors sorted between the overlapping ones (mtp.* names are accepted).
hdr = json.loads(json.dumps(TINY_HEADER))
a0, a1 = hdr["layers.0.attn.kv_norm.weight"]["data_offsets"]
hdr["layers.0.attn.q_norm.weight"]["data_offsets"] = [a0 + 4, a1 + 4]
hdr["mtp.z1"] = {"dtype": "I8", "shape": [0], "data_offsets": [a0 + 2, a0 + 2]}
hdr["mtp.z2"] = {"dtype": "I8", "shape": [0], "data_offsets": [a1, a1]}
all_commands("overlap hidden by empty tensors", model_dir("st_overlap", st=st_bytes(hdr, TINY_DATA)))
all_commands("NUL-padded header", model_dir("st_nul", st=st_bytes(TINY_HEADER, TINY_DATA, pad=b"\0", align=64)))
all_commands("header not starting with {",
             model_dir("st_lead", st=st_bytes(None, TINY_DATA, raw_header=b" " + json.dumps(TINY_HEADER).encode())))
# tid2eid: 2^32 + 1 wraps to expert 1 when narrowed to int32.
data = bytearray(TINY_DATA)
off = TINY_HEADER["layers.0.ffn.gate.tid2eid"]["data_offsets"][0]
data[off:off + 8] = struct.pack("<q", 2**32 + 1)
all_commands("tid2eid 2^32+1", model_dir("st_tid2eid", st=st_bytes(TINY_HEADER, bytes(data))),
             inspect=False)
# Index naming a shard outside the directory.
idx = json.dumps({"weight_map": {"embed.weight": "../model.safetensors"}}).encode()
all_commands("index shard ../", model_dir("idx_dotdot", files={"model.safetensors.index.json": idx}))
all_commands("index with a duplicate key", model_dir("idx_dup", files={
    "model.safetensors.index.json": b'{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}'}))


# --- golden files ---------------------------------------------------------------------------------
def golden_case(name, content):
    g = os.path.join(new_dir(f"golden_{name}"), "golden.safetensors")
    open(g, "wb").write(content)
    cases.append((f"golden {name} [verify]", ["verify", "--model", TINY, "--golden", g], None))


gdata = bytearray(GOLD_DATA)
off = GOLD_HEADER["p0.input_ids"]["data_offsets"][0]
gdata[off:off + 8] = struct.pack("<q", 2**32 + 5)
golden_case("input id 2^32+5", st_bytes(GOLD_HEADER, bytes(gdata)))
gdata = bytearray(GOLD_DATA)
off = GOLD_HEADER["p0.greedy_tokens"]["data_offsets"][0]
gdata[off:off + 8] = struct.pack("<q", -(2**32) + 7)
golden_case("greedy token -2^32+7", st_bytes(GOLD_HEADER, bytes(gdata)))
golden_case("NUL padding", st_bytes(GOLD_HEADER, GOLD_DATA, pad=b"\0", align=64))
misaligned = json.dumps(GOLD_HEADER).encode()
while len(misaligned) % 8 != 2:
    misaligned += b" "
golden_case("misaligned F32", st_bytes(None, GOLD_DATA, raw_header=misaligned, align=1))
ghdr = json.loads(json.dumps(GOLD_HEADER))
ghdr["p0.input_ids"]["shape"] = [0]
ghdr["p0.input_ids"]["data_offsets"] = [0, 0]
golden_case("empty prompt", st_bytes(ghdr, GOLD_DATA))

# --- command lines --------------------------------------------------------------------------------
gen = ["generate", "--model", TINY, "--prompt-ids", "1,2,3", "--max-tokens", "2"]
ver = ["verify", "--model", TINY, "--golden", GOLDEN]
ins = ["inspect", "--model", TINY]
for label, flags in [
        ("pp-partition 2147483647,2147483647,7", ["--pp", "3", "--pp-partition", "2147483647,2147483647,7"]),
        ("pp-partition 4294967298,4294967299", ["--pp", "2", "--pp-partition", "4294967298,4294967299"]),
        ("pp-partition -1,6", ["--pp", "2", "--pp-partition", "-1,6"]),
        ("pp-partition 2,3,", ["--pp", "2", "--pp-partition", "2,3,"]),
        ("max-num-seqs 2^64", ["--max-num-seqs", "18446744073709551616"]),
        ("seed -1", ["--seed", "-1"]),
        ("threads ' 4'", ["--threads", " 4"]),
        ("max-model-len 0x10", ["--max-model-len", "0x10"])]:
    for cmd, base in (("generate", gen), ("verify", ver), ("inspect", ins)):
        cases.append((f"flag {label} [{cmd}]", base + flags, None))
for label, flags in [
        ("prompt-ids 4294967297", ["--prompt-ids", "4294967297"]),
        ("prompt-ids +1", ["--prompt-ids", "+1"]),
        ("max-tokens 99999999999999999999", ["--max-tokens", "99999999999999999999"]),
        ("fault-inject 99999999999:1", ["--fault-inject", "99999999999:1"]),
        ("fault-inject 0:-1", ["--fault-inject", "0:-1"]),
        ("fault-inject 0:1:boom", ["--fault-inject", "0:1:boom"]),
        ("trace /dev/full", ["--trace", "/dev/full"]),
        ("trace a directory", ["--trace", root]),
        ("trace in a missing directory", ["--trace", os.path.join(root, "no/such/dir/t.json")]),
        ("model path of 100k characters", ["--model", "m" * 100000])]:
    cases.append((f"flag {label} [generate]", gen + flags, None))
    if not label.startswith(("prompt-ids", "max-tokens")):
        cases.append((f"flag {label} [verify]", ver + flags, None))

# --trace on an existing file must leave it alone when the run is refused.
keep = os.path.join(root, "keep_trace.json")
open(keep, "w").write("keep me\n")


def trace_kept(_res):
    got = open(keep).read()
    return None if got == "keep me\n" else f"--trace file was changed to {got[:40]!r}"


cases.append(("trace file kept when the run is refused [generate]",
              ["generate", "--model", TINY, "--prompt-ids", "1,999", "--trace", keep], trace_kept))
cases.append(("trace file kept when the run is refused [verify]",
              ["verify", "--model", model_dir("cfg_trace", config=dict(TINY_CONFIG, hc_mult=17)),
               "--golden", GOLDEN, "--trace", keep], trace_kept))


# --- exhausted resources (not under ASan: it reserves terabytes of address space) ----------------
def limit_as(kib):
    def pre():
        resource.setrlimit(resource.RLIMIT_AS, (kib * 1024, kib * 1024))
    return pre


LIMITED = []
if not SANITIZED:
    for kib in (60000, 100000, 200000):
        LIMITED.append((f"ulimit -v {kib} [generate]", gen + ["--threads", "8", "--pp", "2"], kib))
        LIMITED.append((f"ulimit -v {kib} [verify]", ver + ["--threads", "8"], kib))


def run(name, argv, check, kib=None):
    try:
        r = subprocess.run([BIN, *argv], capture_output=True, timeout=TIMEOUT,
                           preexec_fn=limit_as(kib) if kib else None)
    except subprocess.TimeoutExpired:
        return f"{name}: hung (no exit within {TIMEOUT} s)"
    err = r.stderr.decode(errors="replace")
    if kib and r.returncode == 0:
        return None  # the run fitted in the limit: fine, as long as nothing crashed or hung
    if r.returncode != 2:
        return f"{name}: exit {r.returncode}, expected 2; stderr: {err[-600:]}"
    if not any(line.startswith("error: ") for line in err.splitlines()):
        return f"{name}: no 'error: ' line; stderr: {err[-600:]}"
    for mark in CRASH_MARKS:
        if mark in err:
            return f"{name}: crash marker {mark!r}; stderr: {err[-600:]}"
    if len(err) > 20000:
        return f"{name}: {len(err)} bytes of stderr; expected a short message"
    return check(r) if check else None


failures = []
jobs = [(n, a, c, None) for n, a, c in cases] + [(n, a, None, k) for n, a, k in LIMITED]
with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    for (name, *_), problem in zip(jobs, pool.map(lambda j: run(*j), jobs)):
        if problem:
            failures.append(problem)
            print("FAIL:", problem)
        else:
            print("ok:", name)
shutil.rmtree(root, ignore_errors=True)
print(f"{len(jobs) - len(failures)} of {len(jobs)} hostile cases refused cleanly")
sys.exit(1 if failures else 0)
