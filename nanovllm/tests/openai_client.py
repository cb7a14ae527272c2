"""The official `openai` Python client against `nanovllm serve` (run by .ci/run).

Starts the server binary given as argv[1] on the tiny Qwen3 fixture (CPU, any free port), with
a word-level tokenizer of the fixture's 1,024-token vocabulary written next to it (as
nanovllm/tests/serve.rs does), and checks completions and chat completions, whole and
streamed, the model list and an error, as the client parses them. Exits non-zero on failure.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(ROOT, "nanovllm-models", "tests", "fixtures", "tiny-qwen3")
MODEL = "tiny"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def write_model(folder):
    for name in ["config.json", "generation_config.json", "model.safetensors"]:
        os.symlink(os.path.join(FIXTURE, name), os.path.join(folder, name))
    vocab = {f"w{i}": i for i in range(1000)}
    vocab.update({t: 1000 + i for i, t in enumerate(SPECIALS)})
    for i, w in enumerate(["user", "assistant", "system", "hello", "world", "[UNK]"]):
        vocab[w] = 1003 + i
    added = [
        {"id": 1000 + i, "content": t, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True}
        for i, t in enumerate(SPECIALS)
    ]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": vocab},
    }
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}, f)


def start_server(binary, folder):
    cmd = [binary, "serve", "--model", folder, "--served-model-name", MODEL, "--device", "cpu",
           "--port", "0", "--max-model-len", "512", "--num-kvcache-blocks", "64"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        m = re.search(r"on (http://\S+)", line)
        if m:
            # Keep draining stderr so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [sys.stderr.write(x) for x in proc.stderr],
                             daemon=True).start()
            return proc, m.group(1)
    proc.wait()
    sys.exit(f"nanovllm serve exited ({proc.returncode}) before listening:\n{''.join(lines)}")


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def run(client):
    models = [m.id for m in client.models.list()]
    check(models == [MODEL], f"models: {models}")

    prompt = list(range(10, 30))
    extra = {"ignore_eos": True}
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body=extra)
    text = r.choices[0].text
    check(r.choices[0].finish_reason == "length", f"finish_reason: {r}")
    check(r.usage.prompt_tokens == 20 and r.usage.completion_tokens == 8, f"usage: {r.usage}")
    words = " ".join(f"w{i}" for i in prompt)
    r2 = client.completions.create(model=MODEL, prompt=words, max_tokens=8, temperature=0,
                                   extra_body=extra)
    check(r2.choices[0].text == text, f"text prompt: {r2.choices[0].text!r} != {text!r}")

    chunks = list(client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    check(streamed == text, f"streamed {streamed!r} != {text!r}")
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8,
          f"last chunk: {chunks[-1]}")

    messages = [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                       temperature=0, extra_body=extra)
    content = r.choices[0].message.content
    check(r.choices[0].message.role == "assistant", f"role: {r}")
    check(r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 6, f"usage: {r.usage}")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra))
    check(chunks[0].choices[0].delta.role == "assistant", f"first chunk: {chunks[0]}")
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == content, f"streamed chat {streamed!r} != {content!r}")
    check(chunks[-1].usage.total_tokens == 17, f"last chunk: {chunks[-1]}")

    try:
        client.completions.create(model=MODEL, prompt=[1], temperature=5)
        raise AssertionError("temperature 5 was accepted")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", f"error body: {e.body}")
    try:
        client.completions.create(model="gpt-4", prompt=[1])
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError:
        pass


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: openai_client.py PATH/TO/nanovllm")
    with tempfile.TemporaryDirectory() as folder:
        write_model(folder)
        proc, base = start_server(sys.argv[1], folder)
        try:
            run(openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                              timeout=60))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"openai {openai.__version__} client: completions and chat, whole and streamed: ok")


if __name__ == "__main__":
    main()
