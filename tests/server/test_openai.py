"""`seekpipe serve` driven by the official openai client: completions and chat, streaming and
not, thinking on and off, a tool-call round trip, stop strings, seeds, n, logprobs, a cancelled
stream, 32 concurrent clients; greedy outputs equal `seekpipe generate`'s at every pipeline split.

usage: test_openai.py SEEKPIPE MODEL_DIR pp1|pp2|mpi2
"""
import concurrent.futures
import json
import sys
import time

from harness import Server, generate_text, run_tests

binary, model, mode = sys.argv[1], sys.argv[2], sys.argv[3]
NAME = model.rstrip("/").split("/")[-1]
PROMPT = "And Jesus said unto them,"
pp = 1 if mode == "pp1" else 2
srv = Server(binary, model, "--debug-replay", "--max-num-seqs", "8", pp=pp, mpi=mode == "mpi2",
             max_model_len=2048)
client = srv.client()
REF = generate_text(binary, model, PROMPT, 24)  # seekpipe generate, single stage


def greedy(**kw):
    args = dict(model=NAME, prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    args.update(kw)
    return client.completions.create(**args)


def test_models():
    ids = [m.id for m in client.models.list().data]
    assert ids == [NAME], ids


def test_completion_greedy_equals_generate():
    r = greedy()
    assert r.choices[0].text == REF, (r.choices[0].text, REF)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 24


def test_chat_equals_generate_chat():
    """`seekpipe generate --chat` renders the same prompt and replies the same (greedy)."""
    msg = "Who spake unto Moses?"
    r = srv.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": msg}],
                                             max_tokens=16, temperature=0,
                                             extra_body={"ignore_eos": True})
    want = generate_text(binary, model, msg, 16, extra=("--chat",))
    assert r.choices[0].message.content == want, (r.choices[0].message.content, want)


def test_completion_token_id_prompt():
    status, _, tok = srv.post("/tokenize", {"model": NAME, "prompt": PROMPT})
    assert status == 200 and tok["count"] == len(tok["tokens"]), tok
    r = greedy(prompt=tok["tokens"])
    assert r.choices[0].text == REF
    status, _, det = srv.post("/detokenize", {"model": NAME, "tokens": tok["tokens"]})
    assert status == 200 and det["prompt"].endswith(PROMPT), det


