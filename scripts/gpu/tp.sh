#!/usr/bin/env bash
# Tensor parallelism on a machine with two GPUs, in one command from the repository root:
#   equal   greedy tokens and teacher-forced logits at --tp 2 against --tp 1 (dummy Qwen3-0.6B
#           and Qwen3-8B), divergence allowed only after a near tie of tp 1's two best logits;
#           and the one-shot all-reduce and its fusion with the residual add + RMSNorm against
#           NCCL's all-reduce followed by add_rms_norm (NANOVLLM_CUSTOM_ALLREDUCE=0) at --tp 2:
#           the same bits are required (identical greedy tokens, logits max |diff| exactly 0);
#           and at --tp 2 with the prefill's row-parallel products split into parts of 64 rows
#           whose exchange through the copy engines overlaps the next part
#           (NANOVLLM_AR_OVERLAP_ROWS=64, the one-shot kernel off so that it does not take the
#           prompts' all-reduces) against --tp 1, held to the same rule as tp 2 itself (logits
#           |diff| at most twice tp 2's), and against the same run with the peer's sums added
#           by their own kernel instead of inside the norm's (NANOVLLM_AR_NORM_FUSED=0): the
#           same bits are required. The fused run also shares the rows out between the ranks
#           (NANOVLLM_AR_SHARE_ROWS=1: each rank adds and normalises half of them and stores
#           its results into the peer's buffer too), the unfused one does not
#   slices  sampling at --tp 2: each rank draws from its vocabulary slice and the ranks exchange
#           their best candidates; a top-k cut (vocab - 1, which drops only the least likely
#           token) makes them gather whole rows instead, through decode graphs captured when
#           first needed. The same seeded draws must give the same text, in graphs and eagerly
#   hf      scripts/gpu/hf_compare.py with --tp 2 (quick: one config)
#   bench   `nanovllm bench` (bench.py's workload) at tp 1 and tp 2 (and tp 2 on NCCL alone),
#           Qwen3-0.6B and Qwen3-8B; an entry `2@R` of TP_BENCH_TPS runs tp 2 with
#           NANOVLLM_AR_OVERLAP_ROWS=R (0: the prefill's all-reduces not overlapped);
#           TP_BENCH_ROUNDS=R repeats the tp 1 / tp 2 pair R times and prints each round's
#           tp 2 / tp 1 and their mean, min and max (the ratio moves ~1 % from run to run)
#   steps   decode step time of dummy Qwen3-8B at batch 1, 16 and 256 (fixed lengths: 512-token
#           prompts, 128 new tokens) at tp 1, tp 2 and tp 2 on NCCL alone: where tp 2 loses
#   ar      gpu/bin/ar_bench: the collectives alone, per call, at decode sizes (one-shot and
#           fused kernels, then NCCL alone), with and without programmatic dependent launch
#   fail    a worker killed mid-run ends rank 0 with an error within 10 s; --tp 4 on two GPUs
#           is refused before any weight is loaded; `generate --tp 2` works
# Pick parts with TP_PARTS (default: all); narrow them with TP_EQUAL_MODELS, TP_BENCH_MODELS,
# TP_BENCH_TPS (e.g. "1 2"), STEPS_BS and STEPS_TP. Expects gpu/bin/nanovllm and gpu/bin/ar_bench
# (scripts/gpu/stage.sh); TP_BIN and TP_AR_BENCH run other builds of them (a baseline).
# Logs go to $OUT (default /tmp/nanovllm-tp); a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-/tmp/nanovllm-tp}"
bin="${TP_BIN:-gpu/bin/nanovllm}"
ar_bench="${TP_AR_BENCH:-gpu/bin/ar_bench}"
parts="${TP_PARTS:-equal slices hf bench steps ar fail}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
summary=()
has() { [[ " $parts " == *" $1 "* ]]; }

nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
nvidia-smi topo -m >"$out/topo.txt" 2>&1 || true

if has equal; then
    for model in ${TP_EQUAL_MODELS:-qwen3-0.6b qwen3-8b}; do
        if ! timeout 400 python3 - "$bin" "$model" "/tmp/nanovllm-tp-equal/$model" <<'PY' 2>&1 | tee "$out/equal-$model.log"; then
import json, os, subprocess, sys
import numpy as np
binary, model, root = sys.argv[1:4]
os.makedirs(root, exist_ok=True)
rng = np.random.default_rng(0)
prompts = [rng.integers(0, 10000, n).tolist() for n in (7, 33, 100, 300)]
MAX_NEW = 64

