// Fused attention, FlashAttention-2's algorithm (Dao, 2023) on CUDA cores in f32: the GPU twin
// of kernels::flash (same strided per-head views, same masks, same saved log-sum-exp), and the
// reference the tensor-core kernels are held to. The (Tq, Tk) scores never exist: each thread
// owns one query row (forward, dQ) or one key row (dK, dV) and streams the other side through
// shared memory in tiles.
//
// Shared tiles and register rows hold MAXD columns, zero beyond D, so the unrolled loops over
// them need no bounds test.
//
// Views: row t of batch b, head h of an operand starts at (b·len + t)·rs + off + h·D.
// Masks (kernels::attention::Masks): key padding pad (B, Tk) bytes, 1 = padding (null: none);
// causal; window w > 0: query i sees keys i−w+1..=i (causal) or |i − j| < w.

#define FLASH_BC 32  // keys per shared-memory tile (forward, dQ)
#define FLASH_BQ 8   // queries per shared-memory tile (dK, dV)
#define FLASH_THREADS 64  // query rows per block (forward, dQ); the launcher's block size

__device__ __forceinline__ u64 row_at(int b, int len, int t, long long rs, long long off, int h,
                                      int d) {
    return ((u64)b * len + t) * rs + off + (u64)h * d;
}

// Forward: out (B, Tq, H·D) contiguous; lse (B, H, Tq), −∞ (and out 0) for a row that sees no
// key. Grid (⌈Tq/blockDim⌉, H, B); one thread per query row.
template <int MAXD>
__device__ void flash_forward(float* out, float* lse, const float* q, long long q_rs,
                              long long q_off, const float* k, long long k_rs, long long k_off,
                              const float* v, long long v_rs, long long v_off,
                              const unsigned char* pad, int heads, int tq, int tk, int d,
                              int causal, int window, float scale) {
    __shared__ float ks[FLASH_BC][MAXD + 1], vs[FLASH_BC][MAXD + 1];
    __shared__ float ss[FLASH_BC][FLASH_THREADS];
    const float NEG_INF = __int_as_float(0xff800000);
    int b = blockIdx.z, h = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    bool active = i < tq;
    float qr[MAXD], o[MAXD];
#pragma unroll
    for (int x = 0; x < MAXD; x++) {
        qr[x] = active && x < d ? q[row_at(b, tq, i, q_rs, q_off, h, d) + x] : 0.0f;
        o[x] = 0.0f;
    }
    Visible vis = visible(active ? i : 0, tk, causal, window);
    // The block's key band: lo and hi do not decrease with i.
    int first = blockIdx.x * blockDim.x, last = min(tq, first + (int)blockDim.x) - 1;
    int band_lo = visible(first, tk, causal, window).lo;
    int band_hi = visible(last, tk, causal, window).hi;
    float m = NEG_INF, l = 0.0f;
    for (int j0 = band_lo - band_lo % FLASH_BC; j0 < band_hi; j0 += FLASH_BC) {
        __syncthreads();
        for (int e = threadIdx.x; e < FLASH_BC * MAXD; e += blockDim.x) {
            int r = e / MAXD, x = e % MAXD, j = j0 + r;
            bool in = j < tk && x < d;
            ks[r][x] = in ? k[row_at(b, tk, j, k_rs, k_off, h, d) + x] : 0.0f;
            vs[r][x] = in ? v[row_at(b, tk, j, v_rs, v_off, h, d) + x] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
        // Scores go to shared memory, column threadIdx.x (conflict-free): a register array
        // indexed by the key loop would need that loop unrolled too, and unrolling both loops
        // (32 × D) made NVRTC take minutes per source.
        float tmax = NEG_INF;
#pragma unroll 1
        for (int r = 0; r < FLASH_BC; r++) {
            float dot = 0.0f;
#pragma unroll
            for (int x = 0; x < MAXD; x++) dot += qr[x] * ks[r][x];
            float sr = sees(vis, j0 + r, pad, b, tk) ? dot * scale : NEG_INF;
            ss[r][threadIdx.x] = sr;
            tmax = fmaxf(tmax, sr);
        }
        if (tmax == NEG_INF) continue;
        float mnew = fmaxf(m, tmax);
        float corr = expf(m - mnew);  // 0 on the first visible tile (m = −∞)
        l *= corr;
#pragma unroll
        for (int x = 0; x < MAXD; x++) o[x] *= corr;
#pragma unroll 1
        for (int r = 0; r < FLASH_BC; r++) {
            float p = expf(ss[r][threadIdx.x] - mnew);
            l += p;
#pragma unroll
            for (int x = 0; x < MAXD; x++) o[x] += p * vs[r][x];
        }
        m = mnew;
    }
    if (!active) return;
    int w = heads * d;
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
    // Register arrays are indexed by unrolled constants only (a runtime index would move them
    // to local memory).
#pragma unroll
    for (int x = 0; x < MAXD; x++)
        if (x < d) out[((u64)b * tq + i) * w + (u64)h * d + x] = o[x] * inv;
    lse[((u64)b * heads + h) * tq + i] = l > 0.0f ? m + logf(l) : NEG_INF;
}

// delta[b, h, i] = Σ_x dout·out over the head's D columns (FlashAttention-2's D_i).
extern "C" __global__ void flash_delta(float* delta, const float* dout, const float* out,
                                       int batch, int heads, int tq, int d) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)batch * heads * tq) return;
    int i = (int)(idx % tq), h = (int)(idx / tq % heads), b = (int)(idx / tq / heads);
    u64 base = ((u64)b * tq + i) * heads * d + (u64)h * d;
    float acc = 0.0f;
    for (int x = 0; x < d; x++) acc += dout[base + x] * out[base + x];
    delta[idx] = acc;
}

