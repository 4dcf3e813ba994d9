// Exact kNN inside small groups (n <= 256 points per group, self mode), forward and backward.
//
// Ops (torch.ops.pec.*), on x of shape (G, n, D), contiguous, fp32 / fp16 / bf16:
//   knn_grouped_select(x, k, valid=None, scale=None) -> (idx (G, n, k) int64, dist (G, n, k) fp32)
//       the k nearest j != i (self excluded by index, duplicates at distance 0 are valid),
//       ascending by distance, ties by smaller index; dist = ||x_i - x_j|| in fp32.
//       valid (G, n) bool: masked j rank after every valid one, at distance +inf (a row with fewer
//       than k valid candidates gets some of them; knn_entropy discards such rows).
//   knn_grouped_pair_distances(x, idx, scale=None) -> (G, n, k) fp32: ||x_i - x_idx[i,s]|| in fp32.
//   knn_grouped_pair_grad(x, idx, coef, scale=None) -> grad (G, n, D) fp32:
//       grad_i += sum_s coef[i,s] (x_i - x_j),  grad_j -= coef[i,s] (x_i - x_j),  j = idx[i,s].
//   scale (G, n) fp32, optional everywhere (the cosine metric's inverse norms): every row x_i is read
//   as scale[i] * x_i, as it is staged, so the normalised rows never exist in global memory; the
//   gradient is then in the scaled rows.
//
// Strategy. A group's features are streamed through shared memory in chunks of DC dimensions
// (all n rows at once, converted to fp32; the next chunk is prefetched into registers while the
// current one is used). NC, the group size rounded up to 32/64/128/256, is a template parameter
// and DC = 4096 / NC, so a chunk always holds 4096 floats (16-20 KB of shared memory).
//   Forward: block (g, r) computes the squared distances of 32 query rows of group g against all
//     n candidates, directly as sum_d (x_i - x_j)^2 with fp32 FMAs (no Gram-matrix cancellation:
//     exact duplicates give exactly 0). Warp w owns rows w, w+8, w+16, w+24; lane l owns candidates
//     l, l+32, ...; the 32 x NC tile lives in registers, so the n x n matrix never exists anywhere
//     (at n = 256 it would need 256 KB). Each warp then selects the k smallest of its rows by k
//     rounds of a warp-wide minimum over packed keys (float bits << 32 | j), which orders by
//     distance and breaks ties by the smaller index.
//   Backward: one block per group. The scatter is turned into a gather: every pair (i, j, c)
//     contributes c (x_i - x_j) to row i (outgoing) and c (x_j - x_i) to row j (incoming), so the
//     block builds, in shared memory, the list of incoming pairs of every row (a counting sort whose
//     placement runs in index order in one warp, so the result is deterministic), then each row's
//     gradient is one sum over its outgoing and incoming pairs, written once. No atomics on global
//     memory; the only atomics are the integer counts in shared memory.
//   Pair distances: one block per group, same chunking, one team of DC/4 lanes per row.
// Indices outside [0, n) (the Python wrapper rejects them) are never dereferenced: they give a
// NaN distance and no gradient contribution.
#include "common.cuh"

#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace pec {
namespace {

constexpr int kThreads = 256;      // threads per block, all kernels
constexpr int kWarps = kThreads / 32;
constexpr int kChunkFloats = 4096;  // floats of features staged per chunk: NC rows x DC dims
constexpr int kRowsPerBlock = 32;  // forward: query rows per block
constexpr int kRowsPerWarp = kRowsPerBlock / kWarps;
constexpr int kMaxGroup = 256;
constexpr int kMaxK = 64;

// Shared-memory layout of one chunk for groups of at most NC points.
template <int NC>
struct ChunkShape {
  static constexpr int DC = kChunkFloats / NC;  // dimensions per chunk
  static constexpr int STRIDE = DC + 4;         // floats per row: keeps float4 rows aligned and
                                                // the 8 lanes of a quarter-warp on distinct banks
  static constexpr int FLOATS = NC * STRIDE;
  static_assert(DC % 8 == 0, "a chunk row must hold whole 16-byte vectors of any input dtype");
};

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// The 16 bytes of a vector load as fp32, by bit operations (taking the address of the loaded
// registers to reinterpret them would put them on the stack). Element 0 is the lowest address.
template <typename T>
struct Unpack16;

template <>
struct Unpack16<float> {
  static __device__ __forceinline__ void run(const uint4 r, float* out) {
    out[0] = __uint_as_float(r.x);
    out[1] = __uint_as_float(r.y);
    out[2] = __uint_as_float(r.z);
    out[3] = __uint_as_float(r.w);
  }
};

template <>
struct Unpack16<at::BFloat16> {
  static __device__ __forceinline__ void run(const uint4 r, float* out) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      out[2 * t] = __uint_as_float(w[t] << 16);
      out[2 * t + 1] = __uint_as_float(w[t] & 0xffff0000u);
    }
  }
};

