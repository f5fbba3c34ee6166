// Selective scan (Mamba-1): the fast CPU forward, backward and decode step, vectorised with
// Highway and dispatched at run time. The naive references and the argument checks are in
// selective_scan_ref.cpp.
//
// Forward, vectorised ACROSS CHANNELS (D): work item = (batch b, block of `lanes` consecutive
// channels d0..d0+lanes). The state of a block, h (N x lanes), stays in L1; per time step
//   dt = softplus?(delta + bias),  dA_n = exp(dt * A[:, n]),  h_n = dA_n h_n + dt u B_n,
//   y = sum_n h_n C_n + D u,  out = y * silu(z)
// all as vectors over the block's channels. A and const B/C are staged per block as (N, lanes)
// (the pre-transposed (N, D) slice); var/group B/C are broadcast per (t, n) (a block that
// straddles two groups gathers per lane). A partial last block (D not a multiple of lanes) is
// staged through zero-padded buffers. A thread runs all its blocks over a tile of kTile steps
// before the next tile: consecutive steps of a block are D floats apart, and walking all L
// pages block by block thrashed the TLB (3x slower at D=1536, L=2048).
//
// Backward: pass 1 keeps h every kChunk steps (checkpoints); then chunk by chunk from the end,
// each block's chunk states and exp values are recomputed into a per-thread buffer and the
// reverse recurrence runs over them. dA, dD, ddelta_bias and const dB/dC are per channel and
// accumulated per block; var/group dB/dC (sums over channels per (b, t, n)) are accumulated as
// vectors into a per-thread chunk buffer, summed over lanes into per-part rows, and those are
// summed over the parts in part order after the parallel region: no races, and bitwise
// reproducible for a given thread count.
//
// Decode step (selective_state_update): one token, the state row (N) of a channel is
// contiguous, so it is vectorised across N instead.
//
// NaN: propagated as in the reference (the shared vector math, ops/simd_math-inl.h, maps NaN
// to NaN in every lane, and the scalar tails do the same).
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/selective_scan.cpp"
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>
#include <hwy/cache_control.h>
#include "ops/simd_math-inl.h"  // Exp, Softplus, SoftplusGrad, Sigmoid (one NaN rule)
// clang-format on

#include "ops/selective_scan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "mamba/parallel.h"
#include "ops/act.h"

#ifndef MAMBA_SELECTIVE_SCAN_PLAN_ONCE
#define MAMBA_SELECTIVE_SCAN_PLAN_ONCE
namespace mamba::ops::scan_detail {

constexpr int64_t kChunk = 64;  // backward checkpoint interval (time steps)
// Below this many state updates (L * N * channels) per thread, threads cost more than they
// save: small problems run on the calling thread.
constexpr int64_t kMinWorkPerThread = 1 << 16;
// Steps ahead to prefetch: consecutive steps of a block are D floats apart, a stride the
// hardware prefetcher does not follow across pages.
constexpr int64_t kPrefetch = 8;
// Time tile: a thread runs all its channel blocks over kTile steps before the next tile, so
// the pages of those steps' rows (one per step and tensor: rows are D floats apart) stay in
// the TLB instead of every block walking all L pages alone.
constexpr int64_t kTile = 32;

// Raw pointers and dimensions shared by every SIMD target's kernels.
struct Plan {
  ScanDims s;
  bool softplus = false;
  const float *u = nullptr, *delta = nullptr, *A = nullptr, *B = nullptr, *C = nullptr;
  const float *Dskip = nullptr, *z = nullptr, *bias = nullptr, *h0 = nullptr;
  float *out = nullptr, *last = nullptr;
  // backward
  const float* dout = nullptr;
  float *du = nullptr, *ddelta = nullptr, *dz = nullptr, *dA = nullptr, *dB = nullptr,
        *dC = nullptr;
  float *dD = nullptr, *dbias = nullptr, *dh0 = nullptr;
  bool reverse = false;  // step t reads memory row L-1-t (ScanArgs::reverse)

  // Memory row (b, time) of scan step t: the kernels run over steps t = 0..L-1 and read every
  // (B, L, ·) tensor through this map, so a reverse scan is a negative stride, not a copy.
  int64_t row(int64_t b, int64_t t) const { return b * s.L + (reverse ? s.L - 1 - t : t); }
  // Distance in floats from step t's (B, L, D) row to step t+1's.
  int64_t step_stride() const { return reverse ? -s.D : s.D; }
  // Offset of the N values of B (or C) for (b, t) and group g.
  int64_t bc_row(ScanBCKind kind, int64_t G, int64_t b, int64_t t, int64_t g) const {
    return kind == ScanBCKind::Var ? row(b, t) * s.N : (row(b, t) * G + g) * s.N;
  }
};

// Arguments of one decode step (selective_state_update).
struct StepPlan {
  StepDims s;
  bool softplus = false;
  float* state = nullptr;
  const float *x = nullptr, *dt = nullptr, *A = nullptr, *B = nullptr, *C = nullptr;
  const float *Dskip = nullptr, *z = nullptr, *bias = nullptr;
  float* y = nullptr;
};

}  // namespace mamba::ops::scan_detail
#endif

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;
using scan_detail::Plan;
using scan_detail::StepPlan;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Loads nl <= lanes floats (the rest zero) / stores the first nl lanes.
HWY_INLINE VF LoadPart(DF d, const float* p, size_t nl, float* tmp) {
  if (nl == hn::Lanes(d)) return hn::LoadU(d, p);
  std::memset(tmp, 0, hn::Lanes(d) * sizeof(float));
  std::memcpy(tmp, p, nl * sizeof(float));
  return hn::LoadU(d, tmp);
}
HWY_INLINE void StorePart(DF d, VF v, float* p, size_t nl, float* tmp) {
  if (nl == hn::Lanes(d)) return hn::StoreU(v, d, p);
  hn::StoreU(v, d, tmp);
  std::memcpy(p, tmp, nl * sizeof(float));
}

