// Fused CUDA kernels of compressed_comm: the torch reference's math (kernels/torch_ref.py),
// one pass per reduction and one per quantise/pack (+ reference update) or decode.
//
// Conventions (as in the reference): x, pred, ref, out are row-major (N, C) arrays of T
// (float, __half or __nv_bfloat16); has_pred == 0 means a zero prediction; has_ref == 0 means
// no reference update. The residual is d = float(x) - float(pred), saturated to +-FP32_MAX
// (finite inputs never overflow it; NaN stays NaN), or float(x) itself without a
// prediction; the caller rejects NaN/Inf input beforehand when asked to. Reconstructions are
// float(pred) + dhat, saturated to T's finite range and rounded to nearest even. Codes are
// packed little-endian within a byte over the flattened (N, C) array. Compile with
// -fmad=false so that a*b + c is not contracted into an FMA the reference does not do.
//
// Every kernel exists for the three dtypes with the suffix _f32, _f16 or _bf16.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

#define FP32_MAX 3.4028234663852886e38f

__device__ __forceinline__ float saturate(float v, float big) {
    // NaN passes through (both comparisons are false)
    return v > big ? big : (v < -big ? -big : v);
}
__device__ __forceinline__ void store(float* p, float v) { *p = saturate(v, FP32_MAX); }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(saturate(v, 65504.0f)); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(saturate(v, 3.3895313892515355e38f));
}

// x - pv saturated to +-FP32_MAX (torch_ref.residual); x itself without a prediction
__device__ __forceinline__ float residual_of(float xv, float pv, int has_pred) {
    return has_pred ? saturate(xv - pv, FP32_MAX) : xv;
}

template <typename T>
__device__ __forceinline__ float residual(const T* x, const T* pred, int has_pred, i64 i) {
    return has_pred ? residual_of(to_f32(x[i]), to_f32(pred[i]), 1) : to_f32(x[i]);
}

template <typename T>
__device__ __forceinline__ float prediction(const T* pred, int has_pred, i64 i) {
    return has_pred ? to_f32(pred[i]) : 0.0f;
}

// Block-wide sum of one double per thread (blockDim.x a multiple of 32, at most 1024).
__device__ double block_sum(double v) {
    __shared__ double warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? warp_sums[lane] : 0.0;
    if (warp == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;  // valid in thread 0
}

// ---------------------------------------------------------------------------- reductions
//
// Column statistics are reduced per tile of TILE rows into partials[tile, C] (no atomics:
// deterministic), then over tiles by the *_finish kernels.

#define TILE 32

// rows[r] = sum_c |d[r, c]| (float64); partials[tile, c] = sum over the tile's rows.
template <typename T>
__device__ void abs_sums(const T* x, const T* pred, int has_pred, i64 n, i64 c,
                         double* rows, double* partials) {
    i64 r0 = (i64)blockIdx.x * TILE;
    double row_acc[TILE];
    for (int k = 0; k < TILE; ++k) row_acc[k] = 0.0;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        double col_acc = 0.0;
        for (int k = 0; k < TILE && r0 + k < n; ++k) {
            double a = fabsf(residual(x, pred, has_pred, (r0 + k) * c + j));
            col_acc += a;
            row_acc[k] += a;
        }
        partials[(i64)blockIdx.x * c + j] = col_acc;
    }
    for (int k = 0; k < TILE && r0 + k < n; ++k) {
        double s = block_sum(row_acc[k]);
        if (threadIdx.x == 0) rows[r0 + k] = s;
    }
}

// lo/hi partials of d per column and tile (NaN propagates like torch.amin/amax).
template <typename T>
__device__ void col_min_max(const T* x, const T* pred, int has_pred, i64 n, i64 c,
                            float* lo_parts, float* hi_parts) {
    i64 r0 = (i64)blockIdx.x * TILE;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float lo = __int_as_float(0x7f800000), hi = -lo;
        for (int k = 0; k < TILE && r0 + k < n; ++k) {
            float d = residual(x, pred, has_pred, (r0 + k) * c + j);
            if (d < lo || d != d) lo = d;
            if (d > hi || d != d) hi = d;
        }
        lo_parts[(i64)blockIdx.x * c + j] = lo;
        hi_parts[(i64)blockIdx.x * c + j] = hi;
    }
}

template <typename T>
__device__ void col_abs_max(const T* x, const T* pred, int has_pred, i64 n, i64 c,
                            float* parts) {
    i64 r0 = (i64)blockIdx.x * TILE;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float m = 0.0f;
        for (int k = 0; k < TILE && r0 + k < n; ++k) {
            float a = fabsf(residual(x, pred, has_pred, (r0 + k) * c + j));
            if (a > m || a != a) m = a;
        }
        parts[(i64)blockIdx.x * c + j] = m;
    }
}

