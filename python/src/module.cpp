// The extension module mambacpp._core: the numpy-level API over the C++ library.
// Depends on Python and numpy only (never on libtorch); mambacpp.torch is pure Python on top.
// Errors: mamba::Error (bad input) -> ValueError, other C++ exceptions -> RuntimeError (pybind11's
// std::exception translation), std::bad_alloc -> MemoryError. Kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/os.h"
#include "mamba/error.h"
#include "mamba/generate.h"
#include "mamba/lm.h"
#include "mamba/parallel.h"
#include "mamba/safetensors.h"
#include "mamba/tokenizer.h"
#include "py_util.h"

#ifndef MAMBACPP_VERSION
#define MAMBACPP_VERSION "0.0.0"
#endif

namespace mambapy {
void bind_mamba1(py::module_& m);
void bind_mamba2(py::module_& m);
void bind_mamba3(py::module_& m);
void bind_attention(py::module_& m);
void bind_vision(py::module_& m);
void bind_st_block(py::module_& m);

namespace {

// Token ids: an integer numpy array (any integer dtype) or a nested list, as int32 with the
// range checked (the LM checks ids < vocab).
std::vector<int32_t> ids_of(const py::handle& obj, const char* what, std::vector<int64_t>& shape) {
  py::array arr = py::array::ensure(obj);
  MAMBA_CHECK(arr, what, ": expected an integer array");
  MAMBA_CHECK(arr.dtype().kind() == 'i' || arr.dtype().kind() == 'u' || arr.size() == 0, what,
              ": expected an integer dtype, got ", std::string(py::str(arr.dtype())));
  auto a64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
  shape.assign(a64.shape(), a64.shape() + a64.ndim());
  std::vector<int32_t> out(static_cast<size_t>(a64.size()));
  const int64_t* p = a64.data();
  for (size_t i = 0; i < out.size(); ++i) {
    MAMBA_CHECK(p[i] >= 0 && p[i] <= std::numeric_limits<int32_t>::max(), what, "[", i,
                "] = ", p[i], " is not a token id");
    out[i] = static_cast<int32_t>(p[i]);
  }
  return out;
}

struct PyLMState {
  mamba::LMState state;
};

struct PyLM {
  std::shared_ptr<mamba::MambaLM> lm;
};

py::dict lm_config(const mamba::MambaLM& lm) {
  // The model's config.json as a dict (what mamba_ssm's MambaConfig holds).
  auto tmp = mamba::str(lm.config().to_json());
  return py::module_::import("json").attr("loads")(tmp);
}

void bind_lm(py::module_& m) {
  py::class_<PyLMState>(m, "LMState", "Decode state of a whole LM (opaque; constant size).")
      .def_property_readonly("batch", [](const PyLMState& s) { return s.state.batch; });

  py::class_<PyLM>(m, "LM",
                   "A Mamba language model (mamba_ssm's MambaLMHeadModel), for inference.\n"
                   "LM.load(folder): config.json + model.safetensors or pytorch_model.bin.")
      .def_static(
          "load",
          [](const std::string& dir, const std::string& dtype) {
            auto t = mamba::parse_weight_dtype(dtype);
            py::gil_scoped_release nogil;
            return PyLM{std::make_shared<mamba::MambaLM>(mamba::MambaLM::load(dir, t))};
          },
          py::arg("folder"), py::arg("dtype") = "f32",
          "Loads a model folder; dtype 'f32' (default), 'bf16', 'f16', 'q8_0' or 'q4_0' for the "
          "large weights.")
      .def_property_readonly("config", [](const PyLM& s) { return lm_config(*s.lm); })
      .def_property_readonly(
          "vocab", [](const PyLM& s) { return s.lm->vocab(); },
          "Logits' last dimension (the padded vocabulary).")
      .def_property_readonly("num_parameters", [](const PyLM& s) { return s.lm->num_parameters(); })
      .def(
          "state_dict",
          [](PyLM& s) {
            py::dict d;
            for (auto& [name, p] : s.lm->named_parameters())
              d[py::str(name)] = array_of(p->value.to_f32().clone());
            return d;
          },
          "Every parameter as a float32 array (mamba_ssm names; a tied head appears once).")
      .def(
          "forward",
          [](const PyLM& s, const py::object& ids, bool last_only) {
            std::vector<int64_t> shape;
            auto v = ids_of(ids, "ids", shape);
            MAMBA_CHECK(shape.size() == 2, "ids: expected shape (B, L), got ", shape.size(),
                        " dimensions");
            mamba::Tensor out;
            {
              py::gil_scoped_release nogil;
              out = last_only ? s.lm->forward_last(v, shape[0], shape[1])
                              : s.lm->forward(v, shape[0], shape[1]);
            }
            return array_of(out);
          },
          py::arg("ids"), py::arg("last_only") = false,
          "ids (B, L) integers -> logits float32 (B, L, vocab); last_only: (B, vocab).")
      .def(
          "new_state",
          [](const PyLM& s, int64_t batch) {
            MAMBA_CHECK(batch >= 1, "new_state: batch = ", batch, " must be >= 1");
            return PyLMState{s.lm->new_state(batch)};
          },
          py::arg("batch"))
      .def(
          "prefill",
          [](const PyLM& s, const py::object& ids) {
            std::vector<int64_t> shape;
            auto v = ids_of(ids, "ids", shape);
            MAMBA_CHECK(shape.size() == 2, "ids: expected shape (B, L)");
            auto st = std::make_unique<PyLMState>();
            mamba::Tensor out;
            {
              py::gil_scoped_release nogil;
              out = s.lm->forward_last(v, shape[0], shape[1], &st->state);
            }
            return py::make_tuple(array_of(out), py::cast(std::move(st)));
          },
          py::arg("ids"), "ids (B, L) -> (last logits (B, vocab), LMState after the prompt).")
      .def(
          "step",
          [](const PyLM& s, const py::object& ids, PyLMState& st) {
            std::vector<int64_t> shape;
            auto v = ids_of(ids, "ids", shape);
            MAMBA_CHECK(shape.size() == 1, "ids: expected shape (B,)");
            mamba::Tensor out;
            {
              py::gil_scoped_release nogil;
              out = s.lm->step(v, st.state);
            }
            return array_of(out);
          },
          py::arg("ids"), py::arg("state"),
          "One token per sequence: ids (B,) -> logits (B, vocab).")
      .def(
          "generate",
          [](const PyLM& s, const std::vector<std::vector<int32_t>>& prompts,
             int64_t max_new_tokens, bool greedy, float temperature, int64_t top_k, float top_p,
             float min_p, float repetition_penalty, uint64_t seed, int32_t eos_id,
             int64_t vocab_limit, bool return_scores) {
            mamba::GenerateOptions o;
            o.max_new_tokens = max_new_tokens;
            o.sampling.greedy = greedy;
            o.sampling.temperature = temperature;
            o.sampling.top_k = top_k;
            o.sampling.top_p = top_p;
            o.sampling.min_p = min_p;
            o.sampling.repetition_penalty = repetition_penalty;
            o.sampling.validate();
            MAMBA_CHECK(max_new_tokens >= 0, "max_new_tokens = ", max_new_tokens, " must be >= 0");
            o.seed = seed;
            o.eos_id = eos_id;
            o.vocab_limit = vocab_limit;
            o.keep_scores = return_scores;
            mamba::GenerateResult r;
            {
              py::gil_scoped_release nogil;
              r = mamba::generate(*s.lm, prompts, o);
            }
            if (!return_scores) return py::cast(r.tokens);
            return py::object(py::make_tuple(py::cast(r.tokens), py::cast(r.scores)));
          },
          py::arg("prompts"), py::kw_only(), py::arg("max_new_tokens") = 64,
          py::arg("greedy") = false, py::arg("temperature") = 1.0f, py::arg("top_k") = 0,
          py::arg("top_p") = 1.0f, py::arg("min_p") = 0.0f, py::arg("repetition_penalty") = 1.0f,
          py::arg("seed") = 0, py::arg("eos_id") = -1, py::arg("vocab_limit") = -1,
          py::arg("return_scores") = false,
          "prompts: list of token-id lists (any lengths; decoded as one batch). Returns the "
          "generated ids per prompt (and, with return_scores, the logits that chose each).");
}

void bind_tokenizer(py::module_& m) {
  py::class_<mamba::Tokenizer>(m, "Tokenizer",
                               "Byte-level BPE of a Hugging Face tokenizer.json (GPT-NeoX).")
      .def_static("from_file", &mamba::Tokenizer::from_file, py::arg("path"))
      .def_static("from_model_dir", &mamba::Tokenizer::from_model_dir, py::arg("folder"))
      .def(
          "encode",
          [](const mamba::Tokenizer& t, const std::string& text, bool special) {
            py::gil_scoped_release nogil;
            return t.encode(text, special);
          },
          py::arg("text"), py::arg("add_special_tokens") = false, "text -> list of token ids")
      .def(
          "decode",
          [](const mamba::Tokenizer& t, const std::vector<int32_t>& ids, bool skip) {
            return t.decode(ids, skip);
          },
          py::arg("ids"), py::arg("skip_special_tokens") = false, "token ids -> text")
      .def("token_to_id", &mamba::Tokenizer::token_to_id, py::arg("token"))
      .def("id_to_token", &mamba::Tokenizer::id_to_token, py::arg("id"))
      .def_property_readonly("eos_id", &mamba::Tokenizer::eos_id)
      .def_property_readonly("vocab_size", &mamba::Tokenizer::vocab_size);
}

void bind_io(py::module_& m) {
  m.def(
      "load_safetensors",
      [](const std::string& path) {
        auto f = mamba::SafetensorsFile::open(path);
        py::dict d;
        for (const auto& name : f.names()) {
          const auto& dt = f.info(name).dtype;
          if (dt == "F32" || dt == "F16" || dt == "BF16") {
            d[py::str(name)] = array_of(f.tensor(name));
          } else {
            mamba::Shape shape;
            auto v = f.tensor_i64(name, &shape);
            std::vector<py::ssize_t> sh(shape.begin(), shape.end());
            py::array_t<int64_t> a(sh);
            if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(int64_t));
            d[py::str(name)] = a;
          }
        }
        return py::make_tuple(d, f.metadata());
      },
      py::arg("path"),
      "Reads a .safetensors file: (dict name -> array, metadata dict). Float tensors (F32, F16, "
      "BF16) as float32, integer ones as int64. Every byte is checked (hostile files: "
      "ValueError).");
  m.def(
      "save_safetensors",
      [](const std::string& path, const py::dict& tensors,
         const std::map<std::string, std::string>& metadata) {
        py::list keep;
        std::vector<std::pair<std::string, mamba::Tensor>> ts;
        for (auto item : tensors) {
          const std::string name = item.first.cast<std::string>();
          ts.emplace_back(name, tensor_of(item.second, name.c_str(), keep));
        }
        py::gil_scoped_release nogil;
        mamba::save_safetensors(path, ts, metadata);
      },
      py::arg("path"), py::arg("tensors"),
      py::arg("metadata") = std::map<std::string, std::string>{},
      "Writes float32 arrays (dict name -> array, in its order) as .safetensors, atomically.");
}

}  // namespace
}  // namespace mambapy

