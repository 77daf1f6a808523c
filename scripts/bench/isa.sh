# Sourced by the benchmark scripts: when QKV_ISA holds qkv to an instruction set
# (baseline | avx2 | avx512), hold PyTorch's kernels (ATen's dispatch) and MKL to the same one,
# so a same-run ratio compares the same instruction set on both sides.
case "${QKV_ISA:-}" in
    "") ;;
    avx512) export ATEN_CPU_CAPABILITY=avx512 MKL_ENABLE_INSTRUCTIONS=AVX512 ;;
    avx2) export ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ;;
    baseline) export ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ;;
    *) echo "QKV_ISA=$QKV_ISA: expected baseline, avx2 or avx512" >&2; exit 1 ;;
esac
[ -z "${QKV_ISA:-}" ] || echo "instruction set held to $QKV_ISA (ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS=$MKL_ENABLE_INSTRUCTIONS)" >&2
