// FlashAttention-2's forward (Dao, 2023) on tensor cores: bf16 operands, f32 accumulation,
// mma.sync.m16n8k16. The twin of flash.cu's f32 forward (same views, masks and saved
// log-sum-exp), which it is tested against with bf16-rounded inputs.
//
// A block is 4 warps and 64 query rows, 16 per warp; key tiles of 64 keys are converted to bf16
// into shared memory. Each warp keeps its queries as A fragments, its scores S = Q·Kᵀ and output
// O as C fragments in registers; P = softmax(S) is re-packed from C to A fragments for P·V
// (the layouts line up: FlashAttention-2 §3.3). Head widths 32, 64 and 128.
//
// Fragment layouts of m16n8k16 (PTX ISA), g = lane / 4, t = lane % 4, pairs packed low first:
//   A (16×16, row): a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16×8, col):  b0 (2t.., g), b1 (2t+8.., g)
//   C (16×8):       c0 c1 (g, 2t, 2t+1), c2 c3 (g+8, 2t, 2t+1)

#define TC_ROWS 64  // query rows per block
#define TC_KEYS 64  // keys per tile

__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return (unsigned)bf16_rn(lo) | ((unsigned)bf16_rn(hi) << 16);
}

__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int D>
__device__ void flash_forward_tc(float* out, float* lse, const float* q, long long q_rs,
                                 long long q_off, const float* k, long long k_rs,
                                 long long k_off, const float* v, long long v_rs,
                                 long long v_off, const unsigned char* pad, int heads, int tq,
                                 int tk, int causal, int window, float scale) {
    // Rows padded by 8 bf16 (16 bytes): a warp's B-fragment loads then hit 32 distinct banks.
    __shared__ unsigned short ks[TC_KEYS][D + 8], vs[TC_KEYS][D + 8];
    const float NEG_INF = __int_as_float(0xff800000);
    int b = blockIdx.z, h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int i0 = blockIdx.x * TC_ROWS + warp * 16;  // this warp's first query row
    int rows[2] = {i0 + g, i0 + g + 8};

    // Q as A fragments, D/16 k-steps.
    unsigned qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
        for (int f = 0; f < 4; f++) {
            int r = rows[f & 1], c = kk * 16 + 2 * t + (f >> 1) * 8;
            float x0 = 0.0f, x1 = 0.0f;
            if (r < tq) {
                const float* qr = q + ((u64)b * tq + r) * q_rs + q_off + (u64)h * D;
                x0 = qr[c];
                x1 = qr[c + 1];
            }
            qa[kk][f] = pack2(x0, x1);
        }
    }
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    Visible vis[2] = {visible(min(rows[0], tq - 1), tk, causal, window),
                        visible(min(rows[1], tq - 1), tk, causal, window)};

    int first = blockIdx.x * TC_ROWS, last = min(tq, first + TC_ROWS) - 1;
    int band_lo = visible(first, tk, causal, window).lo;
    int band_hi = visible(last, tk, causal, window).hi;
    for (int j0 = band_lo - band_lo % TC_KEYS; j0 < band_hi; j0 += TC_KEYS) {
        __syncthreads();
        for (int e = threadIdx.x; e < TC_KEYS * D; e += blockDim.x) {
            int r = e / D, c = e % D, j = j0 + r;
            float kx = 0.0f, vx = 0.0f;
            if (j < tk) {
                kx = k[((u64)b * tk + j) * k_rs + k_off + (u64)h * D + c];
                vx = v[((u64)b * tk + j) * v_rs + v_off + (u64)h * D + c];
            }
            ks[r][c] = bf16_rn(kx);
            vs[r][c] = bf16_rn(vx);
        }
        __syncthreads();

        // S = Q·Kᵀ over this tile: 8 column tiles of 8 keys.
        float s[TC_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const unsigned short* kr = &ks[nt * 8 + g][kk * 16 + 2 * t];
                unsigned b0 = *(const unsigned*)kr, b1 = *(const unsigned*)(kr + 8);
                mma_bf16(s[nt], qa[kk], b0, b1);
            }
        }
        // Scale, mask, and the tile's row maxima (rows g and g+8, across the quad).
        float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++) {
#pragma unroll
            for (int f = 0; f < 4; f++) {
                int ri = f >> 1, j = j0 + nt * 8 + 2 * t + (f & 1);
                bool ok = rows[ri] < tq && sees(vis[ri], j, pad, b, tk);
                s[nt][f] = ok ? s[nt][f] * scale : NEG_INF;
                mx[ri] = fmaxf(mx[ri], s[nt][f]);
            }
        }
        float corr[2];
