"""Serving many requests at once: the continuous-batching engine (llama/engine/batching.py) under C concurrent
clients, against the same requests run one after another through ``Llama.generate`` and against transformers'
continuous batching (``ContinuousBatchingManager``) on the same weights.

The workload: --requests requests with seeded random prompt lengths (--prompt_lens lo,hi), generation lengths
(--gen_lens lo,hi) and token ids (random weights: no request ends before its length). Closed-loop clients: C
threads, the first C started --stagger seconds apart, each taking the next request from the shared list when its
previous one has finished, so at most C requests run at once. For each C of --clients, per engine:

- tok/s: generated tokens of all requests / wall time (first submission to last result);
- TTFT: time to first token (from submission to the first streamed token: queueing, prefill and the first
  sample), median and p90 over the requests;
- ITL: per-token latency after the first (the gaps between a request's streamed tokens, pooled over all
  requests), median and p90.

Engines (--engines): "faithful" (the default path: ``Transformer.forward_rows`` in the model's dtype), "fast"
(``FastDecoder(model, compile=True)``), and "int8"/"int4" (the fast path on the same weights quantized by
llama/quant/, the default int8-input kernels). Baselines on the same requests:

- "sequential": each request alone through ``Llama.generate([prompt], n, temperature=0)`` of the same engine,
  one after another (C = 1 without batching); "x seq" is the engine's tok/s over it.
- "transformers": ``LlamaForCausalLM`` with the same weights (bf16, SDPA attention) through transformers'
  ``ContinuousBatchingManager`` (``init_continuous_batching``, ``add_request(ids, max_new_tokens=n)``) under the
  same closed-loop clients (--hf_clients); its token times are the manager's own ``record_timestamps``.

Each engine warms up first (a few short requests, so compilation is not timed; a compilation during the timed runs
is reported). The check column "= seq" counts the requests whose greedy tokens equal the sequential run's. Random
weights make near-ties everywhere, so any change of rounding flips some: in bf16, torch's GEMM rounds a product of
one row differently from one of several rows (the faithful engine at C > 1), and a prompt longer than the prefill
chunk is multiplied in other shapes than generate's one-piece prefill.

The defaults (16 requests, prompts 16-64, generations 16-64, every engine, transformers at C = 8) take about 15
minutes on 2 Zen 4 cores; the issue's lengths (prompts 16-512, generations 16-256) are flags away.

    python benchmarks/bench_serve.py                                   # the 0.85B shape, every engine
    python benchmarks/bench_serve.py --dim 256 --n_layers 2 --requests 8 --clients 1,4   # a quick check
    python benchmarks/bench_serve.py --engines fast --soak 300         # memory: RSS every 50 requests

--soak N runs N short requests (prompts and generations of 4-24 tokens) through one engine (the first of
--engines) with max(--clients) clients, printing the process's resident memory every 50 requests, and nothing else.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import torch
from bench_decode import DTYPE_NAMES, add_model_arguments, hf_model, model_shape, quantized, random_model

from llama import Llama
from llama.distributed import setup_model_parallel
from llama.engine.batching import Engine
from llama.engine.fast import FastDecoder
from llama.engine.requests import SamplingParams
from llama.model import ModelArgs
from llama.quant.scheme import MODES

ENGINES = ("faithful", "fast", *MODES)
SOAK_PROMPT_LENS, SOAK_GEN_LENS = (4, 24), (4, 24)


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_gen_len: int


@dataclass
class Trace:
    """One request as its client saw it: when it was submitted, when each generated token arrived, its tokens."""

    submitted: float
    token_times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)


def make_requests(n: int, prompt_lens: tuple[int, int], gen_lens: tuple[int, int], vocab: int, seed: int
                  ) -> list[Request]:  # fmt: skip
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        length = rng.randint(*prompt_lens)
        prompt = [rng.randrange(3, vocab) for _ in range(length)]  # 0-2: pad, BOS and EOS in Llama 2's vocabulary
        requests.append(Request(prompt, rng.randint(*gen_lens)))
    return requests


def closed_loop(serve: Callable[[Request], Trace], requests: list[Request], clients: int, stagger: float
                ) -> tuple[list[Trace], float]:  # fmt: skip
    """Run requests through `serve` (which serves one in the calling thread) from `clients` threads, each taking
    the next request when its previous one has finished. Returns the traces in the requests' order and the wall
    time from the first submission to the last result."""
    traces: list[Optional[Trace]] = [None] * len(requests)
    taken = iter(range(len(requests)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        time.sleep(k * stagger)
        while not errors:
            with lock:
                i = next(taken, None)
            if i is None:
                return
            try:
                traces[i] = serve(requests[i])
            except BaseException as error:  # reported by the main thread
                errors.append(error)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    return traces, wall  # type: ignore[return-value]


def engine_client(engine: Engine) -> Callable[[Request], Trace]:
    """Serve one request through the engine, timestamping each streamed token."""

    def serve(request: Request) -> Trace:
        trace = Trace(time.perf_counter())
        handle = engine.submit(request.prompt, SamplingParams(temperature=0, max_gen_len=request.max_gen_len))
        for output in handle:
            if output.token is not None:
                trace.token_times.append(time.perf_counter())
                trace.tokens.append(output.token)
        result = handle.result()
        if result.usage.completion_tokens != len(trace.tokens) or len(trace.tokens) != request.max_gen_len:
            raise RuntimeError(f"request {result.request_id}: streamed {len(trace.tokens)} tokens, usage says "
                               f"{result.usage.completion_tokens}, asked for {request.max_gen_len} "
                               f"(finish_reason {result.finish_reason})")  # fmt: skip
        return trace

    return serve


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between the closest ranks."""
    values = sorted(values)
    x = q * (len(values) - 1)
    lo = int(x)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (x - lo)


