"""``lmlab serve`` under load, on loopback only: throughput, latency, and a bounded soak test.

    python benchmarks/serve_load.py throughput --out runs/serve_throughput.json
    python benchmarks/serve_load.py loop --out runs/serve_loop.json
    python benchmarks/serve_load.py soak --requests 500 --soak-clients 32 --out runs/serve_soak.json
    python benchmarks/serve_load.py single --repeats 30 --chunk 8 --out runs/serve_single.json
    python benchmarks/serve_load.py single --compare-source ../old/src --repeats 30 --out runs/serve_single_ab.json
    python benchmarks/serve_load.py throughput --model gguf:SmolLM2.gguf --dtype bfloat16 --max-tokens 16 --out ...

throughput: a server (a subprocess of ``lmlab serve`` on 127.0.0.1) on a transformer of the
    demo's size (4 layers, 4 heads, 128 wide, block 64, tiny-Shakespeare characters; random
    weights, <eos> banned with logit_bias so every request makes exactly --max-tokens tokens),
    driven by 1, 4, 16 and 32 concurrent streaming clients (each on its own kept-alive
    connection); 1 and 16 clients against a server with --max-batch 1 (one request at a
    time); with --compare-thread, 1 and 16 clients against the decoding loop on a thread of
    the HTTP process. All servers are up at once and measured in --repeats interleaved rounds
    (the settings compared see the same load of a shared machine); right after the batching
    server's one-client row, ``lmlab generate``'s loop runs the same requests in this process
    (what a single client loses to the server). Aggregate tokens/s, tokens per CPU second of the server's
    processes, the clients' CPU, time to first token and inter-token latency (p50, p99), the
    load average; the median run per row and the medians of the rounds' ratios.
loop: the same figures for the decoding loop alone (``Scheduler`` in this process, no HTTP):
    N jobs submitted together against the same jobs one at a time, to show what the HTTP
    layer costs.
single: one client of the batching server, streaming and not, against ``lmlab generate`` in
    this process on the same requests, alternated in chunks of --chunk requests, --repeats
    rounds: the single-client comparison with the machine's speed changes spread over every side.
    --compare-source DIR adds a streaming client of another version's server (its ``src``
    directory), in the same rounds: a before/after comparison.
soak: --requests requests from --clients concurrent clients, a mix of streaming and
    non-streaming, some cancelled after a few tokens, some invalid (answered 400). Checks that
    every request is answered exactly once (or refused with a clear error), that no response
    id repeats, and reports the server's resident memory after a warm-up and at the end.

Prints Markdown tables and writes JSON. Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

PROMPTS = ["ROMEO:", "JULIET:\nO ", "First Citizen:", "KING HENRY", "To be, or ", "MENENIUS:\nWhat", "O", "Good "]


def demo_checkpoint(directory: Path) -> Path:
    """A demo-size char transformer (random weights) with the bundled corpus' tokenizer."""
    from lmlab.data import read_corpus
    from lmlab.models import build_model, save_model
    from lmlab.tokenizers import CharTokenizer

    tok = CharTokenizer.train(read_corpus(None))
    torch.manual_seed(0)
    model = build_model("transformer", dict(vocab_size=tok.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128))
    save_model(model, directory)
    tok.save(directory / "tokenizer.json")
    return directory


# The decoding loop on a thread of the HTTP process (what `lmlab serve` did before it got a process of its own).
_THREAD_SERVER = ("import sys, uvicorn; from lmlab.checkpoints import load_checkpoint; "
                  "from lmlab.serve.app import create_app; model, tok = load_checkpoint(sys.argv[1]); "
                  "app = create_app(model, tok, sys.argv[1], max_batch=int(sys.argv[3]), "
                  "max_tokens_limit=int(sys.argv[4]), decoding_process=False); "
                  "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')")


