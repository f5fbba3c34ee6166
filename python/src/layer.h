// One generic Python class over any layer of the C++ library: the mixers (Mamba1, Mamba2, Mamba3,
// MHA: forward(x, Saved*, State*), backward, new_state, step), the stateless layers (GatedMLP,
// BiMamba, SS2D, VSSBlock: forward(x, Saved*), backward) and the spatio-temporal STBlock. Binding a
// layer is one small file: a LayerTraits<L> specialisation (its Python constructor's positional
// arguments, how its Config is read from the keyword arguments, and, for layers with a decode
// state, the state's tensors) and bind_layer<L>(m, ...) (python/src/layer_mamba1.cpp is the
// example; python/src/layer_blocks.cpp binds the research blocks).
//
// Parameters. The layer owns its parameters (numpy views: `params`, `grads`). Every method also
// takes `params=` (and backward `grads=`): arrays, in param_names order, used for that one call
// instead of the layer's own, without copies. mambacpp.torch uses this: the torch module's
// nn.Parameters stay ordinary torch tensors (optimisers, load_state_dict, .data assignments,
// deepcopy all work), and each call hands their memory to the C++ layer. The swap happens under
// the layer's mutex with the GIL released, so calls on one layer from several Python threads
// are serialised, and calls on different layers run in parallel.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "core/json_reader.h"
#include "mamba/error.h"
#include "mamba/nn/param.h"
#include "mamba/tensor.h"
#include "py_util.h"

namespace mambapy {

// Specialise per layer:
//   static std::vector<std::string> positional();  // the constructor's positional arguments
//   static typename L::Config config(const nlohmann::json& kw);  // validated; errors name the key
// optionally:
//   static std::vector<std::pair<std::string, mamba::Param*>> params(L&);  // default: params()
//   static std::vector<std::pair<const char*, mamba::Tensor*>> tensors(typename L::State&);
//       the decode-state tensors, in the official order (allocate_inference_cache's tuple);
//       required when L has a State
//   static void bind_state_extras(py::class_<PyState<L>>&);  // more State properties
//   static constexpr bool kStateArrays = false;  // step() takes a State object only (the state
//       is not a fixed set of arrays: MHA's growing KV cache, STBlock's per-node mixer state)
template <class L>
struct LayerTraits;

template <class L>
concept HasState = requires {
  typename L::State;
};

template <class L>
concept HasSsmCfg = requires(const typename L::Config& c) {
  c.to_ssm_cfg();
};

template <class L>
constexpr bool state_arrays() {
  if constexpr (requires { LayerTraits<L>::kStateArrays; })
    return LayerTraits<L>::kStateArrays;
  else
    return true;
}

// A Python keyword argument as JSON (for the Config readers).
inline nlohmann::json json_of(const py::handle& v, const std::string& key) {
  if (v.is_none()) return nullptr;
  if (py::isinstance<py::bool_>(v)) return v.cast<bool>();
  if (py::isinstance<py::int_>(v)) return v.cast<int64_t>();
  if (py::isinstance<py::float_>(v)) return v.cast<double>();
  if (py::isinstance<py::str>(v)) return v.cast<std::string>();
  if (py::isinstance<py::list>(v) || py::isinstance<py::tuple>(v)) {
    nlohmann::json a = nlohmann::json::array();
    for (auto item : v) a.push_back(json_of(item, key));
    return a;
  }
  if (py::isinstance<py::dict>(v)) {
    nlohmann::json o = nlohmann::json::object();
    for (auto item : py::reinterpret_borrow<py::dict>(v)) {
      const std::string k = py::str(item.first);
      o[k] = json_of(item.second, key + "." + k);
    }
    return o;
  }
  throw mamba::Error(
      mamba::str("'", key, "': unsupported value of type ", std::string(py::str(py::type::of(v)))));
}

// A mixer's Config from its ssm_cfg keys (Mamba1, Mamba2, Mamba3, MHA): d_model plus
// Config::from_ssm_cfg's keys; unknown keys are errors naming the key.
template <class L>
typename L::Config mixer_config(nlohmann::json j, const char* d_model_key = "d_model") {
  MAMBA_CHECK(j.contains(d_model_key) && j[d_model_key].is_number_integer(), L::kName, ": '",
              d_model_key, "' (an integer) is required");
  const int64_t d_model = j[d_model_key].template get<int64_t>();
  j.erase(d_model_key);
  MAMBA_CHECK(d_model >= 1 && d_model <= (1 << 20), "'", d_model_key, "' = ", d_model,
              " is out of range [1, 1048576]");
  mamba::json_io::KeyReader r(j, "");
  typename L::Config c = L::Config::from_ssm_cfg(r, d_model);
  r.finish(L::kName);
  c.check_ssm_cfg();
  c.validate();
  return c;
}

template <class L>
std::vector<std::pair<std::string, mamba::Param*>> named_params_of(L& l) {
  if constexpr (requires { LayerTraits<L>::params(l); }) {
    return LayerTraits<L>::params(l);
  } else {
    std::vector<std::pair<std::string, mamba::Param*>> out;
    for (auto& p : l.params().all()) out.emplace_back(p.name, &p);
    return out;
  }
}

template <class L>
struct PyLayer;

// Saved activations of one forward: what backward reads. Keeps the arrays it refers to alive.
template <class L>
struct PySaved {
  typename L::Saved saved;
  py::list keep;
  const PyLayer<L>* owner = nullptr;
};

// Decode state. Either owned (new_state) or over caller arrays (then `keep` holds them).
template <class L>
struct PyStateOf {
  struct type {};
};
template <HasState L>
struct PyStateOf<L> {
  struct type {
    typename L::State state;
    py::list keep;
  };
};
template <class L>
using PyState = typename PyStateOf<L>::type;

template <class L>
struct PyLayer {
  std::string name;       // the Python class name (messages)
  nlohmann::json kwargs;  // what the layer was built from (config for layers without to_ssm_cfg)
  std::unique_ptr<L> layer;
  std::vector<std::pair<std::string, mamba::Param*>> params;  // name, parameter; official order
  std::mutex mu;  // held while another set of parameters is swapped in, and by backward

