// Element-wise, bias and embedding ops (see include/mamba/ops/elementwise.h).
#include "ops/elementwise.h"

#include <algorithm>
#include <cmath>

#include "mamba/parallel.h"
#include "ops/act.h"

namespace mamba::ops {
namespace {

// (rows, row length, row stride, first element) of a tensor viewed as a 2-D matrix with rows of
// `n` values; n = 0: its own rows.
struct Rows {
  float* p;
  int64_t M, n, ld;
};
Rows rows_of(const Tensor& t, const char* what, int64_t n) {
  check_defined(t, what);
  if (n == 0) n = t.row_len();
  if (t.is_contiguous()) return {t.view_data(), n ? t.numel() / n : 0, n, n};
  MAMBA_CHECK(t.row_len() == n, what, ": strided view ", t.shape_str(), " has rows of ",
              t.row_len(), " values, expected ", n);
  return {t.view_data(), t.rows(), n, t.row_stride()};
}

// Row length shared by two same-shaped tensors (a strided one decides).
int64_t common_row(const Tensor& a, const Tensor& b) {
  if (!a.is_contiguous()) return a.row_len();
  if (!b.is_contiguous()) return b.row_len();
  return std::max<int64_t>(a.numel(), 1);  // both contiguous: one run
}

void check_same(const Tensor& a, const Tensor& b, const char* what) {
  check_defined(a, what);
  check_defined(b, what);
  MAMBA_CHECK(a.shape() == b.shape(), what, ": shapes ", a.shape_str(), " and ", b.shape_str(),
              " differ");
}

void check_bias(const Tensor& y, const Tensor& b, const char* what) {
  check_defined(y, what);
  MAMBA_CHECK(y.ndim() >= 1, what, ": y must be (..., n), got ", y.shape_str());
  check_shape(b, what, {y.dim(-1)});
}

}  // namespace

void add_into(const Tensor& dst, const Tensor& src) {
  check_same(dst, src, "add_into");
  if (!dst.numel()) return;
  const int64_t n = common_row(dst, src);
  const Rows d = rows_of(dst, "add_into: dst", n), s = rows_of(src, "add_into: src", n);
  for (int64_t m = 0; m < d.M; ++m) {
    float* dr = d.p + m * d.ld;
    const float* sr = s.p + m * s.ld;
    for (int64_t j = 0; j < n; ++j) dr[j] += sr[j];
  }
}

void add_mul_into(const Tensor& dst, const Tensor& a, const Tensor& b) {
  check_same(dst, a, "add_mul_into");
  check_same(dst, b, "add_mul_into");
  float* d = Tensor(dst).data();  // a Tensor is a handle: const is the handle, not the values
  const float *pa = a.data(), *pb = b.data();
  for (int64_t i = 0; i < dst.numel(); ++i) d[i] += pa[i] * pb[i];
}

Tensor mul(const Tensor& a, const Tensor& b) {
  check_same(a, b, "mul");
  Tensor out = Tensor::empty(a.shape());
  float* o = out.data();
  const float *pa = a.data(), *pb = b.data();
  for (int64_t i = 0; i < out.numel(); ++i) o[i] = pa[i] * pb[i];
  return out;
}

void copy_into(const Tensor& dst, const Tensor& src) {
  check_same(dst, src, "copy_into");
  Tensor d = dst;
  d.copy_from(src);
}

Tensor neg_exp(const Tensor& x) {
  check_defined(x, "neg_exp");
  Tensor a = Tensor::empty(x.shape());
  const Tensor c = x.contiguous();
  for (int64_t i = 0; i < a.numel(); ++i) a[i] = -std::exp(c[i]);
  return a;
}

Tensor log_neg(const Tensor& x, const std::string& what) {
  check_defined(x, "log_neg");
  Tensor a = Tensor::empty(x.shape());
  const Tensor c = x.contiguous();
  for (int64_t i = 0; i < a.numel(); ++i) {
    MAMBA_CHECK(std::isfinite(c[i]) && c[i] < 0, what, "[", i, "] = ", c[i],
                " (A must be negative and finite)");
    a[i] = static_cast<float>(std::log(-static_cast<double>(c[i])));
  }
  return a;
}

Tensor neg_exp_fast(const Tensor& x) {
  check_defined(x, "neg_exp_fast");
  const Tensor xc = x.contiguous();
  Tensor a = Tensor::empty(x.shape());
  const float* src = xc.data();
  float* p = a.data();
  // Mamba-1's decode step calls this every token (A = -exp(A_log), D x N values): split over
  // threads in pieces of 64 values, so every value takes the same (vector or scalar tail) path
  // whatever the split.
  const int64_t n = a.numel(), pieces = (n + 63) / 64;
  parallel_for(pieces, 128, [&](int64_t pb, int64_t pe) {
    const int64_t b = pb * 64, e = std::min(n, pe * 64);
    neg_exp_fast_into(src + b, p + b, e - b);
  });
  return a;
}

void neg_exp_fast_into(const float* x, float* y, int64_t n) {
  std::copy(x, x + n, y);
  exp_inplace(y, n);
  for (int64_t i = 0; i < n; ++i) y[i] = -y[i];
}

void bias_add(const Tensor& y, const Tensor& b) {
  check_bias(y, b, "bias_add: b");
  const Rows r = rows_of(y, "bias_add: y", y.dim(-1));
  const float* bp = b.data();
  for (int64_t m = 0; m < r.M; ++m)
    for (int64_t j = 0; j < r.n; ++j) r.p[m * r.ld + j] += bp[j];
}

void bias_fill(const Tensor& y, const Tensor& b) {
  check_bias(y, b, "bias_fill: b");
  const Rows r = rows_of(y, "bias_fill: y", y.dim(-1));
  const float* bp = b.data();
  for (int64_t m = 0; m < r.M; ++m) std::copy_n(bp, r.n, r.p + m * r.ld);
}

void bias_grad(const Tensor& db, const Tensor& dy) {
  check_bias(dy, db, "bias_grad: db");
  const Rows r = rows_of(dy, "bias_grad: dy", dy.dim(-1));
  float* d = Tensor(db).data();
  for (int64_t m = 0; m < r.M; ++m)
    for (int64_t j = 0; j < r.n; ++j) d[j] += r.p[m * r.ld + j];
}

void scale_inplace(const Tensor& t, float s) {
  if (!t.defined() || !t.numel()) return;
  const Rows r = rows_of(t, "scale_inplace: t", t.is_contiguous() ? t.numel() : 0);
  for (int64_t m = 0; m < r.M; ++m)
    for (int64_t j = 0; j < r.n; ++j) r.p[m * r.ld + j] *= s;
}

void mul_cols_inplace(const Tensor& y, const Tensor& s) {
  check_bias(y, s, "mul_cols_inplace: s");
  const Rows r = rows_of(y, "mul_cols_inplace: y", y.dim(-1));
  const float* sp = s.data();
  for (int64_t m = 0; m < r.M; ++m)
    for (int64_t j = 0; j < r.n; ++j) r.p[m * r.ld + j] *= sp[j];
}

void mul_cols_grad(const Tensor& ds, const Tensor& dy, const Tensor& x) {
  check_bias(dy, ds, "mul_cols_grad: ds");
  check_same(dy, x, "mul_cols_grad: dy and x");
  const Rows g = rows_of(dy, "mul_cols_grad: dy", dy.dim(-1));
  const Rows v = rows_of(x, "mul_cols_grad: x", x.dim(-1));
  float* d = Tensor(ds).data();
  for (int64_t m = 0; m < g.M; ++m)
    for (int64_t j = 0; j < g.n; ++j) d[j] += g.p[m * g.ld + j] * v.p[m * v.ld + j];
}

Tensor embedding_fwd(const Weight& W, std::span<const int32_t> ids) {
  MAMBA_CHECK(W.defined() && W.shape().size() == 2, "embedding: W must be (V, d), got ",
              W.shape_str());
  const int64_t V = W.rows(), d = W.cols(), n = static_cast<int64_t>(ids.size());
  Tensor out = Tensor::empty({n, d});
  for (int64_t i = 0; i < n; ++i) {
    MAMBA_CHECK(ids[i] >= 0 && ids[i] < V, "input ids: id ", ids[i], " at position ", i,
                " is outside the vocabulary [0, ", V, ")");
    W.row_to_f32(ids[i], out.data() + i * d);
  }
  return out;
}

void embedding_bwd(const Tensor& dW, std::span<const int32_t> ids, const Tensor& dy) {
  check_defined(dW, "embedding_bwd: dW");
  MAMBA_CHECK(dW.ndim() == 2, "embedding_bwd: dW must be (V, d), got ", dW.shape_str());
  const int64_t V = dW.dim(0), d = dW.dim(1), n = static_cast<int64_t>(ids.size());
  check_shape(dy, "embedding_bwd: dy", {n, d});
  float* g = Tensor(dW).data();
  const float* src = dy.data();
  for (int64_t t = 0; t < n; ++t) {
    MAMBA_CHECK(ids[t] >= 0 && ids[t] < V, "embedding_bwd: id ", ids[t], " at position ", t,
                " is outside [0, ", V, ")");
    float* row = g + static_cast<int64_t>(ids[t]) * d;
    const float* s = src + t * d;
    for (int64_t j = 0; j < d; ++j) row[j] += s[j];
  }
}

void bias_grad_ref(Tensor& db, const Tensor& dy) {
  const int64_t n = db.numel(), M = n ? dy.numel() / n : 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) db[j] += dy[m * n + j];
}

Tensor embedding_fwd_ref(const Tensor& W, std::span<const int32_t> ids) {
  const int64_t d = W.dim(1), n = static_cast<int64_t>(ids.size());
  Tensor out = Tensor::empty({n, d});
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = W[ids[i] * d + j];
  return out;
}

void embedding_bwd_ref(Tensor& dW, std::span<const int32_t> ids, const Tensor& dy) {
  const int64_t d = dW.dim(1);
  for (size_t t = 0; t < ids.size(); ++t)
    for (int64_t j = 0; j < d; ++j) dW[ids[t] * d + j] += dy[static_cast<int64_t>(t) * d + j];
}

}  // namespace mamba::ops
