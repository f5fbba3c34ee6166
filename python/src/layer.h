// One generic Python class over any mixer layer of the C++ library (the layer contract of
// include/mamba/nn/mamba1.h: Config::from_ssm_cfg, params(), forward(x, Saved*, State*),
// backward(saved, dy), new_state(B), step(x, State&)). Binding a layer is one small file:
// a LayerTraits<L> specialisation naming its decode-state tensors, and bind_layer<L>(m, ...)
// (python/src/layer_mamba1.cpp is the example).
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

// Specialise per layer: static std::vector<std::pair<const char*, mamba::Tensor*>>
// tensors(typename L::State&) — the decode-state tensors, in mamba_ssm's order
// (allocate_inference_cache's tuple).
template <class L>
struct LayerTraits;

// A Python keyword argument as JSON (for Config::from_ssm_cfg).
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
  throw mamba::Error(
      mamba::str("'", key, "': unsupported value of type ", std::string(py::str(py::type::of(v)))));
}

template <class L>
typename L::Config config_from_kwargs(int64_t d_model, const py::kwargs& kw) {
  nlohmann::json j = nlohmann::json::object();
  for (auto item : kw) {
    const std::string k = item.first.cast<std::string>();
    j[k] = json_of(item.second, k);
  }
  MAMBA_CHECK(d_model >= 1 && d_model <= (1 << 20), "'d_model' = ", d_model,
              " is out of range [1, 1048576]");
  mamba::json_io::KeyReader r(j, "");
  typename L::Config c = L::Config::from_ssm_cfg(r, d_model);
  r.finish(L::kName);
  c.check_ssm_cfg();
  c.validate();
  return c;
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
struct PyState {
  typename L::State state;
  py::list keep;
};

template <class L>
struct PyLayer {
  std::unique_ptr<L> layer;
  std::mutex mu;  // held while another set of parameters is swapped in, and by backward

  PyLayer(int64_t d_model, uint64_t seed, const py::kwargs& kw)
      : layer(std::make_unique<L>(config_from_kwargs<L>(d_model, kw), seed)) {}

  mamba::ParamList& pl() { return layer->params(); }

  // Arrays in param_names order as Tensors (GIL held); empty when obj is None.
  std::vector<mamba::Tensor> tensors_of(const py::object& obj, const char* what, py::list& keep,
                                        bool writable) {
    std::vector<mamba::Tensor> out;
    if (obj.is_none()) return out;
    auto seq = py::reinterpret_borrow<py::sequence>(obj);
    const auto& all = pl().all();
    MAMBA_CHECK(seq.size() == all.size(), what, ": expected ", all.size(),
                " arrays (param_names order), got ", seq.size());
    size_t i = 0;
    for (const auto& p : all) {
      const std::string name = mamba::str(what, "[", i, "] (", p.name, ")");
      mamba::Tensor t = tensor_of(seq[i], name.c_str(), keep, writable);
      MAMBA_CHECK(t.shape() == p.value.shape(), name, ": expected shape ", p.value.shape_str(),
                  ", got ", t.shape_str());
      out.push_back(std::move(t));
      ++i;
    }
    return out;
  }

  // Puts the given values / gradients in place of the layer's own for one call (mu held).
  struct Swap {
    mamba::ParamList& pl;
    std::vector<mamba::Weight> old_v;
    std::vector<mamba::Tensor> old_g;
    Swap(mamba::ParamList& l, const std::vector<mamba::Tensor>& vals,
         const std::vector<mamba::Tensor>& grads)
        : pl(l) {
      size_t i = 0;
      for (auto& p : pl.all()) {
        if (!vals.empty()) {
          old_v.push_back(p.value);
          p.value = mamba::Weight(vals[i]);
        }
        if (!grads.empty()) {
          old_g.push_back(p.grad_if_allocated());
          p.set_grad(grads[i]);
        }
        ++i;
      }
    }
    ~Swap() {
      size_t i = 0;
      for (auto& p : pl.all()) {
        if (!old_v.empty()) p.value = std::move(old_v[i]);
        if (!old_g.empty()) p.set_grad(std::move(old_g[i]));
        ++i;
      }
    }
    Swap(const Swap&) = delete;
    Swap& operator=(const Swap&) = delete;
  };

  py::object forward(const py::object& x, bool save, bool return_state, const py::object& params) {
    py::list keep;
    mamba::Tensor xt = tensor_of(x, "x", keep);
    auto vals = tensors_of(params, "params", keep, false);
    std::unique_ptr<PySaved<L>> sv = save ? std::make_unique<PySaved<L>>() : nullptr;
    std::unique_ptr<PyState<L>> st = return_state ? std::make_unique<PyState<L>>() : nullptr;
    mamba::Tensor y;
    {
      py::gil_scoped_release nogil;
      std::unique_lock<std::mutex> lk(mu, std::defer_lock);
      if (!vals.empty()) lk.lock();
      std::unique_ptr<Swap> sw =
          vals.empty() ? nullptr : std::make_unique<Swap>(pl(), vals, std::vector<mamba::Tensor>{});
      y = layer->forward(xt, sv ? &sv->saved : nullptr, st ? &st->state : nullptr);
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

  py::array backward(PySaved<L>& sv, const py::object& dy, const py::object& params,
                     const py::object& grads) {
    MAMBA_CHECK(sv.owner == this, L::kName,
                ".backward: these saved activations come from another layer's forward");
    py::list keep;
    mamba::Tensor dyt = tensor_of(dy, "dy", keep);
    auto vals = tensors_of(params, "params", keep, false);
    auto gr = tensors_of(grads, "grads", keep, true);
    mamba::Tensor dx;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lk(mu);
      Swap sw(pl(), vals, gr);
      dx = layer->backward(sv.saved, dyt);
    }
    return array_of(dx);
  }

  // state: a State object, or a sequence of arrays (LayerTraits order) updated in place.
  py::array step(const py::object& x, const py::object& state, const py::object& params) {
    py::list keep;
    mamba::Tensor xt = tensor_of(x, "x", keep);
    auto vals = tensors_of(params, "params", keep, false);
    PyState<L> tmp;
    PyState<L>* st = nullptr;
    if (py::isinstance<PyState<L>>(state)) {
      st = &state.template cast<PyState<L>&>();
    } else {
      auto seq = py::reinterpret_borrow<py::sequence>(state);
      auto slots = LayerTraits<L>::tensors(tmp.state);
      MAMBA_CHECK(seq.size() == slots.size(), L::kName, ".step: expected a State or ", slots.size(),
                  " state arrays, got ", seq.size());
      for (size_t i = 0; i < slots.size(); ++i)
        *slots[i].second = tensor_of(seq[i], slots[i].first, keep, /*writable=*/true);
      st = &tmp;
    }
    mamba::Tensor y;
    {
      py::gil_scoped_release nogil;
      std::unique_lock<std::mutex> lk(mu, std::defer_lock);
      if (!vals.empty()) lk.lock();
      std::unique_ptr<Swap> sw =
          vals.empty() ? nullptr : std::make_unique<Swap>(pl(), vals, std::vector<mamba::Tensor>{});
      y = layer->step(xt, st->state);
    }
    return array_of(y);
  }

  py::dict config() const {
    auto j = py::module_::import("json").attr("loads")(layer->config().to_ssm_cfg());
    py::dict d;
    d["d_model"] = layer->config().d_model;
    for (auto item : py::reinterpret_borrow<py::dict>(j))
      if (item.first.template cast<std::string>() != "layer") d[item.first] = item.second;
    return d;
  }
};

// Registers class `name` (and its Saved / State classes) in module m.
template <class L>
void bind_layer(py::module_& m, const char* name, const char* doc) {
  using PL = PyLayer<L>;
  const std::string saved_name = std::string(name) + "Saved";
  const std::string state_name = std::string(name) + "State";
  py::class_<PySaved<L>>(m, saved_name.c_str(),
                         "Activations a forward(save=True) kept for backward (opaque).");
  py::class_<PyState<L>> st(m, state_name.c_str(),
                            "Decode state of one layer; its arrays are views (writable).");
  typename L::State probe;
  for (const auto& slot : LayerTraits<L>::tensors(probe)) {
    const std::string field = slot.first;
    st.def_property_readonly(
        slot.first,
        [field](py::object self) {
          auto& s = self.template cast<PyState<L>&>();
          for (auto& t : LayerTraits<L>::tensors(s.state))
            if (field == t.first) return view_of(*t.second, self);
          throw mamba::Error("no state field " + field);
        },
        "view of the state tensor");
  }
  st.def(
      "arrays",
      [](py::object self) {
        auto& s = self.template cast<PyState<L>&>();
        py::list out;
        for (auto& t : LayerTraits<L>::tensors(s.state)) out.append(view_of(*t.second, self));
        return py::tuple(out);
      },
      "The state tensors as a tuple of views (allocate_inference_cache's order).");

  py::class_<PL>(m, name, doc)
      .def(py::init<int64_t, uint64_t, const py::kwargs&>(), py::arg("d_model"),
           py::arg("seed") = 0,
           "Builds the layer from mamba_ssm's keyword arguments (unknown ones: ValueError), "
           "parameters initialised as mamba_ssm does, from `seed`.")
      .def_property_readonly("config", &PL::config, "The configuration (mamba_ssm's arguments).")
      .def_property_readonly(
          "param_names",
          [](PL& self) {
            std::vector<std::string> n;
            for (const auto& p : self.pl().all()) n.push_back(p.name);
            return n;
          },
          "Parameter names (mamba_ssm's state_dict keys), in the order params= lists use.")
      .def_property_readonly(
          "param_shapes",
          [](PL& self) {
            std::vector<std::vector<int64_t>> s;
            for (const auto& p : self.pl().all()) s.push_back(p.value.shape());
            return s;
          },
          "Parameter shapes, in param_names order.")
      .def_property_readonly(
          "params",
          [](py::object self) {
            py::dict d;
            for (auto& p : self.template cast<PL&>().pl().all())
              d[py::str(p.name)] = view_of(p.value.f32(), self);
            return d;
          },
          "dict name -> writable float32 view of the layer's own parameter.")
      .def_property_readonly(
          "grads",
          [](py::object self) {
            py::dict d;
            for (auto& p : self.template cast<PL&>().pl().all())
              d[py::str(p.name)] = view_of(p.grad(), self);
            return d;
          },
          "dict name -> view of the accumulated gradient (backward adds into it).")
      .def(
          "zero_grad", [](PL& self) { self.pl().zero_grad(); }, "Sets every gradient to zero.")
      .def_property_readonly("num_parameters", [](PL& self) { return self.pl().count(); })
      .def("forward", &PL::forward, py::arg("x"), py::kw_only(), py::arg("save") = false,
           py::arg("return_state") = false, py::arg("params") = py::none(),
           "x: float32 (B, L, d_model) -> y (B, L, d_model).\n"
           "save=True also returns the Saved activations backward needs; return_state=True the "
           "decode State after the last token: y, or (y, saved), (y, state), (y, saved, state).\n"
           "params: arrays in param_names order to use instead of the layer's own (no copy).")
      .def("backward", &PL::backward, py::arg("saved"), py::arg("dy"), py::kw_only(),
           py::arg("params") = py::none(), py::arg("grads") = py::none(),
           "dy: (B, L, d_model) -> dx. Parameter gradients are ADDED into `grads` (arrays in "
           "param_names order, written in place) or into the layer's own.")
      .def(
          "new_state",
          [](PL& self, int64_t batch) {
            MAMBA_CHECK(batch >= 1, "new_state: batch = ", batch, " must be >= 1");
            auto s = std::make_unique<PyState<L>>();
            s->state = self.layer->new_state(batch);
            return s;
          },
          py::arg("batch"), "A zeroed decode State for `batch` sequences.")
      .def(
          "state_shapes",
          [](PL& self, int64_t batch) {
            MAMBA_CHECK(batch >= 1, "state_shapes: batch = ", batch, " must be >= 1");
            auto s = self.layer->new_state(batch);
            std::vector<std::vector<int64_t>> out;
            for (auto& t : LayerTraits<L>::tensors(s)) out.push_back(t.second->shape());
            return out;
          },
          py::arg("batch"), "Shapes of the decode-state arrays (allocate_inference_cache's order).")
      .def("step", &PL::step, py::arg("x"), py::arg("state"), py::kw_only(),
           py::arg("params") = py::none(),
           "One token: x (B, d_model) -> y (B, d_model); advances `state` (a State, or the "
           "state arrays, C-contiguous float32, updated in place).");
}

}  // namespace mambapy