// Prefetches the rows of step t + kPrefetch (offset off of step t) of the (B, L, D) inputs.
HWY_INLINE void PrefetchAhead(const Plan& p, int64_t t, int64_t off, bool with_out) {
  if (t + scan_detail::kPrefetch >= p.s.L) return;
  const int64_t o = off + scan_detail::kPrefetch * p.step_stride();
  hwy::Prefetch(p.u + o);
  hwy::Prefetch(p.delta + o);
  if (p.z) hwy::Prefetch(p.z + o);
  if (with_out) hwy::Prefetch(p.out + o);
}

// The shared vector math (src/ops/simd_math-inl.h); ExpInRange only where dt >= 0 finite and
// A <= 0 finite were checked.
namespace sm = simd_math;  // called qualified: see simd_math-inl.h

// Per-thread scratch for one block of channels.
struct Block {
  int64_t b = 0, d0 = 0;
  size_t nl = 0;  // valid lanes
  size_t lanes = 0;
  std::vector<float> A;       // (N, lanes)
  std::vector<float> Bs, Cs;  // (N, lanes): B and C for the current step (const: staged once)
  std::vector<float> tmp;     // lanes
  // The groups the block's channels fall in, for B and C: [g_first, g_last].
  int64_t gb0 = 0, gb1 = 0, gc0 = 0, gc1 = 0;
  bool a_nonpos = false;  // every A of the block finite and <= 0
};

// h (N, lanes) = the block's initial state (zero without one, and in padding lanes).
void InitState(const Plan& p, const Block& k, float* h) {
  const int64_t N = p.s.N, D = p.s.D;
  for (int64_t n = 0; n < N; ++n)
    for (size_t l = 0; l < k.lanes; ++l)
      h[n * k.lanes + l] = (p.h0 && l < k.nl) ? p.h0[(k.b * D + k.d0 + l) * N + n] : 0.f;
}

void BlockInit(const Plan& p, Block& k, int64_t b, int64_t d0, size_t lanes) {
  const int64_t N = p.s.N, D = p.s.D;
  k.b = b, k.d0 = d0, k.lanes = lanes;
  k.nl = static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(lanes), D - d0));
  k.A.assign(N * lanes, 0.f);
  k.Bs.assign(N * lanes, 0.f);
  k.Cs.assign(N * lanes, 0.f);
  k.tmp.assign(lanes, 0.f);
  for (size_t l = 0; l < k.nl; ++l)
    for (int64_t n = 0; n < N; ++n) k.A[n * lanes + l] = p.A[(d0 + l) * N + n];
  if (p.s.b_kind == ScanBCKind::Const)
    for (size_t l = 0; l < k.nl; ++l)
      for (int64_t n = 0; n < N; ++n) k.Bs[n * lanes + l] = p.B[(d0 + l) * N + n];
  if (p.s.c_kind == ScanBCKind::Const)
    for (size_t l = 0; l < k.nl; ++l)
      for (int64_t n = 0; n < N; ++n) k.Cs[n * lanes + l] = p.C[(d0 + l) * N + n];
  const int64_t last = d0 + static_cast<int64_t>(k.nl) - 1;
  k.gb0 = d0 / (D / p.s.b_groups), k.gb1 = last / (D / p.s.b_groups);
  k.gc0 = d0 / (D / p.s.c_groups), k.gc1 = last / (D / p.s.c_groups);
  k.a_nonpos = true;
  for (float v : k.A)
    if (!(v <= 0.f) || std::isinf(v)) k.a_nonpos = false;
}

// Fills dst (N, lanes) with B (or C) at step t for the block's channels (var/group kinds).
HWY_INLINE void StageBC(DF d, const Plan& p, const Block& k, ScanBCKind kind, const float* src,
                        int64_t G, int64_t g0, int64_t g1, int64_t t, float* dst) {
  const int64_t N = p.s.N;
  const size_t lanes = k.lanes;
  if (kind == ScanBCKind::Const) return;
  if (g0 == g1) {  // every channel of the block reads the same row: broadcast
    const float* row = src + p.bc_row(kind, G, k.b, t, g0);
    for (int64_t n = 0; n < N; ++n) hn::StoreU(hn::Set(d, row[n]), d, dst + n * lanes);
    return;
  }
  const int64_t per = p.s.D / G;
  for (size_t l = 0; l < k.nl; ++l) {
    const float* row = src + p.bc_row(kind, G, k.b, t, (k.d0 + static_cast<int64_t>(l)) / per);
    for (int64_t n = 0; n < N; ++n) dst[n * lanes + l] = row[n];
  }
}

// ---- forward ----------------------------------------------------------------------------------

// One time step for the block: h_n = exp(dt A_n) h_n + dtu B_n, returns sum_n h_n C_n.
// kBB / kCB: B / C is one row broadcast to every lane (var kind, or a group covering the
// block) read from Bp[n]; otherwise Bp is staged (N, lanes). kSafe: dt*A may be NaN or
// positive (clamped, NaN kept); otherwise dt >= 0 finite and A <= 0 finite were checked.
template <bool kBB, bool kCB, bool kSafe>
HWY_INLINE VF FwdStep(DF d, int64_t N, size_t lanes, const float* HWY_RESTRICT As,
                      float* HWY_RESTRICT h, const float* Bp, const float* Cp, VF dt, VF dtu) {
  VF y0 = hn::Zero(d), y1 = hn::Zero(d);
  auto bval = [&](int64_t n) { return kBB ? hn::Set(d, Bp[n]) : hn::LoadU(d, Bp + n * lanes); };
  auto cval = [&](int64_t n) { return kCB ? hn::Set(d, Cp[n]) : hn::LoadU(d, Cp + n * lanes); };
  auto expo = [&](VF x) { return kSafe ? sm::Exp(d, x) : sm::ExpInRange(d, x); };
  int64_t n = 0;
  for (; n + 2 <= N; n += 2) {
    const VF e0 = expo(hn::Mul(dt, hn::LoadU(d, As + n * lanes)));
    const VF e1 = expo(hn::Mul(dt, hn::LoadU(d, As + (n + 1) * lanes)));
    const VF h0 = hn::MulAdd(e0, hn::LoadU(d, h + n * lanes), hn::Mul(dtu, bval(n)));
    const VF h1 = hn::MulAdd(e1, hn::LoadU(d, h + (n + 1) * lanes), hn::Mul(dtu, bval(n + 1)));
    hn::StoreU(h0, d, h + n * lanes);
    hn::StoreU(h1, d, h + (n + 1) * lanes);
    y0 = hn::MulAdd(h0, cval(n), y0);
    y1 = hn::MulAdd(h1, cval(n + 1), y1);
  }
  for (; n < N; ++n) {
    const VF e0 = expo(hn::Mul(dt, hn::LoadU(d, As + n * lanes)));
    const VF h0 = hn::MulAdd(e0, hn::LoadU(d, h + n * lanes), hn::Mul(dtu, bval(n)));
    hn::StoreU(h0, d, h + n * lanes);
    y0 = hn::MulAdd(h0, cval(n), y0);
  }
  return hn::Add(y0, y1);
}

