// Fused SDE step + Gaussian log-prob (pec_kernels/sde, DESIGN.md §2.1): the CUDA backend.
//
// The contract is pec_kernels/sde/torch_backend.py's docstring. Inputs are (B, n) contiguous, all in
// one dtype T (float, double, half, bfloat16); math runs in A = acc_type<T> (float, or double for
// double); coef is (B, 3) [a, b, s] and vscale (B, 2) [guidance_scale, guidance_weight] in A.
//
// Forward: grid (chunks, B), one block streams one chunk of one sample with 16-byte vector loads,
// writes μ (and x' in rollout mode, rounded to T, the residual taken against the rounded value) and one
// partial sum of residual² (and of (v − v_ref)²) per block, reduced by warp shuffles then shared
// memory. The (B, chunks) partials are summed by at::sum, so results are deterministic and a rollout
// and its re-evaluation give bit-identical log-probs.
// Backward: the same grid, elementwise; recomputes μ instead of storing the residual (cheaper in bytes).
#include "common.cuh"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include <cstdint>

namespace pec {
namespace {

constexpr int kThreads = 256;
constexpr int kItersPerChunk = 4;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC, typename A>
__device__ __forceinline__ void load(const T* p, A (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = static_cast<A>(pk.v[k]);
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store(T* p, const A (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pk.v[k] = static_cast<T>(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// v = v0 (nv = 1) or v0 + gs·(v1 − v0) [+ gw·v2] (classifier-free guidance, nv = 2 or 3).
template <typename T, int VEC, typename A>
__device__ __forceinline__ void velocity(const T* v0, const T* v1, const T* v2, int nv, A gs, A gw,
                                         int64_t off, A (&v)[VEC]) {
  load<T, VEC>(v0 + off, v);
  if (nv >= 2) {
    A u[VEC];
    load<T, VEC>(v1 + off, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = v[k] + gs * (u[k] - v[k]);
  }
  if (nv == 3) {
    A g[VEC];
    load<T, VEC>(v2 + off, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = v[k] + gw * g[k];
  }
}

// Sum over the block; the result is valid in thread 0. `shared` holds one slot per warp.
template <typename A>
__device__ __forceinline__ A block_sum(A val, A* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) val += __shfl_down_sync(0xffffffffu, val, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = val;
  __syncthreads();
  val = threadIdx.x < (blockDim.x >> 5) ? shared[lane] : A(0);
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) val += __shfl_down_sync(0xffffffffu, val, o);
  }
  return val;
}

struct Velocities {
  int nv;
  bool need[3];
};

template <typename T, int VEC, typename A>
__global__ void __launch_bounds__(kThreads)
sde_forward_kernel(const T* __restrict__ x, const T* __restrict__ v0, const T* __restrict__ v1,
                   const T* __restrict__ v2, const T* __restrict__ target, const T* __restrict__ vref,
                   const A* __restrict__ coef, const A* __restrict__ vscale, T* __restrict__ prev,
                   T* __restrict__ mean, A* __restrict__ part_r, A* __restrict__ part_kl, int64_t n,
                   int64_t chunk_elems, int nv, bool rollout, bool has_ref) {
  __shared__ A shared_r[kThreads / 32];
  __shared__ A shared_k[kThreads / 32];
  const int64_t chunk = blockIdx.x, b = blockIdx.y;
  const A a = coef[b * 3], bv = coef[b * 3 + 1], s = coef[b * 3 + 2];
  const A gs = nv >= 2 ? vscale[b * 2] : A(0), gw = nv >= 2 ? vscale[b * 2 + 1] : A(0);
  const int64_t start = chunk * chunk_elems;
  const int64_t end = min(n, start + chunk_elems);
  A acc_r = 0, acc_k = 0;
  for (int64_t i = start + int64_t(threadIdx.x) * VEC; i < end; i += int64_t(kThreads) * VEC) {
    const int64_t off = b * n + i;
    A v[VEC], xv[VEC], t[VEC], mu[VEC];
    velocity<T, VEC>(v0, v1, v2, nv, gs, gw, off, v);
    load<T, VEC>(x + off, xv);
    load<T, VEC>(target + off, t);
#pragma unroll
    for (int k = 0; k < VEC; ++k) mu[k] = a * xv[k] + bv * v[k];
    if (rollout) {
      A p[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) p[k] = static_cast<A>(static_cast<T>(mu[k] + s * t[k]));
      store<T, VEC>(prev + off, p);
#pragma unroll
      for (int k = 0; k < VEC; ++k) t[k] = p[k];
    }
    store<T, VEC>(mean + off, mu);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const A r = t[k] - mu[k];
      acc_r += r * r;
    }
    if (has_ref) {
      A w[VEC];
      load<T, VEC>(vref + off, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A d = v[k] - w[k];
        acc_k += d * d;
      }
    }
  }
  const int64_t n_chunks = gridDim.x;
  acc_r = block_sum(acc_r, shared_r);
  if (threadIdx.x == 0) part_r[b * n_chunks + chunk] = acc_r;
  if (has_ref) {
    acc_k = block_sum(acc_k, shared_k);
    if (threadIdx.x == 0) part_kl[b * n_chunks + chunk] = acc_k;
  }
}

template <typename T, int VEC, typename A>
__global__ void __launch_bounds__(kThreads)
sde_backward_kernel(const T* __restrict__ x, const T* __restrict__ v0, const T* __restrict__ v1,
                    const T* __restrict__ v2, const T* __restrict__ prev, const T* __restrict__ vref,
                    const T* __restrict__ grad_mean, const T* __restrict__ grad_prev,
                    const A* __restrict__ coef, const A* __restrict__ vscale, const A* __restrict__ gscale,
                    T* __restrict__ dx, T* __restrict__ dv0, T* __restrict__ dv1, T* __restrict__ dv2,
                    int64_t n, int64_t chunk_elems, Velocities vel) {
  const int64_t chunk = blockIdx.x, b = blockIdx.y;
  const A a = coef[b * 3], bv = coef[b * 3 + 1];
  const A gr = gscale[b * 2], gk = gscale[b * 2 + 1];
  const int nv = vel.nv;
  const A gs = nv >= 2 ? vscale[b * 2] : A(0), gw = nv >= 2 ? vscale[b * 2 + 1] : A(0);
  // d v / d v_k: 1 for a plain velocity, (1 − gs, gs, gw) for a guided one.
  const A weight[3] = {nv >= 2 ? A(1) - gs : A(1), gs, gw};
  T* const dv[3] = {dv0, dv1, dv2};
  const int64_t start = chunk * chunk_elems;
  const int64_t end = min(n, start + chunk_elems);
  for (int64_t i = start + int64_t(threadIdx.x) * VEC; i < end; i += int64_t(kThreads) * VEC) {
    const int64_t off = b * n + i;
    A v[VEC], xv[VEC], p[VEC], g_mu[VEC], g_v[VEC];
    velocity<T, VEC>(v0, v1, v2, nv, gs, gw, off, v);
    load<T, VEC>(x + off, xv);
    load<T, VEC>(prev + off, p);
#pragma unroll
    for (int k = 0; k < VEC; ++k) g_mu[k] = gr * (p[k] - (a * xv[k] + bv * v[k]));
    if (grad_mean != nullptr) {
      A g[VEC];
      load<T, VEC>(grad_mean + off, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g_mu[k] += g[k];
    }
    if (grad_prev != nullptr) {
      A g[VEC];
      load<T, VEC>(grad_prev + off, g);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g_mu[k] += g[k];
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) g_v[k] = bv * g_mu[k];
    if (vref != nullptr) {
      A w[VEC];
      load<T, VEC>(vref + off, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) g_v[k] += gk * (v[k] - w[k]);
    }
    if (dx != nullptr) {
      A out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = a * g_mu[k];
      store<T, VEC>(dx + off, out);
    }
    for (int j = 0; j < nv; ++j) {
      if (!vel.need[j]) continue;
      A out[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = weight[j] * g_v[k];
      store<T, VEC>(dv[j] + off, out);
    }
  }
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void check_latent(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), name, " must be on x's CUDA device");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must have x's dtype");
}

void check_per_sample(const at::Tensor& t, const at::Tensor& x, int64_t cols, const char* name) {
  TORCH_CHECK(t.device() == x.device() && t.is_contiguous() && t.dim() == 2 && t.size(0) == x.size(0) &&
                  t.size(1) == cols,
              name, " must be a contiguous (B, ", cols, ") tensor on x's device");
  TORCH_CHECK(t.scalar_type() == (x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat), name,
              " must be float32 (float64 for float64 latents)");
}

// Velocity count from the optional second and third velocities; checks them and vscale.
int velocity_count(const at::Tensor& x, const std::optional<at::Tensor>& v1, const std::optional<at::Tensor>& v2,
                   const std::optional<at::Tensor>& vscale) {
  const int nv = 1 + v1.has_value() + v2.has_value();
  TORCH_CHECK(!v2.has_value() || v1.has_value(), "v2 needs v1");
  if (v1.has_value()) check_latent(*v1, x, "v1");
  if (v2.has_value()) check_latent(*v2, x, "v2");
  if (nv >= 2) {
    TORCH_CHECK(vscale.has_value(), "vscale is required with several velocities");
    check_per_sample(*vscale, x, 2, "vscale");
  }
  return nv;
}

// Elements per vector (16 bytes) when n and every pointer allow it, else 1.
template <typename T>
int vector_width(int64_t n, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  if (n % kVec != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return kVec;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sde_step_fwd(
    const at::Tensor& x, const at::Tensor& v0, const std::optional<at::Tensor>& v1,
    const std::optional<at::Tensor>& v2, const at::Tensor& target, const std::optional<at::Tensor>& v_ref,
    const at::Tensor& coef, const std::optional<at::Tensor>& vscale, bool rollout) {
  PEC_CHECK_CUDA(x);
  PEC_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 2, "x must be (B, n)");
  check_latent(v0, x, "v0");
  check_latent(target, x, "target");
  if (v_ref.has_value()) check_latent(*v_ref, x, "v_ref");
  check_per_sample(coef, x, 3, "coef");
  const int nv = velocity_count(x, v1, v2, vscale);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), n = x.size(1);
  at::Tensor prev = rollout ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = at::empty_like(x);
  at::Tensor sum_kl = at::empty({0}, coef.options());
  at::Tensor sum_r2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_fwd", [&] {
    using A = at::acc_type<scalar_t, true>;
    const scalar_t* vref_p = ptr_or_null<scalar_t>(v_ref);
    const scalar_t* v1_p = ptr_or_null<scalar_t>(v1);
    const scalar_t* v2_p = ptr_or_null<scalar_t>(v2);
    scalar_t* prev_p = rollout ? prev.data_ptr<scalar_t>() : nullptr;
    const int vec = vector_width<scalar_t>(n, {x.data_ptr(), v0.data_ptr(), v1_p, v2_p, target.data_ptr(),
                                               vref_p, prev_p, mean.data_ptr()});
    const int64_t chunk_elems = int64_t(kThreads) * vec * kItersPerChunk;
    const int64_t n_chunks = (n + chunk_elems - 1) / chunk_elems;
    TORCH_CHECK(batch <= 65535, "sde_step_fwd: at most 65535 samples per call, got ", batch);
    at::Tensor part_r = at::empty({batch, n_chunks}, coef.options());
    at::Tensor part_kl = v_ref.has_value() ? at::empty({batch, n_chunks}, coef.options()) : part_r;
    const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(batch));
    const A* vscale_p = nv >= 2 ? vscale->data_ptr<A>() : nullptr;
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      sde_forward_kernel<scalar_t, VEC, A><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), v0.data_ptr<scalar_t>(), v1_p, v2_p, target.data_ptr<scalar_t>(), vref_p,
          coef.data_ptr<A>(), vscale_p, prev_p, mean.data_ptr<scalar_t>(), part_r.data_ptr<A>(),
          part_kl.data_ptr<A>(), n, chunk_elems, nv, rollout, v_ref.has_value());
    };
    if (vec == 1) {
      launch(std::integral_constant<int, 1>{});
    } else {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_r2 = part_r.sum(1);
    if (v_ref.has_value()) sum_kl = part_kl.sum(1);
  });
  return {prev, mean, sum_r2, sum_kl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sde_step_bwd(
    const at::Tensor& x, const at::Tensor& v0, const std::optional<at::Tensor>& v1,
    const std::optional<at::Tensor>& v2, const at::Tensor& prev, const std::optional<at::Tensor>& v_ref,
    const at::Tensor& coef, const std::optional<at::Tensor>& vscale, const at::Tensor& gscale,
    const std::optional<at::Tensor>& grad_mean, const std::optional<at::Tensor>& grad_prev, bool need_dx,
    bool need_dv0, bool need_dv1, bool need_dv2) {
  PEC_CHECK_CUDA(x);
  PEC_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 2, "x must be (B, n)");
  check_latent(v0, x, "v0");
  check_latent(prev, x, "prev");
  if (v_ref.has_value()) check_latent(*v_ref, x, "v_ref");
  if (grad_mean.has_value()) check_latent(*grad_mean, x, "grad_mean");
  if (grad_prev.has_value()) check_latent(*grad_prev, x, "grad_prev");
  check_per_sample(coef, x, 3, "coef");
  check_per_sample(gscale, x, 2, "gscale");
  const int nv = velocity_count(x, v1, v2, vscale);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), n = x.size(1);
  TORCH_CHECK(batch <= 65535, "sde_step_bwd: at most 65535 samples per call, got ", batch);
  auto maybe = [&](bool need) { return need ? at::empty_like(x) : at::empty({0}, x.options()); };
  at::Tensor dx = maybe(need_dx), dv0 = maybe(need_dv0), dv1 = maybe(need_dv1 && nv >= 2),
             dv2 = maybe(need_dv2 && nv == 3);
  const Velocities vel{nv, {need_dv0, need_dv1 && nv >= 2, need_dv2 && nv == 3}};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_bwd", [&] {
    using A = at::acc_type<scalar_t, true>;
    auto out = [](at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    const scalar_t* v1_p = ptr_or_null<scalar_t>(v1);
    const scalar_t* v2_p = ptr_or_null<scalar_t>(v2);
    const scalar_t* vref_p = ptr_or_null<scalar_t>(v_ref);
    const scalar_t* gm_p = ptr_or_null<scalar_t>(grad_mean);
    const scalar_t* gp_p = ptr_or_null<scalar_t>(grad_prev);
    scalar_t *dx_p = out(dx), *dv0_p = out(dv0), *dv1_p = out(dv1), *dv2_p = out(dv2);
    const int vec = vector_width<scalar_t>(n, {x.data_ptr(), v0.data_ptr(), v1_p, v2_p, prev.data_ptr(), vref_p,
                                               gm_p, gp_p, dx_p, dv0_p, dv1_p, dv2_p});
    const int64_t chunk_elems = int64_t(kThreads) * vec * kItersPerChunk;
    const int64_t n_chunks = (n + chunk_elems - 1) / chunk_elems;
    const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(batch));
    const A* vscale_p = nv >= 2 ? vscale->data_ptr<A>() : nullptr;
    auto launch = [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      sde_backward_kernel<scalar_t, VEC, A><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), v0.data_ptr<scalar_t>(), v1_p, v2_p, prev.data_ptr<scalar_t>(), vref_p, gm_p,
          gp_p, coef.data_ptr<A>(), vscale_p, gscale.data_ptr<A>(), dx_p, dv0_p, dv1_p, dv2_p, n, chunk_elems, vel);
    };
    if (vec == 1) {
      launch(std::integral_constant<int, 1>{});
    } else {
      launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dv0, dv1, dv2};
}

}  // namespace
}  // namespace pec

TORCH_LIBRARY_FRAGMENT(pec, m) {
  m.def("sde_step_fwd(Tensor x, Tensor v0, Tensor? v1, Tensor? v2, Tensor target, Tensor? v_ref, Tensor coef, "
        "Tensor? vscale, bool rollout) -> (Tensor prev, Tensor mean, Tensor sum_r2, Tensor sum_kl)");
  m.def("sde_step_bwd(Tensor x, Tensor v0, Tensor? v1, Tensor? v2, Tensor prev, Tensor? v_ref, Tensor coef, "
        "Tensor? vscale, Tensor gscale, Tensor? grad_mean, Tensor? grad_prev, bool need_dx, bool need_dv0, "
        "bool need_dv1, bool need_dv2) -> (Tensor dx, Tensor dv0, Tensor dv1, Tensor dv2)");
}

TORCH_LIBRARY_IMPL(pec, CUDA, m) {
  m.impl("sde_step_fwd", &pec::sde_step_fwd);
  m.impl("sde_step_bwd", &pec::sde_step_bwd);
}