def summarize(traces: list[Trace], wall: float) -> dict[str, float]:
    ttft = [t.token_times[0] - t.submitted for t in traces]
    gaps = [b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:])]
    generated = sum(len(t.token_times) for t in traces)
    return {
        "tokens": generated, "wall_s": wall, "tok_per_s": generated / wall,
        "ttft_median_s": statistics.median(ttft), "ttft_p90_s": percentile(ttft, 0.9),
        "itl_median_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"),
        "itl_p90_ms": percentile(gaps, 0.9) * 1e3 if gaps else float("nan"),
    }  # fmt: skip


def sequential(llama: Llama, requests: list[Request]) -> tuple[list[list[int]], float]:
    """Each request alone through generate, one after another: the tokens of each, and the wall time."""
    start = time.perf_counter()
    tokens = [llama.generate([r.prompt], r.max_gen_len, temperature=0)[0][0] for r in requests]
    return tokens, time.perf_counter() - start


def warm_up(llama: Llama, engine: Engine, vocab: int) -> float:
    """Compile and touch every path the timed runs take: generate at batch 1, and engine steps of 1 to 4 rows
    (the compiled row step specializes on one row, then on two, then compiles once for any count)."""
    start = time.perf_counter()
    llama.generate([[5, 6, 7]], 4, temperature=0)
    warm = [Request([5 + i] * (3 + 5 * i), 2 + 3 * i) for i in range(4)]  # ends staggered: 4, 3, 2, 1 rows
    closed_loop(engine_client(engine), warm, clients=4, stagger=0.0)
    closed_loop(engine_client(engine), warm[:1], clients=1, stagger=0.0)
    return time.perf_counter() - start


class Manager:
    """transformers' ContinuousBatchingManager for closed-loop clients: ``serve`` submits one request and waits for
    it; a router thread hands each finished output (the manager has one output queue) to its client."""

    def __init__(self, manager: object):
        self.manager = manager
        self.finished: dict[str, object] = {}
        self.arrived = threading.Condition()
        self.stopped = threading.Event()
        manager.start()
        self.router = threading.Thread(target=self._route, daemon=True)
        self.router.start()

    def _route(self) -> None:
        while not self.stopped.is_set():
            out = self.manager.get_result(timeout=0.05)
            if out is not None and out.is_finished():
                with self.arrived:
                    self.finished[out.request_id] = out
                    self.arrived.notify_all()

    def serve(self, request: Request) -> Trace:
        trace = Trace(time.perf_counter())
        rid = self.manager.add_request(request.prompt, max_new_tokens=request.max_gen_len, record_timestamps=True)
        with self.arrived:
            self.arrived.wait_for(lambda: rid in self.finished)
            out = self.finished.pop(rid)
        if out.error is not None:
            raise RuntimeError(f"transformers failed request {rid}: {out.error}")
        trace.token_times, trace.tokens = list(out.timestamps), list(out.generated_tokens)
        if len(trace.tokens) != request.max_gen_len:
            raise RuntimeError(f"transformers generated {len(trace.tokens)} tokens for {rid}, asked for "
                               f"{request.max_gen_len}")  # fmt: skip
        return trace

    def stop(self) -> None:
        self.stopped.set()
        self.router.join()
        self.manager.stop(block=True)