// Steps [t0, t1) of one block; h (N, lanes) is its running state.
template <bool kBB, bool kCB>
void FwdSteps(const Plan& p, Block& k, float* h, int64_t t0, int64_t t1) {
  const DF d;
  const int64_t N = p.s.N, D = p.s.D, b = k.b, d0 = k.d0;
  const size_t lanes = k.lanes, nl = k.nl;
  float* tmp = k.tmp.data();
  const VF Dv = p.Dskip ? LoadPart(d, p.Dskip + d0, nl, tmp) : hn::Zero(d);
  const VF bias = p.bias ? LoadPart(d, p.bias + d0, nl, tmp) : hn::Zero(d);
  const VF inf = hn::Set(d, HUGE_VALF);
  const float* As = k.A.data();
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t off = p.row(b, t) * D + d0;
    PrefetchAhead(p, t, off, true);
    VF dt = hn::Add(LoadPart(d, p.delta + off, nl, tmp), bias);
    if (p.softplus) dt = sm::Softplus(d, dt);
    const VF u = LoadPart(d, p.u + off, nl, tmp);
    const VF dtu = hn::Mul(dt, u);
    const float* Bp = k.Bs.data();
    const float* Cp = k.Cs.data();
    if (kBB)
      Bp = p.B + p.bc_row(p.s.b_kind, p.s.b_groups, b, t, k.gb0);
    else
      StageBC(d, p, k, p.s.b_kind, p.B, p.s.b_groups, k.gb0, k.gb1, t, k.Bs.data());
    if (kCB)
      Cp = p.C + p.bc_row(p.s.c_kind, p.s.c_groups, b, t, k.gc0);
    else
      StageBC(d, p, k, p.s.c_kind, p.C, p.s.c_groups, k.gc0, k.gc1, t, k.Cs.data());
    const bool fast =
        k.a_nonpos && hn::AllTrue(d, hn::And(hn::Ge(dt, hn::Zero(d)), hn::Lt(dt, inf)));
    VF y = fast ? FwdStep<kBB, kCB, false>(d, N, lanes, As, h, Bp, Cp, dt, dtu)
                : FwdStep<kBB, kCB, true>(d, N, lanes, As, h, Bp, Cp, dt, dtu);
    y = hn::MulAdd(Dv, u, y);
    if (p.z) {
      const VF z = LoadPart(d, p.z + off, nl, tmp);
      y = hn::Mul(y, sm::Silu(d, z));
    }
    StorePart(d, y, p.out + off, nl, tmp);
  }
}

// B (or C) is one broadcast row for the whole block: var kind, or group kind with the block
// inside one group.
bool Broadcast(ScanBCKind kind, int64_t g0, int64_t g1) {
  return kind == ScanBCKind::Var || (kind == ScanBCKind::Group && g0 == g1);
}

void ScanFwdKernel(const Plan& p) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const int64_t N = p.s.N, D = p.s.D, L = p.s.L, NL = N * static_cast<int64_t>(lanes);
  const int64_t nblk = (D + static_cast<int64_t>(lanes) - 1) / static_cast<int64_t>(lanes);
  const int64_t items = p.s.batch * nblk;
  const int64_t work = std::max<int64_t>(1, L * NL);
  parallel_for(
      items, (scan_detail::kMinWorkPerThread + work - 1) / work, [&](int64_t i0, int64_t i1) {
        static thread_local std::vector<Block> blocks;
        static thread_local std::vector<float> h;
        for (int64_t s0 = i0; s0 < i1;) {  // runs of items of one batch
          const int64_t b = s0 / nblk, s1 = std::min(i1, (b + 1) * nblk), nb = s1 - s0;
          if (static_cast<int64_t>(blocks.size()) < nb) blocks.resize(nb);
          if (static_cast<int64_t>(h.size()) < nb * NL) h.resize(nb * NL);
          for (int64_t i = 0; i < nb; ++i) {
            BlockInit(p, blocks[i], b, ((s0 + i) % nblk) * static_cast<int64_t>(lanes), lanes);
            InitState(p, blocks[i], h.data() + i * NL);
          }
          for (int64_t t0 = 0; t0 < L; t0 += scan_detail::kTile) {
            const int64_t t1 = std::min(L, t0 + scan_detail::kTile);
            for (int64_t i = 0; i < nb; ++i) {
              Block& k = blocks[i];
              float* hk = h.data() + i * NL;
              const bool bb = Broadcast(p.s.b_kind, k.gb0, k.gb1),
                         cb = Broadcast(p.s.c_kind, k.gc0, k.gc1);
              if (bb && cb)
                FwdSteps<true, true>(p, k, hk, t0, t1);
              else if (bb)
                FwdSteps<true, false>(p, k, hk, t0, t1);
              else if (cb)
                FwdSteps<false, true>(p, k, hk, t0, t1);
              else
                FwdSteps<false, false>(p, k, hk, t0, t1);
            }
          }
          if (p.last)
            for (int64_t i = 0; i < nb; ++i) {
              const Block& k = blocks[i];
              for (size_t l = 0; l < k.nl; ++l)
                for (int64_t n = 0; n < N; ++n)
                  p.last[(b * D + k.d0 + l) * N + n] = h[i * NL + n * lanes + l];
            }
          s0 = s1;
        }
      });
}