  PyLayer(std::string n, nlohmann::json kw, uint64_t seed)
      : name(std::move(n)),
        kwargs(std::move(kw)),
        layer(std::make_unique<L>(LayerTraits<L>::config(kwargs), seed)),
        params(named_params_of(*layer)) {}

  // Arrays in param_names order as Tensors (GIL held); empty when obj is None.
  std::vector<mamba::Tensor> tensors_of(const py::object& obj, const char* what, py::list& keep,
                                        bool writable) {
    std::vector<mamba::Tensor> out;
    if (obj.is_none()) return out;
    auto seq = py::reinterpret_borrow<py::sequence>(obj);
    MAMBA_CHECK(seq.size() == params.size(), what, ": expected ", params.size(),
                " arrays (param_names order), got ", seq.size());
    for (size_t i = 0; i < params.size(); ++i) {
      const mamba::Param& p = *params[i].second;
      const std::string n = mamba::str(what, "[", i, "] (", params[i].first, ")");
      mamba::Tensor t = tensor_of(seq[i], n.c_str(), keep, writable);
      MAMBA_CHECK(t.shape() == p.value.shape(), n, ": expected shape ", p.value.shape_str(),
                  ", got ", t.shape_str());
      out.push_back(std::move(t));
    }
    return out;
  }

  // Puts the given values / gradients in place of the layer's own for one call (mu held).
  struct Swap {
    std::vector<std::pair<std::string, mamba::Param*>>& ps;
    std::vector<mamba::Weight> old_v;
    std::vector<mamba::Tensor> old_g;
    Swap(std::vector<std::pair<std::string, mamba::Param*>>& l,
         const std::vector<mamba::Tensor>& vals, const std::vector<mamba::Tensor>& grads)
        : ps(l) {
      for (size_t i = 0; i < ps.size(); ++i) {
        mamba::Param& p = *ps[i].second;
        if (!vals.empty()) {
          old_v.push_back(p.value);
          p.value = mamba::Weight(vals[i]);
        }
        if (!grads.empty()) {
          old_g.push_back(p.grad_if_allocated());
          p.set_grad(grads[i]);
        }
      }
    }
    ~Swap() {
      for (size_t i = 0; i < ps.size(); ++i) {
        mamba::Param& p = *ps[i].second;
        if (!old_v.empty()) p.value = std::move(old_v[i]);
        if (!old_g.empty()) p.set_grad(std::move(old_g[i]));
      }
    }
    Swap(const Swap&) = delete;
    Swap& operator=(const Swap&) = delete;
  };

