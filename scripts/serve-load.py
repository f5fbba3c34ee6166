#!/usr/bin/python3
"""Load and fault figures of `mambacpp serve` (docs/PERFORMANCE.md, "Serving"), loopback only.

Starts `mambacpp serve --config <mamba-130m shapes, random weights> --port 0`, then:
  1. streams (after one untimed warm-up request): for C in 1, 4, 16, 64 concurrent streaming
     clients, each sends one greedy request (a 32-token prompt of distinct random ids, --gen
     tokens); reports aggregate tok/s (generated tokens / wall time of the round, prompts'
     prefill included), decode tok/s (each stream's tokens after its first / the time from its
     first token to its last, summed over the streams), p50/p99 time to first token and p50/p99
     inter-token latency (the gap between streamed chunks, divided by the tokens they carry),
     and the server's own prefill seconds / prefill calls and decode seconds / steps in the
     round (from /metrics; prefill chunks and decode steps take turns on the cores, so the two
     add up to at most the round's wall time), and the CPU seconds the server process used
     in the round (user + system, all threads: what the round cost on a loaded machine, where
     the wall time depends on the share the server gets).
     --url URL drives an already-running OpenAI-compatible server instead of starting one
     (e.g. llama.cpp's llama-server on a GGUF of the same model): part 1 only, the same prompts
     (token ids) and requests; tokens are counted from `token_ids`, or one per streamed event
     and the final `usage` when the server does not send ids (stream_one).
  2. faults: --requests requests from 16 workers (or until --fault-seconds), a mix of
     well-formed completions (prompts from a set of 32, max_tokens 1-3, some streamed),
     malformed JSON, bodies over the limit, wrong field types, max_tokens 0, max_tokens over the
     limit, and streams the client drops after the first event. Reports failures of well-formed
     requests (anything but a correct 200) and the server's resident memory after warm-up and
     at the end.
Bounded: run it under `flock /tmp/bench.lock` at normal priority; about 2-3 minutes on 2 cores.
Usage: scripts/serve-load.py [--bin build/mambacpp] [--dtype f32] [--gen 32] [--requests 10000]

With --long-prompt N it measures only this instead (docs/PERFORMANCE.md, "Serving"): one greedy stream runs; once it has streamed 20 tokens, a request with an N-token prompt
(max_tokens 1) arrives; the stream goes on until that request is answered and 20 tokens more.
Reports the stream's median inter-token gap before the long prompt, its largest gap while the
long prompt was prefilled, and the long request's latency. --server-args passes options to the
server (e.g. "--prefill-chunk 128").
"""
import argparse
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

MAMBA_130M = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba1"},
              "pad_vocab_size_multiple": 8}


def pct(v, q):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


HOST = "127.0.0.1"
EXTERNAL = False  # --url: a server this script did not start


