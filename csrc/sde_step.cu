// Fused SDE step + Gaussian log-prob (pec_kernels/sde, DESIGN.md §2.1): the CUDA backend.
//
// The contract is pec_kernels/sde/torch_backend.py's docstring. Latent inputs are (B, n) contiguous,
// all in one dtype T (float, double, half, bfloat16); math runs in A = acc_type<T> (float, or double
// for double). The per-sample parameters (σ, σ', sigma_max, guidance scale, guidance weight) each come
// as a 0-d or (B,) tensor in A, or as a number; every block evaluates its sample's step coefficients
// itself (step_coefficients below mirrors pec_kernels/sde/coefficients.py), so a call is three kernel
// launches and no small torch ops.
//
// Forward: grid (chunks, min(B, 65535)), one block streams one chunk of a sample with 16-byte vector
// loads (blocks loop over the samples b = blockIdx.y, blockIdx.y + gridDim.y, ..., since grid axis y
// stops at 65535), writes x' in rollout mode (rounded to T, the residual taken against the rounded
// value) and μ when asked for, and one partial sum of residual² (and of (v − v_ref)²) per block and
// sample, reduced by warp shuffles then shared memory. Finalize: one block per sample sums its partials
// in a fixed order (deterministic: a rollout and its re-evaluation give bit-identical log-probs) and
// writes log_prob, kl and std.
// Backward: the same grid and sample loop as the forward, elementwise; recomputes μ instead of storing
// the residual.
#include "common.cuh"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace pec {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;  // grid axis y limit: larger batches loop over the samples
constexpr int kItersPerChunk = 2;  // ~1000 blocks at B·n = 4 M bf16 elements: a full wave on H100/H200

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

template <typename A>
struct Param {
  const A* ptr;  // nullptr: every sample uses `value`
  int64_t stride;
  A value;
  __device__ __forceinline__ A at(int64_t b) const { return ptr != nullptr ? ptr[b * stride] : value; }
};

enum Kind { kFlow = 0, kDance = 1, kCps = 2 };

template <typename A>
struct StepArgs {
  Param<A> sigma, sigma_next, sigma_max, guidance_scale, guidance_weight;
  A eta;
  int kind;
};

template <typename A>
struct Coefficients {
  A a, b, s, inv_two_var, log_norm;
};

