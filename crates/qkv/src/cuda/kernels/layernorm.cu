// Layer normalisation (Ba et al., 2016) and "Add & Norm" (Figure 1): kernels::layernorm on the
// CPU. One warp per row: rows are C ≤ a few thousand wide, so a row's 32 lanes read it
// coalesced and reduce with shuffles, without shared memory or block barriers.

// Normalises row `row` of x into out; returns through mean/rstd. Mean first, then the variance
// about it (two passes, as the CPU), not E[x²] − E[x]².
__device__ __forceinline__ void normalise_row(float* out, float* mean, float* rstd,
                                              const float* x, const float* w, const float* b,
                                              int row, int c, float eps) {
    int lane = threadIdx.x & 31;
    const float* xr = x + (u64)row * c;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += xr[i];
    float m = warp_sum(s) / c;
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = xr[i] - m;
        v += d * d;
    }
    float r = 1.0f / sqrtf(warp_sum(v) / c + eps);
    float* o = out + (u64)row * c;
    for (int i = lane; i < c; i += 32) o[i] = (xr[i] - m) * r * w[i] + b[i];
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// out = LN(x)·w + b over rows of width c; saves per-row mean and rstd for backward.
// x, out: (N, C); mean, rstd: (N). Block: a multiple of 32 threads, one warp per row.
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd,
                                             const float* x, const float* w, const float* b,
                                             int n, int c, float eps) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    normalise_row(out, mean, rstd, x, w, b, row, c, eps);
}

// Post-LN "Add & Norm" in one kernel: sum = x + dropout(sub) (saved for backward), out = LN(sum).
// Each lane re-reads only the elements of `sum` it wrote itself.
extern "C" __global__ void residual_layernorm_forward(float* sum, float* out, float* mean,
                                                      float* rstd, const float* x,
                                                      const float* sub, const float* w,
                                                      const float* b, int n, int c, float eps,
                                                      float p, u64 seed, u64 offset) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    int lane = threadIdx.x & 31;
    u64 base = (u64)row * c;
    for (int i = lane; i < c; i += 32)
        sum[base + i] = x[base + i] + sub[base + i] * drop_factor(p, seed, offset + base + i);
    normalise_row(out, mean, rstd, sum, w, b, row, c, eps);
}

// Input gradient of LN: dx (+)= s·(dy∘w − mean(dy∘w) − x̂·mean(dy∘w∘x̂)), one warp per row;
// `accumulate` adds onto dx (the residual branch's gradient, fused as on the CPU).
extern "C" __global__ void layernorm_backward_input(float* dx, const float* dy, const float* x,
                                                    const float* mean, const float* rstd,
                                                    const float* w, int n, int c,
                                                    int accumulate) {
    int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    int lane = threadIdx.x & 31;
    u64 base = (u64)row * c;
    float m = mean[row], s = rstd[row];
    float sd = 0.0f, sdx = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float d = dy[base + i] * w[i];
        sd += d;
        sdx += d * (x[base + i] - m) * s;
    }
    float mean_d = warp_sum(sd) / c, mean_dx = warp_sum(sdx) / c;
    for (int i = lane; i < c; i += 32) {
        float xhat = (x[base + i] - m) * s;
        float g = s * (dy[base + i] * w[i] - mean_d - xhat * mean_dx);
        dx[base + i] = accumulate ? dx[base + i] + g : g;
    }
}

// dw += Σ_rows dy∘x̂, db += Σ_rows dy. Block (32, 8): x walks 32 adjacent columns (coalesced),
// y stripes the rows of this block's row chunk (blockIdx.y); the 8 stripes meet in shared
// memory and each column tile adds its chunk's sums with one atomic per column.
extern "C" __global__ void layernorm_param_grads(float* dw, float* db, const float* dy,
                                                 const float* x, const float* mean,
                                                 const float* rstd, int n, int c,
                                                 int rows_per_chunk) {
    __shared__ float sw[8][33], sb[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float aw = 0.0f, ab = 0.0f;
    if (col < c) {
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            float d = dy[(u64)r * c + col];
            aw += d * (x[(u64)r * c + col] - mean[r]) * rstd[r];
            ab += d;
        }
    }
    sw[threadIdx.y][threadIdx.x] = aw;
    sb[threadIdx.y][threadIdx.x] = ab;
    __syncthreads();
    if (threadIdx.y == 0 && col < c) {
        for (int k = 1; k < 8; k++) {
            aw += sw[k][threadIdx.x];
            ab += sb[k][threadIdx.x];
        }
        atomicAdd(&dw[col], aw);
        atomicAdd(&db[col], ab);
    }
}
