#!/usr/bin/python3
"""mamba.cpp next to llama.cpp on the same GGUF files, against the machine's own bounds (issue 19
item 5; docs/PERFORMANCE.md, "Against the bounds").

For every --models preset and --types storage type:
  1. writes the GGUF file once (`mambacpp convert --preset P --format gguf --gguf-type T`, random
     weights with the released model's exact shapes) into --workdir;
  2. runs --rounds rounds; each round runs `mambacpp bench --model FILE --dtype T` (prefill
     --pp tokens, decode --tg tokens) and then, when --llama-bench is given, llama.cpp's
     `llama-bench -m FILE -p PP -n TG -t THREADS -r 1 -o json`, alternating, so both see the same
     machine state; the ratio of each round is reported (median and range);
  3. measures the machine's bounds in the same run (`mambacpp info --measure`: fp32 FMA peak and
     read bandwidth, at the start and at the end) and reports each figure as a share of its bound:
     decode tok/s against bandwidth / (weight bytes read per token + 2 x state bytes), prefill
     tok/s against peak / (projection FLOPs per token), both from `bench --json`.
llama.cpp is never built or kept in the repository: pass the path of a llama-bench you built
from its public source elsewhere. Without --llama-bench only mamba.cpp's columns are filled.
With --profile, one more `mambacpp bench --profile` run per row says where mamba.cpp's time goes:
the projections' share of the prefill and their GFLOP/s (% of the peak), the scan's / SSD's
share, and per decode step the matmuls' share, the weight GB/s they stream (% of the read
bandwidth) and the microseconds of everything else.
Prints a markdown table and, with --jsonl FILE, one JSON object per (model, type).
Bounded: run it under `flock /tmp/bench.lock` at normal priority. Rough cost per (model, type)
and round: the prefill plus the decode (130m f32: ~2 s; 1.4b f32: ~40 s), plus writing each file
once (1.4b f32: 5.5 GB on disk).
Usage: scripts/bench-llamacpp.py [--mambacpp build/mambacpp] [--llama-bench PATH]
           [--models mamba-130m,mamba2-130m] [--types f32,bf16] [--rounds 3] [--threads 2]
           [--profile] [--ours-args "--activations q8"]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys


def run_json(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip()[-400:]}")
    return json.loads(p.stdout.strip().splitlines()[-1] if not p.stdout.lstrip().startswith("[")
                      else p.stdout)


def measure_bounds(exe, threads):
    j = run_json([exe, "info", "--measure", "--json", "--threads", str(threads)])
    return j["fma_gflops"], j["read_gbs"]


def llama_round(exe, path, pp, tg, threads):
    """One llama-bench run: (prefill tok/s, decode tok/s). llama-bench's JSON output is a list
    of tests with n_prompt, n_gen and avg_ts (tokens per second)."""
    tests = run_json([exe, "-m", path, "-p", str(pp), "-n", str(tg), "-t", str(threads), "-r", "1",
                      "-o", "json"])
    pre = [t["avg_ts"] for t in tests if t.get("n_prompt") == pp and t.get("n_gen") == 0]
    dec = [t["avg_ts"] for t in tests if t.get("n_gen") == tg and t.get("n_prompt") == 0]
    if not pre or not dec:
        raise RuntimeError(f"llama-bench output without pp{pp} / tg{tg} results: {tests}")
    return pre[0], dec[0]


def ours_round(exe, path, dtype, pp, tg, threads, extra=()):
    j = run_json([exe, "bench", "--model", path, "--dtype", dtype, "--prompt", str(pp), "--gen",
                  str(tg), "--threads", str(threads), "--reps", "1", "--json", *extra])
    return j


PROJ = ("in_proj", "x_proj", "dt_proj", "out_proj")
SCAN = ("selective_scan", "ssd", "selective_state_update", "ssd_update")


def op_kind(name):
    """proj, lm_head, scan or other; a fused op ("dt_proj+selective_state_update") is a scan if
    one of its parts is, else a projection if one of its parts is."""
    parts = [p.split("[")[0] for p in name.rsplit(".", 1)[-1].split("+")]
    if any(p in SCAN for p in parts):
        return "scan"
    if "lm_head" in parts:
        return "lm_head"
    return "proj" if any(p in PROJ for p in parts) else "other"


def profile_row(exe, path, dtype, pp, tg, threads, extra=()):
    """One `bench --profile` run: the time split of the prefill and of a decode step."""
    j = run_json([exe, "bench", "--model", path, "--dtype", dtype, "--prompt", str(pp), "--gen",
                  str(tg), "--threads", str(threads), "--reps", "1", "--json", "--profile",
                  *extra])
    out = {}
    for phase, head in (("prefill", ()), ("decode", ("lm_head",))):
        ph = j["profile"][phase]
        t = {"proj": 0.0, "scan": 0.0, "other": 0.0, "lm_head": 0.0}
        for o in ph["ops"]:
            t[op_kind(o["op"])] += o["s"]
        proj = t["proj"] + sum(t[k] for k in head)
        out[phase] = {"wall": ph["wall_s"], "proj": proj, "scan": t["scan"],
                      "rest": ph["wall_s"] - proj - t["scan"]}
    out["cost"] = {k: j[k] for k in ("decode_weight_bytes", "prefill_flops_per_token")}
    return out


def spread(v):
    return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mambacpp", default="build/mambacpp")
    ap.add_argument("--llama-bench", default="", help="path of llama.cpp's llama-bench (optional)")
    ap.add_argument("--models", default="mamba-130m,mamba2-130m",
                    help="comma-separated `bench --preset` names (e.g. mamba-1.4b, mamba2-1.3b)")
    ap.add_argument("--types", default="f32,f16,bf16,q8_0,q4_0",
                    help="comma-separated GGUF types (mamba.cpp runs each as --dtype of that name)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512, help="prompt tokens (prefill)")
    ap.add_argument("--tg", type=int, default=128, help="generated tokens (decode)")
    ap.add_argument("--workdir", default="/tmp/mambacpp-bench-gguf",
                    help="where the GGUF files are written (kept for the next run)")
    ap.add_argument("--jsonl", default="", help="also write one JSON object per row here")
    ap.add_argument("--ours-args", default="",
                    help="more `mambacpp bench` options, e.g. \"--activations q8\"")
    ap.add_argument("--profile", action="store_true",
                    help="one more profiled mamba.cpp run per row: where its time goes")
    a = ap.parse_args()
    if a.rounds < 1 or a.threads < 1 or a.pp < 1 or a.tg < 1:
        ap.error("--rounds, --threads, --pp and --tg must be >= 1")
    for exe in [a.mambacpp] + ([a.llama_bench] if a.llama_bench else []):
        if not os.access(exe, os.X_OK):
            ap.error(f"not an executable: {exe}")
    os.makedirs(a.workdir, exist_ok=True)
    extra = a.ours_args.split()

    peak0, bw0 = measure_bounds(a.mambacpp, a.threads)
    print(f"bounds at the start: fp32 FMA peak {peak0:.1f} GFLOP/s, read bandwidth {bw0:.2f} GB/s "
          f"({a.threads} threads)", file=sys.stderr)
    rows = []
    for model in a.models.split(","):
        for typ in a.types.split(","):
            path = os.path.join(a.workdir, f"{model}-{typ}.gguf")
            if not os.path.exists(path):
                print(f"writing {path}", file=sys.stderr)
                subprocess.run([a.mambacpp, "convert", "--preset", model, "--format", "gguf",
                                "--gguf-type", typ, "--out", path], check=True,
                               stdout=subprocess.DEVNULL)
            row = {"model": model, "type": typ, "rounds": a.rounds, "threads": a.threads,
                   "pp": a.pp, "tg": a.tg, "ours_pp": [], "ours_tg": [], "llama_pp": [],
                   "llama_tg": [], "error": ""}
            try:
                for r in range(a.rounds):
                    j = ours_round(a.mambacpp, path, typ, a.pp, a.tg, a.threads, extra)
                    row["ours_pp"].append(j["prefill_tok_s"]["median"])
                    row["ours_tg"].append(j["decode_tok_s"]["median"])
                    row["cost"] = {k: j[k] for k in ("decode_weight_bytes", "state_bytes",
                                                     "prefill_flops_per_token")}
                    if a.llama_bench:
                        p, d = llama_round(a.llama_bench, path, a.pp, a.tg, a.threads)
                        row["llama_pp"].append(p)
                        row["llama_tg"].append(d)
                    print(f"{model} {typ} round {r + 1}: ours pp {row['ours_pp'][-1]:.1f} tg "
                          f"{row['ours_tg'][-1]:.1f}" +
                          (f", llama.cpp pp {row['llama_pp'][-1]:.1f} tg {row['llama_tg'][-1]:.1f}"
                           if a.llama_bench else ""), file=sys.stderr)
                if a.profile:
                    row["profile"] = profile_row(a.mambacpp, path, typ, a.pp, a.tg, a.threads,
                                                 extra)
            except RuntimeError as e:
                row["error"] = str(e)
                print(f"{model} {typ}: {e}", file=sys.stderr)
            rows.append(row)
    peak1, bw1 = measure_bounds(a.mambacpp, a.threads)
    print(f"bounds at the end: {peak1:.1f} GFLOP/s, {bw1:.2f} GB/s", file=sys.stderr)
    peak, bw = max(peak0, peak1), max(bw0, bw1)  # the machine's capability: the better reading

    print(f"\nBounds (measured in this run, {a.threads} threads, the better of start / end): fp32 "
          f"FMA peak {peak:.1f} GFLOP/s (start {peak0:.1f}, end {peak1:.1f}); read bandwidth "
          f"{bw:.2f} GB/s (start {bw0:.2f}, end {bw1:.2f}).\n")
    print(f"| model | type | mamba.cpp pp{a.pp} | llama.cpp pp{a.pp} | pp ratio per round | "
          f"pp % of compute bound | mamba.cpp tg{a.tg} | llama.cpp tg{a.tg} | tg ratio per round | "
          f"tg % of bandwidth bound | bounds (tok/s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if row["error"] and not row["ours_pp"]:
            print(f"| {row['model']} | {row['type']} | error: {row['error'][:120]} |")
            continue
        c = row["cost"]
        pp_bound = peak * 1e9 / c["prefill_flops_per_token"]
        tg_bound = bw * 1e9 / (c["decode_weight_bytes"] + 2 * c["state_bytes"])
        row["pp_bound"], row["tg_bound"] = pp_bound, tg_bound
        rp = [o / l for o, l in zip(row["ours_pp"], row["llama_pp"])]
        rt = [o / l for o, l in zip(row["ours_tg"], row["llama_tg"])]
        fmt_r = (lambda v: f"{statistics.median(v):.2f}x ({min(v):.2f}-{max(v):.2f})" if v else "-")
        print(f"| {row['model']} | {row['type']} | {spread(row['ours_pp'])} | "
              f"{spread(row['llama_pp'])} | {fmt_r(rp)} | "
              f"{100 * statistics.median(row['ours_pp']) / pp_bound:.0f}% | "
              f"{spread(row['ours_tg'])} | {spread(row['llama_tg'])} | {fmt_r(rt)} | "
              f"{100 * statistics.median(row['ours_tg']) / tg_bound:.0f}% | "
              f"pp {pp_bound:.0f}, tg {tg_bound:.1f} |")
    if a.profile:
        print(f"\nWhere mamba.cpp's time goes (one `bench --profile` run per row; shares of the "
              f"pp{a.pp} prefill and of a decode step):\n")
        print("| model | type | pp: projections share | projections GFLOP/s (% of peak) | "
              "pp: scan / SSD share | pp: rest | tg: matmuls share | matmuls weight GB/s "
              "(% of bandwidth) | tg: scan / state update | tg: rest (us per token) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            pr = row.get("profile")
            if not pr:
                continue
            pre, dec, c = pr["prefill"], pr["decode"], pr["cost"]
            gfl = c["prefill_flops_per_token"] * a.pp / pre["proj"] / 1e9
            gbs = c["decode_weight_bytes"] * a.tg / dec["proj"] / 1e9
            print(f"| {row['model']} | {row['type']} | {100 * pre['proj'] / pre['wall']:.0f}% | "
                  f"{gfl:.0f} ({100 * gfl / peak:.0f}%) | {100 * pre['scan'] / pre['wall']:.0f}% | "
                  f"{100 * pre['rest'] / pre['wall']:.0f}% | {100 * dec['proj'] / dec['wall']:.0f}% | "
                  f"{gbs:.1f} ({100 * gbs / bw:.0f}%) | {100 * dec['scan'] / dec['wall']:.0f}% | "
                  f"{100 * dec['rest'] / dec['wall']:.0f}% ({dec['rest'] / a.tg * 1e6:.0f}) |")
    if a.jsonl:
        with open(a.jsonl, "w") as f:
            for row in rows:
                f.write(json.dumps(dict(row, fma_gflops=peak, read_gbs=bw)) + "\n")


if __name__ == "__main__":
    main()
