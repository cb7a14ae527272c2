#!/usr/bin/env bash
# Where a decode step's GPU time goes, kernel by kernel, from Nsight Compute (ncu) on the GPU
# machine. One fixed-batch `nanovllm bench` (PROFILE_BATCH sequences of PROFILE_INPUT-token
# prompts, PROFILE_TOKENS new tokens each) runs twice:
#   1. plain: the decode step time (CUDA graphs, programmatic dependent launch: the real step);
#   2. under ncu with --graph-profiling node and --profile-from-start off, with
#      NANOVLLM_PROFILE_DECODE=1, which makes the bench step the engine itself and switch the
#      profiler on from its second decode step to its last: start-up, warm-up and prefill stay
#      out. Every kernel of every replayed graph is timed on its own (serialised, so no overlap
#      between kernels; caches and clocks left alone).
# The table lists each kernel name's calls and time per decode step (decode steps = the
# decode-attention launches / PROFILE_LAYERS). "sum" is the kernels' time per step; the
# difference to the plain step is the gaps between kernels (less what PDL overlaps) and the
# host cost. With PROFILE_TP=2 only rank 0's process is profiled; its all-reduce kernels then
# include the wait for rank 1.
# Usage (repository root, GPU machine): PROFILE_MODEL=qwen3-8b PROFILE_LAYERS=36 \
#   PROFILE_BATCH=256 PROFILE_TP=2 scripts/gpu/profile.sh
# (PROFILE_MIN_INPUT=100 PROFILE_INPUT=2000: prompts of 100..2,000 tokens in one batch.)
# Expects gpu/bin/nanovllm (scripts/gpu/stage.sh). Logs go to $OUT (default /tmp/nanovllm-prof).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/nanovllm-prof}"
bin=gpu/bin/nanovllm
model="${PROFILE_MODEL:-qwen3-0.6b}"
layers="${PROFILE_LAYERS:-28}"
batch="${PROFILE_BATCH:-1}"
tokens="${PROFILE_TOKENS:-32}"
input="${PROFILE_INPUT:-512}"
# PROFILE_MIN_INPUT below PROFILE_INPUT gives prompts of mixed lengths (the serving mix).
min_input="${PROFILE_MIN_INPUT:-$input}"
tp="${PROFILE_TP:-1}"
ncu_bin="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
mkdir -p "$out"
args=(bench --model "$model" --tp "$tp" --num-seqs "$batch" --min-input-len "$min_input" --max-input-len "$input"
    --min-output-len "$tokens" --max-output-len "$tokens" --json)

timeout 300 "$bin" "${args[@]}" >"$out/plain.json" 2>"$out/plain.err" || {
    echo "profile: plain run failed:"; tail -5 "$out/plain.err"; exit 1; }
step_ms=$(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(1e3*j['decode_seconds']/max(1,j['decode_steps']))" "$out/plain.json")

NANOVLLM_PROFILE_DECODE=1 timeout 900 "$ncu_bin" --graph-profiling node --profile-from-start off --cache-control none --clock-control none \
    --target-processes application-only --metrics gpu__time_duration.sum --csv \
    "$bin" "${args[@]}" >"$out/ncu.csv" 2>"$out/ncu.err" || {
    echo "profile: ncu run failed:"; tail -5 "$out/ncu.err"; exit 1; }

python3 - "$out/ncu.csv" "$layers" "$step_ms" "$model" "$batch" "$tp" "$([ "$min_input" = "$input" ] && echo "$input" || echo "$min_input..$input")" <<'PY'
import collections, csv, io, sys
path, layers, step_ms, model, batch, tp, prompt = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), *sys.argv[4:]
text = open(path, errors="replace").read()
start = text.find('"ID"')
if start < 0:
    sys.exit("profile: no ncu CSV in the output")
total = collections.defaultdict(float)
calls = collections.Counter()
for row in csv.DictReader(io.StringIO(text[start:])):
    if row.get("Metric Name") != "gpu__time_duration.sum":
        continue
    name = row["Kernel Name"].split("(")[0].strip()
    value = float(row["Metric Value"].replace(",", ""))
    unit = row.get("Metric Unit", "nsecond")
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}.get(unit, 1e-3)
    total[name] += value * scale
    calls[name] += 1
attn = sum(c for n, c in calls.items() if n.startswith(("attn_decode_hd", "attn_decode_bal_hd")))
steps = attn / layers if attn else 0
if steps == 0:
    sys.exit("profile: no decode-attention kernel found; is PROFILE_LAYERS right?")
rows = sorted(((t / steps, calls[n] / steps, n) for n, t in total.items()), reverse=True)
kernel_sum = sum(r[0] for r in rows)
print(f"== {model}, batch {batch}, prompt {prompt}, tp {tp}: {steps:.0f} decode steps profiled; "
      f"plain decode step {step_ms * 1e3:.0f} us")
print(f"{'kernel':58} {'calls/step':>10} {'us/step':>9} {'share':>6}")
for us, per, name in rows:
    if us < 0.005 * kernel_sum:
        continue
    print(f"{name[:58]:58} {per:10.1f} {us:9.1f} {100 * us / kernel_sum:5.1f}%")
print(f"{'sum of kernels':58} {sum(r[1] for r in rows):10.1f} {kernel_sum:9.1f}")
print(f"{'plain step - sum (gaps, host; PDL overlap makes it smaller)':58} {'':10} {step_ms * 1e3 - kernel_sum:9.1f}")
PY