// dK and dV, one thread per key row j: Σ over the queries that see j of
//   p = exp(s − lse_i),  dv_j += p·do_i,  ds = p·(do_i·v_j − delta_i)·scale,  dk_j += ds·q_i.
// Grid (⌈Tk/blockDim⌉, H, B), blockDim ≤ 32 (k and v rows live in shared memory).
template <int MAXD>
__device__ void flash_backward_dkdv(float* dk, long long dk_rs, long long dk_off, float* dv,
                                    long long dv_rs, long long dv_off, const float* dout,
                                    const float* lse, const float* delta, const float* q,
                                    long long q_rs, long long q_off, const float* k,
                                    long long k_rs, long long k_off, const float* v,
                                    long long v_rs, long long v_off, const unsigned char* pad,
                                    int heads, int tq, int tk, int d, int causal, int window,
                                    float scale) {
    __shared__ float kr[32][MAXD + 1], vr[32][MAXD + 1];
    __shared__ float qs[FLASH_BQ][MAXD + 1], dos[FLASH_BQ][MAXD + 1];
    __shared__ float ls[FLASH_BQ], ds_[FLASH_BQ];
    int b = blockIdx.z, h = blockIdx.y, t = threadIdx.x;
    int j = blockIdx.x * blockDim.x + t;
    bool active = j < tk;
    for (int x = 0; x < MAXD; x++) {
        kr[t][x] = active && x < d ? k[row_at(b, tk, j, k_rs, k_off, h, d) + x] : 0.0f;
        vr[t][x] = active && x < d ? v[row_at(b, tk, j, v_rs, v_off, h, d) + x] : 0.0f;
    }
    float dkr[MAXD], dvr[MAXD];
#pragma unroll
    for (int x = 0; x < MAXD; x++) dkr[x] = dvr[x] = 0.0f;
    int w = heads * d;
    for (int i0 = 0; i0 < tq; i0 += FLASH_BQ) {
        __syncthreads();
        for (int e = t; e < FLASH_BQ * MAXD; e += blockDim.x) {
            int r = e / MAXD, x = e % MAXD, i = i0 + r;
            bool in = i < tq && x < d;
            qs[r][x] = in ? q[row_at(b, tq, i, q_rs, q_off, h, d) + x] : 0.0f;
            dos[r][x] = in ? dout[((u64)b * tq + i) * w + (u64)h * d + x] : 0.0f;
        }
        for (int r = t; r < FLASH_BQ; r += blockDim.x) {
            int i = i0 + r;
            ls[r] = i < tq ? lse[((u64)b * heads + h) * tq + i] : 0.0f;
            ds_[r] = i < tq ? delta[((u64)b * heads + h) * tq + i] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
#pragma unroll 1
        for (int r = 0; r < FLASH_BQ && i0 + r < tq; r++) {
            if (!sees(visible(i0 + r, tk, causal, window), j, pad, b, tk)) continue;
            float dot = 0.0f, dp = 0.0f;
#pragma unroll
            for (int x = 0; x < MAXD; x++) {
                dot += qs[r][x] * kr[t][x];
                dp += dos[r][x] * vr[t][x];
            }
            float p = expf(dot * scale - ls[r]);
            float ds = p * (dp - ds_[r]) * scale;
#pragma unroll
            for (int x = 0; x < MAXD; x++) {
                dvr[x] += p * dos[r][x];
                dkr[x] += ds * qs[r][x];
            }
        }
    }
    if (!active) return;
#pragma unroll
    for (int x = 0; x < MAXD; x++)
        if (x < d) {
            dk[row_at(b, tk, j, dk_rs, dk_off, h, d) + x] = dkr[x];
            dv[row_at(b, tk, j, dv_rs, dv_off, h, d) + x] = dvr[x];
        }
}

// dQ, one thread per query row i: dq_i = Σ_j ds_ij·k_j, ds as in flash_backward_dkdv.
// Grid (⌈Tq/blockDim⌉, H, B).
template <int MAXD>
__device__ void flash_backward_dq(float* dq, long long dq_rs, long long dq_off,
                                  const float* dout, const float* lse, const float* delta,
                                  const float* q, long long q_rs, long long q_off,
                                  const float* k, long long k_rs, long long k_off,
                                  const float* v, long long v_rs, long long v_off,
                                  const unsigned char* pad, int heads, int tq, int tk, int d,
                                  int causal, int window, float scale) {
    __shared__ float ks[FLASH_BC][MAXD + 1], vs[FLASH_BC][MAXD + 1];
    int b = blockIdx.z, h = blockIdx.y;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    bool active = i < tq;
    int w = heads * d;
    float qr[MAXD], dor[MAXD], dqr[MAXD];
#pragma unroll
    for (int x = 0; x < MAXD; x++) {
        qr[x] = active && x < d ? q[row_at(b, tq, i, q_rs, q_off, h, d) + x] : 0.0f;
        dor[x] = active && x < d ? dout[((u64)b * tq + i) * w + (u64)h * d + x] : 0.0f;
        dqr[x] = 0.0f;
    }
    float li = active ? lse[((u64)b * heads + h) * tq + i] : 0.0f;
    float di = active ? delta[((u64)b * heads + h) * tq + i] : 0.0f;
    Visible vis = visible(active ? i : 0, tk, causal, window);
    int first = blockIdx.x * blockDim.x, last = min(tq, first + (int)blockDim.x) - 1;
    int band_lo = visible(first, tk, causal, window).lo;
    int band_hi = visible(last, tk, causal, window).hi;
    for (int j0 = band_lo - band_lo % FLASH_BC; j0 < band_hi; j0 += FLASH_BC) {
        __syncthreads();
        for (int e = threadIdx.x; e < FLASH_BC * MAXD; e += blockDim.x) {
            int r = e / MAXD, x = e % MAXD, j = j0 + r;
            bool in = j < tk && x < d;
            ks[r][x] = in ? k[row_at(b, tk, j, k_rs, k_off, h, d) + x] : 0.0f;
            vs[r][x] = in ? v[row_at(b, tk, j, v_rs, v_off, h, d) + x] : 0.0f;
        }
        __syncthreads();
        if (!active) continue;
#pragma unroll 1
        for (int r = 0; r < FLASH_BC; r++) {
            if (!sees(vis, j0 + r, pad, b, tk)) continue;
            float dot = 0.0f, dp = 0.0f;
#pragma unroll
            for (int x = 0; x < MAXD; x++) {
                dot += qr[x] * ks[r][x];
                dp += dor[x] * vs[r][x];
            }
            float p = expf(dot * scale - li);
            float ds = p * (dp - di) * scale;
#pragma unroll
            for (int x = 0; x < MAXD; x++) dqr[x] += ds * ks[r][x];
        }
    }
    if (!active) return;
#pragma unroll
    for (int x = 0; x < MAXD; x++)
        if (x < d) dq[row_at(b, tq, i, dq_rs, dq_off, h, d) + x] = dqr[x];
}

// One extern "C" entry per head-width bound: registers are sized at compile time.
#define FLASH_ENTRIES(MAXD)                                                                    \
    extern "C" __global__ void flash_forward_d##MAXD(                                          \
        float* out, float* lse, const float* q, long long q_rs, long long q_off, const float* k, \
        long long k_rs, long long k_off, const float* v, long long v_rs, long long v_off,      \
        const unsigned char* pad, int heads, int tq, int tk, int d, int causal, int window,    \
        float scale) {                                                                         \
        flash_forward<MAXD>(out, lse, q, q_rs, q_off, k, k_rs, k_off, v, v_rs, v_off, pad,     \
                            heads, tq, tk, d, causal, window, scale);                         \
    }                                                                                          \
    extern "C" __global__ void flash_backward_dkdv_d##MAXD(                                    \
        float* dk, long long dk_rs, long long dk_off, float* dv, long long dv_rs,              \
        long long dv_off, const float* dout, const float* lse, const float* delta,             \
        const float* q, long long q_rs, long long q_off, const float* k, long long k_rs,       \
        long long k_off, const float* v, long long v_rs, long long v_off,                      \
        const unsigned char* pad, int heads, int tq, int tk, int d, int causal, int window,    \
        float scale) {                                                                         \
        flash_backward_dkdv<MAXD>(dk, dk_rs, dk_off, dv, dv_rs, dv_off, dout, lse, delta, q,   \
                                  q_rs, q_off, k, k_rs, k_off, v, v_rs, v_off, pad, heads, tq, \
                                  tk, d, causal, window, scale);                              \
    }                                                                                          \
    extern "C" __global__ void flash_backward_dq_d##MAXD(                                      \
        float* dq, long long dq_rs, long long dq_off, const float* dout, const float* lse,     \
        const float* delta, const float* q, long long q_rs, long long q_off, const float* k,   \
        long long k_rs, long long k_off, const float* v, long long v_rs, long long v_off,      \
        const unsigned char* pad, int heads, int tq, int tk, int d, int causal, int window,    \
        float scale) {                                                                         \
        flash_backward_dq<MAXD>(dq, dq_rs, dq_off, dout, lse, delta, q, q_rs, q_off, k, k_rs,  \
                                k_off, v, v_rs, v_off, pad, heads, tq, tk, d, causal, window,  \
                                scale);                                                        \
    }

FLASH_ENTRIES(32)
FLASH_ENTRIES(64)
FLASH_ENTRIES(128)