#pragma unroll
        for (int ri = 0; ri < 2; ri++) {
            mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 1));
            mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 2));
            float mnew = fmaxf(m[ri], mx[ri]);
            // A row that has seen nothing yet keeps m = −∞ and p = 0 (no NaN from −∞ − −∞).
            corr[ri] = mnew == NEG_INF ? 1.0f : expf(m[ri] - mnew);
            m[ri] = mnew;
            l[ri] *= corr[ri];
        }
#pragma unroll
        for (int nt = 0; nt < TC_KEYS / 8; nt++) {
#pragma unroll
            for (int f = 0; f < 4; f++) {
                int ri = f >> 1;
                float p = s[nt][f] == NEG_INF ? 0.0f : expf(s[nt][f] - m[ri]);
                s[nt][f] = p;
                l[ri] += p;  // this thread's part of the row sum; the quad is summed at the end
            }
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            o[dt][0] *= corr[0];
            o[dt][1] *= corr[0];
            o[dt][2] *= corr[1];
            o[dt][3] *= corr[1];
        }
        // O += P·V: P's C fragments of key tiles 2kk and 2kk+1 are the A fragment of k-step kk.
#pragma unroll
        for (int kk = 0; kk < TC_KEYS / 16; kk++) {
            unsigned pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1]), pack2(s[2 * kk][2], s[2 * kk][3]),
                              pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            int kr = kk * 16 + 2 * t;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                int c = dt * 8 + g;
                unsigned b0 = (unsigned)vs[kr][c] | ((unsigned)vs[kr + 1][c] << 16);
                unsigned b1 = (unsigned)vs[kr + 8][c] | ((unsigned)vs[kr + 9][c] << 16);
                mma_bf16(o[dt], pa, b0, b1);
            }
        }
    }
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 1);
        l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 2);
    }
    int w = heads * D;
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        int r = rows[ri];
        if (r >= tq) continue;
        float inv = l[ri] > 0.0f ? 1.0f / l[ri] : 0.0f;
        float* orow = out + ((u64)b * tq + r) * w + (u64)h * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            orow[dt * 8 + 2 * t] = o[dt][2 * ri] * inv;
            orow[dt * 8 + 2 * t + 1] = o[dt][2 * ri + 1] * inv;
        }
        if (t == 0) lse[((u64)b * heads + h) * tq + r] = l[ri] > 0.0f ? m[ri] + logf(l[ri]) : NEG_INF;
    }
}

#define FLASH_TC_ENTRY(D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128) flash_forward_tc_d##D(                    \
        float* out, float* lse, const float* q, long long q_rs, long long q_off, const float* k, \
        long long k_rs, long long k_off, const float* v, long long v_rs, long long v_off,       \
        const unsigned char* pad, int heads, int tq, int tk, int d, int causal, int window,     \
        float scale) {                                                                          \
        flash_forward_tc<D>(out, lse, q, q_rs, q_off, k, k_rs, k_off, v, v_rs, v_off, pad,      \
                            heads, tq, tk, causal, window, scale);                             \
    }

FLASH_TC_ENTRY(32)
FLASH_TC_ENTRY(64)
FLASH_TC_ENTRY(128)