PYBIND11_MODULE(_core, m) {
  namespace py = pybind11;
  m.doc() =
      "mambacpp._core: the C++ library's numpy-level API (use the package mambacpp, and "
      "mambacpp.torch for the PyTorch modules).";
  m.attr("__version__") = MAMBACPP_VERSION;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const mamba::Error& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("set_num_threads", &mamba::set_num_threads, py::arg("n"),
        "Threads of the C++ kernels (and of the BLAS); n <= 0: all cores.");
  m.def("num_threads", &mamba::num_threads, "Threads the C++ kernels use.");
  m.def("keep_freed_memory", &mamba::os::keep_freed_memory,
        "Opt-in allocator policy for loops that allocate and free the same large arrays (every "
        "training step): freed memory stays in the process (glibc: blocks below 1 GiB come from "
        "the heap, which is not trimmed below 1 GiB free) instead of being page-faulted back in "
        "on every call. It changes the whole process's malloc (torch's and numpy's arrays too); "
        "call it once, at start. A no-op outside glibc. See docs/PERFORMANCE.md.");
  m.def(
      "set_tensor_cache_limit",
      [](int64_t bytes) {
        if (bytes < 0)
          throw mamba::Error(mamba::str("set_tensor_cache_limit: bytes must be >= 0, got ", bytes));
        mamba::os::set_tensor_cache_limit(static_cast<uint64_t>(bytes));
      },
      py::arg("bytes"),
      "Limit of the C++ library's tensor cache in bytes: the memory of its freed arrays of 128 KiB "
      "and more is kept (oldest dropped first) and reused by the next array it fits, so repeated "
      "calls (forward + backward every training step) do not page-fault fresh memory in. Only the "
      "library's own arrays, never torch's or numpy's. Default: 1 GiB or 1/8 of the physical "
      "memory, whichever is smaller; 0 turns it off and empties it.");
  m.def(
      "_zeros",
      [](const std::vector<int64_t>& shape) {
        for (int64_t d : shape)
          if (d < 0) throw mamba::Error(mamba::str("_zeros: negative dimension ", d));
        return mambapy::array_of(mamba::Tensor::zeros(mamba::Shape(shape.begin(), shape.end())));
      },
      py::arg("shape"),
      "A zeroed float32 array in the C++ library's memory (from its tensor cache when a freed "
      "block fits): mambacpp.torch's gradient buffers.");
  m.def("tensor_cache_limit", &mamba::os::tensor_cache_limit,
        "The tensor cache's limit in bytes (see set_tensor_cache_limit).");
  m.def("tensor_cache_bytes", &mamba::os::tensor_cache_bytes,
        "Bytes the tensor cache holds now (freed arrays awaiting reuse).");
  m.def("clear_tensor_cache", &mamba::os::clear_tensor_cache,
        "Hands every block the tensor cache holds back to the system (the limit is unchanged).");
  mambapy::bind_mamba1(m);
  mambapy::bind_mamba2(m);
  mambapy::bind_mamba3(m);
  mambapy::bind_attention(m);
  mambapy::bind_vision(m);
  mambapy::bind_st_block(m);
  mambapy::bind_lm(m);
  mambapy::bind_tokenizer(m);
  mambapy::bind_io(m);
}