// μ = a·x + b·v, x' = μ + s·ε, log p = −inv_two_var·(x' − μ)² + log_norm per element; a deterministic
// step (s² not a positive normal number) has s = inv_two_var = log_norm = 0. Same formulas and floors
// as step_coefficients in pec_kernels/sde/coefficients.py.
template <typename A>
__device__ Coefficients<A> step_coefficients(const StepArgs<A>& p, int64_t sample) {
  const A sigma = p.sigma.at(sample), sigma_next = p.sigma_next.at(sample), eta = p.eta;
  const A dt = sigma_next - sigma;
  const A floor = std::numeric_limits<A>::epsilon();
  A a, b, s;
  if (p.kind == kFlow) {
    const A one_minus = max(A(1) - (sigma >= A(1) ? p.sigma_max.at(sample) : sigma), floor);
    const A half_k = eta * eta / (A(2) * one_minus);
    a = A(1) + half_k * dt;
    b = (A(1) + half_k * (A(1) - sigma)) * dt;
    s = eta * sqrt(max(sigma, A(0)) / one_minus) * sqrt(max(-dt, A(0)));
  } else if (p.kind == kDance) {
    const A half_k = eta * eta / (A(2) * max(sigma, floor));
    a = A(1) + half_k * dt;
    b = dt + half_k * dt * (A(1) - sigma);
    s = eta * sqrt(max(-dt, A(0)));
  } else {
    const A s_signed = sigma_next * sin(eta * A(1.5707963267948966));
    const A c = sqrt(max(sigma_next * sigma_next - s_signed * s_signed, A(0)));
    a = (A(1) - sigma_next) + c;
    b = c * (A(1) - sigma) - sigma * (A(1) - sigma_next);
    s = fabs(s_signed);
  }
  const A var = s * s;
  const bool stochastic = var > std::numeric_limits<A>::min();
  const A safe_var = stochastic ? var : A(1);
  return {a, b, stochastic ? s : A(0), stochastic ? A(0.5) / safe_var : A(0),
          stochastic ? A(-0.5) * log(safe_var) - A(0.9189385332046727) : A(0)};
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
                   T* __restrict__ prev, T* __restrict__ mean, A* __restrict__ part_r, A* __restrict__ part_kl,
                   StepArgs<A> step, int64_t batch, int64_t n, int64_t chunk_elems, int nv, bool rollout) {
  __shared__ A shared_r[kThreads / 32];
  __shared__ A shared_k[kThreads / 32];
  const int64_t chunk = blockIdx.x;
  // b is the same for the whole block, so the barriers inside block_sum are reached by every thread.
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const Coefficients<A> c = step_coefficients(step, b);
    const A gs = step.guidance_scale.at(b), gw = step.guidance_weight.at(b);
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
      for (int k = 0; k < VEC; ++k) mu[k] = c.a * xv[k] + c.b * v[k];
      if (rollout) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) t[k] = static_cast<A>(static_cast<T>(mu[k] + c.s * t[k]));
        store<T, VEC>(prev + off, t);
      }
      if (mean != nullptr) store<T, VEC>(mean + off, mu);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A r = t[k] - mu[k];
        acc_r += r * r;
      }
      if (vref != nullptr) {
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
    if (vref != nullptr) {
      acc_k = block_sum(acc_k, shared_k);
      if (threadIdx.x == 0) part_kl[b * n_chunks + chunk] = acc_k;
    }
    __syncthreads();  // warp 0 has read the shared slots before the next sample overwrites them
  }
}

// One block per sample: writes log_prob[b], std[b] and kl[b] (when part_kl is given), partials summed in
// a fixed order. Three separate (B,) outputs, so that no output of the op aliases another.
template <typename A>
__global__ void __launch_bounds__(kThreads)
sde_finalize_kernel(const A* __restrict__ part_r, const A* __restrict__ part_kl, A* __restrict__ log_prob,
                    A* __restrict__ kl, A* __restrict__ std_out, StepArgs<A> step, int64_t n_chunks, A inv_norm,
                    A n_over_norm) {
  __shared__ A shared_r[kThreads / 32];
  __shared__ A shared_k[kThreads / 32];
  const int64_t b = blockIdx.x;
  A acc_r = 0, acc_k = 0;
  for (int64_t c = threadIdx.x; c < n_chunks; c += kThreads) {
    acc_r += part_r[b * n_chunks + c];
    if (part_kl != nullptr) acc_k += part_kl[b * n_chunks + c];
  }
  acc_r = block_sum(acc_r, shared_r);
  if (part_kl != nullptr) acc_k = block_sum(acc_k, shared_k);
  if (threadIdx.x == 0) {
    const Coefficients<A> c = step_coefficients(step, b);
    log_prob[b] = c.log_norm * n_over_norm - c.inv_two_var * acc_r * inv_norm;
    if (part_kl != nullptr) kl[b] = c.inv_two_var * c.b * c.b * acc_k * inv_norm;
    std_out[b] = c.s;
  }
}

