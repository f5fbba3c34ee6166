// VMamba's 2-D selective scan (see cross_scan.h): the strided kernel (forward, backward),
// vectorised with Highway and dispatched at run time; the copy-based implementation over
// ops::selective_scan; the naive references and the argument checks.
//
// Strided kernel, vectorised ACROSS CHANNELS as the 1-D scan (ops/selective_scan.cpp): a work
// item is (batch b, block of `lanes` consecutive channels). The item runs the four directions
// one after the other; direction k walks its index table order_k (pixel of each step) and
// reads the rows u[p], delta[p, k], x_dbl[p, k] where they lie: nothing is copied. Its output
// is added to y[p] (direction 0 stores, 1..3 add, in that order: the merge is deterministic and
// needs no extra pass). A partial last block is staged through zero-padded buffers.
//
// Backward, per item and direction: pass 1 recomputes the recurrence and keeps h every kChunk
// steps; then chunk by chunk from the end the chunk's states are recomputed and the reverse
// recurrence runs over them (gh = dL/dh carried backwards):
//   g = gh + dy C_t;  dC_t += dy h_t;  dB_t += g dt u;  du += g dt B_t + Ds dy;
//   ddt += g (h_{t-1} exp(dt A) A + B_t u);  dA += g h_{t-1} exp(dt A) dt;  gh = g exp(dt A)
// dB and dC (sums over a direction's D channels per (b, p, k, n)) are added, as lane sums, into
// per-part buffers, summed over the parts in part order afterwards; dA, dDs and ddelta_bias the
// same way: no races, bitwise reproducible for a given thread count.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/cross_scan.cpp"
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>
#include "ops/simd_math-inl.h"
// clang-format on

#include "ops/cross_scan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "mamba/parallel.h"
#include "ops/selective_scan.h"

#ifndef MAMBA_CROSS_SCAN_PLAN_ONCE
#define MAMBA_CROSS_SCAN_PLAN_ONCE
namespace mamba::ops::xscan {

constexpr int64_t kK = kCrossScanK;
constexpr int64_t kChunk = 64;  // backward checkpoint interval (steps)
// Below this many state updates per thread, threads cost more than they save.
constexpr int64_t kMinWorkPerThread = 1 << 16;

struct Plan {
  CrossScanDims s;
  bool softplus = true;
  const int32_t* order = nullptr;  // (K, L) pixel of each step
  const float *u = nullptr, *delta = nullptr, *xdbl = nullptr, *A = nullptr, *Ds = nullptr,
              *bias = nullptr;
  float* y = nullptr;
  // backward
  const float* dy = nullptr;
  float *du = nullptr, *ddelta = nullptr, *dxdbl = nullptr, *dA = nullptr, *dDs = nullptr,
        *dbias = nullptr;
};

}  // namespace mamba::ops::xscan
#endif

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
namespace sm = simd_math;  // called qualified: see simd_math-inl.h
using xscan::Plan;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

HWY_INLINE VF XLoadPart(DF d, const float* p, size_t nl, float* tmp) {
  if (nl == hn::Lanes(d)) return hn::LoadU(d, p);
  std::memset(tmp, 0, hn::Lanes(d) * sizeof(float));
  std::memcpy(tmp, p, nl * sizeof(float));
  return hn::LoadU(d, tmp);
}
HWY_INLINE void XStorePart(DF d, VF v, float* p, size_t nl, float* tmp) {
  if (nl == hn::Lanes(d)) return hn::StoreU(v, d, p);
  hn::StoreU(v, d, tmp);
  std::memcpy(p, tmp, nl * sizeof(float));
}

// Per-direction constants of a block: A (N, lanes), Ds and bias (lanes), zero-padded.
struct DirConsts {
  std::vector<float> A, Ds, bias;
  void stage(const Plan& p, int64_t k, int64_t d0, size_t nl, size_t lanes) {
    const int64_t N = p.s.N, D = p.s.D;
    A.assign(N * lanes, 0.f);
    Ds.assign(lanes, 0.f);
    bias.assign(lanes, 0.f);
    for (size_t l = 0; l < nl; ++l) {
      const int64_t c = k * D + d0 + static_cast<int64_t>(l);
      for (int64_t n = 0; n < N; ++n) A[n * lanes + l] = p.A[c * N + n];
      if (p.Ds) Ds[l] = p.Ds[c];
      if (p.bias) bias[l] = p.bias[c];
    }
  }
};