// ---------------------------------------------------------------------------------------------
// Backward on tensor cores (FlashAttention-2 §3.2, Algorithm 2): a block owns 64 keys, 16 per
// warp, and walks the query tiles that can see them. Each warp computes its keys' side of the
// problem transposed — Sᵀ = K·Qᵀ, so the rows of every C fragment are its own keys:
//   Pᵀ = exp(Sᵀ·scale − lse),  dV += Pᵀ·dO,  dPᵀ = V·dOᵀ,  dSᵀ = Pᵀ∘(dPᵀ − delta)·scale,
//   dK += dSᵀ·Q;
// dSᵀ goes through shared memory so that each warp then takes 16 queries for dQ = dS·K, added
// with atomics into an f32 (B, H, Tq, D) buffer (every key block adds to every query's dQ).
// K and V stay in registers as A fragments. Head widths 32 and 64 (128 would spill).

template <int D, int BQ>
__device__ void flash_backward_tc(float* dq_acc, float* dk, long long dk_rs, long long dk_off,
                                  float* dv, long long dv_rs, long long dv_off,
                                  const float* dout, const float* lse, const float* delta,
                                  const float* q, long long q_rs, long long q_off,
                                  const float* k, long long k_rs, long long k_off,
                                  const float* v, long long v_rs, long long v_off,
                                  const unsigned char* pad, int heads, int tq, int tk,
                                  int causal, int window, float scale) {
    __shared__ unsigned short qs[BQ][D + 8], dos[BQ][D + 8], ks[TC_KEYS][D + 8];
    __shared__ unsigned short dss[TC_KEYS][BQ + 8];
    __shared__ float lse_s[BQ], delta_s[BQ];
    const float NEG_INF = __int_as_float(0xff800000);
    int b = blockIdx.z, h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int j0 = blockIdx.x * TC_KEYS;
    int keys[2] = {j0 + warp * 16 + g, j0 + warp * 16 + g + 8};
    int w = heads * D;

    // This block's keys: all of them into shared memory (B operand of dQ), and this warp's 16
    // as A fragments of K and V.
    for (int e = threadIdx.x; e < TC_KEYS * D; e += blockDim.x) {
        int r = e / D, c = e % D, j = j0 + r;
        ks[r][c] = bf16_rn(j < tk ? k[((u64)b * tk + j) * k_rs + k_off + (u64)h * D + c] : 0.0f);
    }
    unsigned ka[D / 16][4], va[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
        for (int f = 0; f < 4; f++) {
            int j = keys[f & 1], c = kk * 16 + 2 * t + (f >> 1) * 8;
            float k0 = 0.0f, k1 = 0.0f, v0 = 0.0f, v1 = 0.0f;
            if (j < tk) {
                const float* kr = k + ((u64)b * tk + j) * k_rs + k_off + (u64)h * D;
                const float* vr = v + ((u64)b * tk + j) * v_rs + v_off + (u64)h * D;
                k0 = kr[c];
                k1 = kr[c + 1];
                v0 = vr[c];
                v1 = vr[c + 1];
            }
            ka[kk][f] = pack2(k0, k1);
            va[kk][f] = pack2(v0, v1);
        }
    }
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; dt++)
#pragma unroll
        for (int f = 0; f < 4; f++) dka[dt][f] = dva[dt][f] = 0.0f;

    int last_key = min(tk, j0 + TC_KEYS) - 1;
    for (int i0 = 0; i0 < tq; i0 += BQ) {
        // Skip query tiles that see none of these keys (lo and hi do not decrease with i).
        int i1 = min(tq, i0 + BQ) - 1;
        if (visible(i0, tk, causal, window).lo > last_key ||
            visible(i1, tk, causal, window).hi <= j0)
            continue;
        __syncthreads();
        for (int e = threadIdx.x; e < BQ * D; e += blockDim.x) {
            int r = e / D, c = e % D, i = i0 + r;
            float qx = 0.0f, dx = 0.0f;
            if (i < tq) {
                qx = q[((u64)b * tq + i) * q_rs + q_off + (u64)h * D + c];
                dx = dout[((u64)b * tq + i) * w + (u64)h * D + c];
            }
            qs[r][c] = bf16_rn(qx);
            dos[r][c] = bf16_rn(dx);
        }
        for (int r = threadIdx.x; r < BQ; r += blockDim.x) {
            int i = i0 + r;
            lse_s[r] = i < tq ? lse[((u64)b * heads + h) * tq + i] : 0.0f;
            delta_s[r] = i < tq ? delta[((u64)b * heads + h) * tq + i] : 0.0f;
        }
        __syncthreads();

        // Sᵀ and dPᵀ (this warp's 16 keys × BQ queries).
        float p[BQ / 8][4], dp[BQ / 8][4];
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) {
#pragma unroll
            for (int f = 0; f < 4; f++) p[nt][f] = dp[nt][f] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                const unsigned short* qr = &qs[nt * 8 + g][kk * 16 + 2 * t];
                const unsigned short* dr = &dos[nt * 8 + g][kk * 16 + 2 * t];
                mma_bf16(p[nt], ka[kk], *(const unsigned*)qr, *(const unsigned*)(qr + 8));
                mma_bf16(dp[nt], va[kk], *(const unsigned*)dr, *(const unsigned*)(dr + 8));
            }
        }
        // Pᵀ and dSᵀ in place: element f of tile nt is (key keys[f >> 1], query nt·8 + 2t + f&1).
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) {
#pragma unroll
            for (int f = 0; f < 4; f++) {
                int r = nt * 8 + 2 * t + (f & 1), i = i0 + r, j = keys[f >> 1];
                bool ok = i < tq && j < tk && sees(visible(i, tk, causal, window), j, pad, b, tk);
                float pv = ok ? expf(p[nt][f] * scale - lse_s[r]) : 0.0f;
                p[nt][f] = pv;
                dp[nt][f] = pv * (dp[nt][f] - delta_s[r]) * scale;
            }
        }
        // dV += Pᵀ·dO and dK += dSᵀ·Q: the C fragments of query tiles 2kk, 2kk+1 are the A
        // fragment of k-step kk; B fragments (k = query, n = column) are two rows apart.
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            unsigned pa[4] = {pack2(p[2 * kk][0], p[2 * kk][1]), pack2(p[2 * kk][2], p[2 * kk][3]),
                              pack2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                              pack2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
            unsigned sa[4] = {pack2(dp[2 * kk][0], dp[2 * kk][1]),
                              pack2(dp[2 * kk][2], dp[2 * kk][3]),
                              pack2(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              pack2(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
            int r = kk * 16 + 2 * t;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) {
                int c = dt * 8 + g;
                unsigned o0 = (unsigned)dos[r][c] | ((unsigned)dos[r + 1][c] << 16);
                unsigned o1 = (unsigned)dos[r + 8][c] | ((unsigned)dos[r + 9][c] << 16);
                mma_bf16(dva[dt], pa, o0, o1);
                unsigned q0 = (unsigned)qs[r][c] | ((unsigned)qs[r + 1][c] << 16);
                unsigned q1 = (unsigned)qs[r + 8][c] | ((unsigned)qs[r + 9][c] << 16);
                mma_bf16(dka[dt], sa, q0, q1);
            }
        }
        // dSᵀ to shared memory, then dQ = dS·K: warp w takes queries 16w.. of the tile.
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++) {
            int c = nt * 8 + 2 * t;
            int r0 = warp * 16 + g;
            dss[r0][c] = bf16_rn(dp[nt][0]);
            dss[r0][c + 1] = bf16_rn(dp[nt][1]);
            dss[r0 + 8][c] = bf16_rn(dp[nt][2]);
            dss[r0 + 8][c + 1] = bf16_rn(dp[nt][3]);
        }
        __syncthreads();
        for (int qt = warp; qt < BQ / 16; qt += 4) {
            float acc[D / 8][4];
#pragma unroll
            for (int dt = 0; dt < D / 8; dt++) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < TC_KEYS / 16; kk++) {
                // A = dS (query rows, key columns), read from dSᵀ: two keys apart.
                int qr = qt * 16 + g, kc = kk * 16 + 2 * t;
                unsigned a[4] = {
                    (unsigned)dss[kc][qr] | ((unsigned)dss[kc + 1][qr] << 16),
                    (unsigned)dss[kc][qr + 8] | ((unsigned)dss[kc + 1][qr + 8] << 16),
                    (unsigned)dss[kc + 8][qr] | ((unsigned)dss[kc + 9][qr] << 16),
                    (unsigned)dss[kc + 8][qr + 8] | ((unsigned)dss[kc + 9][qr + 8] << 16)};
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    int c = dt * 8 + g;
                    unsigned k0 = (unsigned)ks[kc][c] | ((unsigned)ks[kc + 1][c] << 16);
                    unsigned k1 = (unsigned)ks[kc + 8][c] | ((unsigned)ks[kc + 9][c] << 16);
                    mma_bf16(acc[dt], a, k0, k1);
                }
            }