template <typename T, int VEC, typename A>
__global__ void __launch_bounds__(kThreads)
sde_backward_kernel(const T* __restrict__ x, const T* __restrict__ v0, const T* __restrict__ v1,
                    const T* __restrict__ v2, const T* __restrict__ prev, const T* __restrict__ vref,
                    const A* __restrict__ grad_log_prob, const A* __restrict__ grad_kl,
                    const T* __restrict__ grad_mean, const T* __restrict__ grad_prev, T* __restrict__ dx,
                    T* __restrict__ dv0, T* __restrict__ dv1, T* __restrict__ dv2, StepArgs<A> step, int64_t n,
                    int64_t batch, int64_t chunk_elems, A inv_norm, Velocities vel) {
  const int64_t chunk = blockIdx.x;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    const Coefficients<A> c = step_coefficients(step, b);
    // d log_prob / d μ = 2·inv_two_var·(x' − μ)/norm; d kl / d v = 2·inv_two_var·b²·(v − v_ref)/norm.
    const A gr = grad_log_prob != nullptr ? A(2) * c.inv_two_var * inv_norm * grad_log_prob[b] : A(0);
    const A gk = grad_kl != nullptr ? A(2) * c.inv_two_var * c.b * c.b * inv_norm * grad_kl[b] : A(0);
    const int nv = vel.nv;
    const A gs = step.guidance_scale.at(b), gw = step.guidance_weight.at(b);
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
      for (int k = 0; k < VEC; ++k) g_mu[k] = gr * (p[k] - (c.a * xv[k] + c.b * v[k]));
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
      for (int k = 0; k < VEC; ++k) g_v[k] = c.b * g_mu[k];
      if (grad_kl != nullptr) {
        A w[VEC];
        load<T, VEC>(vref + off, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) g_v[k] += gk * (v[k] - w[k]);
      }
      if (dx != nullptr) {
        A out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = c.a * g_mu[k];
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

void check_velocities(at::TensorList vels, const at::Tensor& x) {
  TORCH_CHECK(vels.size() >= 1 && vels.size() <= 3, "vels must hold 1 to 3 velocities, got ", vels.size());
  for (const at::Tensor& v : vels) check_latent(v, x, "each velocity");
}

at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// (B,) per-sample inputs computed by torch (grad_log_prob, grad_kl) in the compute dtype.
std::optional<at::Tensor> per_sample_grad(const std::optional<at::Tensor>& g, const at::Tensor& x) {
  if (!g.has_value()) return std::nullopt;
  TORCH_CHECK(g->numel() == x.size(0) && g->device() == x.device(), "per-sample gradients must be (B,) on x's device");
  return g->to(compute_type(x)).contiguous();
}

// The five per-sample parameters (σ, σ', sigma_max, guidance scale, guidance weight): a 0-d or (B,)
// tensor in the compute dtype, or None and a number.
template <typename A>
StepArgs<A> step_args(const at::Tensor& x, const c10::List<std::optional<at::Tensor>>& params,
                      at::ArrayRef<double> values, double eta, int64_t kind) {
  TORCH_CHECK(params.size() == 5 && values.size() == 5, "params and values must hold 5 entries");
  TORCH_CHECK(kind >= kFlow && kind <= kCps, "kind must be 0 (flow), 1 (dance) or 2 (cps)");
  Param<A> p[5];
  for (int i = 0; i < 5; ++i) {
    const std::optional<at::Tensor> t = params.get(i);
    p[i] = {nullptr, 0, static_cast<A>(values[i])};
    if (t.has_value()) {
      TORCH_CHECK(t->device() == x.device() && t->scalar_type() == compute_type(x) && t->is_contiguous() &&
                      (t->dim() == 0 || (t->dim() == 1 && t->size(0) == x.size(0))),
                  "per-sample parameter ", i, " must be a 0-d or (B,) contiguous tensor in the compute dtype on x's device");
      p[i] = {t->data_ptr<A>(), t->dim() == 0 ? 0 : 1, A(0)};
    }
  }
  return {p[0], p[1], p[2], p[3], p[4], static_cast<A>(eta), static_cast<int>(kind)};
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

template <typename F>
void with_vector_width(int vec, F&& launch) {
  if (vec == 1) {
    launch(std::integral_constant<int, 1>{});
  } else if (vec == 2) {
    launch(std::integral_constant<int, 2>{});
  } else if (vec == 4) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 8>{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sde_step_fwd(
    const at::Tensor& x, at::TensorList vels, const at::Tensor& target, const std::optional<at::Tensor>& v_ref,
    const c10::List<std::optional<at::Tensor>>& params, at::ArrayRef<double> values, double eta, int64_t kind,
    bool rollout, double norm, bool need_mean) {
  PEC_CHECK_CUDA(x);
  PEC_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 2, "x must be (B, n)");
  check_velocities(vels, x);
  check_latent(target, x, "target");
  if (v_ref.has_value()) check_latent(*v_ref, x, "v_ref");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), n = x.size(1);
  TORCH_CHECK(batch <= INT32_MAX, "sde_step_fwd: at most 2^31 - 1 samples per call, got ", batch);
  const unsigned grid_y = static_cast<unsigned>(std::min<int64_t>(batch, kMaxGridY));
  const int nv = static_cast<int>(vels.size());
  at::Tensor prev = rollout ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor mean = need_mean ? at::empty_like(x) : at::empty({0}, x.options());
  const auto per_sample = x.options().dtype(compute_type(x));
  at::Tensor log_prob = at::empty({batch}, per_sample), std_out = at::empty({batch}, per_sample);
  at::Tensor kl = at::empty({v_ref.has_value() ? batch : 0}, per_sample);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_fwd", [&] {
    using A = at::acc_type<scalar_t, true>;
    const StepArgs<A> step = step_args<A>(x, params, values, eta, kind);
    const scalar_t* v1 = nv >= 2 ? vels[1].data_ptr<scalar_t>() : nullptr;
    const scalar_t* v2 = nv == 3 ? vels[2].data_ptr<scalar_t>() : nullptr;
    const scalar_t* vref = ptr_or_null<scalar_t>(v_ref);
    scalar_t* prev_p = rollout ? prev.data_ptr<scalar_t>() : nullptr;
    scalar_t* mean_p = need_mean ? mean.data_ptr<scalar_t>() : nullptr;
    const int vec = vector_width<scalar_t>(
        n, {x.data_ptr(), vels[0].data_ptr(), v1, v2, target.data_ptr(), vref, prev_p, mean_p});
    const int64_t chunk_elems = int64_t(kThreads) * vec * kItersPerChunk;
    const int64_t n_chunks = (n + chunk_elems - 1) / chunk_elems;
    at::Tensor part = at::empty({vref != nullptr ? 2 : 1, batch, n_chunks}, per_sample);
    A* part_r = part.data_ptr<A>();
    A* part_kl = vref != nullptr ? part_r + batch * n_chunks : nullptr;
    const auto stream = at::cuda::getCurrentCUDAStream();
    with_vector_width(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      sde_forward_kernel<scalar_t, VEC, A><<<dim3(n_chunks, grid_y), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), vels[0].data_ptr<scalar_t>(), v1, v2, target.data_ptr<scalar_t>(), vref, prev_p,
          mean_p, part_r, part_kl, step, batch, n, chunk_elems, nv, rollout);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sde_finalize_kernel<A><<<batch, kThreads, 0, stream>>>(
        part_r, part_kl, log_prob.data_ptr<A>(), vref != nullptr ? kl.data_ptr<A>() : nullptr, std_out.data_ptr<A>(),
        step, n_chunks, static_cast<A>(1.0 / norm), static_cast<A>(n / norm));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {prev, mean, log_prob, kl, std_out};
}

std::vector<at::Tensor> sde_step_bwd(const at::Tensor& x, at::TensorList vels, const at::Tensor& prev,
                                     const std::optional<at::Tensor>& v_ref,
                                     const c10::List<std::optional<at::Tensor>>& params, at::ArrayRef<double> values,
                                     double eta, int64_t kind, double norm,
                                     const std::optional<at::Tensor>& grad_log_prob,
                                     const std::optional<at::Tensor>& grad_kl,
                                     const std::optional<at::Tensor>& grad_mean,
                                     const std::optional<at::Tensor>& grad_prev, bool need_dx, bool need_dv0,
                                     bool need_dv1, bool need_dv2) {
  PEC_CHECK_CUDA(x);
  PEC_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 2, "x must be (B, n)");
  check_velocities(vels, x);
  check_latent(prev, x, "prev");
  if (v_ref.has_value()) check_latent(*v_ref, x, "v_ref");
  if (grad_mean.has_value()) check_latent(*grad_mean, x, "grad_mean");
  if (grad_prev.has_value()) check_latent(*grad_prev, x, "grad_prev");
  TORCH_CHECK(!grad_kl.has_value() || v_ref.has_value(), "grad_kl needs v_ref");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t batch = x.size(0), n = x.size(1);
  TORCH_CHECK(batch <= INT32_MAX, "sde_step_bwd: at most 2^31 - 1 samples per call, got ", batch);
  const unsigned grid_y = static_cast<unsigned>(std::min<int64_t>(batch, kMaxGridY));
  const int nv = static_cast<int>(vels.size());
  const std::optional<at::Tensor> glp = per_sample_grad(grad_log_prob, x), gkl = per_sample_grad(grad_kl, x);
  const bool need[4] = {need_dx, need_dv0, need_dv1 && nv >= 2, need_dv2 && nv == 3};
  std::vector<at::Tensor> grads;
  for (int i = 0; i < 4; ++i) grads.push_back(need[i] ? at::empty_like(x) : at::empty({0}, x.options()));
  const Velocities vel{nv, {need[1], need[2], need[3]}};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sde_step_bwd", [&] {
    using A = at::acc_type<scalar_t, true>;
    const StepArgs<A> step = step_args<A>(x, params, values, eta, kind);
    auto out = [&](int i) { return need[i] ? grads[i].data_ptr<scalar_t>() : nullptr; };
    const scalar_t* v1 = nv >= 2 ? vels[1].data_ptr<scalar_t>() : nullptr;
    const scalar_t* v2 = nv == 3 ? vels[2].data_ptr<scalar_t>() : nullptr;
    const scalar_t* vref = ptr_or_null<scalar_t>(v_ref);
    const scalar_t* gm = ptr_or_null<scalar_t>(grad_mean);
    const scalar_t* gp = ptr_or_null<scalar_t>(grad_prev);
    const int vec = vector_width<scalar_t>(n, {x.data_ptr(), vels[0].data_ptr(), v1, v2, prev.data_ptr(), vref, gm,
                                               gp, out(0), out(1), out(2), out(3)});
    const int64_t chunk_elems = int64_t(kThreads) * vec * kItersPerChunk;
    const int64_t n_chunks = (n + chunk_elems - 1) / chunk_elems;
    with_vector_width(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      sde_backward_kernel<scalar_t, VEC, A><<<dim3(n_chunks, grid_y), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), vels[0].data_ptr<scalar_t>(), v1, v2, prev.data_ptr<scalar_t>(), vref,
          glp.has_value() ? glp->data_ptr<A>() : nullptr, gkl.has_value() ? gkl->data_ptr<A>() : nullptr, gm, gp,
          out(0), out(1), out(2), out(3), step, n, batch, chunk_elems, static_cast<A>(1.0 / norm), vel);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grads;
}

}  // namespace
}  // namespace pec

TORCH_LIBRARY_FRAGMENT(pec, m) {
  m.def("sde_step_fwd(Tensor x, Tensor[] vels, Tensor target, Tensor? v_ref, Tensor?[] params, float[] values, "
        "float eta, int kind, bool rollout, float norm, bool need_mean) -> (Tensor prev, Tensor mean, "
        "Tensor log_prob, Tensor kl, Tensor std)");
  m.def("sde_step_bwd(Tensor x, Tensor[] vels, Tensor prev, Tensor? v_ref, Tensor?[] params, float[] values, "
        "float eta, int kind, float norm, Tensor? grad_log_prob, Tensor? grad_kl, Tensor? grad_mean, "
        "Tensor? grad_prev, bool need_dx, bool need_dv0, bool need_dv1, bool need_dv2) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pec, CUDA, m) {
  m.impl("sde_step_fwd", &pec::sde_step_fwd);
  m.impl("sde_step_bwd", &pec::sde_step_bwd);
}
