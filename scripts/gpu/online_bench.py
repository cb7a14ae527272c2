#!/usr/bin/env python3
"""Online serving benchmark: `nanovllm serve` under Poisson request arrivals (run on a GPU machine).

Starts `gpu/bin/nanovllm serve --model qwen3-0.6b` (dummy weights), waits for GET /health, and
for each request rate (4, 16, 64 req/s and "inf" = all at once) sends N requests to
POST /v1/completions with exponential inter-arrival times. The workload is bench.py's: with
Python's random.seed(0), prompt i is randint(100, 1024) ids drawn with randint(0, 10000), then
max_tokens are randint(100, 1024) per request; the same requests are sent at every rate.
Sampling: temperature 0.6, ignore_eos, streamed with a final usage chunk.

Per request: TTFT = send -> first chunk carrying a choice; TPOT = (last choice chunk - first)
/ (completion tokens - 1). Per rate: p50/p99 of both and output tokens / wall time (first send
to last completion). Python standard library only; one thread per in-flight request.

    python3 scripts/gpu/online_bench.py            # the GPU run
    python3 scripts/gpu/online_bench.py --quick    # small local check on the tiny CPU model
"""

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time

RATES = [4.0, 16.0, 64.0, float("inf")]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="local check: tiny CPU model, small N and lengths, port 8011")
    p.add_argument("--binary", default=None, help="nanovllm binary (default gpu/bin/nanovllm)")
    p.add_argument("--model", default=None, help="model name or path (default qwen3-0.6b)")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--num-requests", type=int, default=None, help="requests per rate (default 200)")
    p.add_argument("--max-seconds-per-rate", type=float, default=90.0,
                   help="lower N for a rate whose arrivals alone would take longer than this")
    args = p.parse_args()
    if args.quick:
        args.binary = args.binary or "target-main/release/nanovllm"
        args.model = args.model or "nanovllm-models/tests/fixtures/tiny-qwen3"
        args.port = args.port or 8011
        args.num_requests = args.num_requests or 12
        args.extra = ["--device", "cpu"]
        args.prompt_len = (4, 32)
        args.output_len = (4, 24)
        args.max_id = 1023
    else:
        args.binary = args.binary or "gpu/bin/nanovllm"
        args.model = args.model or "qwen3-0.6b"
        args.port = args.port or 8000
        args.num_requests = args.num_requests or 200
        args.extra = []
        args.prompt_len = (100, 1024)
        args.output_len = (100, 1024)
        args.max_id = 10000
    return args


def workload(n, prompt_len, output_len, max_id):
    """bench.py's draws: all prompts first, then all max_tokens, from random.seed(0)."""
    random.seed(0)
    prompts = [[random.randint(0, max_id) for _ in range(random.randint(*prompt_len))]
               for _ in range(n)]
    max_tokens = [random.randint(*output_len) for _ in range(n)]
    return prompts, max_tokens


def card_name():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or "(nvidia-smi gave nothing)"
    except (OSError, subprocess.SubprocessError):
        return "(no nvidia-smi)"