// ---- backward ---------------------------------------------------------------------------------
//
// Part q (one per thread) owns a contiguous range of channel blocks. For each batch b:
//   pass 1, per block: run the recurrence, saving h at the start of every chunk;
//   then chunks from the last to the first; per chunk, per block: recompute the chunk's
//   states and exp values, run the reverse recurrence (carry = dL/dh kept per block), and
//   add the var/group dB/dC contributions (vectors over the block's lanes) into a chunk
//   buffer (T, G, N, lanes) shared by the part's blocks; at the end of the chunk that buffer
//   is summed over lanes into the part's rows (L, G, N). The parts' rows are then summed.

struct PartScratch {
  int64_t nbk = 0;
  std::vector<Block> blocks;
  std::vector<float> ckpt, carry, dAacc, dBacc, dCacc, dDacc, dbacc;  // per block
  std::vector<float> H, E, Y, dtv, spg, dBstep, dCstep, mask, chunkB, chunkC;
  void init(const Plan& p, size_t lanes, int64_t nblocks) {
    const int64_t N = p.s.N, C = scan_detail::kChunk, NL = N * static_cast<int64_t>(lanes);
    const int64_t nchunks = (p.s.L + C - 1) / C;
    nbk = nblocks;
    blocks.resize(nblocks);
    ckpt.resize(nblocks * nchunks * NL);
    for (auto* v : {&carry, &dAacc, &dBacc, &dCacc}) v->resize(nblocks * NL);
    dDacc.resize(nblocks * lanes);
    dbacc.resize(nblocks * lanes);
    H.resize((C + 1) * NL);
    E.resize(C * NL);
    for (auto* v : {&Y, &dtv, &spg}) v->resize(C * lanes);
    dBstep.resize(NL);
    dCstep.resize(NL);
    mask.resize(lanes);
    if (p.s.b_kind != ScanBCKind::Const) chunkB.resize(C * p.s.b_groups * NL);
    if (p.s.c_kind != ScanBCKind::Const) chunkC.resize(C * p.s.c_groups * NL);
  }
};

// chunk (T, G, N, lanes) row (j, g) += step (N, lanes) for the lanes of the block in group g
// (a block may straddle groups).
void AddToChunk(DF d, const Plan& p, const Block& k, int64_t G, int64_t g0, int64_t g1, int64_t j,
                const float* step, float* chunk, float* mask) {
  const int64_t N = p.s.N;
  const size_t lanes = k.lanes;
  if (g0 == g1 && k.nl == lanes) {
    float* row = chunk + (j * G + g0) * N * static_cast<int64_t>(lanes);
    for (int64_t n = 0; n < N; ++n)
      hn::StoreU(hn::Add(hn::LoadU(d, row + n * lanes), hn::LoadU(d, step + n * lanes)), d,
                 row + n * lanes);
    return;
  }
  const int64_t per = p.s.D / G;
  for (int64_t g = g0; g <= g1; ++g) {
    for (size_t l = 0; l < lanes; ++l) {
      const int64_t ch = k.d0 + static_cast<int64_t>(l);
      mask[l] = (l < k.nl && ch / per == g) ? 1.f : 0.f;
    }
    const VF m = hn::LoadU(d, mask);
    float* row = chunk + (j * G + g) * N * static_cast<int64_t>(lanes);
    for (int64_t n = 0; n < N; ++n)
      hn::StoreU(hn::MulAdd(m, hn::LoadU(d, step + n * lanes), hn::LoadU(d, row + n * lanes)), d,
                 row + n * lanes);
  }
}

// dt (and softplus') for the block at step t.
HWY_INLINE VF DeltaT(DF d, const Plan& p, const Block& k, int64_t off, VF bias, VF* spg) {
  const VF v = hn::Add(LoadPart(d, p.delta + off, k.nl, const_cast<float*>(k.tmp.data())), bias);
  if (!p.softplus) {
    if (spg) *spg = hn::Set(d, 1.f);
    return v;
  }
  if (spg) *spg = sm::SoftplusGrad(d, v);
  return sm::Softplus(d, v);
}

// Pass 1, steps [t0, t1) of one block: h (N, lanes) is its running state; the state at the
// start of every chunk goes to ckpt (nchunks, N, lanes).
void BwdCheckpoints(const Plan& p, Block& k, float* ckpt, float* h, int64_t t0, int64_t t1) {
  const DF d;
  const int64_t N = p.s.N, L = p.s.L, D = p.s.D, b = k.b, d0 = k.d0, C = scan_detail::kChunk;
  const size_t lanes = k.lanes, nl = k.nl;
  const int64_t NL = N * static_cast<int64_t>(lanes);
  float* tmp = k.tmp.data();
  const VF bias = p.bias ? LoadPart(d, p.bias + d0, nl, tmp) : hn::Zero(d);
  const float* As = k.A.data();
  for (int64_t t = t0; t < t1; ++t) {
    if (t % C == 0) std::memcpy(ckpt + (t / C) * NL, h, NL * sizeof(float));
    if (t + 1 == L) break;  // the last state is not needed
    const int64_t off = p.row(b, t) * D + d0;
    PrefetchAhead(p, t, off, false);
    const VF dt = DeltaT(d, p, k, off, bias, nullptr);
    const VF dtu = hn::Mul(dt, LoadPart(d, p.u + off, nl, tmp));
    StageBC(d, p, k, p.s.b_kind, p.B, p.s.b_groups, k.gb0, k.gb1, t, k.Bs.data());
    const float* Bs = k.Bs.data();
    for (int64_t n = 0; n < N; ++n) {
      const VF e = sm::Exp(d, hn::Mul(dt, hn::LoadU(d, As + n * lanes)));
      hn::StoreU(
          hn::MulAdd(e, hn::LoadU(d, h + n * lanes), hn::Mul(dtu, hn::LoadU(d, Bs + n * lanes))), d,
          h + n * lanes);
    }
  }
}