template <>
struct Unpack16<at::Half> {
  static __device__ __forceinline__ void run(const uint4 r, float* out) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      out[2 * t] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[t] & 0xffffu)));
      out[2 * t + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[t] >> 16)));
    }
  }
};

// Loads one chunk of a group (rows < n, dims [d0, d0 + DC) clipped to D, zeros elsewhere) into
// registers as fp32, and stores it to shared memory. VEC elements per load: 16 bytes when D and
// the base pointer allow it, else 1.
template <typename T, int NC, int VEC>
struct ChunkStager {
  using Shape = ChunkShape<NC>;
  static constexpr int VECS_PER_ROW = Shape::DC / VEC;
  static constexpr int PER_THREAD = NC * VECS_PER_ROW / kThreads;
  static_assert(NC * VECS_PER_ROW % kThreads == 0, "chunk must split evenly over the block");
  static_assert(VEC == 1 || VEC * sizeof(T) == 16, "vector loads are 16 bytes");

  float v[PER_THREAD][VEC];

  // scale_g: the group's row multipliers, or nullptr (rows as they are).
  __device__ __forceinline__ void load(const T* __restrict__ xg, const float* __restrict__ scale_g, int n, int D,
                                       int d0) {
#pragma unroll
    for (int p = 0; p < PER_THREAD; ++p) {
      const int e = threadIdx.x + p * kThreads;
      const int row = e / VECS_PER_ROW;
      const int d = d0 + (e % VECS_PER_ROW) * VEC;
      const T* src = xg + static_cast<int64_t>(row) * D + d;
      if constexpr (VEC > 1) {
        // D % VEC == 0 here, so a vector is entirely inside or entirely outside [0, D).
        if (row < n && d < D) {
          Unpack16<T>::run(*reinterpret_cast<const uint4*>(src), v[p]);
          if (scale_g != nullptr) {
            const float s = scale_g[row];
#pragma unroll
            for (int c = 0; c < VEC; ++c) v[p][c] *= s;
          }
        } else {
#pragma unroll
          for (int c = 0; c < VEC; ++c) v[p][c] = 0.f;
        }
      } else {
        v[p][0] = (row < n && d < D) ? to_float(*src) : 0.f;
        if (scale_g != nullptr && row < n) v[p][0] *= scale_g[row];
      }
    }
  }

  __device__ __forceinline__ void store(float* xs) const {
#pragma unroll
    for (int p = 0; p < PER_THREAD; ++p) {
      const int e = threadIdx.x + p * kThreads;
      float* dst = xs + (e / VECS_PER_ROW) * Shape::STRIDE + (e % VECS_PER_ROW) * VEC;
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int c = 0; c < VEC; c += 4)
          *reinterpret_cast<float4*>(dst + c) = make_float4(v[p][c], v[p][c + 1], v[p][c + 2], v[p][c + 3]);
      } else {
#pragma unroll
        for (int c = 0; c < VEC; ++c) dst[c] = v[p][c];
      }
    }
  }
};

__device__ __forceinline__ float4 load_row4(const float* xs, int stride, int row, int d) {
  return *reinterpret_cast<const float4*>(xs + row * stride + d);
}