def test_completion_stream_equals_non_stream():
    chunks = list(greedy(stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == REF, (text, REF)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"], finals
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].choices == []


def test_stream_without_usage_has_none():
    chunks = list(greedy(stream=True))
    assert all(c.usage is None for c in chunks)


def test_stop_strings():
    stop = REF.split()[3]  # a word well inside the reference text
    cut = REF[:REF.index(stop)]
    r = greedy(stop=[stop, "zzzz-never"])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop", r.choices[0]
    text = "".join(c.choices[0].text for c in greedy(stop=stop, stream=True) if c.choices)
    assert text == cut, (text, cut)  # held back until it could not match, never sent


def test_stop_token_ids():
    status, _, tok = srv.post("/tokenize", {"model": NAME, "prompt": REF, "add_special_tokens": False})
    first = tok["tokens"][2]
    r = greedy(extra_body={"stop_token_ids": [first], "ignore_eos": False})
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= 3


def test_seeds():
    a = greedy(temperature=1.0, seed=1234, max_tokens=16).choices[0].text
    b = greedy(temperature=1.0, seed=1234, max_tokens=16).choices[0].text
    assert a == b, (a, b)
    others = {greedy(temperature=1.0, seed=s, max_tokens=16).choices[0].text for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds gave the same text every time"


def test_n_choices():
    r = greedy(n=3, temperature=1.0, seed=7, max_tokens=16)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1, "n choices share one random stream"
    assert r.usage.completion_tokens == 48
    g = greedy(n=2)
    assert g.choices[0].text == g.choices[1].text == REF
    again = greedy(n=3, temperature=1.0, seed=7, max_tokens=16)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    chunks = list(greedy(n=2, stream=True))
    by = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            by[ch.index] += ch.text
    assert by[0] == by[1] == REF


def test_logprobs():
    r = greedy(logprobs=3, max_tokens=8)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and len(lp.token_logprobs) == 8 and len(lp.top_logprobs) == 8
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen <= 0
        assert abs(max(top.values()) - chosen) < 1e-5  # greedy picks the most likely token
    c = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_chat_non_stream_and_stream():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who spake?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant" and isinstance(m.content, str)
    s = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(s)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == m.content, (text, m.content)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def rendered_prompt(body):
    status, _, tok = srv.post("/tokenize", dict(body, model=NAME))
    assert status == 200, tok
    status, _, det = srv.post("/detokenize", {"model": NAME, "tokens": tok["tokens"]})
    return det["prompt"]


def test_thinking_on_off():
    msgs = [{"role": "user", "content": "Hi"}]
    assert rendered_prompt({"messages": msgs}).endswith("<｜Assistant｜></think>")
    for key in ("thinking", "enable_thinking"):
        p = rendered_prompt({"messages": msgs, "chat_template_kwargs": {key: True}})
        assert p.endswith("<｜Assistant｜><think>"), p
    # Through generation: reasoning is split off only in thinking mode.
    text = "Let me think.</think>The answer."
    on = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=50,
                                        extra_body={"chat_template_kwargs": {"thinking": True},
                                                    "debug_replay_text": text})
    assert on.choices[0].message.content == "The answer."
    assert on.choices[0].message.model_extra["reasoning_content"] == "Let me think."
    off = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=50,
                                         extra_body={"debug_replay_text": text})
    assert off.choices[0].message.content == text
    deltas = list(client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=50, stream=True,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}, "debug_replay_text": text}))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                        for c in deltas if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in deltas if c.choices)
    assert (reasoning, content) == ("Let me think.", "The answer."), (reasoning, content)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL = ("Checking.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
        "<｜DSML｜parameter name=\"city\" string=\"true\">Jerusalem</｜DSML｜parameter>\n"
        "<｜DSML｜parameter name=\"days\" string=\"false\">3</｜DSML｜parameter>\n"
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>")


def test_tool_call_round_trip():
    msgs = [{"role": "user", "content": "Weather in Jerusalem?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=100,
                                       extra_body={"debug_replay_text": CALL})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    assert ch.message.content == "Checking."
    call = ch.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Jerusalem", "days": 3}
    # Streaming: the same call, whole, once its block closed.
    chunks = list(client.chat.completions.create(model=NAME, messages=msgs, tools=TOOLS, max_tokens=100,
                                                 stream=True, extra_body={"debug_replay_text": CALL}))
    calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Jerusalem", "days": 3}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # The round trip: the call and its result go back in; the model answers (a real generation).
    msgs2 = msgs + [ch.message.model_dump(exclude_none=True),
                    {"role": "tool", "tool_call_id": call.id, "content": "{\"temp\": 21}"}]
    r2 = client.chat.completions.create(model=NAME, messages=msgs2, tools=TOOLS, max_tokens=8, temperature=0)
    assert r2.choices[0].message.role == "assistant" and r2.usage.completion_tokens > 0
    p = rendered_prompt({"messages": msgs2, "tools": TOOLS})
    assert "get_weather" in p and "{\"temp\": 21}" in p and "Jerusalem" in p, p


def test_cancelled_stream_frees_its_blocks():
    before = srv.metric("seekpipe_request_finish_total", reason="abort")
    stream = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=480, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    stream.close()  # the client goes away mid-generation
    m = srv.wait_idle(stages=pp)
    assert m[("seekpipe_request_finish_total", (("reason", "abort"),))] >= before + 1


def test_concurrent_clients():
    def one(i):
        if i % 2:
            return greedy().choices[0].text
        return "".join(c.choices[0].text for c in greedy(stream=True) if c.choices)
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        outs = list(ex.map(one, range(32), timeout=300))
    assert all(o == REF for o in outs), [o for o in outs if o != REF][:2]
    srv.wait_idle(stages=pp)


def test_metrics_parse():
    m = srv.metrics()
    for name in ("seekpipe_prompt_tokens_total", "seekpipe_generation_tokens_total",
                 "seekpipe_time_to_first_token_seconds_count", "seekpipe_inter_token_latency_seconds_count",
                 "seekpipe_e2e_request_latency_seconds_count", "seekpipe_queue_length",
                 "seekpipe_num_requests_running", "seekpipe_num_requests_waiting"):
        assert any(k[0] == name for k in m), name
    assert m[("seekpipe_generation_tokens_total", ())] > 0
    assert m[("seekpipe_requests_total", (("status", "200"),))] > 0
    for s in range(pp):
        assert ("seekpipe_state_blocks_total", (("stage", str(s)),)) in m
        busy = m[("seekpipe_stage_busy_fraction", (("stage", str(s)),))]
        assert 0 < busy <= 1, (s, busy)


try:
    rc = run_tests([test_models, test_completion_greedy_equals_generate, test_chat_equals_generate_chat,
                    test_completion_token_id_prompt,
                    test_completion_stream_equals_non_stream, test_stream_without_usage_has_none,
                    test_stop_strings, test_stop_token_ids, test_seeds, test_n_choices, test_logprobs,
                    test_chat_non_stream_and_stream, test_thinking_on_off, test_tool_call_round_trip,
                    test_cancelled_stream_frees_its_blocks, test_concurrent_clients, test_metrics_parse],
                   srv)
finally:
    code = srv.stop()
if mode != "mpi2" and code != 0:  # mpirun's own exit code after SIGTERM is not the server's
    print("FAIL shutdown: seekpipe serve exited with %s after SIGTERM" % code)
    rc = 1
sys.exit(rc)