// dt = softplus?(delta + bias) at row `row` (= b L + p) of direction k.
HWY_INLINE VF StepDt(DF d, const Plan& p, const DirConsts& dc, int64_t row, int64_t k, int64_t d0,
                     size_t nl, float* tmp, VF* dl_out) {
  const VF dl = hn::Add(XLoadPart(d, p.delta + (row * xscan::kK + k) * p.s.D + d0, nl, tmp),
                        hn::LoadU(d, dc.bias.data()));
  if (dl_out) *dl_out = dl;
  return p.softplus ? sm::Softplus(d, dl) : dl;
}

void CrossScanFwdKernel(const Plan& p) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const int64_t D = p.s.D, N = p.s.N, L = p.s.L(), E = p.s.E(), R = p.s.R;
  const int64_t nblk = (D + static_cast<int64_t>(lanes) - 1) / static_cast<int64_t>(lanes);
  const int64_t items = p.s.batch * nblk;
  const int64_t per_item = xscan::kK * L * N * static_cast<int64_t>(lanes);
  parallel_for(
      items, std::max<int64_t>(1, xscan::kMinWorkPerThread / std::max<int64_t>(per_item, 1)),
      [&](int64_t i0, int64_t i1) {
        DirConsts dc;
        std::vector<float> h(N * lanes), tmp(lanes);
        for (int64_t it = i0; it < i1; ++it) {
          const int64_t b = it / nblk, d0 = (it % nblk) * static_cast<int64_t>(lanes);
          const size_t nl = static_cast<size_t>(std::min<int64_t>(lanes, D - d0));
          for (int64_t k = 0; k < xscan::kK; ++k) {
            dc.stage(p, k, d0, nl, lanes);
            const VF Dv = hn::LoadU(d, dc.Ds.data());
            std::fill(h.begin(), h.end(), 0.f);
            const int32_t* ord = p.order + k * L;
            for (int64_t t = 0; t < L; ++t) {
              const int64_t row = b * L + ord[t];
              const VF u = XLoadPart(d, p.u + row * D + d0, nl, tmp.data());
              const VF dt = StepDt(d, p, dc, row, k, d0, nl, tmp.data(), nullptr);
              const float* Bp = p.xdbl + (row * xscan::kK + k) * E + R;
              const float* Cp = Bp + N;
              const VF dtu = hn::Mul(dt, u);
              VF y = hn::Mul(Dv, u);
              for (int64_t n = 0; n < N; ++n) {
                const VF dA = sm::Exp(d, hn::Mul(dt, hn::LoadU(d, dc.A.data() + n * lanes)));
                float* hn_ = h.data() + n * lanes;
                const VF hv = hn::MulAdd(dA, hn::LoadU(d, hn_), hn::Mul(dtu, hn::Set(d, Bp[n])));
                hn::StoreU(hv, d, hn_);
                y = hn::MulAdd(hv, hn::Set(d, Cp[n]), y);
              }
              float* yo = p.y + row * D + d0;
              if (k > 0) y = hn::Add(y, XLoadPart(d, yo, nl, tmp.data()));
              XStorePart(d, y, yo, nl, tmp.data());
            }
          }
        }
      });
}

// One part's scratch and partial sums for the backward.
struct BwdScratch {
  // hs, dAs: the chunk's states and exp(dt A) (kChunk, N, lanes); dts, dls: its dt and
  // delta + bias (kChunk, lanes), computed once by the chunk's forward recompute
  std::vector<float> ck, hs, dAs, dts, dls, gh, dAacc, dDacc, dbacc, tmp;
  void init(int64_t L, int64_t N, size_t lanes) {
    const int64_t nch = (L + xscan::kChunk - 1) / xscan::kChunk;
    ck.assign((nch + 1) * N * lanes, 0.f);
    hs.assign(xscan::kChunk * N * lanes, 0.f);
    dAs.assign(xscan::kChunk * N * lanes, 0.f);
    dts.assign(xscan::kChunk * lanes, 0.f);
    dls.assign(xscan::kChunk * lanes, 0.f);
    gh.assign(N * lanes, 0.f);
    dAacc.assign(N * lanes, 0.f);
    dDacc.assign(lanes, 0.f);
    dbacc.assign(lanes, 0.f);
    tmp.assign(lanes, 0.f);
  }
};

