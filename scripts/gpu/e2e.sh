#!/usr/bin/env bash
# The end-to-end GPU check in one command, run from the repository root on a GPU machine:
#   hf      nanovllm against HF transformers on random Qwen3 weights (scripts/gpu/hf_compare.py)
#   bench   `nanovllm bench` on dummy Qwen3-0.6B (bench.py's workload)
#   single  one sequence: 128-token prompt, 1,024 new tokens
#   side    HF transformers and nanovllm on the same weights and a slice of the workload
#   cli     `nanovllm generate` and `nanovllm chat` on the GPU, and clear errors for bad input
# Pick parts with E2E_PARTS (default: all). Expects gpu/bin/nanovllm (scripts/gpu/stage.sh).
# Logs go to $OUT (default /tmp/nanovllm-e2e); a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/nanovllm-e2e}"
models=/tmp/nanovllm-models
bin=gpu/bin/nanovllm
parts="${E2E_PARTS:-hf bench single side cli}"
mkdir -p "$out" "$models"
export PYTHONUNBUFFERED=1
status=0
summary=()

has() { [[ " $parts " == *" $1 "* ]]; }
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$@"; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# The card's copy bandwidth (bytes read + written), measured now: the ceiling's denominator.
python3 - <<'PY' | tee "$out/ceiling.txt"
import torch
a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
for _ in range(3): b.copy_(a)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    s.record(); b.copy_(a); e.record(); e.synchronize(); times.append(s.elapsed_time(e) / 1e3)
bw = 2 * a.numel() / sorted(times)[len(times) // 2]
# DESIGN.md: the bench workload reads 13.9 TB of KV cache and 1.2 TB of weights in decode, and
# its arithmetic (~340 TFLOP) adds ~0.4 s: 133,966 output tokens over that time is the ceiling.
print(f"copy bandwidth {bw / 1e12:.3f} TB/s; ceiling {133966 / (15.1e12 / bw + 0.4):.0f} tok/s")
PY

if has hf; then
    timeout "${HF_TIMEOUT:-420}" python3 scripts/gpu/hf_compare.py "$bin" "$models" ${HF_QUICK:+--quick} \
        2>&1 | tee "$out/hf_compare.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
if has bench; then
    timeout 300 "$bin" bench --json >"$out/bench.json" 2>"$out/bench.err" || { status=1; cat "$out/bench.err"; }
    summary+=("$(cat "$out/ceiling.txt")")
    summary+=("bench.py workload (256 seqs): $(field "$out/bench.json" output_tokens_per_second) tok/s, \
prefill $(field "$out/bench.json" prefill_seconds) s, decode $(field "$out/bench.json" decode_seconds) s, \
cold start $(field "$out/bench.json" cold_start_seconds) s")
fi
if has single; then
    timeout 120 "$bin" bench --num-seqs 1 --min-input-len 128 --max-input-len 128 \
        --min-output-len 1024 --max-output-len 1024 --json >"$out/single.json" 2>"$out/single.err" \
        || { status=1; cat "$out/single.err"; }
    summary+=("single sequence 128+1024: $(field "$out/single.json" output_tokens_per_second) tok/s")
fi
if has side; then
    model="$models/0.6b-28layers"
    [ -f "$model/model.safetensors" ] || python3 -c "
import sys; sys.path.insert(0, 'scripts/gpu'); import hf_compare as h
h.build('0.6b-28layers', h.CONFIGS['0.6b-28layers'], '$models')"
    n="${SIDE_SEQS:-64}"; len="${SIDE_LEN:-256}"
    timeout 300 python3 scripts/gpu/hf_bench.py "$model" "$n" "$len" >"$out/hf_bench.json" 2>"$out/hf_bench.err" \
        || { status=1; tail -5 "$out/hf_bench.err"; }
    timeout 120 "$bin" bench --model "$model" --num-seqs "$n" --min-output-len "$len" --max-output-len "$len" \
        --json >"$out/side.json" 2>"$out/side.err" || { status=1; cat "$out/side.err"; }
    summary+=("side by side ($n seqs x $len tokens): HF $(field "$out/hf_bench.json" output_tokens_per_second) tok/s \
[$(field "$out/hf_bench.json" api)], nanovllm $(field "$out/side.json" output_tokens_per_second) tok/s")
fi

if has cli; then
    cli_ok=1
    timeout 60 "$bin" generate --prompt "The capital of France is" --chat --max-tokens 24 --seed 1 \
        >"$out/generate.txt" 2>&1 || cli_ok=0
    printf 'Hello there\nWhat is 2+2?\n\n' | timeout 60 "$bin" chat --max-tokens 16 \
        >"$out/chat.txt" 2>&1 || cli_ok=0
    # Bad input: each must fail with a message and a non-zero exit, never a panic.
    for args in "--model /nonexistent" "--temperature=-1" "--top-p 0" "--max-model-len 100000 --num-kvcache-blocks 1"; do
        if timeout 60 "$bin" generate --prompt hi $args >"$out/err.txt" 2>&1; then cli_ok=0; fi
        grep -q "^error: " "$out/err.txt" && ! grep -q panicked "$out/err.txt" || cli_ok=0
        echo "nanovllm generate $args -> $(grep '^error: ' "$out/err.txt" | head -1)" >>"$out/errors.txt"
    done
    [ "$cli_ok" -eq 1 ] || status=1
    summary+=("cli: generate + chat + 4 bad inputs: $([ "$cli_ok" -eq 1 ] && echo PASS || echo FAIL)")
fi

echo
echo "===== e2e summary ($(cat "$out/gpu.txt"))"
[ -f "$out/hf_compare.log" ] && sed -n '/^HF comparison/,$p' "$out/hf_compare.log"
for line in "${summary[@]}"; do echo "$line"; done
[ -f "$out/errors.txt" ] && cat "$out/errors.txt"
exit $status