  py::object forward(const py::object& x, bool save, bool return_state, const py::object& pv) {
    if constexpr (!HasState<L>)
      MAMBA_CHECK(!return_state, name, ".forward: return_state=True, but ", name,
                  " has no decode state");
    py::list keep;
    mamba::Tensor xt = tensor_of(x, "x", keep);
    auto vals = tensors_of(pv, "params", keep, false);
    std::unique_ptr<PySaved<L>> sv = save ? std::make_unique<PySaved<L>>() : nullptr;
    std::unique_ptr<PyState<L>> st = return_state ? std::make_unique<PyState<L>>() : nullptr;
    mamba::Tensor y;
    {
      py::gil_scoped_release nogil;
      std::unique_lock<std::mutex> lk(mu, std::defer_lock);
      if (!vals.empty()) lk.lock();
      std::unique_ptr<Swap> sw =
          vals.empty() ? nullptr
                       : std::make_unique<Swap>(params, vals, std::vector<mamba::Tensor>{});
      if constexpr (HasState<L>)
        y = layer->forward(xt, sv ? &sv->saved : nullptr, st ? &st->state : nullptr);
      else
        y = layer->forward(xt, sv ? &sv->saved : nullptr);
    }
    py::array ya = array_of(y);
    if (!save && !return_state) return ya;
    py::list out;
    out.append(ya);
    if (sv) {
      sv->keep = keep;
      sv->owner = this;
      out.append(py::cast(std::move(sv)));
    }
    if (st) out.append(py::cast(std::move(st)));
    return py::tuple(out);
  }

  py::array backward(PySaved<L>& sv, const py::object& dy, const py::object& pv,
                     const py::object& grads) {
    MAMBA_CHECK(sv.owner == this, name,
                ".backward: these saved activations come from another layer's forward");
    py::list keep;
    mamba::Tensor dyt = tensor_of(dy, "dy", keep);
    auto vals = tensors_of(pv, "params", keep, false);
    auto gr = tensors_of(grads, "grads", keep, true);
    mamba::Tensor dx;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lk(mu);
      Swap sw(params, vals, gr);
      dx = layer->backward(sv.saved, dyt);
    }
    return array_of(dx);
  }

  // state: a State object, or (kStateArrays layers) a sequence of arrays (LayerTraits order)
  // updated in place.
  py::array step(const py::object& x, const py::object& state,
                 const py::object& pv) requires HasState<L> {
    py::list keep;
    mamba::Tensor xt = tensor_of(x, "x", keep);
    auto vals = tensors_of(pv, "params", keep, false);
    PyState<L> tmp;
    PyState<L>* st = nullptr;
    if (py::isinstance<PyState<L>>(state)) {
      st = &state.template cast<PyState<L>&>();
    } else {
      if constexpr (state_arrays<L>()) {
        auto seq = py::reinterpret_borrow<py::sequence>(state);
        auto slots = LayerTraits<L>::tensors(tmp.state);
        MAMBA_CHECK(seq.size() == slots.size(), name, ".step: expected a State or ", slots.size(),
                    " state arrays, got ", seq.size());
        for (size_t i = 0; i < slots.size(); ++i)
          *slots[i].second = tensor_of(seq[i], slots[i].first, keep, /*writable=*/true);
        st = &tmp;
      } else {
        throw mamba::Error(mamba::str(name, ".step: state must be a ", name,
                                      "State (from new_state or forward(return_state=True))"));
      }
    }
    mamba::Tensor y;
    {
      py::gil_scoped_release nogil;
      std::unique_lock<std::mutex> lk(mu, std::defer_lock);
      if (!vals.empty()) lk.lock();
      std::unique_ptr<Swap> sw =
          vals.empty() ? nullptr
                       : std::make_unique<Swap>(params, vals, std::vector<mamba::Tensor>{});
      y = layer->step(xt, st->state);
    }
    return array_of(y);
  }