// Item (b, block at d0), direction k. pBC: the part's dB/dC rows for batch b, (L, K, 2N).
// pchan: the part's per-channel sums, (K D) x (N + 2): dA (N), dDs, dbias.
void BwdItemDir(const Plan& p, BwdScratch& w, const DirConsts& dc, int64_t b, int64_t d0, size_t nl,
                int64_t k, float* pBC, float* pchan) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const int64_t D = p.s.D, N = p.s.N, L = p.s.L(), E = p.s.E(), R = p.s.R;
  const int32_t* ord = p.order + k * L;
  const int64_t nch = (L + xscan::kChunk - 1) / xscan::kChunk;
  float* tmp = w.tmp.data();
  const VF Dv = hn::LoadU(d, dc.Ds.data());
  // pass 1: checkpoints
  std::fill(w.ck.begin(), w.ck.begin() + N * lanes, 0.f);
  {
    std::vector<float>& h = w.gh;  // reused as the running state here
    std::fill(h.begin(), h.end(), 0.f);
    for (int64_t t = 0; t < L; ++t) {
      if (t % xscan::kChunk == 0)
        std::memcpy(w.ck.data() + (t / xscan::kChunk) * N * lanes, h.data(),
                    N * lanes * sizeof(float));
      const int64_t row = b * L + ord[t];
      const VF u = XLoadPart(d, p.u + row * D + d0, nl, tmp);
      const VF dt = StepDt(d, p, dc, row, k, d0, nl, tmp, nullptr);
      const float* Bp = p.xdbl + (row * xscan::kK + k) * E + R;
      const VF dtu = hn::Mul(dt, u);
      for (int64_t n = 0; n < N; ++n) {
        const VF dA = sm::Exp(d, hn::Mul(dt, hn::LoadU(d, dc.A.data() + n * lanes)));
        float* hp = h.data() + n * lanes;
        hn::StoreU(hn::MulAdd(dA, hn::LoadU(d, hp), hn::Mul(dtu, hn::Set(d, Bp[n]))), d, hp);
      }
    }
  }
  // pass 2: chunks from the end
  std::fill(w.gh.begin(), w.gh.end(), 0.f);
  std::fill(w.dAacc.begin(), w.dAacc.end(), 0.f);
  VF dDacc = hn::Zero(d), dbacc = hn::Zero(d);
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t t0 = c * xscan::kChunk, t1 = std::min(L, t0 + xscan::kChunk);
    const float* h0 = w.ck.data() + c * N * lanes;
    // recompute the chunk's states: hs[j] = h after step t0 + j
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t row = b * L + ord[t];
      const VF u = XLoadPart(d, p.u + row * D + d0, nl, tmp);
      VF dl;
      const VF dt = StepDt(d, p, dc, row, k, d0, nl, tmp, &dl);
      hn::StoreU(dt, d, w.dts.data() + (t - t0) * lanes);
      hn::StoreU(dl, d, w.dls.data() + (t - t0) * lanes);
      const float* Bp = p.xdbl + (row * xscan::kK + k) * E + R;
      const VF dtu = hn::Mul(dt, u);
      const float* hprev = t == t0 ? h0 : w.hs.data() + (t - t0 - 1) * N * lanes;
      float* hcur = w.hs.data() + (t - t0) * N * lanes;
      float* dAt = w.dAs.data() + (t - t0) * N * lanes;
      for (int64_t n = 0; n < N; ++n) {
        const VF dA = sm::Exp(d, hn::Mul(dt, hn::LoadU(d, dc.A.data() + n * lanes)));
        hn::StoreU(dA, d, dAt + n * lanes);
        hn::StoreU(hn::MulAdd(dA, hn::LoadU(d, hprev + n * lanes), hn::Mul(dtu, hn::Set(d, Bp[n]))),
                   d, hcur + n * lanes);
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t pix = ord[t], row = b * L + pix;
      const VF u = XLoadPart(d, p.u + row * D + d0, nl, tmp);
      const VF dl = hn::LoadU(d, w.dls.data() + (t - t0) * lanes);
      const VF dt = hn::LoadU(d, w.dts.data() + (t - t0) * lanes);
      const float* dAt = w.dAs.data() + (t - t0) * N * lanes;
      const VF dyv = XLoadPart(d, p.dy + row * D + d0, nl, tmp);
      const float* Bp = p.xdbl + (row * xscan::kK + k) * E + R;
      const float* Cp = Bp + N;
      float* bc = pBC + (pix * xscan::kK + k) * 2 * N;
      const float* hprev = t == t0 ? h0 : w.hs.data() + (t - t0 - 1) * N * lanes;
      const float* hcur = w.hs.data() + (t - t0) * N * lanes;
      const VF dtu = hn::Mul(dt, u);
      VF ddt = hn::Zero(d), duacc = hn::Mul(Dv, dyv);
      for (int64_t n = 0; n < N; ++n) {
        const VF An = hn::LoadU(d, dc.A.data() + n * lanes);
        const VF Bn = hn::Set(d, Bp[n]);
        float* ghp = w.gh.data() + n * lanes;
        const VF g = hn::MulAdd(dyv, hn::Set(d, Cp[n]), hn::LoadU(d, ghp));
        bc[N + n] += hn::GetLane(hn::SumOfLanes(d, hn::Mul(dyv, hn::LoadU(d, hcur + n * lanes))));
        const VF dA = hn::LoadU(d, dAt + n * lanes);
        const VF hp = hn::LoadU(d, hprev + n * lanes);
        const VF hpdA = hn::Mul(hp, dA);
        ddt = hn::MulAdd(g, hn::MulAdd(hpdA, An, hn::Mul(Bn, u)), ddt);
        float* dAp = w.dAacc.data() + n * lanes;
        hn::StoreU(hn::MulAdd(hn::Mul(g, hpdA), dt, hn::LoadU(d, dAp)), d, dAp);
        bc[n] += hn::GetLane(hn::SumOfLanes(d, hn::Mul(g, dtu)));
        duacc = hn::MulAdd(hn::Mul(g, dt), Bn, duacc);
        hn::StoreU(hn::Mul(g, dA), d, ghp);
      }
      dDacc = hn::MulAdd(dyv, u, dDacc);
      const VF ddl = p.softplus ? hn::Mul(ddt, sm::SoftplusGrad(d, dl)) : ddt;
      dbacc = hn::Add(dbacc, ddl);
      XStorePart(d, ddl, p.ddelta + (row * xscan::kK + k) * D + d0, nl, tmp);
      float* dup = p.du + row * D + d0;
      if (k > 0) duacc = hn::Add(duacc, XLoadPart(d, dup, nl, tmp));
      XStorePart(d, duacc, dup, nl, tmp);
    }
  }
  hn::StoreU(dDacc, d, w.dDacc.data());
  hn::StoreU(dbacc, d, w.dbacc.data());
  for (size_t l = 0; l < nl; ++l) {
    float* pc = pchan + (k * D + d0 + static_cast<int64_t>(l)) * (N + 2);
    for (int64_t n = 0; n < N; ++n) pc[n] += w.dAacc[n * lanes + l];
    pc[N] += w.dDacc[l];
    pc[N + 1] += w.dbacc[l];
  }
}