// Chunk c of block i of the part: recompute, then the reverse recurrence.
void BwdChunk(const Plan& p, PartScratch& w, int64_t i, int64_t c) {
  const DF d;
  Block& k = w.blocks[i];
  const int64_t N = p.s.N, L = p.s.L, D = p.s.D, b = k.b, d0 = k.d0, C = scan_detail::kChunk;
  const size_t lanes = k.lanes, nl = k.nl;
  const int64_t NL = N * static_cast<int64_t>(lanes);
  const int64_t nchunks = (L + C - 1) / C;
  const int64_t t0 = c * C, T = std::min(L, t0 + C) - t0;
  float* tmp = k.tmp.data();
  const float* As = k.A.data();
  float* Bs = k.Bs.data();
  float* Cs = k.Cs.data();
  const bool bvar = p.s.b_kind != ScanBCKind::Const, cvar = p.s.c_kind != ScanBCKind::Const;
  const VF Dv = p.Dskip ? LoadPart(d, p.Dskip + d0, nl, tmp) : hn::Zero(d);
  const VF bias = p.bias ? LoadPart(d, p.bias + d0, nl, tmp) : hn::Zero(d);
  float* H = w.H.data();
  float* E = w.E.data();
  float* carry = w.carry.data() + i * NL;
  float* dAacc = w.dAacc.data() + i * NL;
  float* dBacc = w.dBacc.data() + i * NL;
  float* dCacc = w.dCacc.data() + i * NL;
  std::memcpy(H, w.ckpt.data() + (i * nchunks + c) * NL, NL * sizeof(float));
  // Recompute: H[j+1] = h after step t0+j, E[j] = exp(dt A), Y[j] = y + D u.
  for (int64_t j = 0; j < T; ++j) {
    const int64_t t = t0 + j, off = p.row(b, t) * D + d0;
    PrefetchAhead(p, t, off, false);
    if (t + scan_detail::kPrefetch < L)
      hwy::Prefetch(p.dout + off + scan_detail::kPrefetch * p.step_stride());
    VF spg;
    const VF dt = DeltaT(d, p, k, off, bias, &spg);
    hn::StoreU(dt, d, w.dtv.data() + j * lanes);
    hn::StoreU(spg, d, w.spg.data() + j * lanes);
    const VF u = LoadPart(d, p.u + off, nl, tmp);
    const VF dtu = hn::Mul(dt, u);
    StageBC(d, p, k, p.s.b_kind, p.B, p.s.b_groups, k.gb0, k.gb1, t, Bs);
    StageBC(d, p, k, p.s.c_kind, p.C, p.s.c_groups, k.gc0, k.gc1, t, Cs);
    const float* hp = H + j * NL;
    float* hc = H + (j + 1) * NL;
    float* ej = E + j * NL;
    VF y = hn::Zero(d);
    for (int64_t n = 0; n < N; ++n) {
      const VF e = sm::Exp(d, hn::Mul(dt, hn::LoadU(d, As + n * lanes)));
      hn::StoreU(e, d, ej + n * lanes);
      const VF hv =
          hn::MulAdd(e, hn::LoadU(d, hp + n * lanes), hn::Mul(dtu, hn::LoadU(d, Bs + n * lanes)));
      hn::StoreU(hv, d, hc + n * lanes);
      y = hn::MulAdd(hv, hn::LoadU(d, Cs + n * lanes), y);
    }
    hn::StoreU(hn::MulAdd(Dv, u, y), d, w.Y.data() + j * lanes);
  }
  // Reverse.
  VF dDacc = hn::LoadU(d, w.dDacc.data() + i * lanes),
     dbacc = hn::LoadU(d, w.dbacc.data() + i * lanes);
  for (int64_t j = T - 1; j >= 0; --j) {
    const int64_t t = t0 + j, off = p.row(b, t) * D + d0;
    const VF dt = hn::LoadU(d, w.dtv.data() + j * lanes);
    const VF u = LoadPart(d, p.u + off, nl, tmp);
    const VF dtu = hn::Mul(dt, u);
    VF dy = LoadPart(d, p.dout + off, nl, tmp);
    if (p.z) {
      const VF z = LoadPart(d, p.z + off, nl, tmp);
      const VF sg = sm::Sigmoid(d, z);
      const VF dsilu = sm::SiluGradOfSigmoid(d, z, sg);
      StorePart(d, hn::Mul(hn::Mul(dy, hn::LoadU(d, w.Y.data() + j * lanes)), dsilu), p.dz + off,
                nl, tmp);
      dy = hn::Mul(dy, hn::Mul(z, sg));
    }
    dDacc = hn::MulAdd(dy, u, dDacc);
    StageBC(d, p, k, p.s.b_kind, p.B, p.s.b_groups, k.gb0, k.gb1, t, Bs);
    StageBC(d, p, k, p.s.c_kind, p.C, p.s.c_groups, k.gc0, k.gc1, t, Cs);
    const float* hp = H + j * NL;
    const float* hc = H + (j + 1) * NL;
    const float* ej = E + j * NL;
    // Where dB/dC of this step go: const kinds accumulate per channel; var/group kinds go
    // straight into the chunk row when the whole block is in one group, else via AddToChunk.
    const bool bdirect = bvar && k.gb0 == k.gb1 && nl == lanes;
    const bool cdirect = cvar && k.gc0 == k.gc1 && nl == lanes;
    float* dBdst = !bvar     ? dBacc
                   : bdirect ? w.chunkB.data() + (j * p.s.b_groups + k.gb0) * NL
                             : w.dBstep.data();
    float* dCdst = !cvar     ? dCacc
                   : cdirect ? w.chunkC.data() + (j * p.s.c_groups + k.gc0) * NL
                             : w.dCstep.data();
    const bool badd = !bvar || bdirect, cadd = !cvar || cdirect;
    VF gB = hn::Zero(d), ddt = hn::Zero(d);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = n * static_cast<int64_t>(lanes);
      const VF e = hn::LoadU(d, ej + o);
      const VF g = hn::MulAdd(dy, hn::LoadU(d, Cs + o), hn::LoadU(d, carry + o));  // dL/dh_t
      const VF dC = hn::Mul(dy, hn::LoadU(d, hc + o));
      const VF dB = hn::Mul(g, dtu);
      hn::StoreU(cadd ? hn::Add(dC, hn::LoadU(d, dCdst + o)) : dC, d, dCdst + o);
      hn::StoreU(badd ? hn::Add(dB, hn::LoadU(d, dBdst + o)) : dB, d, dBdst + o);
      gB = hn::MulAdd(g, hn::LoadU(d, Bs + o), gB);
      const VF ghe = hn::Mul(hn::Mul(g, hn::LoadU(d, hp + o)), e);
      ddt = hn::MulAdd(ghe, hn::LoadU(d, As + o), ddt);
      hn::StoreU(hn::MulAdd(ghe, dt, hn::LoadU(d, dAacc + o)), d, dAacc + o);
      hn::StoreU(hn::Mul(e, g), d, carry + o);
    }
    if (bvar && !bdirect)
      AddToChunk(d, p, k, p.s.b_groups, k.gb0, k.gb1, j, w.dBstep.data(), w.chunkB.data(),
                 w.mask.data());
    if (cvar && !cdirect)
      AddToChunk(d, p, k, p.s.c_groups, k.gc0, k.gc1, j, w.dCstep.data(), w.chunkC.data(),
                 w.mask.data());
    const VF du = hn::MulAdd(dt, gB, hn::Mul(dy, Dv));
    ddt = hn::MulAdd(u, gB, ddt);
    const VF dd = hn::Mul(ddt, hn::LoadU(d, w.spg.data() + j * lanes));
    StorePart(d, du, p.du + off, nl, tmp);
    StorePart(d, dd, p.ddelta + off, nl, tmp);
    dbacc = hn::Add(dbacc, dd);
  }
  hn::StoreU(dDacc, d, w.dDacc.data() + i * lanes);
  hn::StoreU(dbacc, d, w.dbacc.data() + i * lanes);
}