def transformers_runs(model: torch.nn.Module, requests: list[Request], clients: list[int], stagger: float,
                      max_seq_len: int, prefill_tokens: int, reference: Optional[list[list[int]]]
                      ) -> dict[int, dict[str, float]]:  # fmt: skip
    """transformers' continuous batching on model's weights, under the same closed-loop clients: C -> summary.
    reference: the tokens of each request by our first engine's sequential run, to count the equal ones."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    dtype, device = model.tok_embeddings.weight.dtype, model.tok_embeddings.weight.device
    hf = hf_model(model, dtype, device)
    hf.config._attn_implementation = "sdpa"
    config = GenerationConfig(max_new_tokens=max(r.max_gen_len for r in requests), do_sample=False, eos_token_id=-1,
                              pad_token_id=0)  # fmt: skip
    page = 64
    results = {}
    for c in clients:
        # The cache sized for c requests of max_seq_len (else it takes 60% of the free RAM on a CPU), up to
        # prefill_tokens + c tokens a forward (our engine prefills up to --prefill_chunk a step), no prefix sharing.
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=c * (-(-max_seq_len // page)) + 2,
                                      max_batch_tokens=prefill_tokens + c, max_requests_per_batch=c,
                                      allow_block_sharing=False)  # fmt: skip
        manager = Manager(hf.init_continuous_batching(generation_config=config, continuous_batching_config=cb))
        try:
            closed_loop(manager.serve, [Request([5 + i] * (3 + 5 * i), 2 + 3 * i) for i in range(4)], min(c, 4), 0.0)
            traces, wall = closed_loop(manager.serve, requests, c, stagger)
        finally:
            manager.stop()
        results[c] = summarize(traces, wall)
        if reference is not None:
            same = sum(t.tokens == s for t, s in zip(traces, reference))
            results[c]["same_as_sequential"] = f"{same}/{len(requests)}"
        print_row(f"transformers C={c}", results[c])
    return results


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def targets(results: dict, engines: list[str]) -> None:
    """The issue's targets at 8 clients: >= 3x the sequential throughput, and ahead of transformers."""
    hf = results.get("transformers", {}).get(8)
    lines = []
    for name in engines:
        run = results["engines"][name]["runs"].get("C=8")
        if run is None:
            continue
        seq = run.get("vs_sequential")
        line = f"  {name:9s} C=8 {run['tok_per_s']:7.2f} tok/s: "
        line += "-" if seq is None else f"{seq:.2f}x sequential ({'met' if seq >= 3 else 'NOT met'})"
        if hf is not None:
            ratio = run["tok_per_s"] / hf["tok_per_s"]
            line += f", {ratio:.2f}x transformers ({'ahead' if ratio > 1 else 'NOT ahead'})"
            run["vs_transformers"] = ratio
        lines.append(line)
    if lines:
        print("\ntargets at 8 clients (>= 3x sequential, ahead of transformers' continuous batching):")
        print("\n".join(lines))


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(engine: Engine, n: int, clients: int, vocab: int, seed: int, every: int = 50) -> list[tuple[int, float]]:
    """n short requests through the engine from `clients` closed-loop clients; the process's RSS (MB) before any
    and after each `every` finished requests."""
    requests = make_requests(n, SOAK_PROMPT_LENS, SOAK_GEN_LENS, vocab, seed + 1)
    points = [(0, rss_mb())]
    print(f"soak: {n} requests, {clients} clients; RSS before {points[0][1]:.0f} MB")
    serve = engine_client(engine)
    done = itertools.count(1)
    lock = threading.Lock()
    start = time.perf_counter()

    def serve_and_count(request: Request) -> Trace:
        trace = serve(request)
        with lock:
            k = next(done)
            if k % every == 0 or k == n:
                points.append((k, rss_mb()))
                print(f"  after {k:4d} requests: RSS {points[-1][1]:.0f} MB ({time.perf_counter() - start:.0f} s)")
        return trace

    closed_loop(serve_and_count, requests, clients, 0.0)
    return points