def dump(tp, prompts, max_tokens, score, tag, env=None):
    d = os.path.join(root, f"{tag}-tp{tp}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "input.json"), "w") as f:
        json.dump({"prompts": prompts, "max_tokens": max_tokens}, f)
    cmd = [binary, "hf-dump", "--model", model, "--input", os.path.join(d, "input.json"),
           "--outdir", d, "--device", "cuda", "--tp", str(tp), "--max-num-seqs", "512",
           "--max-model-len", "1024"] + (["--score"] if score else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    tokens = json.load(open(os.path.join(d, "tokens.json")))["tokens"]
    logits = [np.fromfile(os.path.join(d, f"logits_{i}.f32"), dtype=np.float32).reshape(len(p), -1)
              for i, p in enumerate(prompts)] if score else None
    return tokens, logits

t1, l1 = dump(1, prompts, MAX_NEW, True, "gen")
t2, l2 = dump(2, prompts, MAX_NEW, True, "gen")
tn, ln = dump(2, prompts, MAX_NEW, True, "gen-nccl", {"NANOVLLM_CUSTOM_ALLREDUCE": "0"})
# The one-shot all-reduce (and, before each residual add + RMSNorm, its fused form) sums in f32
# in rank order and rounds once, as NCCL's two-rank sum does, so the two runs agree bit for bit.
ar_diff = max(float(np.abs(a - b).max()) for a, b in zip(l2, ln))
ar_same = t2 == tn and ar_diff == 0.0
print(f"{model} tp2: one-shot (+ fused add-norm) all-reduce vs NCCL + add_rms_norm: logits max "
      f"|diff| {ar_diff:.4f}, greedy tokens {'identical' if t2 == tn else 'DIFFER'} "
      f"-> {'PASS' if ar_same else 'FAIL (must be bit-identical)'}")
to, lo = dump(2, prompts, MAX_NEW, True, "gen-overlap",
              {"NANOVLLM_CUSTOM_ALLREDUCE": "0", "NANOVLLM_AR_OVERLAP_ROWS": "64",
               "NANOVLLM_AR_SHARE_ROWS": "1"})
tu, lu = dump(2, prompts, MAX_NEW, True, "gen-overlap-unfused",
              {"NANOVLLM_CUSTOM_ALLREDUCE": "0", "NANOVLLM_AR_OVERLAP_ROWS": "64",
               "NANOVLLM_AR_NORM_FUSED": "0"})
# The norm's kernel adds the peer's sums as ar_copy_reduce does: the same bits.
fu_diff = max(float(np.abs(a - b).max()) for a, b in zip(lo, lu))
fu_same = to == tu and fu_diff == 0.0
print(f"{model} tp2 overlapped: the peer's sums added in the norm's kernel (rows shared out) "
      f"vs by their own: "
      f"logits max |diff| {fu_diff:.4f}, greedy tokens {'identical' if to == tu else 'DIFFER'} "
      f"-> {'PASS' if fu_same else 'FAIL (must be bit-identical)'}")
max_abs = max(float(np.abs(a - b).max()) for a, b in zip(l1, l2))
scale = max(float(np.abs(a).max()) for a in l1)
argmax_agree = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(l1, l2)]))
noise = 4 * max_abs
# tp 1's logits along its own continuation, to tell a near tie from a real disagreement.
full = [p + t for p, t in zip(prompts, t1)]
_, lf = dump(1, full, 1, True, "cont")

def diverge(tokens):
    ok, same, first = True, 0, []
    for p, a, b, lg in zip(prompts, t1, tokens, lf):
        same += a == b
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                row = np.sort(lg[len(p) - 1 + i])[::-1]
                gap = float(row[0] - row[1])
                first.append(f"@{i} gap {gap:.3f}")
                ok &= gap <= noise
                break
    return ok, same, first

ok, same, first = diverge(t2)
# The overlapped all-reduces sum the same values; only the parts' products may round
# differently (cuBLASLt picks its kernel per number of rows).
ov_abs = max(float(np.abs(a - b).max()) for a, b in zip(l1, lo))
ov_ok, ov_same, ov_first = diverge(to)
ov_ok &= ov_abs <= 2 * max_abs
print(f"{model} tp2, prefill all-reduces overlapped in 64-row parts: logits vs tp1 max |diff| "
      f"{ov_abs:.4f}; greedy {ov_same}/{len(prompts)} prompts identical to tp1; divergences "
      f"{ov_first or 'none'} -> {'PASS' if ov_ok else 'FAIL'}")