// rows[r] = sum over lanes of chunk[r] (lanes floats each), r < nrows.
void SumLanes(const float* chunk, int64_t nrows, size_t lanes, float* rows) {
  for (int64_t r = 0; r < nrows; ++r) {
    double s = 0;
    for (size_t l = 0; l < lanes; ++l) s += chunk[r * static_cast<int64_t>(lanes) + l];
    rows[r] = static_cast<float>(s);
  }
}

void BwdPart(const Plan& p, PartScratch& w, int64_t b, int64_t blk0, size_t lanes, float* rowsB,
             float* rowsC) {
  const int64_t N = p.s.N, L = p.s.L, D = p.s.D, C = scan_detail::kChunk;
  const int64_t NL = N * static_cast<int64_t>(lanes), nchunks = (L + C - 1) / C;
  const bool bvar = p.s.b_kind != ScanBCKind::Const, cvar = p.s.c_kind != ScanBCKind::Const;
  // Pass 1 in time tiles over all the part's blocks (carry holds the running states).
  for (int64_t i = 0; i < w.nbk; ++i) {
    BlockInit(p, w.blocks[i], b, (blk0 + i) * static_cast<int64_t>(lanes), lanes);
    InitState(p, w.blocks[i], w.carry.data() + i * NL);
  }
  for (int64_t t0 = 0; t0 < L; t0 += scan_detail::kTile)
    for (int64_t i = 0; i < w.nbk; ++i)
      BwdCheckpoints(p, w.blocks[i], w.ckpt.data() + i * nchunks * NL, w.carry.data() + i * NL, t0,
                     std::min(L, t0 + scan_detail::kTile));
  for (auto* v : {&w.carry, &w.dAacc, &w.dBacc, &w.dCacc, &w.dDacc, &w.dbacc})
    std::fill(v->begin(), v->end(), 0.f);
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t t0 = c * C, T = std::min(L, t0 + C) - t0;
    if (bvar) std::fill(w.chunkB.begin(), w.chunkB.end(), 0.f);
    if (cvar) std::fill(w.chunkC.begin(), w.chunkC.end(), 0.f);
    for (int64_t i = 0; i < w.nbk; ++i) BwdChunk(p, w, i, c);
    // Step t's rows go to its memory time (reverse: L-1-t).
    for (int64_t j = 0; j < T; ++j) {
      const int64_t mt = p.row(0, t0 + j);
      const int64_t GNB = p.s.b_groups * N, GNC = p.s.c_groups * N;
      if (bvar)
        SumLanes(w.chunkB.data() + j * GNB * static_cast<int64_t>(lanes), GNB, lanes,
                 rowsB + mt * GNB);
      if (cvar)
        SumLanes(w.chunkC.data() + j * GNC * static_cast<int64_t>(lanes), GNC, lanes,
                 rowsC + mt * GNC);
    }
  }
  // Per-channel results: the part owns its channels, batches run one after another.
  for (int64_t i = 0; i < w.nbk; ++i) {
    const Block& k = w.blocks[i];
    for (size_t l = 0; l < k.nl; ++l) {
      const int64_t ch = k.d0 + static_cast<int64_t>(l);
      for (int64_t n = 0; n < N; ++n) {
        const int64_t o = i * NL + n * static_cast<int64_t>(lanes) + static_cast<int64_t>(l);
        p.dA[ch * N + n] += w.dAacc[o];
        if (!bvar) p.dB[ch * N + n] += w.dBacc[o];
        if (!cvar) p.dC[ch * N + n] += w.dCacc[o];
        if (p.dh0) p.dh0[(b * D + ch) * N + n] = w.carry[o];
      }
      if (p.dD) p.dD[ch] += w.dDacc[i * lanes + l];
      if (p.dbias) p.dbias[ch] += w.dbacc[i * lanes + l];
    }
  }
}