class Server:
    """``lmlab serve`` in a subprocess on a free loopback port (``decoder="thread"``: the decoding
    loop on a thread of the HTTP process instead of a process of its own). ``options``: more
    ``lmlab serve`` flags (``--dtype``, ``--quantize``). ``source``: the ``src`` directory of
    another version of lmlab to serve (its PYTHONPATH)."""

    def __init__(self, model: str, max_batch: int, max_tokens_limit: int = 4096, threads: int = 1,
                 decoder: str = "process", options: tuple[str, ...] = (), source: str | None = None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if decoder == "thread":
            command = ["-c", _THREAD_SERVER, model, str(self.port), str(max_batch), str(max_tokens_limit)]
        else:
            command = ["-m", "lmlab", "serve", "--model", model, "--host", "127.0.0.1", "--port", str(self.port),
                       "--max-batch", str(max_batch), "--max-tokens-limit", str(max_tokens_limit), *options]
        self.proc = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                                     **({"PYTHONPATH": source} if source else {})})
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the server did not start: {self.proc.stdout.read()}")
            time.sleep(0.2)
        self.info = httpx.get(self.url + "/v1/info").json()

    def pids(self) -> list[int]:
        """The server process and its children (the decoding process)."""
        tasks = Path(f"/proc/{self.proc.pid}/task")
        return [self.proc.pid, *(int(c) for t in tasks.iterdir() for c in (t / "children").read_text().split())]

    def cpu_by_process(self) -> tuple[float, float]:
        """(HTTP process, its children: the decoding process) user + system CPU seconds so far."""
        times = []
        for pid in self.pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            times.append((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return times[0], sum(times[1:])

    def rss_mb(self) -> float:
        """Resident memory of the server's processes (MB)."""
        total = 0
        for pid in self.pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream_request(url: str, body: dict, cancel_after: int | None = None, timeout: float = 600,
                   client: httpx.Client | None = None) -> dict:
    """One streaming completion (on ``client``'s kept-alive connection when given); the arrival
    time of every token."""
    t0 = time.perf_counter()
    times, ids, text, finish = [], set(), [], None
    with (client or httpx).stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=timeout) as r:
        if r.status_code != 200:
            r.read()
            return {"status": r.status_code, "error": r.json()["error"]["message"]}
        for line in _sse_data_lines(r):
            if line == b"[DONE]":
                break
            chunk = json.loads(line)
            ids.add(chunk["id"])
            for c in chunk["choices"]:
                if c.get("finish_reason"):
                    finish = c["finish_reason"]
                else:  # logprobs=0: the chunk lists its tokens (one or more)
                    times.extend([time.perf_counter() - t0] * len(c["logprobs"]["tokens"]))
                    text.append(c["text"])
            if cancel_after is not None and len(times) >= cancel_after:
                return {"status": "cancelled", "ids": ids, "tokens": len(times)}
    return {"status": 200, "ids": ids, "times": times, "text": "".join(text), "finish": finish}


def _sse_data_lines(response: httpx.Response):
    """The ``data:`` payloads (bytes) of a server-sent event stream, split by hand: the clients
    share the server's cores, and httpx's ``iter_lines`` (text decoding, a line decoder) cost
    them about as much CPU per token as the server's HTTP side."""
    pending = b""
    for piece in response.iter_raw():
        lines = (pending + piece).split(b"\n")
        pending = lines.pop()
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].rstrip(b"\r")
    if pending.startswith(b"data: "):
        yield pending[6:].rstrip(b"\r")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def drive(server: "Server", clients: int, requests_per_client: int, body: dict,
          connections: list[httpx.Client] | None = None) -> dict:
    """``clients`` threads, each sending its requests one after another on its own kept-alive
    connection (``connections``: kept open by the caller across calls; else opened here);
    aggregate figures, the server's CPU time (on a shared machine, tokens per CPU second
    depend less on the load) and the clients' (this process's)."""
    url = server.url
    results: list[dict] = []
    lock = threading.Lock()
    own = connections is None
    if own:
        connections = [httpx.Client() for _ in range(clients)]

    def client(c: int) -> None:
        for r in range(requests_per_client):
            prompt = PROMPTS[(c + r) % len(PROMPTS)]
            out = stream_request(url, {**body, "prompt": prompt, "seed": c * 1000 + r, "logprobs": 0},
                                 client=connections[c])
            with lock:
                results.append(out)

    t0, cpu0, client_cpu0 = time.perf_counter(), server.cpu_by_process(), time.process_time()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu1 = time.perf_counter() - t0, server.cpu_by_process()
    http_cpu, decoder_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    cpu = http_cpu + decoder_cpu
    client_cpu = time.process_time() - client_cpu0
    if own:
        for connection in connections:
            connection.close()
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(len(r["times"]) for r in ok)
    ttft = [r["times"][0] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    return {"clients": clients, "requests": len(results), "ok": len(ok), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "server_cpu_s": cpu, "tokens_per_server_cpu_s": tokens / cpu,
            "http_cpu_ms_per_token": 1000 * http_cpu / tokens, "decoder_cpu_ms_per_token": 1000 * decoder_cpu / tokens,
            "client_cpu_s": client_cpu, "load_average_1min": os.getloadavg()[0],
            "ttft_p50_ms": 1000 * percentile(ttft, 50),
            "ttft_p99_ms": 1000 * percentile(ttft, 99), "itl_p50_ms": 1000 * percentile(itl, 50),
            "itl_p99_ms": 1000 * percentile(itl, 99)}


class Generate:
    """``lmlab generate``'s loop in this process (the model loaded once): requests of the same size
    as the clients' (``measure``: tokens/s and tokens per CPU s, the median of ``requests``)."""

    def __init__(self, model_spec: str, max_tokens: int, eos_bias: dict, precision: tuple[str, ...] = ()) -> None:
        from lmlab.checkpoints import load_checkpoint
        from lmlab.decode.setups import DecodingSetup

        options = dict(zip(precision[::2], precision[1::2]))
        self.model, self.tokenizer = load_checkpoint(model_spec, dtype=options.get("--dtype"),
                                                     quantize=options.get("--quantize"))
        self.setup = DecodingSetup(logit_bias={int(k): v for k, v in eos_bias.items()})
        self.max_tokens = max_tokens
        self.measure(1)  # warm-up

    def measure(self, requests: int = 3) -> tuple[float, float]:
        """(tokens/s, tokens per CPU s) over ``requests`` requests one after another, as one client
        of a server sends them."""
        from lmlab.decode.setups import run_setup

        tokens, t0, c0 = 0, time.perf_counter(), time.process_time()
        for r in range(requests):
            out = run_setup(self.model, self.tokenizer, [PROMPTS[r % len(PROMPTS)]], self.setup, self.max_tokens, seed=r)
            tokens += len(out[0][0].token_ids)
        return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def throughput(args, model_spec: str) -> dict:
    """Every setting's server up at once; --repeats rounds, each measuring every (setting, client
    count) once, so that the settings compared see the same load of a shared machine; per row the
    run with the median tokens/s is kept, and the speed-up of 16 clients over one request at a
    time is the median of the rounds' ratios. Right after the batching server's one-client row,
    ``lmlab generate`` runs the same requests one after another in this process (the single-client
    comparison: the two measured back to back, so a shared machine's speed moves them together)."""
    body, precision = _measured_request(args, model_spec)
    settings = [("continuous batching (--max-batch 32)", dict(max_batch=32), args.clients),
                ("one request at a time (--max-batch 1)", dict(max_batch=1), [1, 16])]
    if args.compare_thread:
        settings.append(("decoding loop on a thread of the HTTP process, --max-batch 32", dict(max_batch=32, decoder="thread"),
                         [1, 16]))
    servers, generate = [], Generate(model_spec, args.max_tokens, body["logit_bias"], precision)
    generated: list[tuple[float, float]] = []
    try:
        for label, options, client_counts in settings:
            servers.append((label, Server(model_spec, threads=args.threads, options=precision, **options), client_counts))
            drive(servers[-1][1], 2, 1, body)  # warm-up
        runs: dict[tuple[str, int], list[dict]] = {}
        for round_ in range(args.repeats):
            for label, server, client_counts in servers:
                for clients in client_counts:
                    row = drive(server, clients, max(1, args.requests_per_setting // clients), body)
                    runs.setdefault((label, clients), []).append({**row, "server": label, "round": round_,
                                                                  "policy": server.info["policy"]})
                    print(_row(row | {"server": f"{label}, round {round_ + 1}"}), flush=True)
                    if server is servers[0][1] and clients == 1:  # the same requests in-process, right after
                        generated.append(generate.measure(args.requests_per_setting))
                        print(f"lmlab generate, round {round_ + 1}: {generated[-1][0]:.0f} tokens/s, "
                              f"{generated[-1][1]:.0f} tokens per CPU s", flush=True)
            if 1 not in servers[0][2]:
                generated.append(generate.measure(args.requests_per_setting))
    finally:
        for _, server, _ in servers:
            server.close()
    rows = []
    for key, measured in runs.items():
        ordered = sorted(measured, key=lambda r: r["tokens_per_s"])
        rows.append({**ordered[len(ordered) // 2], "tokens_per_s_of_each_round": [r["tokens_per_s"] for r in measured]})
    batched, alone = runs.get((settings[0][0], 16)), runs.get((settings[1][0], 16))
    ratios = sorted(b["tokens_per_s"] / a["tokens_per_s"] for b, a in zip(batched or [], alone or []))
    cpu_ratios = sorted(b["tokens_per_server_cpu_s"] / a["tokens_per_server_cpu_s"] for b, a in zip(batched or [], alone or []))
    single = [r["tokens_per_s"] / g[0] for r, g in zip(runs[(settings[0][0], 1)], generated)] \
        if (settings[0][0], 1) in runs else []
    single_cpu = [r["tokens_per_server_cpu_s"] / g[1] for r, g in zip(runs.get((settings[0][0], 1), []), generated)]

    def median(values):
        return statistics.median(values) if values else None

    return {"rows": rows, "speedup_16_clients_by_round": ratios, "speedup_16_clients_median": median(ratios),
            "speedup_16_clients_per_cpu_median": median(cpu_ratios),
            "lmlab_generate_by_round": generated,
            "lmlab_generate_tokens_per_s": median([g[0] for g in generated]),
            "lmlab_generate_tokens_per_cpu_s": median([g[1] for g in generated]),
            "single_client_over_generate_by_round": single, "single_client_over_generate_median": median(single),
            "single_client_over_generate_per_cpu_median": median(single_cpu)}


def _measured_request(args, model_spec: str) -> tuple[dict, tuple[str, ...]]:
    """The request body every measured request sends (``--max-tokens`` tokens, <eos> banned so
    each makes exactly that many) and the server's precision options (--dtype, --quantize)."""
    body = {"max_tokens": args.max_tokens, "logit_bias": {str(_eos_id(model_spec)): -100}}
    precision = tuple(f for name in ("dtype", "quantize") if getattr(args, name) for f in (f"--{name}", getattr(args, name)))
    return body, precision


def _eos_id(model_spec: str) -> int:
    from lmlab.checkpoints import load_checkpoint

    _, tokenizer = load_checkpoint(model_spec)
    return tokenizer.eos_id


def _row(r: dict) -> str:
    return (f"| {r['server']} | {r['clients']} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_server_cpu_s']:.0f} | {r['client_cpu_s'] / r['seconds']:.2f} | "
            f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} | {r['itl_p50_ms']:.1f} / {r['itl_p99_ms']:.1f} | "
            f"{r['load_average_1min']:.1f} |")


def soak(args, model_spec: str) -> dict:
    """--requests requests from --clients clients: streaming, whole, cancelled and invalid ones."""
    server = Server(model_spec, max_batch=16, max_tokens_limit=64, threads=args.threads)
    rng = random.Random(0)
    plan = []
    for i in range(args.requests):
        kind = rng.choices(["stream", "whole", "cancel", "invalid"], weights=[4, 4, 1, 1])[0]
        plan.append((i, kind, rng.randint(1, 40), rng.choice(PROMPTS)))
    answers: dict[int, dict] = {}
    lock = threading.Lock()
    queue = list(plan)

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                i, kind, max_tokens, prompt = queue.pop()
            body = {"prompt": prompt, "max_tokens": max_tokens, "seed": i}
            try:
                if kind == "invalid":
                    r = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 10_000}, timeout=600)
                    out = {"status": r.status_code, "error": r.json()["error"]["message"]}
                elif kind == "whole":
                    r = httpx.post(server.url + "/v1/completions", json=body, timeout=600)
                    data = r.json()
                    out = {"status": r.status_code, "ids": {data["id"]}, "choices": len(data["choices"]),
                           "tokens": data["usage"]["completion_tokens"]}
                else:
                    out = stream_request(server.url, {**body, "logprobs": 0},
                                         cancel_after=2 if kind == "cancel" else None)
            except httpx.HTTPError as e:
                out = {"status": "transport error", "error": str(e)}
            with lock:
                if i in answers:
                    answers[i]["duplicate"] = True
                else:
                    answers[i] = {"kind": kind, **out}

    try:
        warm = [threading.Thread(target=lambda: stream_request(server.url, {"prompt": "O", "max_tokens": 8, "logprobs": 0}))
                for _ in range(4)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        rss_start = server.rss_mb()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.soak_clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(1.0)
        rss_end = server.rss_mb()
        idle_rows = httpx.get(server.url + "/v1/info").json()
    finally:
        server.close()
    ids = [x for a in answers.values() for x in a.get("ids", ())]
    summary = {
        "requests": args.requests, "clients": args.soak_clients, "seconds": wall,
        "answered": len(answers), "lost": args.requests - len(answers),
        "duplicated_requests": sum(1 for a in answers.values() if a.get("duplicate")),
        "duplicated_response_ids": len(ids) - len(set(ids)),
        "by_kind": {}, "rss_mb_after_warmup": rss_start, "rss_mb_at_end": rss_end,
        "policy": idle_rows["policy"],
    }
    for kind in ("stream", "whole", "cancel", "invalid"):
        mine = [a for a in answers.values() if a["kind"] == kind]
        statuses: dict[str, int] = {}
        for a in mine:
            statuses[str(a["status"])] = statuses.get(str(a["status"]), 0) + 1
        summary["by_kind"][kind] = statuses
    bad = [a for a in answers.values() if a["kind"] != "invalid" and a["status"] not in (200, "cancelled")]
    summary["unexpected"] = bad[:5]
    return summary


def loop(args, model_spec: str) -> dict:
    """Aggregate tokens/s of the Scheduler alone: N jobs at once against one at a time."""
    from lmlab.checkpoints import load_checkpoint
    from lmlab.decode.setups import DecodingSetup
    from lmlab.serve.scheduler import Job, Scheduler

    model, tokenizer = load_checkpoint(model_spec)
    processors = DecodingSetup(logit_bias={tokenizer.eos_id: -100.0}).processors(eos_id=tokenizer.eos_id)
    scheduler = Scheduler(model, tokenizer, max_batch=32)

    def jobs(count: int) -> list[Job]:
        return [Job(prompt_ids=tokenizer.encode(PROMPTS[i % len(PROMPTS)]), max_new_tokens=args.max_tokens,
                    processors=processors, seed=i, eos_id=tokenizer.eos_id) for i in range(count)]

    def timed(batch: list[Job], together: bool) -> float:
        t0 = time.perf_counter()
        for job in batch:
            scheduler.submit(job)
            if not together:
                job.done.wait()
        for job in batch:
            job.done.wait()
        return sum(len(job.results[0].token_ids) for job in batch) / (time.perf_counter() - t0)

    rows = []
    try:
        timed(jobs(4), True)  # warm-up
        for count in args.clients:
            row = {"jobs": count, "together_tokens_per_s": timed(jobs(count), True),
                   "one_at_a_time_tokens_per_s": timed(jobs(count), False)}
            rows.append(row)
            print(f"| {count} | {row['together_tokens_per_s']:.0f} | {row['one_at_a_time_tokens_per_s']:.0f} | "
                  f"{row['together_tokens_per_s'] / row['one_at_a_time_tokens_per_s']:.1f}x |", flush=True)
    finally:
        scheduler.close()
    return {"rows": rows}


def plain_requests(server: "Server", count: int, body: dict, client: httpx.Client) -> dict:
    """``count`` non-streaming completions one after another on ``client``'s kept-alive
    connection, with the requests (prompts, seeds) of ``drive``'s first client."""
    tokens, t0, cpu0 = 0, time.perf_counter(), server.cpu_by_process()
    for r in range(count):
        response = client.post(server.url + "/v1/completions", timeout=600,
                               json={**body, "prompt": PROMPTS[r % len(PROMPTS)], "seed": r})
        response.raise_for_status()
        tokens += response.json()["usage"]["completion_tokens"]
    wall, cpu1 = time.perf_counter() - t0, server.cpu_by_process()
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "http_cpu_ms_per_token": 1000 * (cpu1[0] - cpu0[0]) / tokens,
            "decoder_cpu_ms_per_token": 1000 * (cpu1[1] - cpu0[1]) / tokens}


def single(args, model_spec: str) -> dict:
    """One client of the batching server, streaming and not, against ``lmlab generate`` in this
    process on the same requests, alternated in short chunks (``--chunk`` requests each,
    ``--repeats`` rounds; the server sides take turns going first), so that a shared machine's
    speed changes reach every side alike."""
    body, precision = _measured_request(args, model_spec)
    generate = Generate(model_spec, args.max_tokens, body["logit_bias"], precision)
    server = Server(model_spec, max_batch=32, threads=args.threads, options=precision)
    other = Server(model_spec, max_batch=32, threads=args.threads, options=precision, source=args.compare_source) \
        if args.compare_source else None
    rounds = []
    # One kept-alive connection per side for the whole run, as a client of a server keeps it.
    streaming, plain, other_streaming = httpx.Client(), httpx.Client(), httpx.Client()
    try:
        drive(server, 1, 4, body, [streaming])  # warm-up
        plain_requests(server, 2, body, plain)
        sides = [("streaming", lambda: drive(server, 1, args.chunk, body, [streaming])),
                 ("plain", lambda: plain_requests(server, args.chunk, body, plain))]
        if other is not None:
            drive(other, 1, 4, body, [other_streaming])
            sides.append(("other_streaming", lambda: drive(other, 1, args.chunk, body, [other_streaming])))
        for i in range(args.repeats):
            measured = {name: run() for name, run in sides[i % len(sides):] + sides[:i % len(sides)]}
            local = generate.measure(args.chunk)
            rounds.append({"generate_tokens_per_s": local[0], "generate_cpu_ms_per_token": 1000 / local[1],
                           "load_average_1min": os.getloadavg()[0],
                           **{f"{name}_{key}": value[key] for name, value in measured.items()
                              for key in ("tokens_per_s", "tokens", "seconds", "http_cpu_ms_per_token",
                                          "decoder_cpu_ms_per_token")}})
    finally:
        for connection in (streaming, plain, other_streaming):
            connection.close()
        server.close()
        if other is not None:
            other.close()
    result = {"rounds": rounds, "compare_source": args.compare_source}
    for name, _ in sides:
        ratios = [q[f"{name}_tokens_per_s"] / q["generate_tokens_per_s"] for q in rounds]
        generated_seconds = sum(q[f"{name}_tokens"] / q["generate_tokens_per_s"] for q in rounds)
        result[name] = {"ratio_by_round": ratios, "ratio_median": statistics.median(ratios),
                        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
                        "ratio_of_totals": generated_seconds / sum(q[f"{name}_seconds"] for q in rounds),
                        "decoder_over_generate_cpu_median": statistics.median(
                            q[f"{name}_decoder_cpu_ms_per_token"] / q["generate_cpu_ms_per_token"] for q in rounds)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["throughput", "loop", "soak", "single"])
    parser.add_argument("--model", help="a checkpoint or hf:DIR (default: a demo-size random transformer)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32], help="throughput: client counts")
    parser.add_argument("--soak-clients", type=int, default=32, help="soak: concurrent clients")
    parser.add_argument("--requests-per-setting", type=int, default=64)
    parser.add_argument("--requests", type=int, default=500, help="soak: requests in all")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the server and of the in-process lmlab generate run (OMP_NUM_THREADS)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="throughput: runs per setting (the median is kept); single: rounds")
    parser.add_argument("--chunk", type=int, default=8, help="single: requests per side of a round")
    parser.add_argument("--compare-source", help="single: also a server of the lmlab in this src directory, "
                        "streaming, alternated with the others (a before/after comparison)")
    parser.add_argument("--compare-thread", action="store_true",
                        help="throughput: also the decoding loop on a thread of the HTTP process (1 and 16 clients)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="lmlab serve --dtype")
    parser.add_argument("--quantize", choices=["int8", "int4"], help="lmlab serve --quantize")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_spec = args.model or str(demo_checkpoint(Path(tmp) / "demo-size"))
        meta = {"model": args.model or "demo-size transformer (4x4x128, block 64, random weights)",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "load_average_at_start": os.getloadavg(),
                "torch": torch.__version__, "max_tokens": args.max_tokens, "threads": args.threads}
        if args.mode == "throughput":
            print("| server | clients | requests | tokens | tokens/s | tokens per server CPU s | client cores | "
                  "TTFT p50 / p99 ms | inter-token p50 / p99 ms | load average |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            result = {**meta, **throughput(args, model_spec)}
            print("\nMedians over the rounds:")
            for row in result["rows"]:
                print(_row(row), flush=True)
            for row in result["rows"]:
                print(f"{row['server']}, {row['clients']} clients: CPU ms per token, HTTP process "
                      f"{row['http_cpu_ms_per_token']:.3f}, decoding process {row['decoder_cpu_ms_per_token']:.3f} "
                      "(the round with the median tokens/s)")
            if result["speedup_16_clients_median"] is not None:
                print(f"16 clients, batched / one request at a time: {result['speedup_16_clients_median']:.1f}x "
                      f"(median of the rounds; per server CPU s: {result['speedup_16_clients_per_cpu_median']:.1f}x)")
            print(f"\nlmlab generate, the same requests one after another in-process: {result['lmlab_generate_tokens_per_s']:.0f} tokens/s, "
                  f"{result['lmlab_generate_tokens_per_cpu_s']:.0f} tokens per CPU s (medians of the rounds)")
            if result["single_client_over_generate_median"] is not None:
                print(f"one client of the server / lmlab generate: {result['single_client_over_generate_median']:.2f} "
                      f"(median of the rounds' ratios; per CPU s: {result['single_client_over_generate_per_cpu_median']:.2f})")
        elif args.mode == "single":
            result = {**meta, **single(args, model_spec)}
            for q in result["rounds"]:
                print(f"lmlab generate {q['generate_tokens_per_s']:.0f} tokens/s; server streaming "
                      f"{q['streaming_tokens_per_s']:.0f} ({q['streaming_tokens_per_s'] / q['generate_tokens_per_s']:.2f}), "
                      f"not streaming {q['plain_tokens_per_s']:.0f} ({q['plain_tokens_per_s'] / q['generate_tokens_per_s']:.2f}); "
                      f"CPU ms per token streaming: decoding process {q['streaming_decoder_cpu_ms_per_token']:.3f}, "
                      f"HTTP process {q['streaming_http_cpu_ms_per_token']:.3f}, lmlab generate "
                      f"{q['generate_cpu_ms_per_token']:.3f} (load {q['load_average_1min']:.1f})")
            for name, label in (("streaming", "streaming"), ("plain", "not streaming"),
                                ("other_streaming", f"streaming, {args.compare_source}")):
                if name not in result:
                    continue
                r = result[name]
                quartiles = ", ".join(f"{v:.3f}" for v in r["ratio_quartiles"])
                print(f"one client of the server, {label} / lmlab generate: median {r['ratio_median']:.3f} "
                      f"(quartiles {quartiles}), ratio of the totals {r['ratio_of_totals']:.3f}; decoding process CPU "
                      f"per token / generate's {r['decoder_over_generate_cpu_median']:.3f} "
                      f"({len(result['rounds'])} rounds of {args.chunk} requests)")
        elif args.mode == "loop":
            print("| jobs | together tokens/s | one at a time tokens/s | speed-up |")
            print("|---|---|---|---|")
            result = {**meta, **loop(args, model_spec)}
        else:
            result = {**meta, **soak(args, model_spec)}
            print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