print(f"{model}: teacher-forced logits tp2 vs tp1 max |diff| {max_abs:.4f} (largest |logit| {scale:.1f}), "
      f"argmax agreement {argmax_agree:.4f}; greedy {MAX_NEW} tokens: {same}/{len(prompts)} prompts identical; "
      f"divergences {first or 'none'} (allowed at top-2 gap <= {noise:.3f})")
sys.exit(0 if ok and ar_same and ov_ok and fu_same else 1)
PY
            status=1
            summary+=("equal $model: FAIL (see equal-$model.log)")
        else
            while IFS= read -r line; do summary+=("$line"); done < <(tail -4 "$out/equal-$model.log")
        fi
    done
fi

if has slices; then
    for eager in "" "--enforce-eager"; do
        gen() {
            timeout 200 "$bin" generate --tp 2 --model qwen3-0.6b --temperature 1.0 --seed 5 --ignore-eos \
                --max-tokens 48 --prompt "Tensor parallelism splits the vocabulary" $eager "$@" 2>>"$out/slices.err"
        }
        a=$(gen --top-k 0); b=$(gen --top-k 151935); g=$(gen --temperature 0)
        if [ -n "$a" ] && [ "$a" = "$b" ] && [ "$a" != "$g" ]; then
            summary+=("slices ${eager:-(graphs)}: sampled slices = gathered whole rows (${#a} chars), not greedy -> PASS")
        else
            status=1
            summary+=("slices ${eager:-(graphs)}: FAIL (slices ${#a} chars, whole rows ${#b}, same: $([ "$a" = "$b" ] && echo yes || echo no))")
            printf '%s\n---\n%s\n---\n%s\n' "$a" "$b" "$g" >>"$out/slices.log"
        fi
    done
fi

if has hf; then
    HF_EXTRA_ARGS="--tp 2" timeout 420 python3 scripts/gpu/hf_compare.py "$bin" /tmp/nanovllm-models --quick \
        2>&1 | tee "$out/hf_compare_tp2.log"
    if [ "${PIPESTATUS[0]}" -eq 0 ]; then summary+=("HF comparison at --tp 2: PASS"); else status=1; summary+=("HF comparison at --tp 2: FAIL"); fi
fi

if has bench; then
    rounds="${TP_BENCH_ROUNDS:-1}"
    for model in ${TP_BENCH_MODELS:-qwen3-0.6b qwen3-8b}; do
        ratios=()
        for r in $(seq 1 "$rounds"); do
            sfx=""; [ "$rounds" -gt 1 ] && sfx="-r$r"
            for tp in ${TP_BENCH_TPS:-1 2 2nccl}; do
                f="$out/bench-$model-tp$tp$sfx.json"
                car=1; [ "$tp" = 2nccl ] && car=0
                rows=()
                [[ "$tp" == *@* ]] && rows=("NANOVLLM_AR_OVERLAP_ROWS=${tp#*@}")
                n="${tp%nccl}"
                if env NANOVLLM_CUSTOM_ALLREDUCE=$car "${rows[@]}" timeout 300 "$bin" bench --model "$model" --tp "${n%@*}" --json >"$f" 2>"$out/bench-$model-tp$tp$sfx.err"; then
                    summary+=("$(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(f\"bench {sys.argv[2]} tp{sys.argv[3]}{sys.argv[4]}: {j['output_tokens_per_second']:.0f} tok/s, prefill {j['prefill_seconds']:.2f} s, decode {j['decode_seconds']:.2f} s, cold start {j['cold_start_seconds']:.1f} s\")" "$f" "$model" "$tp" "$sfx")")
                else
                    status=1; summary+=("bench $model tp$tp$sfx: FAIL"); tail -5 "$out/bench-$model-tp$tp$sfx.err"
                fi
            done
            if ratio=$(python3 -c "import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); print(f'{b[\"output_tokens_per_second\"]/a[\"output_tokens_per_second\"]:.3f}')" \
                "$out/bench-$model-tp1$sfx.json" "$out/bench-$model-tp2$sfx.json" 2>/dev/null); then
                ratios+=("$ratio")
                summary+=("$model: tp2/tp1 = $ratio${sfx:+ (round ${sfx#-r})}")
            fi
        done
        # Rounds alternate tp 1 and tp 2 on the same machine; their spread is the run-to-run noise.
        if [ "${#ratios[@]}" -gt 1 ]; then
            summary+=("$(python3 -c "import sys; r=[float(x) for x in sys.argv[2:]]; print(f'{sys.argv[1]}: tp2/tp1 over {len(r)} rounds: mean {sum(r)/len(r):.3f}, min {min(r):.3f}, max {max(r):.3f}')" "$model" "${ratios[@]}")")
        fi
    done
