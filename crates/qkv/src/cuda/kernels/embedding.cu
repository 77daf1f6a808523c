// Token embeddings and positional encodings (§3.4, §3.5): kernels::embedding on the CPU.

// out[r, i] = dropout(table[tokens[r], i] · scale + pos[r mod T, i]).
// tokens: (N) already validated against the vocabulary; table: (V, C); pos: (≥T, C); out: (N, C)
extern "C" __global__ void embedding_forward(float* out, const unsigned* tokens,
                                             const float* table, const float* pos, float scale,
                                             int t_len, int c, int n, float p, u64 seed,
                                             u64 offset) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)n * c) return;
    int row = (int)(idx / c), i = (int)(idx % c);
    float e = table[(u64)tokens[row] * c + i];
    float v = e * scale + pos[(u64)(row % t_len) * c + i];
    out[idx] = v * drop_factor(p, seed, offset + idx);
}

// dtable[tokens[r]] += dout[r] · scale and, with dpos, dpos[r mod T] += dout[r]. `dout` has the
// dropout mask applied already. Rows repeated in `tokens` meet in atomics (the CPU splits the
// columns instead): the sum's order differs, within float rounding.
extern "C" __global__ void embedding_backward(float* dtable, float* dpos, const float* dout,
                                              const unsigned* tokens, float scale, int t_len,
                                              int c, int n) {
    u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (u64)n * c) return;
    int row = (int)(idx / c), i = (int)(idx % c);
    float d = dout[idx];
    atomicAdd(&dtable[(u64)tokens[row] * c + i], d * scale);
    if (dpos) atomicAdd(&dpos[(u64)(row % t_len) * c + i], d);
}
