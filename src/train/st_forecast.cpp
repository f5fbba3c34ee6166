// The spatio-temporal forecasting example: data, model, training loop, evaluation
// (include/mamba/st_forecast.h).
#include "mamba/st_forecast.h"

#include <chrono>
#include <cmath>

#include "mamba/rng.h"
#include "mamba/train.h"
#include "ops/linear.h"

namespace mamba::train {

TrafficSeries make_traffic_series(int64_t N, int64_t S, uint64_t seed) {
  MAMBA_CHECK(N >= 1 && S >= 2, "make_traffic_series: need N >= 1 and S >= 2");
  TrafficSeries ts;
  ts.N = N, ts.S = S;
  Rng rng(seed);
  for (int64_t n = 0; n < N; ++n) {
    ts.edges.push_back({n, (n + 1) % N});
    if (N > 3 && n % 3 == 0) ts.edges.push_back({n, (n + N / 2) % N});
  }
  std::vector<double> base(N), am(N), pm(N), shift(N);
  for (int64_t n = 0; n < N; ++n) {
    base[n] = 60 + 10 * rng.uniform();
    am[n] = 15 + 10 * rng.uniform();
    pm[n] = 10 + 15 * rng.uniform();
    shift[n] = 3 * rng.uniform();
  }
  std::vector<double> inc(N, 0.0), next(N, 0.0);
  ts.v.resize(static_cast<size_t>(S * N));
  const double P = static_cast<double>(ts.period);
  for (int64_t t = 0; t < S; ++t) {
    // Incidents: a new one at a random node now and then; each spreads to its neighbours one step
    // later at 60% and decays by 15% per step.
    std::fill(next.begin(), next.end(), 0.0);
    for (int64_t n = 0; n < N; ++n) next[n] += inc[n] * 0.85;
    for (auto [a, b] : ts.edges) {
      next[b] = std::max(next[b], inc[a] * 0.6);
      next[a] = std::max(next[a], inc[b] * 0.6);
    }
    if (rng.uniform() < 0.04) next[static_cast<int64_t>(rng.below(N))] += 20 + 15 * rng.uniform();
    inc = next;
    for (int64_t n = 0; n < N; ++n) {
      const double h = std::fmod(t + shift[n], P) / P;  // time of day in [0, 1)
      auto bump = [&](double c, double w) { return std::exp(-0.5 * std::pow((h - c) / w, 2)); };
      const double v = base[n] - am[n] * bump(0.33, 0.05) - pm[n] * bump(0.72, 0.06) - inc[n] +
                       1.5 * rng.normal();
      ts.v[t * N + n] = static_cast<float>(v);
    }
  }
  return ts;
}

namespace {

// Features (B, T, N, 3): (normalised value, sin, cos of the time of day); targets (B, T, N, 1):
// the next normalised value. Windows start at the given offsets.
void make_batch(const TrafficSeries& ts, const std::vector<int64_t>& starts, int64_t T, double mu,
                double sd, Tensor& x, Tensor& y) {
  const int64_t B = static_cast<int64_t>(starts.size()), N = ts.N;
  x = Tensor::empty({B, T, N, 3});
  y = Tensor::empty({B, T, N, 1});
  const double P = static_cast<double>(ts.period);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = starts[b] + t;
      const double ang = 2 * M_PI * std::fmod(static_cast<double>(s), P) / P;
      for (int64_t n = 0; n < N; ++n) {
        float* f = x.data() + ((b * T + t) * N + n) * 3;
        f[0] = static_cast<float>((ts.v[s * N + n] - mu) / sd);
        f[1] = static_cast<float>(std::sin(ang));
        f[2] = static_cast<float>(std::cos(ang));
        y[(b * T + t) * N + n] = static_cast<float>((ts.v[(s + 1) * N + n] - mu) / sd);
      }
    }
}

// Linear(3 -> C) -> STBlock -> Linear(C -> 1).
struct Forecaster {
  ParamList io;
  Param *in_w, *in_b, *out_w, *out_b;
  STBlock blk;
  Forecaster(const STBlockConfig& c, uint64_t seed) : blk(c, seed) {
    const int64_t C = c.d_model;
    in_w = &io.add_matrix("in_proj.weight", {C, 3});
    in_b = &io.add("in_proj.bias", {C}, true);
    out_w = &io.add_matrix("head.weight", {1, C});
    out_b = &io.add("head.bias", {1}, true);
    Rng rng(seed + 1);
    rng.fill_uniform(in_w->value.f32(), -0.5, 0.5);
    rng.fill_uniform(out_w->value.f32(), -1 / std::sqrt(double(C)), 1 / std::sqrt(double(C)));
  }
  std::vector<std::pair<std::string, Param*>> named() {
    auto v = blk.named_parameters();
    for (auto& p : io.all()) v.emplace_back(p.name, &p);
    return v;
  }
  struct Saved {
    Tensor x, h, y;
    STBlockSaved blk;
  };
  Tensor forward(const Tensor& x, Saved* s) const {
    Tensor h = ops::linear(x, in_w->value, in_b->value.f32());
    Tensor y = blk.forward(h, s ? &s->blk : nullptr);
    if (s) s->x = x, s->h = h, s->y = y;
    return ops::linear(y, out_w->value, out_b->value.f32());
  }
  void backward(const Saved& s, const Tensor& dpred) {
    Tensor dy = ops::linear_bwd(s.y, out_w->value, dpred, &out_w->grad(), &out_b->grad());
    Tensor dh = blk.backward(s.blk, dy);
    ops::linear_bwd(s.x, in_w->value, dh, &in_w->grad(), &in_b->grad());
  }
};

}  // namespace

