# The ISA table: the instruction sets that the kernel files (stats.cpp, normalize.cpp, backward.cpp)
# are compiled for, one row each, lowest first. This is the only place that names them. The
# top-level CMakeLists.txt reads it: each row whose ARCH matches the target becomes an object
# library bnorm_kernels_<name>, compiled with the row's FLAGS into the namespace
# bnorm::kernels::<name>, and the rows go into the generated header kernels/isa_table.hpp
# (from isa_table.hpp.in), which gives kernels.hpp the Isa enumerators and dispatch.cpp the
# run-time CPU checks and storage types. The first kernel call picks the highest built row whose
# CPU check passes. BNORM_ISA=<name> or set_isa caps that choice at a row, so later rows are the
# preferred ones.
#
#   bnorm_isa(<name> <Isa enumerator> [ARCH <family>] [BASE <row>] [FLAGS <flag>...]
#             [FEATURES <cpu feature>...] [TYPES <storage type>...])
#
#   ARCH      a family below: the row is built where CMAKE_SYSTEM_PROCESSOR matches it, and
#             everywhere when no ARCH is given. Rows built elsewhere still have an enumerator, but
#             isa_supported is false for them.
#   BASE      an earlier row that this one extends. Its FLAGS and FEATURES come first, and the
#             storage types this row does not build run the base's kernels.
#   FLAGS     compiler flags of the row's kernel build.
#   FEATURES  what the CPU must have at run time, as named in dispatch.cpp's feature list
#             (BNORM_CPU_<feature>).
#   TYPES     the storage types whose kernels the row builds (float, double, bfloat16). The
#             default is all of them.
set(BNORM_ARCH_x86 "^(x86_64|AMD64|amd64)$")

# Baseline code for the target (SSE2 on x86-64), the fallback for every CPU.
bnorm_isa(generic Generic)
bnorm_isa(avx2 Avx2 ARCH x86 FLAGS -mavx2 -mfma -mf16c FEATURES avx2 fma f16c)
bnorm_isa(avx512 Avx512 ARCH x86 BASE avx2
          FLAGS -mavx512f -mavx512bw -mavx512vl -mavx512dq -mprefer-vector-width=512
          FEATURES avx512f avx512bw avx512vl avx512dq)
# The AVX-512 build plus the CPU's float -> bfloat16 conversion (AVX512_BF16: its stores then
# round with VCVTNEPS2BF16). Only the bfloat16 kernels differ, so only they are built for it, and
# float and double run the avx512 build.
bnorm_isa(avx512bf16 Avx512Bf16 ARCH x86 BASE avx512 FLAGS -mavx512bf16 FEATURES avx512bf16 TYPES bfloat16)