extern "C" __global__ void binary_scales_finish(const double* rows, const double* partials,
                                                i64 n, i64 c, i64 tiles, float* row, float* col) {
    // one block: total |d|, then row = rows / C and col = (cols / N) / mean (0 if mean == 0)
    double t = 0.0;
    for (i64 r = threadIdx.x; r < n; r += blockDim.x) t += rows[r];
    double total = block_sum(t);
    __shared__ double mean;
    if (threadIdx.x == 0) mean = total / (double)(n * c > 0 ? n * c : 1);
    __syncthreads();
    for (i64 r = threadIdx.x; r < n; r += blockDim.x) row[r] = (float)(rows[r] / (double)(c > 0 ? c : 1));
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        double s = 0.0;
        for (i64 b = 0; b < tiles; ++b) s += partials[b * c + j];
        col[j] = mean > 0.0 ? (float)((s / (double)(n > 0 ? n : 1)) / mean) : 0.0f;
    }
}

extern "C" __global__ void min_max_finish(const float* lo_parts, const float* hi_parts, i64 c,
                                          i64 tiles, float* lo, float* span) {
    i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float l = lo_parts[j], h = hi_parts[j];
    for (i64 b = 1; b < tiles; ++b) {
        float a = lo_parts[b * c + j], z = hi_parts[b * c + j];
        if (a < l || a != a) l = a;
        if (z > h || z != z) h = z;
    }
    lo[j] = l;
    span[j] = saturate(h - l, FP32_MAX);  // the span of a saturated residual can overflow
}

extern "C" __global__ void abs_max_finish(const float* parts, i64 c, i64 tiles, float* amax) {
    i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float m = parts[j];
    for (i64 b = 1; b < tiles; ++b) {
        float a = parts[b * c + j];
        if (a > m || a != a) m = a;
    }
    amax[j] = m;
}

// ---------------------------------------------------------------------------- binary

// one thread per output byte: 8 consecutive elements of the flattened (N, C) array
template <typename T>
__device__ void binary_pack(const T* x, const T* pred, int has_pred, T* ref, int has_ref,
                            unsigned char* bits, const float* row, const float* col,
                            i64 n, i64 c) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = n * c;
    if (b * 8 >= total) return;
    i64 i = b * 8, r = i / c, j = i - r * c;
    unsigned char byte = 0;
    for (int k = 0; k < 8 && i < total; ++k, ++i) {
        float pv = prediction(pred, has_pred, i);
        float d = residual_of(to_f32(x[i]), pv, has_pred);
        bool pos = d >= 0.0f;
        byte |= (unsigned char)pos << k;
        if (has_ref) {
            float s = row[r] * col[j];
            store(ref + i, pv + (pos ? s : -s));
        }
        if (++j == c) { j = 0; ++r; }
    }
    bits[b] = byte;
}

template <typename T>
__device__ void binary_apply(const unsigned char* bits, const float* row, const float* col,
                             const T* pred, int has_pred, T* out, i64 n, i64 c) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = n * c;
    if (b * 8 >= total) return;
    i64 i = b * 8, r = i / c, j = i - r * c;
    unsigned char byte = bits[b];
    for (int k = 0; k < 8 && i < total; ++k, ++i) {
        float s = row[r] * col[j];
        store(out + i, prediction(pred, has_pred, i) + (((byte >> k) & 1) ? s : -s));
        if (++j == c) { j = 0; ++r; }
    }
}

// ---------------------------------------------------------------------------- min-max int-k

template <typename T>
__device__ void minmax_pack(const T* x, const T* pred, int has_pred, T* ref, int has_ref,
                            unsigned char* codes, const float* lo, const float* span,
                            int bits, i64 n, i64 c) {
    int per = 8 / bits;
    float qmax = (float)((1 << bits) - 1);
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = n * c;
    if (b * per >= total) return;
    i64 i = b * per, r = i / c, j = i - r * c;
    unsigned char byte = 0;
    for (int k = 0; k < per && i < total; ++k, ++i) {
        float pv = prediction(pred, has_pred, i);
        float d = residual_of(to_f32(x[i]), pv, has_pred);
        float sp = span[j], q = 0.0f;
        if (sp > 0.0f) {
            q = rintf(__fmul_rn(d - lo[j], __fdiv_rn(qmax, sp)));
            q = q < 0.0f ? 0.0f : (q > qmax ? qmax : q);
        }
        byte |= (unsigned char)q << (k * bits);
        if (has_ref) store(ref + i, pv + (lo[j] + __fmul_rn(q, __fdiv_rn(sp, qmax))));
        if (++j == c) { j = 0; ++r; }
    }
    codes[b] = byte;
}