def wait_health(port, server, timeout_s):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.poll() is not None:
            return False
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def one_request(port, prompt, max_tokens, result):
    """Sends one streamed completion and fills `result` with its timings and token count."""
    body = json.dumps({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.6, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    })
    result["start"] = time.perf_counter()
    first = last = None
    usage = None
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v1/completions", body=body,
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            result["error"] = f"HTTP {resp.status}: {resp.read()[:300]!r}"
            return
        while True:
            line = resp.readline()
            if not line:
                result["error"] = "stream ended before [DONE]"
                return
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result["error"] = f"error chunk: {chunk['error']}"
                return
            if chunk.get("choices"):
                now = time.perf_counter()
                if first is None:
                    first = now
                last = now
            if chunk.get("usage"):
                usage = chunk["usage"]
        conn.close()
    except (OSError, http.client.HTTPException, ValueError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        return
    result["end"] = time.perf_counter()
    if first is None or usage is None:
        result["error"] = "no content chunk or no usage chunk"
        return
    out = usage["completion_tokens"]
    result["tokens"] = out
    result["ttft"] = first - result["start"]
    result["tpot"] = (last - first) / (out - 1) if out > 1 else None
    if out != max_tokens:
        result["error"] = f"{out} completion tokens, expected {max_tokens} (ignore_eos)"


def run_rate(port, rate, prompts, max_tokens):
    """Sends the requests with Poisson arrivals at `rate` req/s; returns the per-request results."""
    arrivals = random.Random(0)
    results = [dict() for _ in prompts]
    threads = []
    t0 = time.perf_counter()
    next_at = t0
    for i, (prompt, mt) in enumerate(zip(prompts, max_tokens)):
        if rate != float("inf"):
            if i > 0:
                next_at += arrivals.expovariate(rate)
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        t = threading.Thread(target=one_request, args=(port, prompt, mt, results[i]), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    wall = max(r.get("end", t0) for r in results) - t0
    return results, wall


def pct(xs, q):
    """Nearest-rank percentile of a non-empty list (q in [0, 100])."""
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, int(round(q / 100 * len(xs) + 0.5)) - 1))
    return xs[k]


def main():
    args = parse_args()
    os.makedirs("/tmp/online_bench", exist_ok=True)
    print(f"card: {card_name()}", flush=True)
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    cmd = [args.binary, "serve", "--model", args.model, "--port", str(args.port)] + args.extra
    print("server:", " ".join(cmd), flush=True)
    log_path = f"/tmp/online_bench/server-{args.port}.log"
    log = open(log_path, "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    try:
        t = time.time()
        if not wait_health(args.port, server, 300):
            log.flush()
            print("server did not become healthy; log tail:", file=sys.stderr)
            with open(log_path) as f:
                print(f.read()[-3000:], file=sys.stderr)
            return 1
        print(f"server healthy after {time.time() - t:.1f} s", flush=True)

        prompts, max_tokens = workload(args.num_requests, args.prompt_len, args.output_len,
                                       args.max_id)
        print(f"workload: {len(prompts)} requests, prompt tokens {sum(map(len, prompts))}, "
              f"max_tokens sum {sum(max_tokens)}", flush=True)
        # Warm-up (not measured): one short request through the whole path.
        warm = {}
        one_request(args.port, prompts[0][:16], 4, warm)
        if "error" in warm:
            print(f"warm-up failed: {warm['error']}", file=sys.stderr)
            return 1

        for rate in RATES:
            n = len(prompts)
            if rate != float("inf") and n / rate > args.max_seconds_per_rate:
                n = max(1, int(args.max_seconds_per_rate * rate))
                print(f"rate {rate:g}: N lowered to {n} to keep arrivals under "
                      f"{args.max_seconds_per_rate:g} s", flush=True)
            results, wall = run_rate(args.port, rate, prompts[:n], max_tokens[:n])
            errors = [r["error"] for r in results if "error" in r]
            if errors:
                print(f"rate {rate:g}: {len(errors)} failed requests, first: {errors[0]}",
                      file=sys.stderr)
                return 1
            tokens = sum(r["tokens"] for r in results)
            ttft = [r["ttft"] * 1e3 for r in results]
            tpot = [r["tpot"] * 1e3 for r in results if r["tpot"] is not None]
            row = {
                "rate": "inf" if rate == float("inf") else f"{rate:g}",
                "requests": n, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                "ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 99),
                "tpot_p50": statistics.median(tpot), "tpot_p99": pct(tpot, 99),
            }
            rows.append(row)
            print(f"rate {row['rate']}: {n} requests, {tokens} output tokens in {wall:.1f} s",
                  flush=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()

    print()
    print("| rate (req/s) | requests | throughput (tok/s) | TTFT p50 (ms) | TTFT p99 (ms) "
          "| TPOT p50 (ms) | TPOT p99 (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['rate']} | {r['requests']} | {r['tok_s']:,.0f} | {r['ttft_p50']:,.1f} "
              f"| {r['ttft_p99']:,.1f} | {r['tpot_p50']:.2f} | {r['tpot_p99']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