void ScanBwdKernel(const Plan& p) {
  const DF d;
  const size_t lanes = hn::Lanes(d);
  const int64_t nblk = (p.s.D + static_cast<int64_t>(lanes) - 1) / static_cast<int64_t>(lanes);
  const int64_t work = p.s.L * p.s.N * p.s.D;  // per batch
  const int64_t nparts = std::max<int64_t>(1, std::min({static_cast<int64_t>(num_threads()), nblk,
                                                        work / scan_detail::kMinWorkPerThread}));
  const bool bvar = p.s.b_kind != ScanBCKind::Const, cvar = p.s.c_kind != ScanBCKind::Const;
  const int64_t rowsB = p.s.L * p.s.b_groups * p.s.N, rowsC = p.s.L * p.s.c_groups * p.s.N;
  std::vector<float> partB(bvar ? nparts * rowsB : 0), partC(cvar ? nparts * rowsC : 0);
  for (int64_t b = 0; b < p.s.batch; ++b) {
    parallel_for(nparts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t blk0 = nblk * q / nparts, blk1 = nblk * (q + 1) / nparts;
        // Per OS thread, kept between calls: the buffers are sized by the largest problem seen
        // (no allocation and no page faults in steady state).
        static thread_local PartScratch w;
        w.init(p, lanes, blk1 - blk0);
        BwdPart(p, w, b, blk0, lanes, bvar ? partB.data() + q * rowsB : nullptr,
                cvar ? partC.data() + q * rowsC : nullptr);
      }
    });
    auto reduce = [&](const std::vector<float>& part, int64_t rows, float* dst) {
      parallel_for(rows, 1 << 15, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          double s = 0;
          for (int64_t q = 0; q < nparts; ++q) s += part[q * rows + r];
          dst[r] = static_cast<float>(s);
        }
      });
    };
    if (bvar) reduce(partB, rowsB, p.dB + b * rowsB);
    if (cvar) reduce(partC, rowsC, p.dC + b * rowsC);
  }
}

// ---- decode step ------------------------------------------------------------------------------
// One token: the state row of a channel, (N), is contiguous, so this one is vectorised across
// N (lanes of the state row), channels in parallel.

// Channels [i0, i1) of the (batch, channel) rows of one step, on the calling thread.
HWY_INLINE void StateRows(const StepPlan& p, int64_t i0, int64_t i1) {
  const DF d;
  const int64_t N = p.s.N, Dd = p.s.D, GB = p.s.b_groups, GC = p.s.c_groups;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  // The per-channel scalars first, vectorised over channels: delta (bias +
  // softplus, NaN kept as in the scan) and the gate silu(z); then one state row
  // (N) per channel.
  constexpr int64_t kBlk = 512, kAhead = 32;
  alignas(64) float dtb[kBlk], gb[kBlk];
  for (int64_t c0 = i0; c0 < i1; c0 += kBlk) {
    const int64_t c1 = std::min(i1, c0 + kBlk);
    for (int64_t i = c0; i < c1;) {  // segments that do not cross a batch row
      const int64_t b = i / Dd, e = std::min(c1, (b + 1) * Dd);
      int64_t j = i;
      for (; j + lanes <= e; j += lanes) {
        VF v = hn::LoadU(d, p.dt + j);
        if (p.bias) v = hn::Add(v, hn::LoadU(d, p.bias + (j - b * Dd)));
        if (p.softplus) v = sm::Softplus(d, v);
        hn::StoreU(v, d, dtb + (j - c0));
      }
      for (; j < e; ++j) {
        float v = p.dt[j];
        if (p.bias) v += p.bias[j - b * Dd];
        if (p.softplus) v = softplus_ref(v);
        dtb[j - c0] = v;
      }
      i = e;
    }
    if (p.z) ops::silu(p.z + c0, gb, c1 - c0);  // the gate (act.h)
    // (batch, channel) of i advanced without divisions (they cost as much as
    // a channel's N = 16 state update)
    const int64_t per_gb = Dd / GB, per_gc = Dd / GC;
    int64_t b = c0 / Dd, dd = c0 % Dd;
    for (int64_t i = c0; i < c1; ++i, ++dd) {
      if (dd == Dd) dd = 0, ++b;
      const float v = dtb[i - c0];
      const float xv = p.x[i];
      const float* Bp = p.B + (b * GB + (GB == 1 ? 0 : dd / per_gb)) * N;
      const float* Cp = p.C + (b * GC + (GC == 1 ? 0 : dd / per_gc)) * N;
      const float* Ap = p.A + dd * N;
      float* h = p.state + i * N;
      // The state streams from memory (a batch of sequences' states is tens of
      // MB): fetch the row kAhead channels on, or each miss waits its latency.
      hwy::Prefetch(h + kAhead * N);
      const VF dtv = hn::Set(d, v), dtx = hn::Set(d, v * xv);
      VF acc = hn::Zero(d);
      int64_t n = 0;
      for (; n + lanes <= N; n += lanes) {
        const VF e = sm::Exp(d, hn::Mul(dtv, hn::LoadU(d, Ap + n)));
        const VF hv = hn::MulAdd(e, hn::LoadU(d, h + n), hn::Mul(dtx, hn::LoadU(d, Bp + n)));
        hn::StoreU(hv, d, h + n);
        acc = hn::MulAdd(hv, hn::LoadU(d, Cp + n), acc);
      }
      float yv = hn::GetLane(hn::SumOfLanes(d, acc));
      for (; n < N; ++n) {
        h[n] = std::exp(v * Ap[n]) * h[n] + v * xv * Bp[n];
        yv += h[n] * Cp[n];
      }
      if (p.Dskip) yv += xv * p.Dskip[dd];
      if (p.z) yv *= gb[i - c0];
      p.y[i] = yv;
    }
  }
}

void StateUpdateKernel(const StepPlan& p) {
  // A step is small (B*D*N state updates, an exp each): tasks of >= 8192 of them (~5 us), so a
  // single sequence's 1536 x 16 (mamba-130m) is split over 2 threads and its serial part shrinks.
  parallel_for(p.s.batch * p.s.D, std::max<int64_t>(1, 8192 / std::max<int64_t>(p.s.N, 1)),
               [&](int64_t i0, int64_t i1) { StateRows(p, i0, i1); });
}

