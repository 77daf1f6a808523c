// Bias + activation after a product (position-wise FFN, §3.3): kernels::activation on the CPU.

// pre += bias (in place) and post = act(pre); with ACT_IDENTITY `post` may be null.
// pre, post: (N, F); bias: (F)
extern "C" __global__ void bias_act_forward(float* pre, float* post, const float* bias, u64 n,
                                            int f, int act) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * f) return;
    float v = pre[i] + bias[i % f];
    pre[i] = v;
    if (act != ACT_IDENTITY) post[i] = act_apply(act, v);
}

// The end of a column sum over a block (32, 8): each thread's partial sum of column `col`
// (its rows of the block's chunk) is added across the 8 row stripes and once into dbias[col].
__device__ __forceinline__ void column_tile_sum(float acc, float* dbias, int col, int f) {
    __shared__ float sums[8][33];
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < f) {
        for (int k = 1; k < 8; k++) acc += sums[k][threadIdx.x];
        atomicAdd(&dbias[col], acc);
    }
}

// In place d ← d · act'(pre) (d holds dpost on entry, dpre on exit; left as it is for
// ACT_IDENTITY) and dbias += Σ_rows dpre, summed while dpre is in registers. Block (32, 8) over
// a tile of 32 columns and a chunk of rows, as layernorm_param_grads.
extern "C" __global__ void bias_act_backward(float* d, float* dbias, const float* pre, int n,
                                             int f, int act, int rows_per_chunk) {
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    if (col < f) {
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            u64 i = (u64)r * f + col;
            float g = d[i];
            if (act != ACT_IDENTITY) {
                g *= act_derivative(act, pre[i]);
                d[i] = g;
            }
            acc += g;
        }
    }
    column_tile_sum(acc, dbias, col, f);
}

// bias_act_forward for a `post` that only bf16 products read (kernels::activation::
// bias_act_forward_bf16): pre += bias, post = bf16(act(pre)). act is not ACT_IDENTITY.
extern "C" __global__ void bias_act_forward_bf16(float* pre, unsigned short* post,
                                                 const float* bias, u64 n, int f, int act) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * f) return;
    float v = pre[i] + bias[i % f];
    pre[i] = v;
    post[i] = bf16_rn(act_apply(act, v));
}

// bias_act_backward with dpre written in bf16 for the product that reads it
// (kernels::activation::bias_act_backward_bf16): out = bf16(dpost · act'(pre)), dbias += the
// unrounded column sums; d (dpost) is read only. Block (32, 8) as bias_act_backward.
extern "C" __global__ void bias_act_backward_bf16(const float* d, float* dbias, const float* pre,
                                                  unsigned short* out, int n, int f, int act,
                                                  int rows_per_chunk) {
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    if (col < f) {
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            u64 i = (u64)r * f + col;
            float g = d[i] * act_derivative(act, pre[i]);
            out[i] = bf16_rn(g);
            acc += g;
        }
    }
    column_tile_sum(acc, dbias, col, f);
}
