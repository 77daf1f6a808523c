// f32 → bf16 bits for the mixed-precision products (bf16_rn in common.cuh), as
// kernels::bf16::bf16_bits on the CPU.
extern "C" __global__ void to_bf16(unsigned short* out, const float* x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = bf16_rn(x[i]);
}