fi

if has steps; then
    for bs in ${STEPS_BS:-1 16 256}; do
        line="8B decode step, batch $bs:"
        for tp in ${STEPS_TP:-1 2 2nccl}; do
            f="$out/steps-$bs-tp$tp.json"
            car=1; [ "$tp" = 2nccl ] && car=0
            if NANOVLLM_CUSTOM_ALLREDUCE=$car timeout 200 "$bin" bench --model qwen3-8b --tp "${tp%nccl}" --num-seqs "$bs" \
                --min-input-len 512 --max-input-len 512 --min-output-len 128 --max-output-len 128 --json \
                >"$f" 2>/dev/null; then
                line+="$(python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(f\" tp{sys.argv[2]} {1e3*j['decode_seconds']/max(1,j['decode_steps']):.3f} ms\", end='')" "$f" "$tp")"
            else
                line+=" tp$tp FAIL"; status=1
            fi
        done
        summary+=("$line")
    done
fi

if has ar; then
    for setting in "" "NANOVLLM_PDL=0" "NANOVLLM_CUSTOM_ALLREDUCE=0"; do
        tag="${setting:-default}"
        if env $setting timeout 120 "$ar_bench" >"$out/ar-$tag.log" 2>&1; then
            summary+=("ar_bench ${setting:-(one-shot, PDL)}:")
            while IFS= read -r line; do summary+=("  $line"); done < <(tail -n +2 "$out/ar-$tag.log")
        else
            status=1; summary+=("ar_bench $tag: FAIL"); tail -5 "$out/ar-$tag.log"
        fi
    done
fi

if has fail; then
    python3 - "$bin" <<'PY' 2>&1 | tee "$out/fail.log"
import os, signal, subprocess, sys, time
binary = sys.argv[1]
res = []
# A worker killed in the middle of a benchmark.
p = subprocess.Popen([binary, "bench", "--tp", "2", "--model", "qwen3-8b"], stdout=subprocess.DEVNULL,
                     stderr=subprocess.PIPE, text=True)
worker = None
for _ in range(600):
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == p.pid:
                worker = int(pid)
    if worker:
        break
    time.sleep(0.05)
time.sleep(15)  # start-up, warm-up, into the timed run (which takes ~13 s)
alive_before = p.poll() is None
try:
    os.kill(worker, signal.SIGKILL)
except ProcessLookupError:
    alive_before = False
t = time.time()
try:
    _, err = p.communicate(timeout=30)
    dt = time.time() - t
except subprocess.TimeoutExpired:
    p.kill(); _, err = p.communicate(); dt = float("inf")
last = [l for l in err.splitlines() if "error" in l.lower()][-1:] or ["(no error line)"]
ok = alive_before and p.returncode != 0 and dt < 10 and "worker rank 1" in err
res.append(f"killed worker: rank 0 exited {p.returncode} after {dt:.2f} s: {last[0][:160]} -> {'PASS' if ok else 'FAIL'}")
# More ranks than GPUs.
t = time.time()
r = subprocess.run([binary, "generate", "--tp", "4", "--prompt", "hi", "--max-tokens", "4"], capture_output=True, text=True)
ok2 = r.returncode != 0 and "driver reports" in r.stderr
res.append(f"--tp 4 on 2 GPUs: exit {r.returncode} in {time.time()-t:.1f} s: {r.stderr.strip().splitlines()[-1][:160]} -> {'PASS' if ok2 else 'FAIL'}")
# generate at tp 2.
r = subprocess.run([binary, "generate", "--tp", "2", "--prompt", "The capital of France is", "--max-tokens", "16",
                    "--temperature", "0"], capture_output=True, text=True)
ok3 = r.returncode == 0 and len(r.stdout.strip()) > 0
res.append(f"generate --tp 2: exit {r.returncode}, {len(r.stdout)} chars -> {'PASS' if ok3 else 'FAIL'}")
leftover = [f for f in os.listdir("/dev/shm") if f.startswith("nanovllm-")]
res.append(f"/dev/shm leftovers: {leftover or 'none'} -> {'PASS' if not leftover else 'FAIL'}")
print("\n".join(res))
sys.exit(0 if ok and ok2 and ok3 and not leftover else 1)
PY
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    while IFS= read -r line; do summary+=("$line"); done < <(tail -4 "$out/fail.log")
fi

echo
echo "== tensor parallelism on $(head -1 "$out/gpu.txt" | cut -d, -f2) x $(wc -l <"$out/gpu.txt") =="
for s in "${summary[@]}"; do echo "$s"; done
exit $status
