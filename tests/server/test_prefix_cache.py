"""Prefix caching through the server: two chat requests with the openai client sharing a long
system prompt; the second one's prompt is partly found in the prefix cache (visible in /metrics as
seekpipe_prefix_cache_hits_total, a multiple of the 256-token state block), its greedy reply is the
one a server without prefix caching gives, and once idle no state block is counted as used.

usage: test_prefix_cache.py SEEKPIPE MODEL_DIR pp1|pp2|mpi2
"""
import sys

from harness import Server, run_tests

binary, model, mode = sys.argv[1], sys.argv[2], sys.argv[3]
NAME = model.rstrip("/").split("/")[-1]
pp = 1 if mode == "pp1" else 2
SYSTEM = ("Thou art a scribe of the house of Israel, learned in the law and the prophets. " * 12 +
          "Answer in the words of the King James Bible, briefly, and speak no vain thing.")
QUESTIONS = ["Who spake unto Moses?", "What did the LORD say unto Abraham?"]
BLOCK = 256


def chat(srv, question):
    r = srv.client().chat.completions.create(
        model=NAME, messages=[{"role": "system", "content": SYSTEM},
                              {"role": "user", "content": question}],
        max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].message.content, r.usage.prompt_tokens


def replies(*flags):
    srv = Server(binary, model, *flags, pp=pp, mpi=mode == "mpi2", max_model_len=1024)
    try:
        out, hits, queries = [], [], []
        for q in QUESTIONS:
            text, prompt_tokens = chat(srv, q)
            m = srv.wait_idle(stages=pp)
            out.append((text, prompt_tokens))
            hits.append(m.get(("seekpipe_prefix_cache_hits_total", ()), None))
            queries.append(m.get(("seekpipe_prefix_cache_queries_total", ()), None))
        return out, hits, queries, m
    finally:
        srv.stop()


def test_shared_system_prompt_hits_and_matches_uncached():
    plain, plain_hits, _, _ = replies("--no-enable-prefix-caching")
    cached, hits, queries, m = replies()
    assert cached == plain, (cached, plain)
    first_len, second_len = plain[0][1], plain[1][1]
    assert first_len > BLOCK and second_len > BLOCK, (first_len, second_len)
    assert plain_hits == [0, 0], plain_hits
    # The first request finds nothing; the second, the shared system prompt's whole blocks.
    assert hits[0] == 0 and queries[0] == first_len, (hits, queries)
    assert queries[1] == first_len + second_len, queries
    assert hits[1] >= BLOCK and hits[1] % BLOCK == 0 and hits[1] < second_len, hits
    assert m[("seekpipe_prefix_cache_blocks", ())] > 0


try:
    rc = run_tests([test_shared_system_prompt_hits_and_matches_uncached])
except Exception as e:  # a server that does not start
    print("FAIL %s" % e)
    rc = 1
sys.exit(rc)