template <typename T>
__device__ void minmax_apply(const unsigned char* codes, const float* lo, const float* span,
                             int bits, const T* pred, int has_pred, T* out, i64 n, i64 c) {
    int per = 8 / bits;
    float qmax = (float)((1 << bits) - 1);
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = n * c;
    if (b * per >= total) return;
    i64 i = b * per, r = i / c, j = i - r * c;
    unsigned char byte = codes[b];
    for (int k = 0; k < per && i < total; ++k, ++i) {
        float q = (float)((byte >> (k * bits)) & ((1 << bits) - 1));
        store(out + i, prediction(pred, has_pred, i) + (lo[j] + __fmul_rn(q, __fdiv_rn(span[j], qmax))));
        if (++j == c) { j = 0; ++r; }
    }
}

// ---------------------------------------------------------------------------- abs-max int8

template <typename T>
__device__ void absmax_pack(const T* x, const T* pred, int has_pred, T* ref, int has_ref,
                            unsigned char* codes, const float* amax, i64 n, i64 c) {
    const float qmax = 127.0f;
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * c) return;
    i64 j = i % c;
    float pv = prediction(pred, has_pred, i);
    float d = residual_of(to_f32(x[i]), pv, has_pred);
    float am = amax[j], safe = am > 0.0f ? am : 1.0f;
    float q = rintf(__fmul_rn(__fdiv_rn(d, safe), qmax));
    q = q < -qmax ? -qmax : (q > qmax ? qmax : q);
    codes[i] = (unsigned char)(q + qmax);
    if (has_ref) store(ref + i, pv + __fmul_rn(__fdiv_rn(q, qmax), am));
}

template <typename T>
__device__ void absmax_apply(const unsigned char* codes, const float* amax, const T* pred,
                             int has_pred, T* out, i64 n, i64 c) {
    const float qmax = 127.0f;
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * c) return;
    float q = (float)codes[i] - qmax;
    store(out + i, prediction(pred, has_pred, i) + __fmul_rn(__fdiv_rn(q, qmax), amax[i % c]));
}

// ---------------------------------------------------------------------------- int2

// one block per row: the least-squares level of each group (|d| below or above split * s)
template <typename T>
__device__ void int2_levels(const T* x, const T* pred, int has_pred, const float* row,
                            const float* col, float split, i64 n, i64 c, float* small,
                            float* big) {
    i64 r = blockIdx.x;
    if (r >= n) return;
    float rv = row[r];
    double ns = 0.0, ds = 0.0, nb = 0.0, db = 0.0;
    for (i64 j = threadIdx.x; j < c; j += blockDim.x) {
        float a = fabsf(residual(x, pred, has_pred, r * c + j));
        float cj = col[j];
        double ac = (double)(a * cj), c2 = (double)(cj * cj);
        if (a >= (rv * cj) * split) { nb += ac; db += c2; } else { ns += ac; ds += c2; }
    }
    ns = block_sum(ns); ds = block_sum(ds); nb = block_sum(nb); db = block_sum(db);
    if (threadIdx.x == 0) {
        small[r] = ds > 0.0 ? saturate((float)(ns / ds), FP32_MAX) : rv;
        big[r] = db > 0.0 ? saturate((float)(nb / db), FP32_MAX) : rv;
    }
}

// one thread per output byte: 4 consecutive elements of the flattened (N, C) array
template <typename T>
__device__ void int2_pack(const T* x, const T* pred, int has_pred, T* ref, int has_ref,
                          unsigned char* codes, const float* row, const float* col,
                          const float* small, const float* big, float split, i64 n, i64 c) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = n * c;
    if (b * 4 >= total) return;
    i64 i = b * 4, r = i / c, j = i - r * c;
    unsigned char byte = 0;
    for (int k = 0; k < 4 && i < total; ++k, ++i) {
        float pv = prediction(pred, has_pred, i);
        float d = residual_of(to_f32(x[i]), pv, has_pred);
        bool large = fabsf(d) >= (row[r] * col[j]) * split;
        bool pos = d >= 0.0f;
        byte |= (unsigned char)(pos | (large << 1)) << (2 * k);
        if (has_ref) {
            float m = (large ? big[r] : small[r]) * col[j];
            store(ref + i, pv + (pos ? m : -m));
        }
        if (++j == c) { j = 0; ++r; }
    }
    codes[b] = byte;
}