void CrossScanBwdKernel(const Plan& p) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const int64_t D = p.s.D, N = p.s.N, L = p.s.L(), E = p.s.E(), Bt = p.s.batch;
  const int64_t nblk = (D + static_cast<int64_t>(lanes) - 1) / static_cast<int64_t>(lanes);
  const int64_t items = Bt * nblk;
  const int64_t per_item = xscan::kK * L * N * static_cast<int64_t>(lanes);
  const int64_t nparts = std::max<int64_t>(
      1, std::min({static_cast<int64_t>(num_threads()), items,
                   std::max<int64_t>(1, items * per_item / xscan::kMinWorkPerThread)}));
  const int64_t bc_rows = L * xscan::kK * 2 * N;  // per batch row
  const int64_t nchan = xscan::kK * D * (N + 2);
  // part q covers items [items q / nparts, items (q + 1) / nparts): batches [bfirst, blast]
  std::vector<int64_t> bfirst(nparts), boff(nparts + 1, 0);
  for (int64_t q = 0; q < nparts; ++q) {
    const int64_t i0 = items * q / nparts, i1 = items * (q + 1) / nparts;
    bfirst[q] = i0 / nblk;
    const int64_t nb = i1 > i0 ? (i1 - 1) / nblk - bfirst[q] + 1 : 0;
    boff[q + 1] = boff[q] + nb;
  }
  std::vector<float> partBC(static_cast<size_t>(boff[nparts] * bc_rows), 0.f);
  std::vector<float> partChan(static_cast<size_t>(nparts * nchan), 0.f);
  parallel_for(nparts, 1, [&](int64_t q0, int64_t q1) {
    BwdScratch w;
    w.init(L, N, lanes);
    DirConsts dc;
    for (int64_t q = q0; q < q1; ++q) {
      for (int64_t it = items * q / nparts; it < items * (q + 1) / nparts; ++it) {
        const int64_t b = it / nblk, d0 = (it % nblk) * static_cast<int64_t>(lanes);
        const size_t nl = static_cast<size_t>(std::min<int64_t>(lanes, D - d0));
        float* pBC = partBC.data() + (boff[q] + b - bfirst[q]) * bc_rows;
        for (int64_t k = 0; k < xscan::kK; ++k) {
          dc.stage(p, k, d0, nl, lanes);
          BwdItemDir(p, w, dc, b, d0, nl, k, pBC, partChan.data() + q * nchan);
        }
      }
    }
  });
  // dB, dC into x_dbl's columns, summed over the parts in part order
  parallel_for(
      Bt * L, std::max<int64_t>(1, 4096 / std::max<int64_t>(xscan::kK * 2 * N, 1)),
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / L, pix = r % L;
          for (int64_t k = 0; k < xscan::kK; ++k) {
            float* dst = p.dxdbl + (r * xscan::kK + k) * E + p.s.R;
            for (int64_t j = 0; j < 2 * N; ++j) {
              float s = 0.f;
              for (int64_t q = 0; q < nparts; ++q) {
                if (b < bfirst[q] || b >= bfirst[q] + (boff[q + 1] - boff[q])) continue;
                s +=
                    partBC[(boff[q] + b - bfirst[q]) * bc_rows + (pix * xscan::kK + k) * 2 * N + j];
              }
              dst[j] = s;
            }
          }
        }
      });
  for (int64_t c = 0; c < xscan::kK * D; ++c) {
    for (int64_t n = 0; n < N + 2; ++n) {
      float s = 0.f;
      for (int64_t q = 0; q < nparts; ++q) s += partChan[q * nchan + c * (N + 2) + n];
      if (n < N)
        p.dA[c * N + n] = s;
      else if (n == N) {
        if (p.dDs) p.dDs[c] = s;
      } else if (p.dbias) {
        p.dbias[c] = s;
      }
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba::ops {
HWY_EXPORT(CrossScanFwdKernel);
HWY_EXPORT(CrossScanBwdKernel);

using xscan::kK;

int64_t cross_scan_pixel(int64_t k, int64_t t, int64_t H, int64_t W) {
  const int64_t L = H * W;
  if (k >= 2) t = L - 1 - t;
  if (k % 2 == 0) return t;    // row-major
  return (t % H) * W + t / H;  // column-major: t = j H + i
}

CrossScanDims cross_scan_check(const CrossScanArgs& a, const char* what) {
  check_defined(a.u, str(what, ": u").c_str());
  check_defined(a.delta, str(what, ": delta").c_str());
  check_defined(a.x_dbl, str(what, ": x_dbl").c_str());
  check_defined(a.A, str(what, ": A").c_str());
  MAMBA_CHECK(a.u.ndim() == 4, what, ": u must be (B, H, W, D), got ", a.u.shape_str());
  CrossScanDims s;
  s.batch = a.u.dim(0), s.H = a.u.dim(1), s.W = a.u.dim(2), s.D = a.u.dim(3);
  MAMBA_CHECK(s.batch >= 1 && s.H >= 1 && s.W >= 1 && s.D >= 1, what,
              ": u needs B, H, W, D >= 1, got ", a.u.shape_str());
  MAMBA_CHECK(s.H * s.W <= std::numeric_limits<int32_t>::max(), what,
              ": H * W must fit in 32 bits, got ", s.H * s.W);
  MAMBA_CHECK(a.A.ndim() == 2, what, ": A must be (K*D = ", kK * s.D, ", N), got ",
              a.A.shape_str());
  s.N = a.A.dim(1);
  MAMBA_CHECK(s.N >= 1, what, ": A needs N >= 1, got ", a.A.shape_str());
  check_shape(a.A, str(what, ": A").c_str(), {kK * s.D, s.N});
  s.R = a.dt_rank;
  MAMBA_CHECK(s.R >= 0, what, ": dt_rank must be >= 0, got ", s.R);
  check_shape(a.delta, str(what, ": delta").c_str(), {s.batch, s.H, s.W, kK, s.D});
  check_shape(a.x_dbl, str(what, ": x_dbl").c_str(), {s.batch, s.H, s.W, kK, s.E()});
  if (a.Ds.defined()) check_shape(a.Ds, str(what, ": Ds").c_str(), {kK * s.D});
  if (a.delta_bias.defined())
    check_shape(a.delta_bias, str(what, ": delta_bias").c_str(), {kK * s.D});
  return s;
}

namespace {

std::vector<int32_t> order_table(int64_t H, int64_t W) {
  const int64_t L = H * W;
  std::vector<int32_t> o(static_cast<size_t>(kK * L));
  for (int64_t k = 0; k < kK; ++k)
    for (int64_t t = 0; t < L; ++t)
      o[k * L + t] = static_cast<int32_t>(cross_scan_pixel(k, t, H, W));
  return o;
}

xscan::Plan make_plan(const CrossScanArgs& a, const CrossScanDims& s, const Tensor& u,
                      const Tensor& delta, const Tensor& xdbl, const Tensor& A, const Tensor& Ds,
                      const Tensor& bias, const std::vector<int32_t>& order) {
  xscan::Plan p;
  p.s = s;
  p.softplus = a.delta_softplus;
  p.order = order.data();
  p.u = u.data();
  p.delta = delta.data();
  p.xdbl = xdbl.data();
  p.A = A.data();
  p.Ds = Ds.defined() ? Ds.data() : nullptr;
  p.bias = bias.defined() ? bias.data() : nullptr;
  return p;
}

Tensor opt_contig(const Tensor& t) { return t.defined() ? t.contiguous() : Tensor(); }

// x (B, H, W, D) -> (B, L, K D): row t holds x at order_k(t) in columns [k D, (k + 1) D).
Tensor gather_image(const Tensor& x_, const CrossScanDims& s, const std::vector<int32_t>& ord) {
  const int64_t Bt = s.batch, L = s.L(), D = s.D;
  const Tensor x = x_.contiguous();
  Tensor o = Tensor::empty({Bt, L, kK * D});
  const float* xp = x.data();
  float* op = o.data();
  parallel_for(Bt * L, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / L, t = r % L;
      for (int64_t k = 0; k < kK; ++k)
        std::memcpy(op + (r * kK + k) * D, xp + (b * L + ord[k * L + t]) * D, D * sizeof(float));
    }
  });
  return o;
}

// The copy path's gathered scan arguments: xs, delta (B, L, K D), B, C (B, L, K, N).
ScanArgs gather(const CrossScanArgs& a, const CrossScanDims& s, const std::vector<int32_t>& ord) {
  const int64_t Bt = s.batch, L = s.L(), D = s.D, N = s.N, E = s.E(), R = s.R;
  const Tensor delta = a.delta.contiguous(), xdbl = a.x_dbl.contiguous();
  ScanArgs sa;
  sa.u = gather_image(a.u, s, ord);
  sa.delta = Tensor::empty({Bt, L, kK * D});
  sa.B = Tensor::empty({Bt, L, kK, N});
  sa.C = Tensor::empty({Bt, L, kK, N});
  const float *dp = delta.data(), *xp = xdbl.data();
  float *ds = sa.delta.data(), *bs = sa.B.data(), *cs = sa.C.data();
  parallel_for(Bt * L, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / L, t = r % L;
      for (int64_t k = 0; k < kK; ++k) {
        const int64_t src = b * L + ord[k * L + t];
        std::memcpy(ds + (r * kK + k) * D, dp + (src * kK + k) * D, D * sizeof(float));
        std::memcpy(bs + (r * kK + k) * N, xp + (src * kK + k) * E + R, N * sizeof(float));
        std::memcpy(cs + (r * kK + k) * N, xp + (src * kK + k) * E + R + N, N * sizeof(float));
      }
    }
  });
  sa.A = a.A.contiguous();
  sa.D = opt_contig(a.Ds);
  sa.delta_bias = opt_contig(a.delta_bias);
  sa.delta_softplus = a.delta_softplus;
  return sa;
}

