"""CPU cost of one engine step in nano-vLLM: its own Scheduler, BlockManager and Sequence
(engine/scheduler.py, engine/block_manager.py, engine/sequence.py, sampling_params.py) driven
through the workloads of benches/benches/scheduler.rs, with a fake model runner that returns a
token at once.

Only those modules are imported from the checkout: the `nanovllm` package's __init__ (which
imports torch through the model runner) is not run, and `nanovllm.config` (which imports
transformers) is replaced by a small stand-in holding the fields the scheduler reads.

Usage:
    python benches/python/scheduler_bench.py /path/to/nano-vllm [--decode-steps 1024] [--prefill-reps 20]

Needs `xxhash` and `numpy` (what block_manager.py imports).
"""

import argparse
import importlib
import os
import statistics
import sys
import time
import types

BLOCK_SIZE = 256
MASK = (1 << 64) - 1


class SplitMix64:
    """The workload's random stream, identical to the Rust bench's."""

    def __init__(self, seed):
        self.state = seed

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def tokens(self, n):
        return [self.next() % 10000 for _ in range(n)]


def load_nano_vllm(checkout):
    """Imports nano-vLLM's scheduler, sequence and sampling params from `checkout` without its
    package __init__ or config module."""
    pkg_dir = os.path.join(checkout, "nanovllm")
    for f in ("engine/scheduler.py", "engine/block_manager.py", "engine/sequence.py", "sampling_params.py"):
        if not os.path.isfile(os.path.join(pkg_dir, f)):
            sys.exit(f"{checkout}: nanovllm/{f} not found (pass the path of a nano-vLLM checkout)")
    pkg = types.ModuleType("nanovllm")
    pkg.__path__ = [pkg_dir]
    sys.modules["nanovllm"] = pkg
    engine = types.ModuleType("nanovllm.engine")
    engine.__path__ = [os.path.join(pkg_dir, "engine")]
    sys.modules["nanovllm.engine"] = engine
    config = types.ModuleType("nanovllm.config")

    class Config:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    config.Config = Config
    sys.modules["nanovllm.config"] = config
    scheduler = importlib.import_module("nanovllm.engine.scheduler")
    sequence = importlib.import_module("nanovllm.engine.sequence")
    sampling = importlib.import_module("nanovllm.sampling_params")
    return Config, scheduler.Scheduler, sequence.Sequence, sampling.SamplingParams


class Engine:
    """nano-vLLM's LLMEngine.step with the model runner replaced by a constant token."""

    def __init__(self, nano, num_blocks, max_num_batched_tokens):
        Config, Scheduler, self.Sequence, self.SamplingParams = nano
        self.Sequence.block_size = BLOCK_SIZE
        cfg = Config(
            max_num_seqs=512,
            max_num_batched_tokens=max_num_batched_tokens,
            eos=151645,
            kvcache_block_size=BLOCK_SIZE,
            num_kvcache_blocks=num_blocks,
        )
        self.scheduler = Scheduler(cfg)
        self.steps = 0

    def add_request(self, prompt, max_tokens):
        sp = self.SamplingParams(temperature=0.6, max_tokens=max_tokens, ignore_eos=True)
        self.scheduler.add(self.Sequence(prompt, sp))

    def step(self):
        seqs, is_prefill = self.scheduler.schedule()
        num_tokens = sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else -len(seqs)
        self.steps += 1
        token_ids = [1 + self.steps % 9999] * len(seqs)
        self.scheduler.postprocess(seqs, token_ids, is_prefill)
        outputs = [(seq.seq_id, seq.completion_token_ids) for seq in seqs if seq.is_finished]
        return outputs, num_tokens


def decode_state(nano, n):
    rng = SplitMix64(0)
    e = Engine(nano, n * 9, 16384)
    for _ in range(n):
        length = 100 + rng.next() % 925
        e.add_request(rng.tokens(length), 2048)
    while e.scheduler.waiting:
        e.step()
    return e


def prefill_engine(nano, hits):
    rng = SplitMix64(0)
    e = Engine(nano, 2048, 256 * 1024)
    prefix = rng.tokens(768) if hits else []
    if hits:
        e.add_request(prefix + [1], 1)
        while not e.scheduler.is_finished():
            e.step()
    return e, rng, prefix


def bench_decode(nano, n, steps):
    e = decode_state(nano, n)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _, num_tokens = e.step()
        times.append(time.perf_counter() - t)
        assert num_tokens == -n
    return times


def bench_prefill(nano, hits, reps):
    # One engine throughout, as the Rust bench: queue 256 new prompts, time the step that
    # prefills them, then drop them (nano-vLLM has no abort: free their blocks and clear the
    # running queue), leaving their blocks cached in the free list.
    e, rng, prefix = prefill_engine(nano, hits)
    times = []
    for _ in range(reps):
        for _ in range(256):
            e.add_request(prefix + rng.tokens(1024 - len(prefix)), 16)
        t = time.perf_counter()
        _, num_tokens = e.step()
        times.append(time.perf_counter() - t)
        assert num_tokens > 0
        for seq in e.scheduler.running:
            e.scheduler.block_manager.deallocate(seq)
        e.scheduler.running.clear()
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkout", help="path of a nano-vLLM checkout (the folder holding nanovllm/)")
    ap.add_argument("--decode-steps", type=int, default=1024)
    ap.add_argument("--prefill-reps", type=int, default=20)
    args = ap.parse_args()
    nano = load_nano_vllm(args.checkout)

    def report(name, times):
        print(
            f"scheduler_step/{name}: median {statistics.median(times) * 1e6:.1f} us, "
            f"mean {statistics.fmean(times) * 1e6:.1f} us per step ({len(times)} steps)"
        )

    for n in (256, 512):
        report(f"decode/{n}", bench_decode(nano, n, args.decode_steps))
    for name, hits in (("prefill/no_hits", False), ("prefill/prefix_hits", True)):
        report(name, bench_prefill(nano, hits, args.prefill_reps))


if __name__ == "__main__":
    main()