// The same rows [i0, i1) on the calling thread (selective_state_update_channels).
void StateUpdateRowsKernel(const StepPlan& p, int64_t i0, int64_t i1) { StateRows(p, i0, i1); }

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba::ops {
HWY_EXPORT(ScanFwdKernel);
HWY_EXPORT(ScanBwdKernel);
HWY_EXPORT(StateUpdateKernel);
HWY_EXPORT(StateUpdateRowsKernel);

namespace {
scan_detail::Plan make_plan(const ScanArgs& a, const ScanDims& s) {
  scan_detail::Plan p;
  p.s = s;
  p.softplus = a.delta_softplus;
  p.u = a.u.data(), p.delta = a.delta.data(), p.A = a.A.data(), p.B = a.B.data(), p.C = a.C.data();
  p.Dskip = a.D.defined() ? a.D.data() : nullptr;
  p.z = a.z.defined() ? a.z.data() : nullptr;
  p.bias = a.delta_bias.defined() ? a.delta_bias.data() : nullptr;
  p.h0 = a.initial_state.defined() ? a.initial_state.data() : nullptr;
  p.reverse = a.reverse;
  return p;
}
}  // namespace

// u, delta: (B, L, D) -> out (B, L, D); last_state (B, D, N)
Tensor selective_scan_fwd(const ScanArgs& a, Tensor* last_state) {
  const ScanDims s = selective_scan_check(a, "selective_scan_fwd");
  Tensor out = Tensor::empty({s.batch, s.L, s.D});
  scan_detail::Plan p = make_plan(a, s);
  p.out = out.data();
  if (last_state) {
    *last_state = Tensor::zeros({s.batch, s.D, s.N});
    p.last = last_state->data();
  }
  if (s.L > 0 && s.D > 0) {
    HWY_DYNAMIC_DISPATCH(ScanFwdKernel)(p);
  } else if (last_state && a.initial_state.defined()) {
    last_state->copy_from(a.initial_state);  // no steps: the state is unchanged
  }
  return out;
}

// Gradients of sum(out * dout); dout: (B, L, D). Fresh tensors.
ScanGrads selective_scan_bwd(const ScanArgs& a, const Tensor& dout) {
  const ScanDims s = selective_scan_check(a, "selective_scan_bwd");
  check_shape(dout, "selective_scan_bwd: dout", {s.batch, s.L, s.D});
  ScanGrads r;
  if (s.L == 0 || s.D == 0) {  // nothing flows: all zero
    r.du = Tensor::zeros(a.u.shape());
    r.ddelta = Tensor::zeros(a.delta.shape());
    r.dA = Tensor::zeros(a.A.shape());
    r.dB = Tensor::zeros(a.B.shape());
    r.dC = Tensor::zeros(a.C.shape());
    if (a.D.defined()) r.dD = Tensor::zeros(a.D.shape());
    if (a.z.defined()) r.dz = Tensor::zeros(a.z.shape());
    if (a.delta_bias.defined()) r.ddelta_bias = Tensor::zeros(a.delta_bias.shape());
    if (a.initial_state.defined()) r.dinitial_state = Tensor::zeros(a.initial_state.shape());
    return r;
  }
  // Written element by element by the kernel: empty; summed into (+=): zeros.
  r.du = Tensor::empty(a.u.shape());
  r.ddelta = Tensor::empty(a.delta.shape());
  r.dA = Tensor::zeros(a.A.shape());
  r.dB = s.b_kind == ScanBCKind::Const ? Tensor::zeros(a.B.shape()) : Tensor::empty(a.B.shape());
  r.dC = s.c_kind == ScanBCKind::Const ? Tensor::zeros(a.C.shape()) : Tensor::empty(a.C.shape());
  if (a.D.defined()) r.dD = Tensor::zeros(a.D.shape());
  if (a.z.defined()) r.dz = Tensor::empty(a.z.shape());
  if (a.delta_bias.defined()) r.ddelta_bias = Tensor::zeros(a.delta_bias.shape());
  if (a.initial_state.defined()) r.dinitial_state = Tensor::empty(a.initial_state.shape());
  scan_detail::Plan p = make_plan(a, s);
  p.dout = dout.data();
  p.du = r.du.data(), p.ddelta = r.ddelta.data(), p.dA = r.dA.data(), p.dB = r.dB.data();
  p.dC = r.dC.data();
  p.dD = a.D.defined() ? r.dD.data() : nullptr;
  p.dz = a.z.defined() ? r.dz.data() : nullptr;
  p.dbias = a.delta_bias.defined() ? r.ddelta_bias.data() : nullptr;
  p.dh0 = a.initial_state.defined() ? r.dinitial_state.data() : nullptr;
  HWY_DYNAMIC_DISPATCH(ScanBwdKernel)(p);
  return r;
}

// One decode step (vectorised over N). state: (B, D, N) in place; x, dt, z: (B, D);
// A: (D, N); B, C: (B, N) or (B, G, N); D, dt_bias: (D). Returns y: (B, D).
Tensor selective_state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                              const Tensor& B, const Tensor& C, const Tensor& D, const Tensor& z,
                              const Tensor& dt_bias, bool dt_softplus) {
  scan_detail::StepPlan p;
  p.s = selective_state_update_check(state, x, dt, A, B, C, D, z, dt_bias);
  Tensor y = Tensor::empty({p.s.batch, p.s.D});
  p.softplus = dt_softplus;
  p.state = state.data();
  p.x = x.data(), p.dt = dt.data(), p.A = A.data(), p.B = B.data(), p.C = C.data();
  p.Dskip = D.defined() ? D.data() : nullptr;
  p.z = z.defined() ? z.data() : nullptr;
  p.bias = dt_bias.defined() ? dt_bias.data() : nullptr;
  p.y = y.data();
  if (y.numel() > 0) HWY_DYNAMIC_DISPATCH(StateUpdateKernel)(p);
  return y;
}

void selective_state_update_channels(float* state, const float* x, const float* dt, const float* A,
                                     const float* B, const float* C, const float* Dskip,
                                     const float* z, const float* dt_bias, bool dt_softplus,
                                     int64_t D, int64_t N, int64_t c0, int64_t c1, float* y) {
  MAMBA_CHECK(D >= 1 && N >= 1 && 0 <= c0 && c0 <= c1 && c1 <= D,
              "selective_state_update_channels: channels [", c0, ", ", c1, ") of D = ", D,
              ", N = ", N);
  scan_detail::StepPlan p;
  p.s.batch = 1, p.s.D = D, p.s.N = N;
  p.softplus = dt_softplus;
  p.state = state;
  p.x = x, p.dt = dt, p.A = A, p.B = B, p.C = C, p.Dskip = Dskip, p.z = z, p.bias = dt_bias;
  p.y = y;
  if (c0 < c1) HWY_DYNAMIC_DISPATCH(StateUpdateRowsKernel)(p, c0, c1);
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