  py::dict config() const {
    py::dict d;
    if constexpr (HasSsmCfg<L>) {
      auto j = py::module_::import("json").attr("loads")(layer->config().to_ssm_cfg());
      d[LayerTraits<L>::positional()[0].c_str()] = layer->config().d_model;
      for (auto item : py::reinterpret_borrow<py::dict>(j))
        if (item.first.template cast<std::string>() != "layer") d[item.first] = item.second;
    } else {
      auto j = py::module_::import("json").attr("loads")(kwargs.dump());
      for (auto item : py::reinterpret_borrow<py::dict>(j)) d[item.first] = item.second;
    }
    return d;
  }
};

// Positional and keyword arguments of a Python constructor as one JSON object; `seed` is taken
// out of the keywords.
template <class L>
nlohmann::json kwargs_json(const std::string& name, const py::args& args, const py::kwargs& kw,
                           uint64_t& seed) {
  const std::vector<std::string> pos = LayerTraits<L>::positional();
  MAMBA_CHECK(args.size() <= pos.size(), name, ": takes at most ", pos.size(),
              " positional arguments, got ", args.size(), " (the others are keywords)");
  nlohmann::json j = nlohmann::json::object();
  for (size_t i = 0; i < args.size(); ++i) j[pos[i]] = json_of(args[i], pos[i]);
  seed = 0;
  for (auto item : kw) {
    const std::string k = item.first.cast<std::string>();
    if (k == "seed") {
      seed = item.second.cast<uint64_t>();
      continue;
    }
    MAMBA_CHECK(!j.contains(k), name, ": got multiple values for argument '", k, "'");
    j[k] = json_of(item.second, k);
  }
  return j;
}

template <class L>
requires HasState<L>
void bind_state(py::module_& m, py::class_<PyLayer<L>>& c, const std::string& cls) {
  using PL = PyLayer<L>;
  const std::string state_name = cls + "State";
  py::class_<PyState<L>> st(m, state_name.c_str(),
                            "Decode state of one layer; its arrays are views (writable).");
  typename L::State probe;
  for (const auto& slot : LayerTraits<L>::tensors(probe)) {
    const std::string field = slot.first;
    st.def_property_readonly(
        slot.first,
        [field](py::object self) -> py::object {
          auto& s = self.template cast<PyState<L>&>();
          for (auto& t : LayerTraits<L>::tensors(s.state))
            if (field == t.first) {
              if (!t.second->defined()) return py::none();
              return view_of(*t.second, self);
            }
          throw mamba::Error("no state field " + field);
        },
        "view of the state tensor (None while it is empty)");
  }
  if constexpr (requires { LayerTraits<L>::bind_state_extras(st); })
    LayerTraits<L>::bind_state_extras(st);
  st.def(
      "arrays",
      [](py::object self) {
        auto& s = self.template cast<PyState<L>&>();
        py::list out;
        for (auto& t : LayerTraits<L>::tensors(s.state))
          out.append(t.second->defined() ? py::object(view_of(*t.second, self)) : py::none());
        return py::tuple(out);
      },
      "The state tensors as a tuple of views (the official cache order).");
  c.def(
       "new_state",
       [](PL& self, int64_t batch) {
         MAMBA_CHECK(batch >= 1, "new_state: batch = ", batch, " must be >= 1");
         auto s = std::make_unique<PyState<L>>();
         s->state = self.layer->new_state(batch);
         return s;
       },
       py::arg("batch"), "A zeroed decode State for `batch` sequences.")
      .def_property_readonly(
          "state_names",
          [](PL&) {
            std::vector<std::string> out;
            typename L::State probe;
            for (auto& t : LayerTraits<L>::tensors(probe)) out.push_back(t.first);
            return out;
          },
          "Names of the decode-state arrays (the official cache order).")
      .def(
          "state_shapes",
          [](PL& self, int64_t batch) {
            MAMBA_CHECK(batch >= 1, "state_shapes: batch = ", batch, " must be >= 1");
            auto s = self.layer->new_state(batch);
            std::vector<std::vector<int64_t>> out;
            for (auto& t : LayerTraits<L>::tensors(s))
              out.push_back(t.second->defined() ? t.second->shape() : std::vector<int64_t>{});
            return out;
          },
          py::arg("batch"), "Shapes of the decode-state arrays (the official cache order).")
      .def("step", &PL::step, py::arg("x"), py::arg("state"), py::kw_only(),
           py::arg("params") = py::none(),
           "One token: x (B, d_model) -> y (B, d_model) (STBlock: x (B, N, C) one time step); "
           "advances `state` (a State, or for the fixed-size states the state arrays, "
           "C-contiguous float32, updated in place).");
}