// (B, L, K D) in scan order -> (B, H, W, D): y[p] = sum_k x_k[t with order_k(t) = p], k in order.
Tensor merge(const Tensor& ys, const CrossScanDims& s, const std::vector<int32_t>& ord) {
  const int64_t Bt = s.batch, L = s.L(), D = s.D;
  // inverse tables: step of pixel p in direction k
  std::vector<int32_t> inv(ord.size());
  for (int64_t k = 0; k < kK; ++k)
    for (int64_t t = 0; t < L; ++t) inv[k * L + ord[k * L + t]] = static_cast<int32_t>(t);
  Tensor y = Tensor::empty({Bt, s.H, s.W, D});
  const float* src = ys.data();
  float* dst = y.data();
  parallel_for(Bt * L, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / L, pix = r % L;
      float* o = dst + r * D;
      for (int64_t k = 0; k < kK; ++k) {
        const float* x = src + ((b * L + inv[k * L + pix]) * kK + k) * D;
        if (k == 0)
          std::memcpy(o, x, D * sizeof(float));
        else
          for (int64_t d = 0; d < D; ++d) o[d] += x[d];
      }
    }
  });
  return y;
}

// The scan-order gradients of the copy path scattered back to the pixel layout.
CrossScanGrads scatter_grads(const ScanGrads& sg, const CrossScanDims& s,
                             const std::vector<int32_t>& ord) {
  const int64_t Bt = s.batch, L = s.L(), D = s.D, N = s.N, E = s.E(), R = s.R;
  CrossScanGrads g;
  g.du = merge(sg.du, s, ord);
  g.ddelta = Tensor::empty({Bt, s.H, s.W, kK, D});
  g.dx_dbl = Tensor::zeros({Bt, s.H, s.W, kK, E});
  const float *dd = sg.ddelta.data(), *db = sg.dB.data(), *dc = sg.dC.data();
  float *od = g.ddelta.data(), *ox = g.dx_dbl.data();
  parallel_for(Bt * L, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / L, t = r % L;
      for (int64_t k = 0; k < kK; ++k) {
        const int64_t dst = b * L + ord[k * L + t];
        std::memcpy(od + (dst * kK + k) * D, dd + (r * kK + k) * D, D * sizeof(float));
        std::memcpy(ox + (dst * kK + k) * E + R, db + (r * kK + k) * N, N * sizeof(float));
        std::memcpy(ox + (dst * kK + k) * E + R + N, dc + (r * kK + k) * N, N * sizeof(float));
      }
    }
  });
  g.dA = sg.dA;
  g.dDs = sg.dD;
  g.ddelta_bias = sg.ddelta_bias;
  return g;
}

}  // namespace

