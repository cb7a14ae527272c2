#!/usr/bin/env python3
"""The official `openai` Python client against `nanovllm serve` on a GPU machine.

Usage: openai_check.py NANOVLLM_BINARY [DEVICE]
Starts `serve --model qwen3-0.6b` (dummy weights, the built-in Qwen3 tokenizer) on DEVICE
(default cuda) and checks, as the client parses them: the model list, a text completion whole
and streamed, a chat completion whole and streamed, and an error for a bad parameter.
Exits non-zero on failure; prints one line per check.
"""
import subprocess
import sys
import time
import urllib.request

import openai

PORT = 8017


def main():
    binary = sys.argv[1]
    device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
    proc = subprocess.Popen([binary, "serve", "--model", "qwen3-0.6b", "--device", device,
                             "--port", str(PORT), "--max-model-len", "1024"])
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    sys.exit(f"server exited with {proc.returncode}")
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key="none")
        print("openai", openai.__version__)
        models = [m.id for m in client.models.list()]
        print("models:", models)
        model = models[0]
        r = client.completions.create(model=model, prompt="The capital of France is",
                                      max_tokens=16, temperature=0.6, seed=1)
        assert r.choices[0].finish_reason in ("length", "stop"), r
        print("completion:", repr(r.choices[0].text[:60]), r.usage)
        pieces = [c.choices[0].text for c in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=16, stream=True) if c.choices]
        assert pieces, "no streamed completion chunks"
        print("streamed completion chunks:", len(pieces))
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=16)
        print("chat:", repr(r.choices[0].message.content[:60]), r.usage)
        chunks = list(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=16,
            stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage is not None, "no usage in the last chunk"
        print("streamed chat chunks:", len(chunks), "usage:", chunks[-1].usage)
        try:
            client.completions.create(model=model, prompt="x", temperature=9)
            sys.exit("temperature 9 was accepted")
        except openai.BadRequestError as e:
            print("bad temperature ->", e.status_code)
        print("openai client check: PASS")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
