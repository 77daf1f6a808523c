// One query per row against the KV cache (incremental decoding, the query being the newest
// position): kernels::attention::attention_one_query on the CPU.
//   out[r] = softmax(q[r]·K[block[r]]ᵀ · scale) V[block[r]]   over keys span[2r]..span[2r+1]
// (rows of one cache may be at different positions, and read sources of different lengths)
// One warp per (row, head): lanes take keys for the scores, then output columns for the
// weighted sum (coalesced value reads). Scores live in dynamic shared memory (the longest
// row's n floats).
// kv: (blocks, rows, rs) with keys at k_off, values at v_off; pad: (blocks, rows) bytes or null.
// A fully masked row gives zeros, as softmax_row.
extern "C" __global__ void attention_one_query(float* out, const float* q, long long q_rs,
                                               const float* kv, long long rows, long long rs,
                                               long long k_off, long long v_off,
                                               const unsigned* block, const int* span,
                                               const unsigned char* pad, int heads, int d,
                                               float scale) {
    extern __shared__ float sc[];
    const float NEG_INF = __int_as_float(0xff800000);
    int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    u64 blk = block[r];
    int k_start = span[2 * r], n = span[2 * r + 1] - k_start;
    const float* qh = q + (u64)r * q_rs + (u64)h * d;
    u64 base = (blk * rows + k_start) * rs;
    float mx = NEG_INF;
    for (int j = lane; j < n; j += 32) {
        const float* kj = kv + base + (u64)j * rs + k_off + (u64)h * d;
        float dot = 0.0f;
        for (int x = 0; x < d; x++) dot += qh[x] * kj[x];
        float s = dot * scale;
        if (pad && pad[blk * rows + k_start + j]) s = NEG_INF;
        sc[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < n; j += 32) {
        float p = sc[j] == NEG_INF ? 0.0f : expf(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = warp_sum(sum);
    __syncwarp();
    float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    float* o = out + ((u64)r * heads + h) * d;
    for (int x = lane; x < d; x += 32) {
        const float* vx = kv + base + v_off + (u64)h * d + x;
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += sc[j] * vx[(u64)j * rs];
        o[x] = acc * inv;
    }
}

// The cache write of a decoding step: row r of src (width floats at row stride src_rs)
// becomes position pos[r] of block block[r] (blocks of `rows` positions of `width` floats).
// One thread block per row: the rows go to different blocks, so one launch replaces a copy
// per row (the CPU's Backend::kv_append copies a slice per row).
extern "C" __global__ void kv_append(float* kv, long long rows, long long width,
                                     const float* src, long long src_rs,
                                     const unsigned* block, const int* pos) {
    int r = blockIdx.x;
    float* dst = kv + ((u64)block[r] * rows + pos[r]) * width;
    const float* s = src + (u64)r * src_rs;
    for (long long i = threadIdx.x; i < width; i += blockDim.x) dst[i] = s[i];
}

// Copies inside one buffer (a decoding cache's blocks, for beam search's repeated parents):
// copy i moves spans[3i+2] floats from offset spans[3i] to offset spans[3i+1]. The targets
// are disjoint and none is a source, so every copy runs at once: one launch per layer
// instead of one copy per row. Grid: (chunks of each copy, copies).
extern "C" __global__ void copy_within(float* data, const long long* spans) {
    int i = blockIdx.y;
    long long from = spans[3 * i], to = spans[3 * i + 1], len = spans[3 * i + 2];
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < len; x += stride)
        data[to + x] = data[from + x];
}