__device__ __forceinline__ float sq_dist4(float4 a, float4 b, float acc) {
  const float dx = a.x - b.x, dy = a.y - b.y, dz = a.z - b.z, dw = a.w - b.w;
  acc = fmaf(dx, dx, acc);
  acc = fmaf(dy, dy, acc);
  acc = fmaf(dz, dz, acc);
  return fmaf(dw, dw, acc);
}

__device__ __forceinline__ unsigned long long warp_min_u64(unsigned long long v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const unsigned long long o = __shfl_xor_sync(0xffffffffu, v, off);
    v = o < v ? o : v;
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Forward: distances + top-k selection. grid = (G, ceil(n / 32)), block = 256.
template <typename T, int NC, int VEC>
__global__ void __launch_bounds__(kThreads)
knn_grouped_select_kernel(const T* __restrict__ x, const bool* __restrict__ valid, const float* __restrict__ scale,
                          int n, int D, int k, int64_t* __restrict__ idx_out, float* __restrict__ dist_out) {
  using Shape = ChunkShape<NC>;
  constexpr int TN = NC / 32;  // candidates per lane
  __shared__ __align__(16) float xs[Shape::FLOATS];

  const int g = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = blockIdx.y * kRowsPerBlock + warp;  // rows row0 + 8a, a < kRowsPerWarp
  const T* xg = x + static_cast<int64_t>(g) * n * D;
  const float* scale_g = scale == nullptr ? nullptr : scale + static_cast<int64_t>(g) * n;
  const bool* valid_g = valid == nullptr ? nullptr : valid + static_cast<int64_t>(g) * n;

  float acc[kRowsPerWarp][TN];
#pragma unroll
  for (int a = 0; a < kRowsPerWarp; ++a)
#pragma unroll
    for (int b = 0; b < TN; ++b) acc[a][b] = 0.f;

  ChunkStager<T, NC, VEC> stager;
  stager.load(xg, scale_g, n, D, 0);
  for (int d0 = 0; d0 < D; d0 += Shape::DC) {
    __syncthreads();  // everyone is done reading the previous chunk
    stager.store(xs);
    __syncthreads();
    if (d0 + Shape::DC < D) stager.load(xg, scale_g, n, D, d0 + Shape::DC);  // in flight during the FMAs
    const int dlen = min(Shape::DC, (D - d0 + 3) & ~3);  // the padding beyond D is zero
#pragma unroll 2
    for (int d = 0; d < dlen; d += 4) {
      float4 xj[TN];
#pragma unroll
      for (int b = 0; b < TN; ++b) xj[b] = load_row4(xs, Shape::STRIDE, lane + 32 * b, d);
#pragma unroll
      for (int a = 0; a < kRowsPerWarp; ++a) {
        const int i = row0 + kWarps * a;
        if (i < n) {  // warp-uniform
          const float4 xi = load_row4(xs, Shape::STRIDE, i, d);  // broadcast
#pragma unroll
          for (int b = 0; b < TN; ++b) acc[a][b] = sq_dist4(xi, xj[b], acc[a][b]);
        }
      }
    }
  }

#pragma unroll
  for (int a = 0; a < kRowsPerWarp; ++a) {
    const int i = row0 + kWarps * a;
    if (i >= n) continue;  // warp-uniform
    // Key = (bits of d^2) << 32 | j: d^2 >= 0, so its bits order like the value. A masked j gets the
    // bits of +inf: after every valid candidate, yet still a row number (never ~0).
    unsigned long long key[TN];
#pragma unroll
    for (int b = 0; b < TN; ++b) {
      const int j = lane + 32 * b;
      const float d2 = (valid_g == nullptr || (j < n && valid_g[j])) ? acc[a][b] : __int_as_float(0x7f800000);
      key[b] = (j < n && j != i)
                   ? (static_cast<unsigned long long>(__float_as_uint(d2)) << 32) | static_cast<unsigned>(j)
                   : ~0ull;
    }
    // Selected pair s is kept by lane s % 32 in slot s / 32 (k <= 64), then written coalesced.
    int sel_j[2] = {0, 0};
    float sel_d[2] = {0.f, 0.f};
    for (int s = 0; s < k; ++s) {  // k <= n - 1, so a valid candidate always remains
      unsigned long long m = key[0];
#pragma unroll
      for (int b = 1; b < TN; ++b) m = key[b] < m ? key[b] : m;
      m = warp_min_u64(m);
      const int j = static_cast<int>(m & 0xffffffffu);
#pragma unroll
      for (int b = 0; b < TN; ++b)
        if (lane + 32 * b == j) key[b] = ~0ull;
      if (lane == (s & 31)) {
        const float d2 = __uint_as_float(static_cast<unsigned>(m >> 32));
        if (s < 32) {
          sel_j[0] = j;
          sel_d[0] = sqrtf(d2);
        } else {
          sel_j[1] = j;
          sel_d[1] = sqrtf(d2);
        }
      }
    }
    const int64_t out = (static_cast<int64_t>(g) * n + i) * k;
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      const int s = lane + 32 * t;
      if (s < k) {
        idx_out[out + s] = sel_j[t];
        dist_out[out + s] = sel_d[t];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Pair distances: grid = G, block = 256, dynamic shared memory (see pair_distances_smem).
// Row i is handled by a team of DC/4 lanes, one float4 of the chunk per lane.
template <int NC>
struct PairLayout {
  static constexpr int TEAM = ChunkShape<NC>::DC / 4;
  static constexpr int TEAMS = kThreads / TEAM;
};

inline size_t pair_distances_smem(int NC_floats, int n, int k) {
  return sizeof(float) * (NC_floats + static_cast<size_t>(n) * k) + sizeof(int16_t) * n * k;
}

// Copies the group's indices to shared memory; -1 marks an index outside [0, n).
__device__ __forceinline__ void stage_indices(const int64_t* __restrict__ idx_g, int n, int nk, int16_t* out) {
  for (int e = threadIdx.x; e < nk; e += kThreads) {
    const int64_t j = idx_g[e];
    out[e] = (j >= 0 && j < n) ? static_cast<int16_t>(j) : static_cast<int16_t>(-1);
  }
}

template <typename T, int NC, int VEC>
__global__ void __launch_bounds__(kThreads)
knn_grouped_pair_distances_kernel(const T* __restrict__ x, const int64_t* __restrict__ idx,
                                  const float* __restrict__ scale, int n, int D, int k, float* __restrict__ dist_out) {
  using Shape = ChunkShape<NC>;
  using Layout = PairLayout<NC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* xs = reinterpret_cast<float*>(smem_raw);
  float* acc = xs + Shape::FLOATS;                              // n*k partial squared distances
  int16_t* nbr = reinterpret_cast<int16_t*>(acc + n * k);      // n*k neighbour indices

  const int g = blockIdx.x;
  const int nk = n * k;
  const int team = threadIdx.x / Layout::TEAM;
  const int tl = threadIdx.x % Layout::TEAM;
  const T* xg = x + static_cast<int64_t>(g) * n * D;
  const float* scale_g = scale == nullptr ? nullptr : scale + static_cast<int64_t>(g) * n;

  stage_indices(idx + static_cast<int64_t>(g) * nk, n, nk, nbr);
  for (int e = threadIdx.x; e < nk; e += kThreads) acc[e] = 0.f;

  ChunkStager<T, NC, VEC> stager;
  stager.load(xg, scale_g, n, D, 0);
  for (int d0 = 0; d0 < D; d0 += Shape::DC) {
    __syncthreads();
    stager.store(xs);
    __syncthreads();
    if (d0 + Shape::DC < D) stager.load(xg, scale_g, n, D, d0 + Shape::DC);
    // The loop bounds are the same for every team, so the whole warp reaches each shuffle.
    for (int base = 0; base < n; base += Layout::TEAMS) {
      const int i = base + team;
      const bool valid = i < n;
      const int row = valid ? i : 0;
      const float4 xi = load_row4(xs, Shape::STRIDE, row, 4 * tl);
      for (int s = 0; s < k; ++s) {
        const int j = valid ? nbr[row * k + s] : -1;
        float part = j >= 0 ? sq_dist4(xi, load_row4(xs, Shape::STRIDE, j, 4 * tl), 0.f) : 0.f;
#pragma unroll
        for (int off = Layout::TEAM / 2; off > 0; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        if (valid && tl == 0) acc[i * k + s] += part;  // always the same thread for a given (i, s)
      }
    }
  }
  __syncthreads();
  float* out = dist_out + static_cast<int64_t>(g) * nk;
  for (int e = threadIdx.x; e < nk; e += kThreads) out[e] = nbr[e] >= 0 ? sqrtf(acc[e]) : __int_as_float(0x7fc00000);
}

// ---------------------------------------------------------------------------------------------
// Backward: grid = G, block = 256, dynamic shared memory laid out by GradSmem.
struct GradSmem {
  size_t out_coef, in_coef, in_off, cursor, out_idx, in_src, total;  // byte offsets
  __host__ __device__ GradSmem(int chunk_floats, int n, int k) {
    const size_t nk = static_cast<size_t>(n) * k;
    out_coef = sizeof(float) * chunk_floats;
    in_coef = out_coef + sizeof(float) * nk;
    in_off = in_coef + sizeof(float) * nk;
    cursor = in_off + sizeof(int) * (n + 1);
    out_idx = cursor + sizeof(int) * n;
    in_src = out_idx + nk;
    total = in_src + nk;
  }
};

template <typename T, int NC, int VEC>
__global__ void __launch_bounds__(kThreads)
knn_grouped_pair_grad_kernel(const T* __restrict__ x, const int64_t* __restrict__ idx,
                             const float* __restrict__ coef, const float* __restrict__ scale, int n, int D, int k,
                             float* __restrict__ grad) {
  using Shape = ChunkShape<NC>;
  using Layout = PairLayout<NC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const GradSmem lay(Shape::FLOATS, n, k);
  float* xs = reinterpret_cast<float*>(smem_raw);
  float* out_coef = reinterpret_cast<float*>(smem_raw + lay.out_coef);  // (i, s) -> coef
  float* in_coef = reinterpret_cast<float*>(smem_raw + lay.in_coef);    // incoming pairs, by row
  int* in_off = reinterpret_cast<int*>(smem_raw + lay.in_off);          // row i: [in_off[i], in_off[i+1])
  int* cursor = reinterpret_cast<int*>(smem_raw + lay.cursor);
  uint8_t* out_idx = smem_raw + lay.out_idx;                            // (i, s) -> j  (n <= 256)
  uint8_t* in_src = smem_raw + lay.in_src;                              // incoming pair -> its row i

  const int g = blockIdx.x;
  const int nk = n * k;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t* idx_g = idx + static_cast<int64_t>(g) * nk;
  const float* coef_g = coef + static_cast<int64_t>(g) * nk;
  const T* xg = x + static_cast<int64_t>(g) * n * D;
  const float* scale_g = scale == nullptr ? nullptr : scale + static_cast<int64_t>(g) * n;

  ChunkStager<T, NC, VEC> stager;
  stager.load(xg, scale_g, n, D, 0);  // in flight while the pair lists are built

  for (int i = threadIdx.x; i < n; i += kThreads) cursor[i] = 0;
  for (int e = threadIdx.x; e < nk; e += kThreads) {
    const int64_t j = idx_g[e];
    const bool ok = j >= 0 && j < n;  // an invalid pair becomes (i, i) with weight 0: no contribution
    out_idx[e] = static_cast<uint8_t>(ok ? j : e / k);
    out_coef[e] = ok ? coef_g[e] : 0.f;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < nk; e += kThreads) atomicAdd(&cursor[out_idx[e]], 1);
  __syncthreads();

  if (warp == 0) {
    // Exclusive scan of the n <= 256 in-degrees: lane l owns rows 8l .. 8l+7.
    constexpr int kPer = kMaxGroup / 32;
    int cnt[kPer];
    int sum = 0;
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int r = lane * kPer + t;
      cnt[t] = r < n ? cursor[r] : 0;
      sum += cnt[t];
    }
    int incl = sum;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int o = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += o;
    }
    int run = incl - sum;
#pragma unroll
    for (int t = 0; t < kPer; ++t) {
      const int r = lane * kPer + t;
      if (r < n) {
        in_off[r] = run;
        cursor[r] = run;
      }
      run += cnt[t];
    }
    if (lane == 0) in_off[n] = nk;
    __syncwarp();
    // Place the pairs in index order: within a batch of 32, lanes aiming at the same row are ranked
    // by lane, and batches run in order, so every row's list is sorted by pair index.
    for (int base = 0; base < nk; base += 32) {
      const int e = base + lane;
      const bool valid = e < nk;
      const int j = valid ? out_idx[e] : kMaxGroup + lane;  // unique dummy key for idle lanes
      const unsigned peers = __match_any_sync(0xffffffffu, j);
      const int rank = __popc(peers & ((1u << lane) - 1u));
      if (valid) {
        const int pos = cursor[j] + rank;
        in_src[pos] = static_cast<uint8_t>(e / k);
        in_coef[pos] = out_coef[e];
      }
      __syncwarp();
      if (valid && rank == 0) cursor[j] += __popc(peers);
      __syncwarp();
    }
  }

  const int team = threadIdx.x / Layout::TEAM;
  const int tl = threadIdx.x % Layout::TEAM;
  const bool vec_store = (D % 4) == 0;
  for (int d0 = 0; d0 < D; d0 += Shape::DC) {
    __syncthreads();  // pair lists ready / previous chunk consumed
    stager.store(xs);
    __syncthreads();
    if (d0 + Shape::DC < D) stager.load(xg, scale_g, n, D, d0 + Shape::DC);
    const int d = d0 + 4 * tl;
    if (d >= D) continue;  // no barrier below, so idle lanes may skip the chunk
    for (int i = team; i < n; i += Layout::TEAMS) {
      const float4 xi = load_row4(xs, Shape::STRIDE, i, 4 * tl);
      float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
      // Outgoing pairs (i, j): + c (x_i - x_j). Incoming pairs (m, i): - c (x_m - x_i) = + c (x_i - x_m).
      const int n_out = k;
      const int in_begin = in_off[i], in_end = in_off[i + 1];
      for (int p = 0; p < n_out + in_end - in_begin; ++p) {
        const bool outgoing = p < n_out;
        const int q = outgoing ? i * k + p : in_begin + p - n_out;
        const int j = outgoing ? out_idx[q] : in_src[q];
        const float c = outgoing ? out_coef[q] : in_coef[q];
        const float4 xj = load_row4(xs, Shape::STRIDE, j, 4 * tl);
        acc.x = fmaf(c, xi.x - xj.x, acc.x);
        acc.y = fmaf(c, xi.y - xj.y, acc.y);
        acc.z = fmaf(c, xi.z - xj.z, acc.z);
        acc.w = fmaf(c, xi.w - xj.w, acc.w);
      }
      float* dst = grad + (static_cast<int64_t>(g) * n + i) * D + d;
      if (vec_store) {
        *reinterpret_cast<float4*>(dst) = acc;
      } else {  // D % 4 != 0: rows are not 16-byte aligned, and the last chunk ends inside a float4
        dst[0] = acc.x;
        if (d + 1 < D) dst[1] = acc.y;
        if (d + 2 < D) dst[2] = acc.z;
        if (d + 3 < D) dst[3] = acc.w;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(TypeTag<float>{}); break;
    case at::kHalf: f(TypeTag<at::Half>{}); break;
    case at::kBFloat16: f(TypeTag<at::BFloat16>{}); break;
    default: TORCH_CHECK(false, "x must be float32, float16 or bfloat16, got ", st);
  }
}

template <typename F>
void dispatch_group_size(int64_t n, F&& f) {
  if (n <= 32) f(std::integral_constant<int, 32>{});
  else if (n <= 64) f(std::integral_constant<int, 64>{});
  else if (n <= 128) f(std::integral_constant<int, 128>{});
  else f(std::integral_constant<int, 256>{});
}

// 16-byte loads need every row to start on a 16-byte boundary.
template <typename T, typename F>
void dispatch_vector_width(const at::Tensor& x, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 && x.size(2) % kVec == 0;
  if (aligned) f(std::integral_constant<int, kVec>{});
  else f(std::integral_constant<int, 1>{});
}

template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, size_t bytes, const at::Tensor& x) {
  const size_t limit = at::cuda::getDeviceProperties(x.get_device())->sharedMemPerBlockOptin;
  TORCH_CHECK(bytes <= limit, "knn_grouped: needs ", bytes, " bytes of shared memory, the device allows ", limit,
              "; use a smaller k or group size");
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

void check_features(const at::Tensor& x) {
  PEC_CHECK_CUDA(x);
  PEC_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 3, "x must have shape (G, n, D), got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(2) >= 1, "x must not be empty, got ", x.sizes());
  TORCH_CHECK(x.size(1) >= 2 && x.size(1) <= kMaxGroup, "x: group size n must be in [2, ", kMaxGroup, "], got ",
              x.size(1));
  TORCH_CHECK(x.size(0) <= INT32_MAX && x.size(2) <= INT32_MAX, "x is too large: ", x.sizes());
}

// An optional per-row tensor (valid, scale): shape (G, n) like x's rows, the given dtype, on x's
// device, contiguous. Returns its data pointer, or nullptr when absent.
template <typename P>
const P* row_tensor(const c10::optional<at::Tensor>& t, const at::Tensor& x, at::ScalarType dtype, const char* name) {
  if (!t.has_value()) return nullptr;
  const at::Tensor& r = *t;
  TORCH_CHECK(r.scalar_type() == dtype, name, " must be ", dtype, ", got ", r.scalar_type());
  TORCH_CHECK(r.device() == x.device(), name, " must be on the device of x");
  TORCH_CHECK(r.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(r.dim() == 2 && r.size(0) == x.size(0) && r.size(1) == x.size(1), name,
              " must have shape (G, n) matching x ", x.sizes(), ", got ", r.sizes());
  return r.data_ptr<P>();
}

void check_pairs(const at::Tensor& x, const at::Tensor& idx) {
  check_features(x);
  PEC_CHECK_CUDA(idx);
  PEC_CHECK_CONTIGUOUS(idx);
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.device() == x.device(), "idx must be on the device of x");
  TORCH_CHECK(idx.dim() == 3 && idx.size(0) == x.size(0) && idx.size(1) == x.size(1),
              "idx must have shape (G, n, k) matching x ", x.sizes(), ", got ", idx.sizes());
  TORCH_CHECK(idx.size(2) >= 1 && idx.size(2) <= kMaxK, "idx: k must be in [1, ", kMaxK, "], got ", idx.size(2));
}

std::tuple<at::Tensor, at::Tensor> knn_grouped_select(const at::Tensor& x, int64_t k,
                                                      const c10::optional<at::Tensor>& valid,
                                                      const c10::optional<at::Tensor>& scale) {
  check_features(x);
  const bool* valid_ptr = row_tensor<bool>(valid, x, at::kBool, "valid");
  const float* scale_ptr = row_tensor<float>(scale, x, at::kFloat, "scale");
  const int64_t G = x.size(0), n = x.size(1), D = x.size(2);
  TORCH_CHECK(k >= 1 && k <= std::min<int64_t>(kMaxK, n - 1), "k must be in [1, min(", kMaxK, ", n - 1)], got ", k);
  const c10::cuda::CUDAGuard guard(x.device());
  auto idx = at::empty({G, n, k}, x.options().dtype(at::kLong));
  auto dist = at::empty({G, n, k}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(G), static_cast<unsigned>(ceil_div(n, kRowsPerBlock)));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_group_size(n, [&](auto nc) {
      dispatch_vector_width<T>(x, [&](auto vec) {
        knn_grouped_select_kernel<T, decltype(nc)::value, decltype(vec)::value><<<grid, kThreads, 0, stream>>>(
            static_cast<const T*>(x.data_ptr()), valid_ptr, scale_ptr, static_cast<int>(n), static_cast<int>(D),
            static_cast<int>(k), idx.data_ptr<int64_t>(), dist.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {idx, dist};
}

at::Tensor knn_grouped_pair_distances(const at::Tensor& x, const at::Tensor& idx,
                                      const c10::optional<at::Tensor>& scale) {
  check_pairs(x, idx);
  const float* scale_ptr = row_tensor<float>(scale, x, at::kFloat, "scale");
  const int64_t G = x.size(0), n = x.size(1), D = x.size(2), k = idx.size(2);
  const c10::cuda::CUDAGuard guard(x.device());
  auto dist = at::empty({G, n, k}, x.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_group_size(n, [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      dispatch_vector_width<T>(x, [&](auto vec) {
        auto kernel = &knn_grouped_pair_distances_kernel<T, NC, decltype(vec)::value>;
        const size_t smem = pair_distances_smem(ChunkShape<NC>::FLOATS, static_cast<int>(n), static_cast<int>(k));
        allow_dynamic_smem(kernel, smem, x);
        kernel<<<static_cast<unsigned>(G), kThreads, smem, stream>>>(
            static_cast<const T*>(x.data_ptr()), idx.data_ptr<int64_t>(), scale_ptr, static_cast<int>(n),
            static_cast<int>(D), static_cast<int>(k), dist.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return dist;
}

at::Tensor knn_grouped_pair_grad(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& coef,
                                 const c10::optional<at::Tensor>& scale) {
  check_pairs(x, idx);
  const float* scale_ptr = row_tensor<float>(scale, x, at::kFloat, "scale");
  PEC_CHECK_CUDA(coef);
  PEC_CHECK_CONTIGUOUS(coef);
  TORCH_CHECK(coef.scalar_type() == at::kFloat, "coef must be float32, got ", coef.scalar_type());
  TORCH_CHECK(coef.device() == x.device(), "coef must be on the device of x");
  TORCH_CHECK(coef.sizes() == idx.sizes(), "coef must have the shape of idx ", idx.sizes(), ", got ", coef.sizes());
  const int64_t G = x.size(0), n = x.size(1), D = x.size(2), k = idx.size(2);
  const c10::cuda::CUDAGuard guard(x.device());
  auto grad = at::empty({G, n, D}, x.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_group_size(n, [&](auto nc) {
      constexpr int NC = decltype(nc)::value;
      dispatch_vector_width<T>(x, [&](auto vec) {
        auto kernel = &knn_grouped_pair_grad_kernel<T, NC, decltype(vec)::value>;
        const size_t smem = GradSmem(ChunkShape<NC>::FLOATS, static_cast<int>(n), static_cast<int>(k)).total;
        allow_dynamic_smem(kernel, smem, x);
        kernel<<<static_cast<unsigned>(G), kThreads, smem, stream>>>(
            static_cast<const T*>(x.data_ptr()), idx.data_ptr<int64_t>(), coef.data_ptr<float>(), scale_ptr,
            static_cast<int>(n), static_cast<int>(D), static_cast<int>(k), grad.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return grad;
}

}  // namespace
}  // namespace pec

TORCH_LIBRARY_FRAGMENT(pec, m) {
  m.def("knn_grouped_select(Tensor x, int k, Tensor? valid=None, Tensor? scale=None) -> (Tensor, Tensor)");
  m.def("knn_grouped_pair_distances(Tensor x, Tensor idx, Tensor? scale=None) -> Tensor");
  m.def("knn_grouped_pair_grad(Tensor x, Tensor idx, Tensor coef, Tensor? scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(pec, CUDA, m) {
  m.impl("knn_grouped_select", &pec::knn_grouped_select);
  m.impl("knn_grouped_pair_distances", &pec::knn_grouped_pair_distances);
  m.impl("knn_grouped_pair_grad", &pec::knn_grouped_pair_grad);
}