ROW = "  {:24s} {:>7s} {:>8s} {:>8s} {:>9s} {:>9s} {:>9s} {:>9s} {:>8s} {:>7s}"


def print_header() -> None:
    print(ROW.format("", "tokens", "wall s", "tok/s", "TTFT med", "TTFT p90", "ITL med", "ITL p90", "x seq",
                     "= seq"))  # fmt: skip
    print(ROW.format("", "", "", "", "s", "s", "ms", "ms", "", ""))


def print_row(name: str, r: dict) -> None:
    def fmt(key: str, spec: str) -> str:
        return "-" if r.get(key) is None else format(r[key], spec)

    print(ROW.format(name, str(r["tokens"]), fmt("wall_s", ".1f"), fmt("tok_per_s", ".2f"), fmt("ttft_median_s", ".2f"),
                     fmt("ttft_p90_s", ".2f"), fmt("itl_median_ms", ".0f"), fmt("itl_p90_ms", ".0f"),
                     "-" if r.get("vs_sequential") is None else f"{r['vs_sequential']:.2f}x",
                     r.get("same_as_sequential", "-")))  # fmt: skip


def pair(text: str, flag: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise SystemExit(f"{flag} {text!r}: give lo,hi with 1 <= lo <= hi")
    return lo, hi


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    get = lambda k: fields.get(k, "?").strip()  # noqa: E731
    flags = [f for f in get("Flags").split() if f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                                                      "avx512_bf16", "amx_bf16")]  # fmt: skip
    return (f"{get('Model name')}, family {get('CPU family')} model {get('Model')}, {get('CPU(s)')} CPUs; "
            + " ".join(flags))  # fmt: skip


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt_lens", default="16,64", help="lo,hi: prompt lengths drawn uniformly")
    parser.add_argument("--gen_lens", default="16,64", help="lo,hi: generation lengths drawn uniformly")
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--stagger", type=float, default=0.05, help="seconds between the first clients' starts")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--prefill_chunk", type=int, default=128, help="the engine's prompt tokens a step")
    parser.add_argument("--skip_sequential", action="store_true")
    parser.add_argument("--skip_hf", action="store_true")
    parser.add_argument("--hf_clients", default="8", help='clients for transformers\' runs ("" for none)')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--soak", type=int, default=0, help="run this many short requests for the RSS, only that")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    opts = parser.parse_args(argv)

    device = torch.device(opts.device)
    dtype = getattr(torch, opts.dtype)
    shape = model_shape(opts, device)
    prompt_lens, gen_lens = pair(opts.prompt_lens, "--prompt_lens"), pair(opts.gen_lens, "--gen_lens")
    clients = [int(c) for c in opts.clients.split(",") if c]
    hf_clients = [int(c) for c in opts.hf_clients.split(",") if c]
    engines = [e for e in opts.engines.split(",") if e]
    if not engines or any(e not in ENGINES for e in engines):
        raise SystemExit(f"--engines {opts.engines!r}: use a comma-separated list of {', '.join(ENGINES)}")
    max_seq_len = max(prompt_lens[1] + gen_lens[1], SOAK_PROMPT_LENS[1] + SOAK_GEN_LENS[1])
    max_batch = max(clients + hf_clients + [4])  # the warm-up runs 4 at once

    setup_model_parallel(1, device)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    args = ModelArgs(**shape, max_batch_size=max_batch, max_seq_len=max_seq_len)
    model = random_model(args, device, dtype)
    vocab = args.vocab_size
    # An EOS that never comes (every request runs to its length) and a text that costs nothing to decode.
    tokenizer = SimpleNamespace(eos_id=-2, pad_id=-1, stop_ids=[-2], decode=lambda ids: "")
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"torch {torch.__version__}, {cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
          f"{torch.get_num_threads()} threads, {device}, {DTYPE_NAMES[dtype]}")  # fmt: skip
    print(f"shape {shape}, {weight_gb:.2f} GB of weights; KV cache {max_batch} slots x {max_seq_len} positions")

    def build(name: str) -> Llama:
        if name == "faithful":
            return Llama(model, tokenizer)  # type: ignore[arg-type]
        weights = model if name == "fast" else quantized(model, name)
        return Llama(weights, tokenizer, fast=FastDecoder(weights, compile=True))  # type: ignore[arg-type]

    if opts.soak:
        llama = build(engines[0])
        engine = Engine.for_llama(llama, prefill_chunk=opts.prefill_chunk)
        warm_up(llama, engine, vocab)
        points = soak(engine, opts.soak, max(clients), vocab, opts.seed)
        engine.close()
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump({"engine": engines[0], "shape": shape, "rss_mb": points}, f, indent=2)
        return

    requests = make_requests(opts.requests, prompt_lens, gen_lens, vocab, opts.seed)
    n_prompt = sum(len(r.prompt) for r in requests)
    n_gen = sum(r.max_gen_len for r in requests)
    print(f"{len(requests)} requests: prompts {prompt_lens[0]}-{prompt_lens[1]} tokens ({n_prompt} in all), "
          f"generations {gen_lens[0]}-{gen_lens[1]} ({n_gen} in all); clients {clients}, stagger {opts.stagger} s, "
          f"prefill chunk {opts.prefill_chunk}")  # fmt: skip
    results: dict[str, object] = {
        "shape": shape, "dtype": opts.dtype, "device": str(device), "torch": torch.__version__,
        "cpu": cpu_model() if device.type == "cpu" else None, "requests": len(requests), "prompt_lens": prompt_lens,
        "gen_lens": gen_lens, "prompt_tokens": n_prompt, "generated_tokens": n_gen, "stagger_s": opts.stagger,
        "prefill_chunk": opts.prefill_chunk, "engines": {},
    }  # fmt: skip
    started = time.perf_counter()
    reference_tokens = None  # the first engine's sequential tokens, to compare transformers' with
    for name in engines:
        t0 = time.perf_counter()
        llama = build(name)
        engine = Engine.for_llama(llama, prefill_chunk=opts.prefill_chunk)
        setup_s = time.perf_counter() - t0
        warm_s = warm_up(llama, engine, vocab)
        print(f"\n{name}: built in {setup_s:.1f} s, warmed up (compiled) in {warm_s:.1f} s")
        print_header()
        rows: dict[str, dict] = {}
        seq_tokens = None
        graphs = compiled_graphs()
        if not opts.skip_sequential:
            seq_tokens, wall = sequential(llama, requests)
            rows["sequential"] = {"tokens": sum(len(t) for t in seq_tokens), "wall_s": wall,
                                  "tok_per_s": sum(len(t) for t in seq_tokens) / wall}  # fmt: skip
            print_row("sequential (generate)", rows["sequential"])
        for c in clients:
            traces, wall = closed_loop(engine_client(engine), requests, c, opts.stagger)
            row = summarize(traces, wall)
            if seq_tokens is not None:
                row["vs_sequential"] = row["tok_per_s"] / rows["sequential"]["tok_per_s"]
                same = sum(t.tokens == s for t, s in zip(traces, seq_tokens))
                row["same_as_sequential"] = f"{same}/{len(requests)}"
            rows[f"C={c}"] = row
            print_row(f"engine C={c}", row)
        engine.close()
        recompiled = compiled_graphs() - graphs
        if recompiled:
            print(f"  ({recompiled} graph(s) compiled during the timed runs: their time is in the figures)")
        results["engines"][name] = {"setup_s": setup_s, "warm_up_s": warm_s, "recompiled": recompiled, "runs": rows}
        if seq_tokens is not None and reference_tokens is None:
            reference_tokens = seq_tokens
        llama = engine = None
    if not opts.skip_hf and hf_clients:
        print(f"\ntransformers continuous batching ({DTYPE_NAMES[dtype]} weights, SDPA), same requests:")
        print_header()
        results["transformers"] = transformers_runs(model, requests, hf_clients, opts.stagger, max_seq_len,
                                                    opts.prefill_chunk, reference_tokens)  # fmt: skip
    targets(results, engines)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
