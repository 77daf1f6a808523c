// Seeded inverted dropout (Srivastava et al., 2014) and the residual sum around a sublayer:
// kernels::dropout on the CPU. Masks are drawn from (seed, offset + element index).

// out = x + dropout(sub); x, sub, out: (N)
extern "C" __global__ void residual_add(float* out, const float* x, const float* sub, u64 n,
                                        float p, u64 seed, u64 offset) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = x[i] + sub[i] * drop_factor(p, seed, offset + i);
}

// In place x = dropout(x) (forward), or dx = dropout'(dx) (backward: the same mask and scale).
extern "C" __global__ void dropout_apply(float* x, u64 n, float p, u64 seed, u64 offset) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    x[i] *= drop_factor(p, seed, offset + i);
}