Tensor cross_scan_fwd(const CrossScanArgs& a, CrossScanImpl impl) {
  const CrossScanDims s = cross_scan_check(a);
  const std::vector<int32_t> ord = order_table(s.H, s.W);
  if (impl == CrossScanImpl::Copy) {
    const ScanArgs sa = gather(a, s, ord);
    return merge(selective_scan_fwd(sa), s, ord);
  }
  const Tensor u = a.u.contiguous(), delta = a.delta.contiguous(), xdbl = a.x_dbl.contiguous(),
               A = a.A.contiguous(), Ds = opt_contig(a.Ds), bias = opt_contig(a.delta_bias);
  xscan::Plan p = make_plan(a, s, u, delta, xdbl, A, Ds, bias, ord);
  Tensor y = Tensor::empty({s.batch, s.H, s.W, s.D});
  p.y = y.data();
  HWY_DYNAMIC_DISPATCH(CrossScanFwdKernel)(p);
  return y;
}

CrossScanGrads cross_scan_bwd(const CrossScanArgs& a, const Tensor& dy_, CrossScanImpl impl) {
  const CrossScanDims s = cross_scan_check(a, "cross_scan_bwd");
  check_shape(dy_, "cross_scan_bwd: dy", {s.batch, s.H, s.W, s.D});
  const std::vector<int32_t> ord = order_table(s.H, s.W);
  const Tensor dy = dy_.contiguous();
  if (impl == CrossScanImpl::Copy) {
    const ScanArgs sa = gather(a, s, ord);
    // dout in scan order: dy gathered per direction (the same gather as u)
    return scatter_grads(selective_scan_bwd(sa, gather_image(dy, s, ord)), s, ord);
  }
  const Tensor u = a.u.contiguous(), delta = a.delta.contiguous(), xdbl = a.x_dbl.contiguous(),
               A = a.A.contiguous(), Ds = opt_contig(a.Ds), bias = opt_contig(a.delta_bias);
  xscan::Plan p = make_plan(a, s, u, delta, xdbl, A, Ds, bias, ord);
  CrossScanGrads g;
  g.du = Tensor::empty({s.batch, s.H, s.W, s.D});
  g.ddelta = Tensor::empty({s.batch, s.H, s.W, kK, s.D});
  g.dx_dbl = Tensor::zeros({s.batch, s.H, s.W, kK, s.E()});
  g.dA = Tensor::empty({kK * s.D, s.N});
  if (Ds.defined()) g.dDs = Tensor::empty({kK * s.D});
  if (bias.defined()) g.ddelta_bias = Tensor::empty({kK * s.D});
  p.dy = dy.data();
  p.du = g.du.data();
  p.ddelta = g.ddelta.data();
  p.dxdbl = g.dx_dbl.data();
  p.dA = g.dA.data();
  p.dDs = Ds.defined() ? g.dDs.data() : nullptr;
  p.dbias = bias.defined() ? g.ddelta_bias.data() : nullptr;
  HWY_DYNAMIC_DISPATCH(CrossScanBwdKernel)(p);
  return g;
}