#pragma unroll
            for (int ri = 0; ri < 2; ri++) {
                int i = i0 + qt * 16 + g + ri * 8;
                if (i >= tq) continue;
                float* row = dq_acc + (((u64)b * heads + h) * tq + i) * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; dt++) {
                    atomicAdd(&row[dt * 8 + 2 * t], acc[dt][2 * ri]);
                    atomicAdd(&row[dt * 8 + 2 * t + 1], acc[dt][2 * ri + 1]);
                }
            }
        }
    }
#pragma unroll
    for (int ri = 0; ri < 2; ri++) {
        int j = keys[ri];
        if (j >= tk) continue;
        float* dkr = dk + ((u64)b * tk + j) * dk_rs + dk_off + (u64)h * D;
        float* dvr = dv + ((u64)b * tk + j) * dv_rs + dv_off + (u64)h * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++) {
            dkr[dt * 8 + 2 * t] = dka[dt][2 * ri];
            dkr[dt * 8 + 2 * t + 1] = dka[dt][2 * ri + 1];
            dvr[dt * 8 + 2 * t] = dva[dt][2 * ri];
            dvr[dt * 8 + 2 * t + 1] = dva[dt][2 * ri + 1];
        }
    }
}

// dq (a strided view) ← dq_acc (B, H, Tq, D): the atomics' buffer into the caller's layout.
extern "C" __global__ void flash_dq_scatter(float* dq, long long dq_rs, long long dq_off,
                                            const float* dq_acc, int batch, int heads, int tq,
                                            int d) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)batch * heads * tq * d) return;
    int x = (int)(idx % d);
    u64 row = idx / d;  // (b, h, i)
    int i = (int)(row % tq), h = (int)(row / tq % heads), b = (int)(row / tq / heads);
    dq[((u64)b * tq + i) * dq_rs + dq_off + (u64)h * d + x] = dq_acc[idx];
}

#define FLASH_TC_BACKWARD(D, BQ)                                                                \
    extern "C" __global__ void __launch_bounds__(128) flash_backward_tc_d##D(                   \
        float* dq_acc, float* dk, long long dk_rs, long long dk_off, float* dv, long long dv_rs, \
        long long dv_off, const float* dout, const float* lse, const float* delta,              \
        const float* q, long long q_rs, long long q_off, const float* k, long long k_rs,        \
        long long k_off, const float* v, long long v_rs, long long v_off,                       \
        const unsigned char* pad, int heads, int tq, int tk, int d, int causal, int window,     \
        float scale) {                                                                          \
        flash_backward_tc<D, BQ>(dq_acc, dk, dk_rs, dk_off, dv, dv_rs, dv_off, dout, lse,       \
                                 delta, q, q_rs, q_off, k, k_rs, k_off, v, v_rs, v_off, pad,    \
                                 heads, tq, tk, causal, window, scale);                        \
    }

FLASH_TC_BACKWARD(32, 64)
FLASH_TC_BACKWARD(64, 64)
