"""Every bad input of the server is a 400 with an OpenAI-style error body naming the field (and
a missing API key a 401), checked raw over HTTP and through the openai client.

usage: test_errors.py SEEKPIPE MODEL_DIR
"""
import json
import sys

import openai

from harness import Server, run_tests

binary, model = sys.argv[1], sys.argv[2]
NAME = model.rstrip("/").split("/")[-1]
KEY = "sekrit-test-key"
srv = Server(binary, model, "--max-body-bytes", "4096", api_key=KEY)

C = "/v1/completions"
CH = "/v1/chat/completions"
OK_C = {"model": NAME, "prompt": "And", "max_tokens": 2}
OK_CH = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def expect(path, body, param, status=400, code=None, headers=None):
    got, _, data = srv.request("POST", path, body, headers=headers)
    assert got == status, "%s %s: status %s, want %s: %r" % (path, str(body)[:120], got, status, data[:300])
    err = json.loads(data)["error"]
    assert err["param"] == param, "param %r, want %r: %s" % (err["param"], param, err)
    assert err["message"] and err["type"], err
    if status == 400:
        assert err["type"] == "invalid_request_error", err
    if code:
        assert err["code"] == code, err
    return err


def with_(base, **kw):
    b = dict(base)
    b.update(kw)
    return b


def test_malformed_json():
    expect(C, "{\"model\": ", None, code="invalid_json")
    expect(CH, "[1, 2]", None, code="invalid_json")
    expect("/tokenize", "not json", None, code="invalid_json")


def test_wrong_types():
    for field, value in [("max_tokens", "ten"), ("temperature", "hot"), ("top_p", [1]), ("stream", "yes"),
                         ("n", 1.5), ("seed", "x"), ("stop", 5), ("logprobs", "x"), ("top_k", 0.5),
                         ("ignore_eos", 1), ("stop_token_ids", "1"), ("stream_options", 3)]:
        expect(C, with_(OK_C, **{field: value}), field)
    expect(C, with_(OK_C, prompt=5), "prompt", code="invalid_type")
    expect(C, with_(OK_C, prompt=[1, "a"]), "prompt")
    expect(CH, with_(OK_CH, messages="hi"), "messages")
    expect(CH, with_(OK_CH, tools={"a": 1}), "tools")
    expect(CH, with_(OK_CH, logprobs=3), "logprobs")
    expect(CH, with_(OK_CH, chat_template_kwargs={"thinking": "yes"}), "chat_template_kwargs")
    expect(CH, with_(OK_CH, messages=[{"content": "no role"}]), "messages")
    expect(C, with_(OK_C, model=7), "model")


def test_model():
    expect(C, {"prompt": "And"}, "model", code="missing_required_parameter")
    expect(C, with_(OK_C, model="gpt-4"), "model", code="model_not_found")
    expect(CH, with_(OK_CH, model="nope"), "model", code="model_not_found")


def test_missing_and_empty_prompt():
    expect(C, {"model": NAME}, "prompt", code="missing_required_parameter")
    expect(C, with_(OK_C, prompt=""), "prompt")
    expect(CH, {"model": NAME}, "messages")
    expect(CH, with_(OK_CH, messages=[]), "messages")


def test_prompt_longer_than_context():
    expect(C, with_(OK_C, prompt=[5] * 512), "prompt", code="context_length_exceeded")
    expect(C, with_(OK_C, prompt="And " * 600), "prompt", code="context_length_exceeded")
    expect(CH, with_(OK_CH, messages=[{"role": "user", "content": "And " * 600}]), "messages",
           code="context_length_exceeded")
    expect(C, with_(OK_C, prompt=[5, 999999]), "prompt")  # outside the vocabulary


def test_max_tokens():
    expect(C, with_(OK_C, max_tokens=512), "max_tokens", code="context_length_exceeded")
    expect(C, with_(OK_C, max_tokens=0), "max_tokens")
    expect(CH, with_(OK_CH, max_tokens=10**6), "max_tokens")
    expect(CH, with_(OK_CH, max_completion_tokens=10**6), "max_completion_tokens")


def test_invalid_sampling_values():
    for field, value in [("temperature", -1), ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5),
                         ("top_k", -2), ("min_p", 2), ("presence_penalty", 3), ("frequency_penalty", -3),
                         ("repetition_penalty", 0), ("n", 0), ("n", 100), ("logprobs", 21), ("logprobs", -1)]:
        expect(C, with_(OK_C, **{field: value}), field)
    expect(CH, with_(OK_CH, logprobs=True, top_logprobs=21), "top_logprobs")
    expect(CH, with_(OK_CH, top_logprobs=2), "top_logprobs")
    expect(C, with_(OK_C, stop=[""]), "stop")
    expect(C, with_(OK_C, stream_options={"include_usage": True}), "stream_options")
    expect(C, with_(OK_C, stream=True, stream_options={"include_usage": "y"}), "stream_options.include_usage")
    expect(C, with_(OK_C, stop_token_ids=[-1]), "stop_token_ids")


def test_oversized_body():
    big = with_(OK_C, prompt="x" * 5000)
    expect(C, big, "body", code="body_too_large")
    expect(CH, with_(OK_CH, messages=[{"role": "user", "content": "y" * 5000}]), "body")
    expect("/tokenize", {"model": NAME, "prompt": "z" * 5000}, "body")


def test_api_key():
    got, _, data = srv.request("POST", C, OK_C, headers={"Authorization": "Bearer wrong"})
    assert got == 401 and json.loads(data)["error"]["code"] == "invalid_api_key", (got, data)
    got, _, data = srv.request("GET", "/v1/models", headers={"Authorization": ""})
    assert got == 401, got
    got, _, _ = srv.request("GET", "/health", headers={"Authorization": ""})
    assert got == 200
    status, _, data = srv.request("POST", C, OK_C)
    assert status == 200, data


def test_tokenize_detokenize_errors():
    expect("/tokenize", {"model": NAME}, "prompt", code="missing_required_parameter")
    expect("/tokenize", {"model": NAME, "prompt": 3}, "prompt")
    expect("/detokenize", {"model": NAME, "tokens": "1,2"}, "tokens")
    expect("/detokenize", {"model": NAME, "tokens": [1, -5]}, "tokens")


def test_openai_client_sees_the_errors():
    c = srv.client()
    try:
        c.completions.create(model=NAME, prompt="And", max_tokens=2, temperature=9)
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and e.body["param"] == "temperature", e.body
    try:
        c.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("no error")
    except openai.BadRequestError as e:
        assert e.body["code"] == "model_not_found", e.body
    bad = srv.client()
    bad.api_key = "wrong"
    try:
        bad.models.list()
        raise AssertionError("no error")
    except openai.AuthenticationError:
        pass


try:
    rc = run_tests([test_malformed_json, test_wrong_types, test_model, test_missing_and_empty_prompt,
                    test_prompt_longer_than_context, test_max_tokens, test_invalid_sampling_values,
                    test_oversized_body, test_api_key, test_tokenize_detokenize_errors,
                    test_openai_client_sees_the_errors], srv)
finally:
    code = srv.stop()
if True and code != 0:  # mpirun's own exit code after SIGTERM is not the server's
    print("FAIL shutdown: seekpipe serve exited with %s after SIGTERM" % code)
    rc = 1
sys.exit(rc)