// ---- references ---------------------------------------------------------------------------

std::vector<double> cross_scan_ref_f64(const CrossScanArgs& a) {
  const CrossScanDims s = cross_scan_check(a, "cross_scan_ref");
  const Tensor u = a.u.contiguous(), delta = a.delta.contiguous(), xdbl = a.x_dbl.contiguous(),
               A = a.A.contiguous();
  const int64_t H = s.H, W = s.W, L = s.L(), D = s.D, N = s.N, E = s.E(), R = s.R;
  std::vector<double> y(static_cast<size_t>(s.batch * L * D), 0.0), h(N);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t k = 0; k < kK; ++k)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t c = k * D + d;
        std::fill(h.begin(), h.end(), 0.0);
        for (int64_t t = 0; t < L; ++t) {
          // the pixel of step t, written out per direction
          int64_t i, j;
          const int64_t tt = k >= 2 ? L - 1 - t : t;
          if (k % 2 == 0)
            i = tt / W, j = tt % W;
          else
            j = tt / H, i = tt % H;
          const int64_t pix = b * L + i * W + j;
          double dt = (double)delta[(pix * kK + k) * D + d] +
                      (a.delta_bias.defined() ? (double)a.delta_bias[c] : 0.0);
          if (a.delta_softplus) dt = dt > 20.0 ? dt : std::log1p(std::exp(dt));
          const double uv = u[pix * D + d];
          double yv = a.Ds.defined() ? (double)a.Ds[c] * uv : 0.0;
          for (int64_t n = 0; n < N; ++n) {
            const double Bv = xdbl[(pix * kK + k) * E + R + n];
            const double Cv = xdbl[(pix * kK + k) * E + R + N + n];
            h[n] = std::exp(dt * (double)A[c * N + n]) * h[n] + dt * Bv * uv;
            yv += h[n] * Cv;
          }
          y[pix * D + d] += yv;
        }
      }
  return y;
}

Tensor cross_scan_ref(const CrossScanArgs& a) {
  const std::vector<double> y = cross_scan_ref_f64(a);
  Tensor o = Tensor::empty(a.u.shape());
  for (int64_t i = 0; i < o.numel(); ++i) o[i] = static_cast<float>(y[i]);
  return o;
}

CrossScanGrads cross_scan_bwd_ref(const CrossScanArgs& a, const Tensor& dy) {
  const CrossScanDims s = cross_scan_check(a, "cross_scan_bwd_ref");
  check_shape(dy, "cross_scan_bwd_ref: dy", {s.batch, s.H, s.W, s.D});
  const std::vector<int32_t> ord = order_table(s.H, s.W);
  const ScanArgs sa = gather(a, s, ord);
  return scatter_grads(selective_scan_bwd_ref(sa, gather_image(dy, s, ord)), s, ord);
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
