"""`seekpipe serve --speculative mtp` driven by the official openai client (a 2-stage pipeline):
greedy completions, streamed or not and from concurrent clients, equal `seekpipe generate`'s without
speculation; stop strings still cut the text; sampled requests complete; /metrics counts the
drafts and the accepted tokens.

usage: test_speculative.py SEEKPIPE MODEL_DIR
"""
import concurrent.futures
import sys

from harness import Server, generate_text, run_tests

binary, model = sys.argv[1], sys.argv[2]
NAME = model.rstrip("/").split("/")[-1]
PROMPTS = ["And Jesus said unto them,", "The LORD is my shepherd;", "In the beginning"]
srv = Server(binary, model, "--max-num-seqs", "4", "--speculative", "mtp",
             "--num-speculative-tokens", "3", pp=2, max_model_len=1024)
client = srv.client()
REF = {p: generate_text(binary, model, p, 40) for p in PROMPTS}  # no speculation, one stage


def greedy(prompt, **kw):
    args = dict(model=NAME, prompt=prompt, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    args.update(kw)
    return client.completions.create(**args)


def test_greedy_equals_generate_without_speculation():
    for p in PROMPTS:
        r = greedy(p)
        assert r.choices[0].text == REF[p], (p, r.choices[0].text, REF[p])
        assert r.usage.completion_tokens == 40, r.usage


def test_stream_equals_non_stream():
    p = PROMPTS[0]
    text = "".join(c.choices[0].text for c in greedy(p, stream=True) if c.choices)
    assert text == REF[p], (text, REF[p])


def test_concurrent_clients():
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda i: (PROMPTS[i % 3], greedy(PROMPTS[i % 3]).choices[0].text), range(8)))
    bad = [(p, o) for p, o in outs if o != REF[p]]
    assert not bad, bad[:2]
    srv.wait_idle(stages=2)


def test_stop_string_cuts_accepted_tokens():
    p = PROMPTS[0]
    stop = REF[p][10:14]
    r = greedy(p, stop=[stop])
    assert r.choices[0].finish_reason == "stop", r.choices[0]
    assert r.choices[0].text == REF[p][:REF[p].index(stop)], (r.choices[0].text, stop)


def test_sampled_requests_complete():
    r = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0.9,
                                  top_p=0.95, seed=7, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 30, r.usage
    again = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=30, temperature=0.9,
                                      top_p=0.95, seed=7, extra_body={"ignore_eos": True})
    assert again.choices[0].text == r.choices[0].text  # counter-based draws: the same seed, the same text


def test_metrics_count_drafts():
    m = srv.metrics()
    drafts = m[("seekpipe_spec_decode_num_drafts_total", ())]
    tokens = m[("seekpipe_spec_decode_num_draft_tokens_total", ())]
    accepted = m[("seekpipe_spec_decode_num_accepted_tokens_total", ())]
    assert drafts > 0 and tokens >= drafts and 0 < accepted <= tokens, (drafts, tokens, accepted)


try:
    rc = run_tests([test_greedy_equals_generate_without_speculation, test_stream_equals_non_stream,
                    test_concurrent_clients, test_stop_string_cuts_accepted_tokens,
                    test_sampled_requests_complete, test_metrics_count_drafts], srv)
finally:
    code = srv.stop()
if code != 0:
    print("FAIL shutdown: seekpipe serve exited with %s after SIGTERM" % code)
    rc = 1
sys.exit(rc)