def stream_one(port, prompt, gen):
    """One streaming request; returns (ttft, [inter-token gaps], tokens).

    An event's tokens are its `token_ids` (mambacpp); a server that does not send them (e.g.
    llama.cpp's llama-server) counts one token per event that carries a choice without a
    finish_reason (llama-server sends one event per sampled token, except a token that ends in
    an incomplete UTF-8 character, whose text comes with the next event), and the total is its
    final `usage.completion_tokens` when it sends one."""
    c = http.client.HTTPConnection(HOST, port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": gen, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    ttft, gaps, tokens, last, usage = None, [], 0, None, None
    while True:
        line = r.fp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        if line == b"data: [DONE]":
            break
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"].get("completion_tokens")
        n = sum(len(ch["token_ids"]) if "token_ids" in ch else
                int(ch.get("finish_reason") is None) for ch in ev.get("choices", []))
        if n == 0:
            continue
        now = time.perf_counter()
        if ttft is None:
            ttft = now - t0
            n_after = n - 1
        else:
            n_after = n
            gaps.extend([(now - last) / n] * n)
        last = now
        tokens += n
        del n_after
    c.close()
    return ttft, gaps, usage if usage is not None else tokens


def long_prompt_probe(port, n, rng):
    """The stream's gaps around an n-token prompt's arrival: (median gap before, max gap while
    the long prompt was in flight, its latency, gaps in flight) in seconds."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(
        {"prompt": [rng.randrange(50277) for _ in range(32)], "max_tokens": 1000000,
         "temperature": 0, "stream": True, "ignore_eos": True}),
        {"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200, r.read()
    times, marks, long_res = [], {}, {}

    def send_long():
        lc = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps({"prompt": [rng.randrange(50277) for _ in range(n)], "max_tokens": 1,
                           "temperature": 0})
        marks["sent"] = time.perf_counter()
        lc.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        lr = lc.getresponse()
        long_res["status"] = lr.status
        lr.read()
        marks["answered"] = time.perf_counter()
        lc.close()

    th = None
    while True:
        line = r.fp.readline()
        if not line:
            break
        if not line.startswith(b"data: {"):
            continue
        times.append(time.perf_counter())
        if len(times) == 20:
            th = threading.Thread(target=send_long)
            th.start()
        if "answered" in marks and times[-1] > marks["answered"] and \
                sum(t > marks["answered"] for t in times) >= 20:
            break
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    th.join()
    assert long_res.get("status") == 200, long_res
    gaps = [(times[i - 1], times[i] - times[i - 1]) for i in range(1, len(times))]
    before = [g for t, g in gaps if t < marks["sent"]]
    during = [g for t, g in gaps if marks["sent"] <= t < marks["answered"] + 0.5]
    return pct(before, .5), max(during), marks["answered"] - marks["sent"], during


def server_metrics(port):
    """The server's counters from /metrics (name -> value; unlabelled ones)."""
    if HOST != "127.0.0.1" or EXTERNAL:
        return {}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#"):
            out[parts[0]] = float(parts[1])
    return out


def cpu_seconds_of(pid):
    """User + system CPU seconds of a process and its threads so far (/proc/PID/stat)."""
    if not pid:
        return float("nan")
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fault_request(port, kind, prompts, limit_body):
    """Returns (well_formed, ok)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    h = {"Content-Type": "application/json"}
    try:
        if kind == "good" or kind == "good_stream":
            p = random.choice(prompts)
            mt = random.randint(1, 3)
            stream = kind == "good_stream"
            c.request("POST", "/v1/completions", json.dumps(
                {"prompt": p, "max_tokens": mt, "temperature": 0, "ignore_eos": True,
                 "stream": stream}), h)
            r = c.getresponse()
            data = r.read()
            if r.status != 200:
                return True, False
            if stream:
                ids = []
                for line in data.split(b"\n\n"):
                    if line.startswith(b"data: {"):
                        for ch in json.loads(line[6:])["choices"]:
                            ids += ch.get("token_ids", [])
                return True, data.rstrip().endswith(b"data: [DONE]") and len(ids) == mt
            j = json.loads(data)
            return True, len(j["choices"][0]["token_ids"]) == mt
        if kind == "zero":
            c.request("POST", "/v1/completions", json.dumps(
                {"prompt": random.choice(prompts), "max_tokens": 0}), h)
            r = c.getresponse()
            j = json.loads(r.read())
            return True, r.status == 200 and j["usage"]["completion_tokens"] == 0
        if kind == "malformed":
            c.request("POST", "/v1/completions", '{"prompt": [1, 2', h)
        elif kind == "oversize":
            c.request("POST", "/v1/completions",
                      json.dumps({"prompt": "x" * (limit_body + 100)}), h)
        elif kind == "badtype":
            c.request("POST", "/v1/completions", json.dumps({"prompt": [1, 2], "top_p": "x"}), h)
        elif kind == "huge":
            c.request("POST", "/v1/completions",
                      json.dumps({"prompt": [1, 2], "max_tokens": 10 ** 12}), h)
        elif kind == "disconnect":
            c.request("POST", "/v1/completions", json.dumps(
                {"prompt": random.choice(prompts), "max_tokens": 100000, "stream": True,
                 "ignore_eos": True}), h)
            r = c.getresponse()
            r.fp.readline()
            c.sock.shutdown(socket.SHUT_RDWR)
            c.close()
            return False, True
        r = c.getresponse()
        r.read()
        want = {"malformed": 400, "oversize": 413, "badtype": 400, "huge": 400}[kind]
        return False, r.status == want
    except (OSError, http.client.HTTPException, ValueError, KeyError):
        return kind.startswith("good") or kind == "zero", False
    finally:
        c.close()


def streams_part(a, port, rng, pid=None):
    """Part 1: the rounds of concurrent streams (pid: the server's, for its CPU seconds)."""
    print("\n## 1. concurrent streams (" + (f"the server at {a.url}" if EXTERNAL else
                                           f"mamba-130m shapes, random weights, {a.dtype}") +
          f", prompt 32 tokens, {a.gen} generated, greedy)")
    print("| streams | aggregate tok/s (vs 1) | decode tok/s (vs 1) | TTFT p50 / p99 (s) | "
          "ITL p50 / p99 (ms) | server: prefill s / calls, decode s / steps | server CPU s |")
    print("|---|---|---|---|---|---|---|")
    # Warm-up, untimed: the server's first request pays its first-touch page faults (its
    # prefill took 0.35 s instead of 0.13 s), which would slow the 1-stream round alone.
    stream_one(port, [rng.randrange(50277) for _ in range(32)], 4)
    base = dbase = None
    for C in [int(x) for x in a.streams.split(",")]:
        prompts = [[rng.randrange(50277) for _ in range(32)] for _ in range(C)]
        m0 = server_metrics(port)
        c0 = cpu_seconds_of(pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(C) as ex:
            res = list(ex.map(lambda p: stream_one(port, p, a.gen), prompts))
        wall = time.perf_counter() - t0
        cpu = cpu_seconds_of(pid) - c0
        m1 = server_metrics(port)

        def d(k):
            return m1.get(k, float("nan")) - m0.get(k, float("nan"))
        toks = sum(r[2] for r in res)
        ttft = [r[0] for r in res]
        gaps = [g for r in res for g in r[1]]
        tps = toks / wall
        base = base or tps
        # Decode: each stream's tokens after its first over the time from its first token to
        # its last, summed over the streams (the rate at which the running streams get tokens;
        # the prompts' prefill, which the aggregate column includes, is outside every stream's
        # window except where it delays the streams already running).
        dps = sum(len(r[1]) / sum(r[1]) for r in res if r[1] and sum(r[1]) > 0)
        dbase = dbase or dps
        srv = "-" if EXTERNAL else (f"{d('mambacpp_prefill_seconds_total'):.2f} / "
                                    f"{d('mambacpp_prefill_calls_total'):.0f}, "
                                    f"{d('mambacpp_decode_seconds_total'):.2f} / "
                                    f"{d('mambacpp_decode_steps_total'):.0f}")
        print(f"| {C} | {tps:.1f} ({tps / base:.2f}x) | {dps:.1f} ({dps / dbase:.2f}x) | "
              f"{pct(ttft, .5):.2f} / "
              f"{pct(ttft, .99):.2f} | {1e3 * pct(gaps, .5):.0f} / {1e3 * pct(gaps, .99):.0f} | "
              f"{srv} | {cpu:.2f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bin", default="build/mambacpp")
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--gen", type=int, default=32, help="tokens per stream in part 1")
    ap.add_argument("--streams", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--fault-seconds", type=float, default=90)
    ap.add_argument("--long-prompt", type=int, default=0,
                    help="measure only a stream's gaps while a prompt of this many tokens arrives")
    ap.add_argument("--server-args", default="", help="extra options for mambacpp serve")
    ap.add_argument("--fault-kinds", default="",
                    help="part 2 sends only these kinds (comma-separated: good, good_stream, zero, "
                         "malformed, oversize, badtype, huge, disconnect)")
    ap.add_argument("--url", default="",
                    help="drive this already-running OpenAI-compatible server instead (e.g. "
                         "llama.cpp's llama-server, http://127.0.0.1:PORT): part 1 only")
    ap.add_argument("--pid", type=int, default=0,
                    help="with --url: the server's process id (for its CPU seconds)")
    a = ap.parse_args()
    if a.url:
        global HOST, EXTERNAL
        u = urllib.parse.urlsplit(a.url)
        HOST, EXTERNAL = u.hostname, True
        streams_part(a, u.port or 80, random.Random(1), a.pid)
        return

    tmp = tempfile.mkdtemp(prefix="serve_load_")
    cfg = os.path.join(tmp, "config.json")
    with open(cfg, "w") as f:
        json.dump(MAMBA_130M, f)
    log = open(os.path.join(tmp, "server.log"), "w+")
    body_kib = max(64, a.long_prompt * 8 // 1024)
    extra = a.server_args.split()
    cache = [] if "--prefix-cache-mib" in extra else ["--prefix-cache-mib", "512"]
    srv = subprocess.Popen([a.bin, "serve", "--config", cfg, "--port", "0", "--dtype", a.dtype,
                            "--max-batch", "64", "--max-queue", "512"] + cache +
                           ["--max-body-kib", str(body_kib), "--max-tokens-limit", "2000000",
                            "--max-prompt-tokens", str(max(8192, a.long_prompt))] + extra,
                           stdout=subprocess.PIPE, stderr=log, text=True)
    line = srv.stdout.readline()
    m = re.search(r"listening on http://127.0.0.1:(\d+)", line)
    if not m:
        sys.exit("server did not start: " + line)
    port = int(m.group(1))
    print(f"server pid {srv.pid} port {port}: {line.strip()}")
    rng = random.Random(1)
    ok = True
    try:
        if a.long_prompt > 0:
            b, worst, lat, during = long_prompt_probe(port, a.long_prompt, rng)
            print(f"long prompt {a.long_prompt} tokens ({a.server_args or 'default options'}): "
                  f"stream gap before {1e3 * b:.0f} ms (median); while it was prefilled: max gap "
                  f"{1e3 * worst:.0f} ms, median {1e3 * pct(during, .5):.0f} ms over "
                  f"{len(during)} tokens; long request answered in {lat:.2f} s", flush=True)
            return
        streams_part(a, port, rng, srv.pid)
        print(f"\n## 2. faults: up to {a.requests} requests, 16 workers, "
              f"at most {a.fault_seconds:.0f} s")
        prompts = [[rng.randrange(50277) for _ in range(8)] for _ in range(32)]
        kinds = (["good"] * 30 + ["good_stream"] * 10 + ["zero"] * 10 + ["malformed"] * 15 +
                 ["oversize"] * 10 + ["badtype"] * 10 + ["huge"] * 10 + ["disconnect"] * 5)
        if a.fault_kinds:  # only these (to find which kind of request a memory growth follows)
            kinds = [k for k in kinds if k in a.fault_kinds.split(",")]
        counts = {}
        bad = {}
        lock = threading.Lock()
        done = [0]
        rss = {}
        t_end = time.perf_counter() + a.fault_seconds

        def worker(seed):
            r = random.Random(seed)
            while True:
                with lock:
                    if done[0] >= a.requests or time.perf_counter() > t_end:
                        return
                    done[0] += 1
                    i = done[0]
                if i % 1000 == 0:  # the trajectory: flat after warm-up, or growing?
                    rss[i] = rss_of(srv.pid)
                k = r.choice(kinds)
                wf, good = fault_request(port, k, prompts, body_kib * 1024)
                with lock:
                    counts[k] = counts.get(k, 0) + 1
                    if not good:
                        bad[k] = bad.get(k, 0) + 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(16) as ex:
            list(ex.map(worker, range(16)))
        wall = time.perf_counter() - t0
        time.sleep(1)
        rss["end"] = rss_of(srv.pid)
        n = sum(counts.values())
        wf_n = sum(v for k, v in counts.items() if k in ("good", "good_stream", "zero"))
        wf_bad = sum(v for k, v in bad.items() if k in ("good", "good_stream", "zero"))
        print(f"{n} requests in {wall:.1f} s ({n / wall:.0f} req/s): " +
              ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print(f"well-formed: {wf_n}, failed: {wf_bad}; unexpected answers to faulty ones: " +
              str({k: v for k, v in bad.items() if k not in ("good", "good_stream", "zero")}))
        if 1000 in rss:
            print(f"server RSS after 1000 requests {rss[1000] / 2**20:.0f} MiB, at the end "
                  f"{rss['end'] / 2**20:.0f} MiB; every 1000 requests: " +
                  " ".join(f"{rss[k] / 2**20:.0f}" for k in sorted(k for k in rss if k != "end")))
        ok = wf_bad == 0
    finally:
        srv.terminate()
        rc = srv.wait(timeout=30)
        print(f"server exit status after SIGTERM: {rc}")
        ok = ok and rc == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