template <typename T>
__device__ void int2_apply(const unsigned char* codes, const float* small, const float* big,
                           const float* col, const T* pred, int has_pred, T* out, i64 n, i64 c) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 total = n * c;
    if (b * 4 >= total) return;
    i64 i = b * 4, r = i / c, j = i - r * c;
    unsigned char byte = codes[b];
    for (int k = 0; k < 4 && i < total; ++k, ++i) {
        unsigned q = (byte >> (2 * k)) & 3u;
        float m = ((q & 2u) ? big[r] : small[r]) * col[j];
        store(out + i, prediction(pred, has_pred, i) + ((q & 1u) ? m : -m));
        if (++j == c) { j = 0; ++r; }
    }
}

// ---------------------------------------------------------------------------- entry points

#define ENTRY_POINTS(S, T)                                                                        \
extern "C" __global__ void abs_sums_##S(const T* x, const T* pred, int has_pred, i64 n, i64 c,   \
                                        double* rows, double* partials) {                         \
    abs_sums<T>(x, pred, has_pred, n, c, rows, partials); }                                       \
extern "C" __global__ void col_min_max_##S(const T* x, const T* pred, int has_pred, i64 n,        \
                                           i64 c, float* lo_parts, float* hi_parts) {             \
    col_min_max<T>(x, pred, has_pred, n, c, lo_parts, hi_parts); }                                \
extern "C" __global__ void col_abs_max_##S(const T* x, const T* pred, int has_pred, i64 n,        \
                                           i64 c, float* parts) {                                  \
    col_abs_max<T>(x, pred, has_pred, n, c, parts); }                                              \
extern "C" __global__ void binary_pack_##S(const T* x, const T* pred, int has_pred, T* ref,       \
        int has_ref, unsigned char* bits, const float* row, const float* col, i64 n, i64 c) {     \
    binary_pack<T>(x, pred, has_pred, ref, has_ref, bits, row, col, n, c); }                      \
extern "C" __global__ void binary_apply_##S(const unsigned char* bits, const float* row,          \
        const float* col, const T* pred, int has_pred, T* out, i64 n, i64 c) {                    \
    binary_apply<T>(bits, row, col, pred, has_pred, out, n, c); }                                 \
extern "C" __global__ void int2_levels_##S(const T* x, const T* pred, int has_pred,            \
        const float* row, const float* col, float split, i64 n, i64 c, float* small, float* big) { \
    int2_levels<T>(x, pred, has_pred, row, col, split, n, c, small, big); }                       \
extern "C" __global__ void int2_pack_##S(const T* x, const T* pred, int has_pred, T* ref,         \
        int has_ref, unsigned char* codes, const float* row, const float* col, const float* small, \
        const float* big, float split, i64 n, i64 c) {                                             \
    int2_pack<T>(x, pred, has_pred, ref, has_ref, codes, row, col, small, big, split, n, c); }    \
extern "C" __global__ void int2_apply_##S(const unsigned char* codes, const float* small,         \
        const float* big, const float* col, const T* pred, int has_pred, T* out, i64 n, i64 c) {  \
    int2_apply<T>(codes, small, big, col, pred, has_pred, out, n, c); }                           \
extern "C" __global__ void minmax_pack_##S(const T* x, const T* pred, int has_pred, T* ref,       \
        int has_ref, unsigned char* codes, const float* lo, const float* span, int bits, i64 n,   \
        i64 c) {                                                                                   \
    minmax_pack<T>(x, pred, has_pred, ref, has_ref, codes, lo, span, bits, n, c); }               \
extern "C" __global__ void minmax_apply_##S(const unsigned char* codes, const float* lo,          \
        const float* span, int bits, const T* pred, int has_pred, T* out, i64 n, i64 c) {         \
    minmax_apply<T>(codes, lo, span, bits, pred, has_pred, out, n, c); }                          \
extern "C" __global__ void absmax_pack_##S(const T* x, const T* pred, int has_pred, T* ref,       \
        int has_ref, unsigned char* codes, const float* amax, i64 n, i64 c) {                     \
    absmax_pack<T>(x, pred, has_pred, ref, has_ref, codes, amax, n, c); }                         \
extern "C" __global__ void absmax_apply_##S(const unsigned char* codes, const float* amax,        \
        const T* pred, int has_pred, T* out, i64 n, i64 c) {                                       \
    absmax_apply<T>(codes, amax, pred, has_pred, out, n, c); }

ENTRY_POINTS(f32, float)
ENTRY_POINTS(f16, __half)
ENTRY_POINTS(bf16, __nv_bfloat16)
