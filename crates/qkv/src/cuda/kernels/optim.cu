// AdamW (Loshchilov & Hutter, 2019) and the global gradient norm for clipping:
// kernels::optim on the CPU. The host turns the step count into the scalars below.

// m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  p ← p·decay − step_size·m / (√v·inv_sqrt_bc2 + ε)
extern "C" __global__ void adamw_step(float* p, const float* g, float* m, float* v, u64 n,
                                      float step_size, float inv_sqrt_bc2, float decay,
                                      float beta1, float beta2, float eps) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = beta1 * m[i] + (1.0f - beta1) * gi;
    float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] = p[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps);
}

// out[0] += Σ x² (f32 per thread and block, f64 across blocks: the norm of millions of
// parameters stays exact enough, as on the CPU).
extern "C" __global__ void sum_squares(double* out, const float* x, u64 n) {
    __shared__ float scratch[32];
    float acc = 0.0f;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        acc += x[i] * x[i];
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) atomicAdd(out, (double)acc);
}

// x *= s (gradient clipping).
extern "C" __global__ void scale(float* x, u64 n, float s) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= s;
}
