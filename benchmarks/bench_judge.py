"""Judge throughput with `--workers` against a local OpenAI-compatible stand-in, and what a generation
key costs (the weights fingerprint `generate` computes before answering).

The stand-in answers every chat request after `--latency` seconds; with `--cap C` it answers 429
(Retry-After `--retry-after`) to any request arriving while C others are in flight, as a rate-limited
API does. Each row judges `--questions` two-turn questions in both orders (4 requests a question)
into a fresh folder; median of `--repeats` runs. Requests/s counts judge units; HTTP requests
include the retried ones.

    python benchmarks/bench_judge.py [--questions 40 --latency 0.05 --cap 4 --repeats 3]
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidpo.generate import weights_fingerprint  # noqa: E402
from minidpo.judge import judge_pairwise, openai_judge  # noqa: E402
from minidpo.model import Mistral, MistralConfig  # noqa: E402
from minidpo.questions import Question  # noqa: E402


def serve(latency, cap, retry_after):
    state = {"in_flight": 0, "requests": 0, "limited": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                state["requests"] += 1
                over = cap and state["in_flight"] >= cap
                state["limited"] += bool(over)
                state["in_flight"] += not over
            if over:
                code, body = 429, b'{"error": "rate limited"}'
            else:
                time.sleep(latency)
                code, body = 200, json.dumps({"choices": [{"message": {"content": "Fine. [[C]]"}}]}).encode()
                with lock:
                    state["in_flight"] -= 1
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", str(retry_after))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()
    return server, state


def judge_rows(args):
    questions = [Question(i, "writing", (f"q{i} turn 1?", f"q{i} turn 2?")) for i in range(args.questions)]
    answers = {m: [{"question_id": q.question_id, "model_id": m, "choices": [{"turns": [f"{m} 1", f"{m} 2"]}]}
                   for q in questions] for m in ("a", "b")}
    units = 4 * len(questions)
    print(f"| cap | workers | wall s (median, min-max) | requests/s | HTTP requests | 429s | speed-up |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for cap in (0, args.cap):
        base = None
        for workers in (1, 4, 8, 16):
            walls, extra = [], []
            for _ in range(args.repeats):
                server, state = serve(args.latency, cap, args.retry_after)
                judge = openai_judge("bench", f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="k")
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    s = judge_pairwise(questions, answers["a"], answers["b"], judge, out, workers=workers,
                                       n_bootstrap=0)
                    walls.append(time.perf_counter() - start)
                assert s["ties"] == 2 * len(questions) and s["errors"] == 0, s
                extra.append((state["requests"], state["limited"]))
                server.shutdown()
                server.server_close()
            wall = statistics.median(walls)
            base = base or wall
            requests, limited = max(extra)
            print(f"| {cap or 'none'} | {workers} | {wall:.2f} ({min(walls):.2f}-{max(walls):.2f}) "
                  f"| {units / wall:.1f} | {requests} | {limited} | {base / wall:.2f}x |")


def fingerprint_rows(args):
    print("\n| model | parameters | dtype | fingerprint s (median of 5) |\n|---|---:|---|---:|")
    config = MistralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=8)
    model = Mistral(config).init_weights(seed=0)
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            weights_fingerprint(model)
            times.append(time.perf_counter() - start)
        count = sum(p.numel() for p in model.parameters())
        print(f"| Mistral 1024x8 | {count / 1e6:.0f}M | {str(dtype).split('.')[1]} | {statistics.median(times):.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--latency", type=float, default=0.05, help="seconds per answered request")
    p.add_argument("--cap", type=int, default=4, help="requests in flight before the server answers 429")
    p.add_argument("--retry-after", type=float, default=0.2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    judge_rows(args)
    fingerprint_rows(args)
