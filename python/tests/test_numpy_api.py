"""The numpy-level API (mambacpp.Mamba1 / Mamba2 / LM / Tokenizer) against the golden files of the
official mamba_ssm, and its behaviour as a Python module: errors, threads, GIL, version."""

import json
import os
import threading
import unicodedata

import numpy as np
import pytest

import mambacpp
from conftest import (
    GOLDEN,
    GOLDEN_F32,
    GOLDEN_GRAD_F32,
    GOLDEN_LOGITS,
    MAMBA1_CASES,
    MAMBA2_CASES,
    SHARED,
    STEP_VS_FULL,
    assert_close,
    golden,
)

LAYERS = {"Mamba": mambacpp.Mamba1, "Mamba2": mambacpp.Mamba2}


def layer_from_golden(name):
    t, meta, cfg = golden(name)
    cls = mambacpp.Mamba2 if name.startswith("mamba2") else mambacpp.Mamba1
    layer = cls(**cfg)
    assert layer.param_names == meta["param_names"].split(",")
    for k, v in layer.params.items():
        v[...] = t["params." + k]
    return layer, t, meta


@pytest.mark.parametrize("name", MAMBA1_CASES + MAMBA2_CASES)
def test_golden_forward_backward_step(name):
    layer, t, meta = layer_from_golden(name)
    assert layer.num_parameters == int(meta["param_count"])
    y, saved = layer.forward(t["x"], save=True)
    assert_close(y, t["y"], GOLDEN_F32, name + " y")
    layer.zero_grad()
    dx = layer.backward(saved, t["g"])
    assert_close(dx, t["grad_x"], GOLDEN_GRAD_F32, name + " grad_x")
    for k in layer.param_names:
        assert_close(layer.grads[k], t["grad." + k], GOLDEN_GRAD_F32, name + " grad." + k)
    # decode: one token at a time from zeroed states, vs the golden step outputs and states
    B, L, _ = t["x"].shape
    state = layer.new_state(B)
    ys = np.stack([layer.step(np.ascontiguousarray(t["x"][:, i]), state) for i in range(L)], 1)
    assert_close(ys, t["y_step"], GOLDEN_F32, name + " y_step")
    assert_close(state.conv_state, t["conv_state"], GOLDEN_F32, name + " conv_state")
    assert_close(state.ssm_state, t["ssm_state"], GOLDEN_F32, name + " ssm_state")
    # prefill: forward over P tokens returns the state the golden cache holds
    P = int(meta["prefill_len"])
    _, st = layer.forward(np.ascontiguousarray(t["x"][:, :P]), return_state=True)
    assert_close(st.conv_state, t["prefill_conv_state"], GOLDEN_F32, name + " prefill conv")
    assert_close(st.ssm_state, t["prefill_ssm_state"], GOLDEN_F32, name + " prefill ssm")


def test_params_argument_uses_given_arrays_without_touching_own():
    layer, t, _ = layer_from_golden("mamba1_d32_n16")
    own = {k: v.copy() for k, v in layer.params.items()}
    other = [np.zeros(s, np.float32) + 0.01 for s in layer.param_shapes]
    y_other = layer.forward(t["x"], params=other)
    y_own = layer.forward(t["x"])
    assert_close(y_own, t["y"], GOLDEN_F32, "own params after a params= call")
    assert not np.allclose(y_other, y_own)
    for k, v in layer.params.items():
        np.testing.assert_array_equal(v, own[k])
    # backward into caller gradients: the same numbers as into the layer's own
    _, saved = layer.forward(t["x"], save=True, params=[layer.params[k].copy() for k in layer.param_names])
    grads = [np.zeros(s, np.float32) for s in layer.param_shapes]
    layer.zero_grad()
    layer.backward(saved, t["g"], params=[layer.params[k] for k in layer.param_names], grads=grads)
    for k, g in zip(layer.param_names, grads):
        assert_close(g, t["grad." + k], GOLDEN_GRAD_F32, "grads= " + k)
        assert not layer.grads[k].any(), "own gradients untouched"


def test_step_with_state_arrays_updates_them_in_place():
    layer, t, _ = layer_from_golden("mamba2_d64_g1")
    B, L, _ = t["x"].shape
    arrays = [np.zeros(s, np.float32) for s in layer.state_shapes(B)]
    ys = np.stack([layer.step(np.ascontiguousarray(t["x"][:, i]), arrays) for i in range(L)], 1)
    assert_close(ys, t["y_step"], GOLDEN_F32, "y_step")
    assert_close(arrays[1], t["ssm_state"], GOLDEN_F32, "ssm_state in place")


def test_errors_are_python_exceptions():
    layer = mambacpp.Mamba1(16, d_state=4)
    x = np.zeros((2, 5, 16), np.float32)
    with pytest.raises(ValueError, match="float32"):
        layer.forward(x.astype(np.float64))
    with pytest.raises(ValueError, match=r"hidden: expected shape \(\*,\*,16\)"):
        layer.forward(np.zeros((2, 5, 15), np.float32))
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        mambacpp.Mamba1(16, nope=1)
    with pytest.raises(ValueError, match="d_state"):
        mambacpp.Mamba1(16, d_state=0)
    with pytest.raises(ValueError, match="d_model"):
        mambacpp.Mamba2(-3)
    with pytest.raises(ValueError, match=r"params\[0\] \(A_log\): expected shape \(32,4\)"):
        layer.forward(x, params=[np.zeros((1,), np.float32)] * len(layer.param_names))
    _, saved = layer.forward(x, save=True)
    other = mambacpp.Mamba1(16, d_state=4)
    with pytest.raises(ValueError, match="another layer"):
        other.backward(saved, x)
    state = [np.zeros(s, np.float32) for s in layer.state_shapes(2)]
    with pytest.raises(ValueError, match="contiguous"):  # a copy would lose the update
        layer.step(np.zeros((2, 16), np.float32), [state[0][:, :, ::-1], state[1]])
    with pytest.raises(ValueError, match="conv_state"):
        layer.step(np.zeros((2, 16), np.float32), [np.zeros((2, 32, 3), np.float32), state[1]])
    with pytest.raises(ValueError):
        mambacpp.load_safetensors(__file__)  # not a safetensors file
    with pytest.raises(ValueError):
        mambacpp.LM.load("/nonexistent-folder")


