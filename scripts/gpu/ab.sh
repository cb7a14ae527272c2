#!/usr/bin/env bash
# A/B timing of `nanovllm bench` under several environment settings, in one run on one GPU, so
# that a change behind a switch (e.g. NANOVLLM_PDL=0) is compared on the same card and warm
# state. For each setting, twice and interleaved (A B A B):
#   bench   bench.py's workload (256 sequences) on dummy Qwen3-0.6B
#   single  one sequence, 128-token prompt, 1,024 new tokens
#   step-B  decode step time at batch B (512-token prompts, 128 new tokens each), B in AB_BATCHES
# Usage (repository root, GPU machine): AB_ENVS="NANOVLLM_PDL=1 NANOVLLM_PDL=0" scripts/gpu/ab.sh
# Settings are space-separated; within one, join several variables with commas
# (A=1,B=2). AB_BIN=PATH in a setting runs another build of nanovllm (a baseline) instead of
# gpu/bin/nanovllm. AB_ARGS adds arguments to every bench (e.g. "--model PATH --tp 2").
# Logs go to $OUT (default /tmp/nanovllm-ab); the table is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/nanovllm-ab}"
bin=gpu/bin/nanovllm
envs="${AB_ENVS:-NANOVLLM_PDL=1 NANOVLLM_PDL=0}"
batches="${AB_BATCHES:-1 16 256}"
rounds="${AB_ROUNDS:-2}"
read -r -a extra <<<"${AB_ARGS:-}"
mkdir -p "$out"
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"

# run SETTING NAME ARGS...: one bench with SETTING's variables; appends "SETTING NAME value".
run() {
    local setting="$1" name="$2" tag
    shift 2
    tag="$(echo "$setting" | tr -c 'A-Za-z0-9_=\n' '_')-$name"
    local -a vars
    IFS=',' read -r -a vars <<<"$setting"
    local exe="$bin" v
    for v in "${vars[@]}"; do [[ "$v" == AB_BIN=* ]] && exe="${v#AB_BIN=}"; done
    if ! env "${vars[@]}" timeout 300 "$exe" bench --json "${extra[@]}" "$@" \
        >"$out/$tag.json" 2>"$out/$tag.err"; then
        status=1
        echo "FAILED: $setting $name" >&2
        tail -5 "$out/$tag.err" >&2
        return
    fi
    python3 - "$out/$tag.json" "$setting" "$name" >>"$out/results.txt" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
name = sys.argv[3]
if name.startswith("step"):
    v = f"{1e3 * j['decode_seconds'] / max(1, j['decode_steps']):.3f} ms"
elif name == "bench":
    v = (f"{j['output_tokens_per_second']:.0f} tok/s (prefill {j['prefill_seconds']:.3f} s, "
         f"decode {j['decode_seconds']:.3f} s, host {j['runner_prepare_seconds']:.3f} + "
         f"{j['engine_host_seconds']:.3f} s)")
else:
    v = f"{j['output_tokens_per_second']:.0f} tok/s"
print(sys.argv[2], name, v)
PY
}

: >"$out/results.txt"
for _ in $(seq "$rounds"); do
    for setting in $envs; do
        run "$setting" bench
        run "$setting" single --num-seqs 1 --min-input-len 128 --max-input-len 128 \
            --min-output-len 1024 --max-output-len 1024
        for b in $batches; do
            run "$setting" "step-$b" --num-seqs "$b" --min-input-len 512 --max-input-len 512 \
                --min-output-len 128 --max-output-len 128
        done
    done
done

echo
echo "===== A/B ($(cat "$out/gpu.txt")), each value per round"
python3 - "$out/results.txt" <<'PY'
import collections, sys
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    setting, name, value = line.split(" ", 2)
    rows.setdefault((name, setting), []).append(value.strip())
for (name, setting), values in rows.items():
    print(f"{name:10} {setting:40} {' | '.join(values)}")
PY
exit $status