// Registers class `name` (and its Saved / State classes) in module m.
template <class L>
void bind_layer(py::module_& m, const char* name, const char* doc) {
  using PL = PyLayer<L>;
  const std::string cls = name;
  const std::string saved_name = cls + "Saved";
  py::class_<PySaved<L>>(m, saved_name.c_str(),
                         "Activations a forward(save=True) kept for backward (opaque).");
  py::class_<PL> c(m, name, doc);
  c.def(py::init([cls](const py::args& args, const py::kwargs& kw) {
          uint64_t seed = 0;
          nlohmann::json j = kwargs_json<L>(cls, args, kw, seed);
          return std::make_unique<PL>(cls, std::move(j), seed);
        }),
        "Builds the layer from the official module's constructor arguments (unknown ones: "
        "ValueError); `seed=` (keyword) seeds the initialisation.")
      .def_property_readonly("config", &PL::config,
                             "The configuration (the official constructor's arguments).")
      .def_property_readonly(
          "param_names",
          [](PL& self) {
            std::vector<std::string> n;
            for (const auto& p : self.params) n.push_back(p.first);
            return n;
          },
          "Parameter names (the official state_dict keys), in the order params= lists use.")
      .def_property_readonly(
          "param_shapes",
          [](PL& self) {
            std::vector<std::vector<int64_t>> s;
            for (const auto& p : self.params) s.push_back(p.second->value.shape());
            return s;
          },
          "Parameter shapes, in param_names order.")
      .def_property_readonly(
          "params",
          [](py::object self) {
            py::dict d;
            for (auto& p : self.template cast<PL&>().params)
              d[py::str(p.first)] = view_of(p.second->value.f32(), self);
            return d;
          },
          "dict name -> writable float32 view of the layer's own parameter.")
      .def_property_readonly(
          "grads",
          [](py::object self) {
            py::dict d;
            for (auto& p : self.template cast<PL&>().params)
              d[py::str(p.first)] = view_of(p.second->grad(), self);
            return d;
          },
          "dict name -> view of the accumulated gradient (backward adds into it).")
      .def(
          "zero_grad",
          [](PL& self) {
            for (auto& p : self.params)
              if (p.second->has_grad()) p.second->grad().zero();
          },
          "Sets every gradient to zero.")
      .def_property_readonly("num_parameters",
                             [](PL& self) {
                               int64_t n = 0;
                               for (auto& p : self.params) n += p.second->value.numel();
                               return n;
                             })
      .def("forward", &PL::forward, py::arg("x"), py::kw_only(), py::arg("save") = false,
           py::arg("return_state") = false, py::arg("params") = py::none(),
           "x: float32 input (the layer's layout, see the class doc) -> y.\n"
           "save=True also returns the Saved activations backward needs; return_state=True (layers "
           "with a decode state) the State after the last token: y, or (y, saved), (y, state), "
           "(y, saved, state).\n"
           "params: arrays in param_names order to use instead of the layer's own (no copy).")
      .def("backward", &PL::backward, py::arg("saved"), py::arg("dy"), py::kw_only(),
           py::arg("params") = py::none(), py::arg("grads") = py::none(),
           "dy: the output's shape -> dx. Parameter gradients are ADDED into `grads` (arrays in "
           "param_names order, written in place) or into the layer's own.");
  if constexpr (HasState<L>) bind_state<L>(m, c, cls);
}

}  // namespace mambapy