def test_non_contiguous_input_is_copied_not_misread():
    layer, t, _ = layer_from_golden("mamba1_d12_bias_e3")
    x = np.asfortranarray(t["x"])  # same values, other memory order
    assert not x.flags["C_CONTIGUOUS"]
    assert_close(layer.forward(x), t["y"], GOLDEN_F32, "Fortran-ordered x")


def test_threads_and_gil(threads):
    layer, t, _ = layer_from_golden("mamba1_d32_n16")
    mambacpp.set_num_threads(1)
    assert mambacpp.num_threads() == 1
    ref = layer.forward(t["x"])
    mambacpp.set_num_threads(2)
    results, errors = [None] * 6, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = layer.forward(t["x"])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ths = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert not errors
    for r in results:
        assert_close(r, ref, (0, 1e-6), "threaded forward")

    # The GIL is released while a kernel runs: a pure-Python thread keeps counting meanwhile.
    big = mambacpp.Mamba1(256, d_state=16)
    xb = np.random.default_rng(0).standard_normal((2, 512, 256)).astype(np.float32)
    counter = [0]
    stop = threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    th = threading.Thread(target=count)
    th.start()
    before = counter[0]
    big.forward(xb)
    during = counter[0] - before
    stop.set()
    th.join()
    assert during > 100, f"the counting thread advanced only {during} times during forward"


def test_version_and_docstrings():
    assert mambacpp.__version__.count(".") == 2
    assert "mamba_ssm" in mambacpp.Mamba1.__doc__
    assert "decode" in mambacpp.Mamba1.forward.__doc__ or "State" in mambacpp.Mamba1.forward.__doc__


@pytest.mark.parametrize("which", ["lm_mamba1", "lm_mamba2"])
def test_lm_golden_logits_and_greedy_generate(which):
    t, meta, cfg = golden(which)
    lm = mambacpp.LM.load(os.path.join(GOLDEN, which + "_ckpt"))
    assert lm.num_parameters == int(meta["param_count"])
    logits = lm.forward(t["input_ids"])
    assert_close(logits, t["logits"], GOLDEN_LOGITS, which + " logits")
    gen, scores = lm.generate(t["input_ids"].tolist(), max_new_tokens=t["generated_ids"].shape[1],
                              greedy=True, vocab_limit=cfg["vocab_size"], return_scores=True)
    np.testing.assert_array_equal(np.array(gen), t["generated_ids"])
    assert_close(np.array(scores), t["gen_scores"], GOLDEN_LOGITS, which + " gen_scores")
    # step == forward
    last, state = lm.prefill(t["input_ids"][:, :10])
    assert_close(last, logits[:, 9], STEP_VS_FULL, "prefill last")
    for i in range(10, 17):
        out = lm.step(t["input_ids"][:, i], state)
        assert_close(out, logits[:, i], STEP_VS_FULL, f"step {i}")
    with pytest.raises(ValueError):
        lm.forward(np.full((1, 3), 10_000))


def test_tokenizer():
    path = os.path.join(SHARED, "tokenizers", "gpt-neox-20b-tokenizer.json")
    if not os.path.exists(path):
        pytest.skip(f"tokenizer not found at {path}")
    tok = mambacpp.Tokenizer.from_file(path)
    with open(os.path.join(GOLDEN, "tokenizer_gpt_neox_cases.json")) as f:
        cases = json.load(f)
    for c in cases:
        assert tok.encode(c["text"]) == c["ids"], c["text"]
        # decode gives the NFC form of the text (as tests/test_tokenizer.cpp checks)
        assert tok.decode(c["ids"]) == unicodedata.normalize("NFC", c["text"])
    assert tok.vocab_size == 50277
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")


def test_safetensors_round_trip(tmp_path):
    a = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    p = str(tmp_path / "x.safetensors")
    mambacpp.save_safetensors(p, a, {"k": "v"})
    back, meta = mambacpp.load_safetensors(p)
    assert meta == {"k": "v"} and list(back) == ["w", "b"] or set(back) == {"w", "b"}
    for k in a:
        np.testing.assert_array_equal(back[k], a[k])


def test_keep_freed_memory_changes_no_result():
    # The opt-in allocator policy is process-wide, so it runs in a child process: a layer's
    # forward + backward (arrays freed and allocated again between calls) gives bitwise the
    # same output and input gradient before and after the call.
    import subprocess
    import sys

    code = """
import numpy as np, mambacpp
rng = np.random.default_rng(0)
layer = mambacpp.Mamba1(32, d_state=4)
x = rng.standard_normal((2, 40, 32)).astype(np.float32)
g = rng.standard_normal((2, 40, 32)).astype(np.float32)
def run():
    y, saved = layer.forward(x, save=True)
    return y, layer.backward(saved, g)
y0, dx0 = run()
assert mambacpp.keep_freed_memory() is None
for _ in range(3):
    y1, dx1 = run()
    assert np.array_equal(y0, y1) and np.array_equal(dx0, dx1)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
