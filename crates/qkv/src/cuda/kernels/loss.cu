// Cross-entropy with label smoothing (§5.4) and an ignored padding index, fused with the softmax
// and its gradient: kernels::loss on the CPU. One block per row of logits.

// For each row r with targets[r] != ignore (ignore < 0: none ignored):
//   dlogits[r] = (softmax(l) − ε/V)·inv, then dlogits[r, y] −= (1 − ε)·inv   (when dlogits)
//   rows[2r] = (1 − ε)·(−log p_y) + ε·mean_j(−log p_j),  rows[2r + 1] = −log p_y
// ignored rows get zero gradient and zero loss. `inv` is 1 / (number of counted rows): the
// gradient of the mean. The host sums `rows` in f64, as the CPU does.
// logits, dlogits: (N, V); targets: (N); rows: (N, 2)
extern "C" __global__ void cross_entropy(float* dlogits, float* rows, const float* logits,
                                         const unsigned* targets, int v, long long ignore,
                                         float smoothing, float inv) {
    __shared__ float scratch[32];
    int row = blockIdx.x;
    unsigned y = targets[row];
    const float* l = logits + (u64)row * v;
    float* d = dlogits ? dlogits + (u64)row * v : 0;
    if (ignore >= 0 && (long long)y == ignore) {
        if (d)
            for (int j = threadIdx.x; j < v; j += blockDim.x) d[j] = 0.0f;
        if (threadIdx.x == 0) rows[2 * row] = rows[2 * row + 1] = 0.0f;
        return;
    }
    float mx = __int_as_float(0xff800000), sl = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        mx = fmaxf(mx, l[j]);
        sl += l[j];
    }
    mx = block_max(mx, scratch);
    sl = block_sum(sl, scratch);
    float se = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) se += expf(l[j] - mx);
    se = block_sum(se, scratch);
    float log_z = mx + logf(se);
    if (d) {
        float scale = inv / se, shift = smoothing / v * inv;
        for (int j = threadIdx.x; j < v; j += blockDim.x) {
            float g = expf(l[j] - mx) * scale - shift;
            if ((unsigned)j == y) g -= (1.0f - smoothing) * inv;
            d[j] = g;
        }
    }
    if (threadIdx.x == 0) {
        float nll = log_z - l[y];
        float smooth = log_z - sl / v;
        rows[2 * row] = (1.0f - smoothing) * nll + smoothing * smooth;
        rows[2 * row + 1] = nll;
    }
}
