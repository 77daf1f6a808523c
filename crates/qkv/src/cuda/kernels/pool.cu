// Pooling (B, T, C) states into (B, C): kernels::pool on the CPU. pool: 0 first, 1 mean over
// non-padding positions (at least one counted). pad: (B, T) bytes, or null for none.

__device__ __forceinline__ float pool_inv(const unsigned char* pad, int b, int t) {
    int real = 0;
    for (int pos = 0; pos < t; pos++) real += pad == 0 || !pad[b * t + pos];
    return 1.0f / (float)max(real, 1);
}

// One thread per (row, column), positions summed in order as the CPU does.
extern "C" __global__ void pool_forward(float* out, const float* h, const unsigned char* pad,
                                        int b_rows, int t, int c, int pool) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= b_rows * c) return;
    int b = i / c, col = i % c;
    const float* hb = h + (u64)b * t * c + col;
    if (pool == 0) {
        out[i] = hb[0];
        return;
    }
    float inv = pool_inv(pad, b, t), acc = 0.0f;
    for (int pos = 0; pos < t; pos++)
        if (pad == 0 || !pad[b * t + pos]) acc += hb[(u64)pos * c] * inv;
    out[i] = acc;
}

// One thread per element of dh (B, T, C), overwritten.
extern "C" __global__ void pool_backward(float* dh, const float* dpooled,
                                         const unsigned char* pad, int b_rows, int t, int c,
                                         int pool) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (u64)b_rows * t * c) return;
    int col = (int)(i % c), pos = (int)((i / c) % t), b = (int)(i / ((u64)c * t));
    float d = dpooled[(u64)b * c + col];
    if (pool == 0) {
        dh[i] = pos == 0 ? d : 0.0f;
        return;
    }
    bool real = pad == 0 || !pad[b * t + pos];
    dh[i] = real ? d * pool_inv(pad, b, t) : 0.0f;
}