STForecastResult run_st_forecast(const STForecastConfig& cfg,
                                 const std::function<void(int64_t, double)>& on_log) {
  MAMBA_CHECK(cfg.seqlen >= 2 && cfg.batch >= 1 && cfg.steps >= 0 && cfg.nodes >= 1,
              "st-forecast: seqlen >= 2, batch >= 1, steps >= 0, nodes >= 1 needed");
  const auto t0 = std::chrono::steady_clock::now();
  const TrafficSeries ts = make_traffic_series(cfg.nodes, cfg.series_len, cfg.seed);
  const int64_t T = cfg.seqlen, split = cfg.series_len * 4 / 5;
  MAMBA_CHECK(split > T + 1 && cfg.series_len - split > T + 1,
              "st-forecast: series_len too short for seqlen ", T);
  double mu = 0, sd = 0;  // normalisation from the training part
  for (int64_t i = 0; i < split * ts.N; ++i) mu += ts.v[i];
  mu /= static_cast<double>(split * ts.N);
  for (int64_t i = 0; i < split * ts.N; ++i) sd += (ts.v[i] - mu) * (ts.v[i] - mu);
  sd = std::sqrt(sd / static_cast<double>(split * ts.N));

  STBlockConfig bc;
  bc.num_nodes = cfg.nodes, bc.d_model = cfg.d_model, bc.num_heads = cfg.heads;
  if (cfg.temporal == "mamba1") {
    Mamba1Config m;
    m.d_state = 8;
    bc.temporal = m;
  } else if (cfg.temporal == "mamba2") {
    Mamba2Config m;
    m.d_state = 16, m.headdim = 8, m.chunk_size = 8;
    bc.temporal = m;
  } else if (cfg.temporal == "attention") {
    MHAConfig m;
    m.num_heads = cfg.heads, m.causal = true, m.rotary_emb_dim = 2;
    bc.temporal = m;
  } else {
    throw Error(
        str("st-forecast: temporal must be mamba1, mamba2 or attention, got '", cfg.temporal, "'"));
  }
  Forecaster model(bc, cfg.seed + 7);
  STForecastResult res;
  for (auto& [n, p] : model.named())
    res.shapes.emplace_back(n, p->value.shape()), res.params += p->value.numel();
  AdamWConfig ac;
  ac.weight_decay = 0.0;
  auto params = model.named();
  AdamW opt(params, ac);
  Rng rng(cfg.seed + 99);
  Tensor x, y;
  for (int64_t step = 0; step < cfg.steps; ++step) {
    std::vector<int64_t> starts(static_cast<size_t>(cfg.batch));
    for (auto& s : starts)
      s = static_cast<int64_t>(rng.below(static_cast<uint64_t>(split - T - 1)));
    make_batch(ts, starts, T, mu, sd, x, y);
    Forecaster::Saved sv;
    Tensor pred = model.forward(x, &sv);
    Tensor d = Tensor::empty(pred.shape());  // MSE over every position
    double loss = 0;
    const double inv = 1.0 / static_cast<double>(pred.numel());
    for (int64_t i = 0; i < pred.numel(); ++i) {
      const double e = pred[i] - y[i];
      loss += e * e * inv;
      d[i] = static_cast<float>(2 * e * inv);
    }
    for (auto& [n, p] : params) p->grad().zero();
    model.backward(sv, d);
    clip_grad_norm(params, 1.0);
    opt.step(lr_at(step, cfg.steps / 10, cfg.steps, cfg.lr, cfg.lr * 0.1));
    res.final_loss = loss;
    if (on_log && (step % 50 == 0 || step + 1 == cfg.steps)) on_log(step, loss);
  }
  // Test: every window in the last 20%; the forecast of the value after the window's last step.
  double e_model = 0, e_pers = 0;
  int64_t count = 0;
  std::vector<int64_t> starts;
  for (int64_t s = split; s + T + 1 <= cfg.series_len; s += 3) starts.push_back(s);
  for (size_t i0 = 0; i0 < starts.size(); i0 += 64) {
    std::vector<int64_t> chunk(starts.begin() + i0,
                               starts.begin() + std::min(starts.size(), i0 + 64));
    make_batch(ts, chunk, T, mu, sd, x, y);
    Tensor pred = model.forward(x, nullptr);
    const int64_t N = ts.N;
    for (size_t b = 0; b < chunk.size(); ++b)
      for (int64_t n = 0; n < N; ++n) {
        const int64_t idx = (static_cast<int64_t>(b) * T + T - 1) * N + n;
        const double truth = y[idx] * sd + mu, last = x[idx * 3] * sd + mu;
        e_model += std::fabs(pred[idx] * sd + mu - truth);
        e_pers += std::fabs(last - truth);
        ++count;
      }
  }
  res.mae_model = e_model / static_cast<double>(count);
  res.mae_persistence = e_pers / static_cast<double>(count);
  res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return res;
}

}  // namespace mamba::train
