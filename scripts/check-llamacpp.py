#!/usr/bin/python3
"""Side-by-side checks of our GGUF support against a llama.cpp build (docs/GGUF.md).

    scripts/check-llamacpp.py --bin /path/to/llama.cpp/build/bin [--logits-tool PATH]

Prints PASS / FAIL / SKIP per check and exits 1 if any check failed. Builds nothing of llama.cpp
and copies nothing from it; it runs its binaries (-t 2):

  load      files we write (`mambacpp convert --format gguf --gguf-type f32|f16|bf16|q8_0|q4_0`,
            Mamba-1 and Mamba-2 of random weights with the GPT-NeoX tokenizer embedded) load in
            llama-simple and llama-completion and generate; their greedy text equals ours
            (`mambacpp generate --greedy`) for F32 / F16.
  ids       with --logits-tool (a small program linked against libllama that prints llama.cpp's
            greedy ids for given prompt ids and writes the logits it chose them from:
            scripts/llamacpp-logits.cpp, compiled by hand against your llama.cpp build): for the trained tiny
            models in tests/data/llamacpp, the files we write from them and the files
            llama-quantize writes from them (F16, BF16, Q8_0, Q4_0, Q4_K_M, Q6_K), our greedy ids
            equal llama.cpp's and our logits lie within the tolerance of the type.
  tokenize  llama-tokenize's ids on the held texts of ../shared/golden/tokenizer_gpt_neox_cases.json
            for a GGUF carrying GPT-NeoX-20B's vocabulary, against the golden ids and ours; and,
            with --vocab-gguf, the same for llama.cpp's own models/ggml-vocab-gpt-neox.gguf read
            by our tokenizer.

--make-fixtures DIR rewrites the fixtures of tests/data/llamacpp (needs --logits-tool and the
source checkpoints, see that folder's README).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import unicodedata

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "data", "llamacpp")
PROMPT = "The model is loaded from "  # byte-level vocabulary: ids are the UTF-8 bytes
N_NEW = 16
# Largest |ours - llama.cpp| of a logit allowed per file type, as a fraction of the largest
# |logit| of the row (tests/tolerances.h, kLlamaCpp*: the same figures).
REL_TOL = {"F32": 1e-5, "F16": 2e-3, "BF16": 1e-2, "Q8_0": 3e-2, "Q4_0": 3e-2, "Q4_K_M": 3e-2,
           "Q6_K": 3e-2}

results = []


def report(name, ok, detail=""):
    tag = "PASS" if ok is True else ("SKIP" if ok is None else "FAIL")
    results.append(tag)
    print(f"{tag}  {name}  {detail}", flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def llama_logits(tool, model, ids, n_new, out):
    r = run([tool, model, ",".join(map(str, ids)), str(n_new), "2", out], check=True)
    lines = r.stdout.strip().split("\n")
    vocab = int(lines[0].split()[1])
    gen = [int(x) for x in lines[1].split()[1:]]
    logits = np.fromfile(out, dtype=np.float32).reshape(-1, vocab)
    return gen, logits


def ours_generate(mambacpp, model, ids, n_new, work, dtype="f32"):
    """Our greedy ids and the logits that chose each of them (score of prompt + ids[:-1])."""
    np.save(os.path.join(work, "ids.npy"), np.array([ids], dtype=np.int64))
    run([mambacpp, "generate", "--model", model, "--ids", os.path.join(work, "ids.npy"),
         "--out-ids", os.path.join(work, "gen.npy"), "-n", str(n_new), "--greedy", "--no-eos",
         "-q", "--threads", "2", "--dtype", dtype], check=True)
    gen = np.load(os.path.join(work, "gen.npy"))[0].tolist()
    np.save(os.path.join(work, "seq.npy"), np.array([ids + gen[:-1]], dtype=np.int64))
    run([mambacpp, "score", "--model", model, "--ids", os.path.join(work, "seq.npy"), "--out",
         os.path.join(work, "logits.npy"), "--threads", "2", "--dtype", dtype], check=True)
    logits = np.load(os.path.join(work, "logits.npy"))[0]
    return gen, logits[len(ids) - 1:]


def rel_err(ours, theirs):
    """max over rows of max |ours - theirs| / max |theirs| of the row."""
    v = theirs.shape[1]
    d = np.abs(ours[:, :v] - theirs).max(axis=1) / np.abs(theirs).max(axis=1)
    return float(d.max())


def check_load(args, work):
    tok = args.tokenizer
    if not os.path.exists(tok):
        report("load", None, f"no tokenizer at {tok}")
        return
    for layer in ("Mamba1", "Mamba2"):
        cfg = {"d_model": 64, "n_layer": 2, "vocab_size": 50277,
               "ssm_cfg": {"layer": layer, **({"headdim": 16} if layer == "Mamba2" else {})}}
        cpath = os.path.join(work, f"{layer}.json")
        json.dump(cfg, open(cpath, "w"))
        for t in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            g = os.path.join(work, f"rand-{layer}-{t}.gguf")
            r = run([args.mambacpp, "convert", "--config", cpath, "--seed", "3", "--format",
                     "gguf", "--gguf-type", t, "--tokenizer", tok, "--out", g])
            if r.returncode:
                report(f"load {layer} {t}", False, "convert failed: " + r.stderr.strip()[-300:])
                continue
            prompt = "The capital of France is"
            s = run([os.path.join(args.bin, "llama-simple"), "-m", g, "-n", "8", prompt])
            c = run([os.path.join(args.bin, "llama-completion"), "-m", g, "-n", "8", "-t", "2",
                     "--temp", "0", "-p", prompt, "-no-cnv", "--no-warmup", "--simple-io"],
                    stdin=subprocess.DEVNULL)
            ok = s.returncode == 0 and c.returncode == 0 and s.stdout.startswith(prompt)
            detail = f"llama-simple rc {s.returncode}, llama-completion rc {c.returncode}"
            if not ok:
                report(f"load {layer} {t}", False, detail + " " + (s.stderr + c.stderr)[-400:])
                continue
            theirs = s.stdout.rstrip("\n")
            o = run([args.mambacpp, "generate", "--model", g, "--prompt", prompt, "-n", "8",
                     "--greedy", "--no-eos", "-q", "--threads", "2"])
            ours = o.stdout.split("\n")[0]
            ours = ours[ours.find("] ") + 2:] if ours.startswith("[0] ") else ours
            ours = ours.split("prefill:")[0]
            same = ours == theirs
            if t in ("f32", "f16"):  # random weights: near-tied logits, so 16-bit / quantised
                report(f"load+text {layer} {t}", same, f"{detail}; llama: {theirs!r} ours: {ours!r}")
            else:  # activations llama.cpp rounds may flip near ties: reported, not judged
                report(f"load {layer} {t}", True,
                       f"{detail}; greedy text {'same' if same else 'differs'} ({theirs!r})")


def fixture_models():
    ref = os.path.join(FIX, "reference.json")
    return json.load(open(ref)) if os.path.exists(ref) else None


def check_ids(args, work):
    if not args.logits_tool:
        report("ids", None, "no --logits-tool")
        return
    ref = fixture_models()
    ids = list(PROMPT.encode())
    q = os.path.join(args.bin, "llama-quantize")
    for m in ref["models"]:
        src = os.path.join(FIX, f"{m}.F32.gguf")
        # (type, file, written by): the committed llama.cpp-written fixtures ...
        files = [(t, os.path.join(FIX, f"{m}.{t}.gguf"), "llama.cpp fixture")
                 for t in ref["models"][m]]
        if os.path.exists(src):
            for t in ("Q6_K",):  # ... plus what llama-quantize writes afresh here ...
                out = os.path.join(work, f"{m}.ll.{t}.gguf")
                r = run([q, src, out, t, "2"])
                if r.returncode:
                    report(f"ids {m} llama-quantize {t}", False, r.stderr[-300:])
                    continue
                files.append((t, out, "llama-quantize"))
            for t in ("f16", "bf16", "q8_0", "q4_0"):  # ... and the files we write
                out = os.path.join(work, f"{m}.ours.{t}.gguf")
                run([args.mambacpp, "convert", "--model", src, "--format", "gguf", "--gguf-type",
                     t, "--out", out], check=True)
                files.append((t.upper(), out, "ours"))
        for t, f, who in files:
            lgen, ll = llama_logits(args.logits_tool, f, ids, N_NEW, os.path.join(work, "ll.f32"))
            dtypes = ["f32"] + ([t.lower()] if t in ("Q8_0", "Q4_0") else [])
            for dt in dtypes:
                ogen, ol = ours_generate(args.mambacpp, f, ids, N_NEW, work, dt)
                e = rel_err(ol, ll[len(ids) - 1:])
                ok = ogen == lgen and e <= REL_TOL[t]
                report(f"ids {m} {t} ({who}) --dtype {dt}", ok,
                       f"ids {'same' if ogen == lgen else 'DIFFER'}; max |dlogit| / max |logit| "
                       f"{e:.2e} (tolerance {REL_TOL[t]:.0e})")


def check_tokenize(args, work):
    cases_path = os.path.join(ROOT, "..", "shared", "golden", "tokenizer_gpt_neox_cases.json")
    if not os.path.exists(args.tokenizer) or not os.path.exists(cases_path):
        report("tokenize", None, "no GPT-NeoX tokenizer / cases in ../shared")
        return
    cases = json.load(open(cases_path))
    g = os.path.join(work, "neox-vocab.gguf")
    cfg = os.path.join(work, "tok.json")
    json.dump({"d_model": 32, "n_layer": 1, "vocab_size": 50277,
               "ssm_cfg": {"layer": "Mamba1"}}, open(cfg, "w"))
    run([args.mambacpp, "convert", "--config", cfg, "--format", "gguf", "--tokenizer",
         args.tokenizer, "--out", g], check=True)
    files = [("ours", g)] + ([("llama.cpp's ggml-vocab-gpt-neox", args.vocab_gguf)]
                             if args.vocab_gguf else [])
    for label, f in files:
        bad, known = [], []
        for i, c in enumerate(cases):
            tf = os.path.join(work, "text.txt")
            open(tf, "w", encoding="utf-8", newline="").write(c["text"])
            # llama.cpp's vocabulary file has no tokenizer.ggml.pre; its Mamba converter writes
            # "mpt" for this vocabulary (GPT-2's split), without it llama.cpp uses another split
            pre = ["--override-kv", "tokenizer.ggml.pre=str:mpt"] if f == args.vocab_gguf else []
            r = run([os.path.join(args.bin, "llama-tokenize"), "-m", f, "-f", tf, "--ids",
                     "--log-disable", "--no-bos"] + pre)
            if r.returncode:  # older builds have no --no-bos
                r = run([os.path.join(args.bin, "llama-tokenize"), "-m", f, "-f", tf, "--ids",
                         "--log-disable"])
            theirs = json.loads(r.stdout.strip().split("\n")[-1]) if r.returncode == 0 else None
            o = run([args.mambacpp, "tokenize", "--model", f, "--file", tf])
            ours = json.loads(o.stdout) if o.returncode == 0 else None
            # GPT-NeoX-20B's tokenizer.json normalises to NFC; llama.cpp's BPE does not, so on a
            # text that is not in NFC form llama.cpp's ids differ from Hugging Face's (and ours).
            nfc = unicodedata.normalize("NFC", c["text"]) == c["text"]
            # llama.cpp's own file: judged on our ids only (llama.cpp differs there, docs/GGUF.md)
            strict = f != args.vocab_gguf
            if ours != c["ids"] or (theirs != c["ids"] and nfc and strict):
                bad.append((i, c["text"][:30], theirs == c["ids"], ours == c["ids"]))
            elif theirs != c["ids"]:
                known.append(i)  # not NFC, or llama.cpp's vocabulary file
        report(f"tokenize {label}", not bad,
               f"{len(cases) - len(bad) - len(known)}/{len(cases)} held texts: llama-tokenize = "
               "ours = golden" + (f"; differing (case, text, llama ok, ours ok): {bad}" if bad
                                  else "")
               + (f"; cases {known}: not in NFC form, llama.cpp does not normalise (ours = golden)"
                  if known else "")
               + ("" if f != args.vocab_gguf else " (llama-tokenize not judged on this file)"))


def make_fixtures(args, work):
    """Writes the llama.cpp-made fixtures and the reference outputs (see the folder's README)."""
    os.makedirs(FIX, exist_ok=True)
    q = os.path.join(args.bin, "llama-quantize")
    ids = list(PROMPT.encode())
    ref = {"prompt": PROMPT, "prompt_ids": ids, "n_new": N_NEW, "models": {},
           "llama_cpp": args.llama_version}
    for spec in args.make_fixtures:
        name, ckpt, types = spec.split(":")
        ours_f32 = os.path.join(work, f"{name}.ours.f32.gguf")
        run([args.mambacpp, "convert", "--model", ckpt, "--format", "gguf", "--out", ours_f32],
            check=True)
        entry = {}
        for t in types.split(","):
            out = os.path.join(FIX, f"{name}.{t}.gguf")
            r = run([q, ours_f32, out, t, "2"], check=True)
            gen, logits = llama_logits(args.logits_tool, out, ids, N_NEW, os.path.join(work, "l"))
            np.save(os.path.join(FIX, f"{name}.{t}.logits.npy"),
                    np.ascontiguousarray(logits[len(ids) - 1:]))
            types_seen = sorted({ln.split("converting to")[1].split()[0]
                                 for ln in (r.stdout + r.stderr).split("\n")
                                 if "converting to" in ln})
            entry[t] = {"ids": gen, "quantised_tensor_types": types_seen}
            print(name, t, bytes(gen), os.path.getsize(out), "bytes", types_seen, flush=True)
        ref["models"][name] = entry
    json.dump(ref, open(os.path.join(FIX, "reference.json"), "w"), indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True, help="llama.cpp's build/bin folder")
    ap.add_argument("--mambacpp", default=os.path.join(ROOT, "build", "mambacpp"))
    ap.add_argument("--logits-tool", help="program: MODEL IDS N_NEW THREADS OUT.f32 (README)")
    ap.add_argument("--tokenizer",
                    default=os.path.join(ROOT, "..", "shared", "tokenizers",
                                         "gpt-neox-20b-tokenizer.json"))
    ap.add_argument("--vocab-gguf", help="llama.cpp's models/ggml-vocab-gpt-neox.gguf")
    ap.add_argument("--only", help="comma list of load,ids,tokenize")
    ap.add_argument("--make-fixtures", nargs="*", help="NAME:CHECKPOINT:TYPE,TYPE...")
    ap.add_argument("--llama-version", default="", help="recorded in reference.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="check-llamacpp-") as work:
        if args.make_fixtures:
            make_fixtures(args, work)
            return 0
        only = set(args.only.split(",")) if args.only else {"load", "ids", "tokenize"}
        if "load" in only:
            check_load(args, work)
        if "ids" in only:
            check_ids(args, work)
        if "tokenize" in only:
            check_tokenize(args, work)
    print(f"{results.count('PASS')} PASS, {results.count('FAIL')} FAIL, "
          f"{results.count('SKIP')} SKIP")
    return 1 if "FAIL" in results else 0


if __name__ == "__main__":
    sys.exit(main())
