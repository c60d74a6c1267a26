"""Throughput of `onegpu serve` with its own engine, with vLLM (`--engine vllm`), and a naive server
built the organizers' sample-server way.

Replays a HELM-shaped request mix (the adapters of ../shared/reference/helm/run_specs_full_coarse_600_budget.conf):
mostly 5-token multiple-choice requests with stop "\\n" (MMLU/TruthfulQA/BBQ, greedy), some 400-token
GSM8K requests with stop "\\n\\n", 128-token CNN/DM summaries (temperature 0.3) and 64-token BIG-bench
requests, built from the real datasets in ../shared/datasets, with HELM's 5 in-context examples by
default (``--shots``; 5-shot prompts are ~160-800 tokens with the bundled tokenizer). Each concurrency level (1, 4, 16) runs
its own requests (the same mix, other items: a level must not find the previous one's prompts in
onegpu's prefix cache) against every server, alternating, and prints req/s, p50/p95 latency (all
requests, and the short multiple-choice ones, which a long prefill would stall), tokens/s, the
1-minute load average and onegpu's prefix-cache hits; then each server's start-up time (launch to
``/health`` 200, vLLM's warm-up compile included) and peak memory (RSS of its process tree).

The two engines serve the same contract from the same front end (tokenizer, BOS rule, stop
sequences), so on greedy requests they must return the same text: the script compares every
greedy completion of the two and reports the onegpu/vLLM ratio only when they all agree (else it
lists the requests that differ). The sampled CNN/DM requests carry seeds, as HELM's do.

The baseline is what the sample servers did: one request at a time (a lock), litgpt's
``generate`` with a KV cache for all ``max_new_tokens`` (no EOS, no stop sequences), then the
tokens' logprobs from one more forward pass.

On a CPU the full mix takes long, so ``--shots`` and ``--token_scale`` scale it down (fewer
in-context examples, every max_new_tokens times the scale); the table says what was used.

    python benchmarks/server_throughput.py --requests 16 --shots 1 --token_scale 0.25 --num_threads 1
    python benchmarks/server_throughput.py --requests 32 --shots 5 --token_scale 0.25 --num_threads 1 --concurrency 4,16

``--servers onegpu`` runs onegpu's side alone (the baseline takes minutes per level on a CPU and
changes only when litgpt does): quick to iterate on, no speed-up column. ``--servers onegpu,vllm``
compares the engines (vLLM's env is created on first use: `make vllm-venv`).

    python benchmarks/server_throughput.py --requests 16 --shots 5 --token_scale 0.25 --num_threads 1 \
        --concurrency 4 --servers onegpu,vllm
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onegpu.paths import shared_datasets_dir  # noqa: E402
from onegpu.submission.launch import free_port, start_server, stop_process_group, wait_healthy  # noqa: E402

SERVERS = {"onegpu": "onegpu serve", "vllm": "onegpu serve --engine vllm", "baseline": "naive baseline"}

# (kind, share of requests, max_new_tokens, temperature, stop) as in the open-eval adapters
MIX = [
    ("mmlu", 0.625, 5, 0.0, ["\n"]),
    ("gsm8k", 0.125, 400, 0.0, ["\n\n"]),
    ("cnn_dm", 0.125, 128, 0.3, ["###"]),
    ("big_bench", 0.125, 64, 0.0, ["\n"]),
]


# ----------------------------------------------------------------------------------------------
# HELM-shaped prompts from the offline datasets


def _mmlu_prompts(data: Path, shots: int, rng: random.Random) -> list[str]:
    subject = "high_school_geography"
    def rows(split):
        with open(data / "mmlu" / split / f"{subject}_{split}.csv", newline="") as f:
            return list(csv.DictReader(f))
    def block(row, with_answer):
        text = f"Question: {row['question']}\n" + "".join(
            f"{letter}. {row[f'choice{i}']}\n" for i, letter in enumerate("ABCD")) + "Answer:"
        return text + (f" {'ABCD'[int(row['answer'])]}\n\n" if with_answer else "")
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    train = "".join(block(r, True) for r in rows("dev")[:shots])
    return [head + train + block(r, False) for r in rng.sample(rows("test"), 64)]


def _gsm8k_prompts(data: Path, shots: int, rng: random.Random) -> list[str]:
    train = [json.loads(line) for line in open(data / "gsm8k" / "train.jsonl")][:shots]
    test = [json.loads(line) for line in open(data / "gsm8k" / "test.jsonl")]
    prefix = "".join(f"Q: {r['question']}\nA: {r['answer'].replace('####', 'The answer is')}\n\n" for r in train)
    return [prefix + f"Q: {r['question']}\nA:" for r in rng.sample(test, 16)]


def _cnn_prompts(data: Path, article_chars: int, rng: random.Random) -> list[str]:
    rows = [json.loads(line) for line in open(next((data / "cnn_dailymail_sample").glob("*article*.jsonl")))]
    return [f"###\nArticle: {r['article'][:article_chars]}\n\nSummarize the above article in 3 sentences.\nSummary:"
            for r in rng.sample(rows, 16)]


def _bigbench_prompts(data: Path, shots: int, rng: random.Random) -> list[str]:
    task = json.loads((data / "bigbench" / "emoji_movie" / "task.json").read_text())
    examples = task["examples"]
    def target(ex):
        return ex.get("target") or max(ex["target_scores"], key=ex["target_scores"].get)
    def as_text(t):
        return t if isinstance(t, str) else t[0]
    prefix = "".join(f"{ex['input']}\n{as_text(target(ex))}\n\n" for ex in examples[:shots])
    return [prefix + f"{ex['input']}\n" for ex in rng.sample(examples[shots:], 16)]


def build_requests(n: int, shots: int, token_scale: float, seed: int) -> list[dict]:
    data = shared_datasets_dir()
    if data is None:
        sys.exit("../shared/datasets (or ONEGPU_DATA_DIR) is needed for the HELM-shaped prompts")
    rng = random.Random(seed)
    pools = {"mmlu": _mmlu_prompts(data, shots, rng), "gsm8k": _gsm8k_prompts(data, shots, rng),
             "cnn_dm": _cnn_prompts(data, 400 + 600 * shots, rng), "big_bench": _bigbench_prompts(data, shots, rng)}
    counts = {kind: max(1, round(share * n)) for kind, share, *_ in MIX}
    counts["mmlu"] = n - sum(c for k, c in counts.items() if k != "mmlu")
    requests = []
    for kind, _share, max_tokens, temperature, stop in MIX:
        for i in range(counts[kind]):
            requests.append({"kind": kind, "body": {
                "prompt": pools[kind][i % len(pools[kind])], "temperature": temperature or 1e-7,
                "max_new_tokens": max(5, round(max_tokens * token_scale)) if max_tokens > 5 else max_tokens,
                "stop_sequences": stop, "echo_prompt": False, "top_k_per_token": 1, "num_return_sequences": 1,
                "top_p": 1.0, "seed": i}})
    rng.shuffle(requests)
    return requests


# ----------------------------------------------------------------------------------------------
# The naive baseline server (the sample servers' way)


def serve_baseline(checkpoint: str, port: int, num_threads: int | None) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from litgpt import GPT, Config
    from litgpt.generate.base import generate
    from litgpt.tokenizer import Tokenizer

    if num_threads:
        torch.set_num_threads(num_threads)
    checkpoint = Path(checkpoint)
    tokenizer = Tokenizer(checkpoint)
    with torch.device("meta"):
        model = GPT(Config.from_file(checkpoint / "model_config.yaml"))
    model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True), assign=True)
    model.cos, model.sin = model.rope_cache(device=torch.device("cpu"))
    model.eval()
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/process")
    def process(body: dict):
        start = time.perf_counter()
        with lock, torch.inference_mode():
            encoded = tokenizer.encode(body["prompt"])
            max_returned = len(encoded) + int(body.get("max_new_tokens", 50))
            model.max_seq_length = max_returned
            model.set_kv_cache(batch_size=1)
            if body.get("seed") is not None:
                torch.manual_seed(body["seed"])
            out = generate(model, encoded, max_returned, temperature=max(body.get("temperature", 0.8), 1e-5),
                           top_k=body.get("top_k", 200), eos_id=None, include_prompt=True)
            model.clear_kv_cache()
            new = out[len(encoded):]
            logprobs = torch.log_softmax(model(out[None, :-1])[0, len(encoded) - 1:].float(), -1)
            chosen = logprobs.gather(1, new[:, None].long())[:, 0].tolist()
        tokens = [{"text": tokenizer.decode(t), "logprob": lp, "top_logprob": {}} for t, lp in zip(new, chosen)]
        return {"text": tokenizer.decode(new), "tokens": tokens, "logprob": sum(chosen),
                "request_time": time.perf_counter() - start}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------------------------
# Load generator


def run_level(base_url: str, requests: list[dict], concurrency: int) -> dict:
    latencies, short, tokens, texts = [], [], 0, []

    def one(request):
        start = time.perf_counter()
        response = client.post(f"{base_url}/process", json=request["body"])
        response.raise_for_status()
        return time.perf_counter() - start, response.json()

    with httpx.Client(timeout=3000, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
            for request, (latency, body) in zip(requests, pool.map(one, requests)):
                latencies.append(latency)
                if request["kind"] == "mmlu":
                    short.append(latency)
                tokens += len(body["tokens"])
                texts.append(body["text"])
        wall = time.perf_counter() - start
    return {"req_s": len(requests) / wall, "p50": statistics.median(latencies), "p95": p95(latencies),
            "p95_mc": p95(short), "tok_s": tokens / wall, "tokens": tokens, "wall": wall,
            "load": os.getloadavg()[0], "texts": texts}


class Memory:
    """Peak RSS of a process and its children, sampled every second in a thread."""

    def __init__(self, pid: int):
        import psutil

        self.process, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(1.0):
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass

    def stop(self) -> float:
        self._stop.set()
        return self.peak / 2**30


def greedy_disagreements(requests_at: dict, rows: list) -> tuple[int, list[str]]:
    """(greedy requests compared, descriptions of those whose onegpu and vLLM texts differ)."""
    texts = {(c, name): r["texts"] for c, name, r in rows}
    compared, differ = 0, []
    for concurrency, requests in requests_at.items():
        ours, theirs = texts.get((concurrency, SERVERS["onegpu"])), texts.get((concurrency, SERVERS["vllm"]))
        if ours is None or theirs is None:
            continue
        for request, a, b in zip(requests, ours, theirs):
            if request["body"]["temperature"] > 1e-5:
                continue
            compared += 1
            if a != b:
                differ.append(f"c={concurrency} {request['kind']}: onegpu {a[:60]!r} vs vLLM {b[:60]!r}")
    return compared, differ


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="litgpt checkpoint dir (default: the bundled model)")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level and server")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--shots", type=int, default=5, help="in-context examples per prompt (HELM: 5)")
    parser.add_argument("--token_scale", type=float, default=1.0, help="multiply every max_new_tokens > 5")
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads per server")
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--prefill_chunk", type=int, default=256, help="onegpu serve's --prefill_chunk (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--servers", default="onegpu,baseline",
                        help="which servers to run (onegpu alone: iterate on onegpu against a known baseline)")
    parser.add_argument("--serve-baseline", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpoint is None:
        from onegpu.model import prepare

        args.checkpoint = str(prepare())
    if args.serve_baseline is not None:
        serve_baseline(args.checkpoint, args.serve_baseline, args.num_threads)
        return

    servers = [s for s in SERVERS if s in args.servers.split(",")]
    if not servers or set(args.servers.split(",")) - set(SERVERS):
        sys.exit(f"--servers {args.servers!r}: a comma-separated subset of {', '.join(SERVERS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    # Each level its own requests (seed + its index): repeating one level's prompts at the next
    # would find them all in onegpu's prefix cache and flatter it (11.8x instead of ~5-7x at c=16).
    requests_at = {c: build_requests(args.requests, args.shots, args.token_scale, args.seed + k)
                   for k, c in enumerate(levels)}
    warm_up = dict(requests_at[levels[0]][0]["body"], prompt="Warm-up: the capital of France is")
    threads = ["--num_threads", str(args.num_threads)] if args.num_threads else []
    import subprocess
    import tempfile

    procs, urls, started, memory, rows, stats = {}, {}, {}, {}, [], {}
    logs = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    try:
        for server in servers:  # one at a time: start-up time and memory are each server's own
            name, port, t0 = SERVERS[server], free_port(), time.perf_counter()
            if server == "baseline":
                procs[name] = subprocess.Popen([sys.executable, __file__, "--checkpoint", args.checkpoint,
                                                "--serve-baseline", str(port), *threads], start_new_session=True,
                                               env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            else:
                engine = ["--engine", server, "--max_batch_size", str(args.max_batch_size), *threads]
                if server == "onegpu":
                    engine += ["--prefill_chunk", str(args.prefill_chunk)]
                procs[name] = start_server(args.checkpoint, port, logs / f"{server}.log", engine)
            urls[name] = f"http://127.0.0.1:{port}"
            memory[name] = Memory(procs[name].pid)
            wait_healthy(urls[name], procs[name], timeout=1800, log_path=logs / f"{server}.log")
            started[name] = time.perf_counter() - t0
            httpx.post(f"{urls[name]}/process", json=warm_up, timeout=3000)  # a request none of the levels sends
            print(f"[bench] {name}: ready in {started[name]:.0f} s", file=sys.stderr, flush=True)
        for concurrency in levels:
            for name, url in urls.items():
                result = run_level(url, requests_at[concurrency], concurrency)
                rows.append((concurrency, name, result))
                print(f"[bench] c={concurrency:<3} {name:<27} {result['req_s']:.3f} req/s "
                      f"p50 {result['p50']:.2f}s p95 {result['p95']:.2f}s {result['tok_s']:.1f} tok/s "
                      f"load {result['load']:.1f}", file=sys.stderr, flush=True)
        for name, url in urls.items():
            if name != SERVERS["baseline"]:
                stats[name] = httpx.get(f"{url}/health").json()["stats"]
    finally:
        peaks = {name: m.stop() for name, m in memory.items()}
        for proc in procs.values():
            stop_process_group(proc)

    from litgpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(Path(args.checkpoint))
    every_level = [r for c in levels for r in requests_at[c]]  # the same mix at each level, other items
    prompt_tokens = [len(tokenizer.encode(r["body"]["prompt"])) for r in every_level]
    kinds = {}
    for r in requests_at[levels[0]]:
        kinds[r["kind"]] = (kinds.get(r["kind"], (0, r["body"]["max_new_tokens"]))[0] + 1, r["body"]["max_new_tokens"])
    print(f"\nRequest mix ({args.requests} per level and server, other items at each level): "
          + ", ".join(f"{k} x{n} (max_new_tokens {m})" for k, (n, m) in kinds.items())
          + f"; {args.shots}-shot prompts (median {statistics.median(prompt_tokens)} tokens, "
          f"max {max(prompt_tokens)}); token_scale {args.token_scale}; onegpu --prefill_chunk {args.prefill_chunk}; "
          f"/health stats at the end: {stats}\n")
    compared, differ = greedy_disagreements(requests_at, rows)
    both = SERVERS["onegpu"] in urls and SERVERS["vllm"] in urls
    if both:
        print(f"Greedy outputs, onegpu vs vLLM: {compared - len(differ)} of {compared} identical"
              + ("" if not differ else "; the onegpu/vLLM ratio is not reported, they differ on:\n  "
                 + "\n  ".join(differ)) + "\n")
    print("| concurrency | server | req/s | p50 latency (s) | p95 latency (s) | p95 MC latency (s) | "
          "returned tokens/s | vs baseline (req/s) | onegpu / vLLM (req/s) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    by_level = {}
    for concurrency, name, result in rows:
        by_level.setdefault(concurrency, {})[name] = result
    for concurrency in levels:
        level = by_level[concurrency]
        base = level.get(SERVERS["baseline"], {}).get("req_s")
        for name, r in level.items():
            speedup = f"{r['req_s'] / base:.1f}x" if base else "-"
            ratio = "-"
            if both and name == SERVERS["onegpu"] and not differ:
                ratio = f"{r['req_s'] / level[SERVERS['vllm']]['req_s']:.2f}x"
            print(f"| {concurrency} | {name} | {r['req_s']:.3f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                  f"{r['p95_mc']:.2f} | {r['tok_s']:.1f} | {speedup} | {ratio} | {r['load']:.1f} |")
    print("\n| server | start-up to /health (s) | peak RSS, all its processes (GiB) |\n|---|---|---|")
    for name in urls:
        print(f"| {name} | {started[name]:.0f} | {peaks[name]:.2f} |")


if __name__ == "__main__":
    main()
