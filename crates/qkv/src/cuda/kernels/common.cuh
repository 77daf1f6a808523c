// Prepended to every kernel source by qkv's loader (src/cuda/mod.rs): NVRTC compiles from
// strings, with no include path into the repository.
//
// Shapes in the CPU kernels' alphabet: N rows, C model width, F feed-forward width, V vocabulary.
// Kernels do not use fast-math: each is tested against its CPU twin in crates/qkv/src/kernels.

typedef unsigned long long u64;

// rng::hash on the CPU: SplitMix64's finaliser over seed mixed with index. Dropout masks are a
// pure function of (seed, element index), so the GPU draws the CPU's mask bit for bit.
__device__ __forceinline__ u64 qkv_hash(u64 seed, u64 index) {
    u64 z = seed + index * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// kernels::dropout::Dropout::factor: 0 or 1/(1-p) for element i; 1 when p == 0 (no dropout).
__device__ __forceinline__ float drop_factor(float p, u64 seed, u64 i) {
    if (p <= 0.0f) return 1.0f;
    float u = (float)(qkv_hash(seed, i) >> 40) * (1.0f / 16777216.0f);
    return u < p ? 0.0f : 1.0f / (1.0f - p);
}

// f32 → bf16 bits, rounded to nearest even, NaN kept quiet: kernels::bf16::bf16_bits.
__device__ __forceinline__ unsigned short bf16_rn(float x) {
    unsigned b = __float_as_uint(x);
    if (x != x) return (unsigned short)((b >> 16) | 0x40);
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads (a multiple of 32); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : __int_as_float(0xff800000);
    return warp_max(v);
}

// Activation codes, as kernels::activation::Activation.
#define ACT_RELU 0
#define ACT_GELU 1
#define ACT_IDENTITY 2

__device__ __forceinline__ float act_apply(int act, float x) {
    // ReLU as `x <= 0 ? 0 : x` (not fmaxf): NaN passes through, as on the CPU.
    if (act == ACT_RELU) return x <= 0.0f ? 0.0f : x;
    if (act == ACT_GELU) return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    return x;
}

__device__ __forceinline__ float act_derivative(int act, float x) {
    if (act == ACT_RELU) return x > 0.0f ? 1.0f : 0.0f;
    if (act == ACT_GELU)
        return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) +
               x * 0.3989422804014327f * expf(-0.5f * x * x);
    return 1.0f;
}

// Attention masks (kernels::attention::Masks) for the flash kernels.
struct Visible {
    int lo, hi;
};

// Keys [lo, hi) query i may see under the causal and window masks (Masks::visible): causal
// hides keys after i; a window w > 0 keeps i−w+1..=i (causal) or |i − j| < w.
__device__ __forceinline__ Visible visible(int i, int tk, int causal, int window) {
    int hi = causal ? min(i + 1, tk) : tk;
    int lo = 0;
    if (window > 0) {
        lo = max(0, i + 1 - window);
        if (!causal) hi = min(hi, i + window);
    }
    return Visible{min(lo, hi), hi};
}

// Whether key j is visible and not padding (pad: (B, Tk) bytes, 1 = padding; null: none).
__device__ __forceinline__ bool sees(Visible v, int j, const unsigned char* pad, int b, int tk) {
    return j >= v.lo && j < v.hi && !(pad && pad[(u64)b * tk + j]);
}
