// f32 → bf16 bits for the mixed-precision products: round to nearest even, NaN kept quiet, as
// kernels::bf16::bf16_bits on the CPU.
extern "C" __global__ void to_bf16(unsigned short* out, const float* x, u64 n) {
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned b = __float_as_uint(x[i]);
    if (x[i] != x[i]) {
        out[i] = (unsigned short)((b >> 16) | 0x40);
        return;
    }
    out[i] = (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
