"""bench/mca --check must fail on a slower loop and on a new spill, and pass on unchanged code.

Runs bench/mca on small hand-written assembly files (--asm-dir) in the layout of the compiled
kernels (DIR/<row>/<file>.s), so it takes seconds and does not depend on the kernels of the day.
Run with pytest or as a script: python3 tests/mca/test_mca.py
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

MCA = Path(__file__).resolve().parents[2] / "bench" / "mca"

# bnorm::kernels::avx2::scale<float>(float const*, float*, long): y = x + x, 8 floats per iteration.
FUNCTION = "_ZN5bnorm7kernels4avx25scaleIfEEvPKT_PS3_l"
FAST_LOOP = """\
\tvmovups\t(%rdi,%rax), %ymm1
\tvaddps\t%ymm1, %ymm1, %ymm0
\tvmovups\t%ymm0, (%r8,%rax)
"""
# The same work with a division in the chain: several times the cycles on every model.
SLOW_LOOP = """\
\tvmovups\t(%rdi,%rax), %ymm1
\tvdivps\t%ymm1, %ymm1, %ymm2
\tvaddps\t%ymm2, %ymm1, %ymm0
\tvmovups\t%ymm0, (%r8,%rax)
"""
# The same work with an operand read from the stack: a spill (llvm-mca also finds it slower;
# the check must name the spill itself).
SPILL_LOOP = FAST_LOOP.replace("\tvaddps\t%ymm1, %ymm1, %ymm0",
                               "\tvaddps\t32(%rsp), %ymm1, %ymm0")


def assembly(loop, name=FUNCTION):
    return f"""\t.text
\t.globl\t{name}
\t.type\t{name}, @function
{name}:
\txorl\t%eax, %eax
.L5:
{loop}\taddq\t$32, %rax
\tcmpq\t%rcx, %rax
\tjne\t.L5
\tvzeroupper
\tret
\t.size\t{name}, .-{name}
"""


def run_mca(folder, loop, *args, extra=""):
    asm = Path(folder) / "asm" / "avx2" / "normalize.s"
    asm.parent.mkdir(parents=True, exist_ok=True)
    asm.write_text(assembly(loop) + extra)
    (asm.parent / "flags").write_text("c++ -O3 -mavx2 -mfma -mf16c\n")
    return subprocess.run([sys.executable, str(MCA), "--asm-dir", str(Path(folder) / "asm"),
                           "-q", *args], capture_output=True, text=True)


def with_baseline(check):
    with tempfile.TemporaryDirectory() as folder:
        baseline = str(Path(folder) / "baseline.json")
        made = run_mca(folder, FAST_LOOP, "--update", baseline)
        assert made.returncode == 0, made.stderr
        check(folder, baseline)


def test_baseline_records_the_loop():
    def check(_folder, baseline):
        loops = json.loads(Path(baseline).read_text())["loops"]
        assert len(loops) == 1, loops
        (entry,) = loops.values()
        assert entry["values_per_iter"] == 8
        assert entry["stack_operands"] == 0
        assert set(entry["cycles_per_iter"]) == {"znver3", "sapphirerapids"}
    with_baseline(check)


def test_unchanged_code_passes():
    def check(folder, baseline):
        result = run_mca(folder, FAST_LOOP, "--check", baseline)
        assert result.returncode == 0, result.stdout + result.stderr
    with_baseline(check)


def test_slower_loop_fails_naming_loop_model_and_cycles():
    def check(folder, baseline):
        result = run_mca(folder, SLOW_LOOP, "--check", baseline)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "scale<float>" in result.stderr
        assert "znver3" in result.stderr and "sapphirerapids" in result.stderr
        assert "cycles per value" in result.stderr and "->" in result.stderr
    with_baseline(check)


def test_new_spill_fails():
    def check(folder, baseline):
        result = run_mca(folder, SPILL_LOOP, "--check", baseline)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "new spill" in result.stderr and "0 -> 1 stack operands" in result.stderr
    with_baseline(check)


def test_new_loop_is_reported_not_failed():
    other = "_ZN5bnorm7kernels4avx25twiceIfEEvPKT_PS3_l"
    def check(folder, baseline):
        result = run_mca(folder, FAST_LOOP, "--check", baseline, extra=assembly(FAST_LOOP, other))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "new loop (not a failure)" in result.stdout and "twice<float>" in result.stdout
    with_baseline(check)


# A loop with a branch inside it: not modelled, but a spill in it still fails the check.
BRANCHY_LOOP = FAST_LOOP + "\ttestq\t%rdx, %rdx\n\tje\t.L6\n\tvmovups\t%ymm0, (%r9,%rax)\n.L6:\n"


def test_spill_in_a_loop_with_branches_fails():
    with tempfile.TemporaryDirectory() as folder:
        baseline = str(Path(folder) / "baseline.json")
        made = run_mca(folder, BRANCHY_LOOP, "--update", baseline)
        assert made.returncode == 0, made.stderr
        (entry,) = json.loads(Path(baseline).read_text())["loops"].values()
        assert entry["cycles_per_iter"] == {} and entry["stack_operands"] == 0
        spilled = BRANCHY_LOOP.replace("\tvaddps\t%ymm1, %ymm1, %ymm0",
                                       "\tvaddps\t32(%rsp), %ymm1, %ymm0")
        result = run_mca(folder, spilled, "--check", baseline)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "new spill" in result.stderr


def test_values_per_iteration_count_bytes_once_across_a_pointer_advance():
    # bfloat16 data read twice at the same address, the pointer advanced mid-loop: 64 bytes of
    # 2-byte values per iteration = 32 values, not 48 or 64.
    bf16 = "_ZN5bnorm7kernels4avx25scaleINS_8bfloat16EEEvPKT_PS4_l"
    loop = """\
\tvmovdqu\t(%rdi,%rax), %ymm1
\tvpand\t(%rdi,%rax), %ymm4, %ymm2
\taddq\t$32, %rax
\tvpslld\t$16, %ymm1, %ymm1
\tvpand\t(%rdi,%rax), %ymm4, %ymm3
\tvaddps\t%ymm1, %ymm2, %ymm0
\tvaddps\t%ymm3, %ymm0, %ymm0
\tvmovups\t%ymm0, (%r8,%rax)
"""
    with tempfile.TemporaryDirectory() as folder:
        asm = Path(folder) / "asm" / "avx2" / "stats.s"
        asm.parent.mkdir(parents=True)
        asm.write_text(assembly(loop, bf16).replace("\taddq\t$32, %rax\n\tcmpq", "\tcmpq"))
        (asm.parent / "flags").write_text("c++ -O3 -mavx2\n")
        baseline = Path(folder) / "baseline.json"
        made = subprocess.run([sys.executable, str(MCA), "--asm-dir", str(asm.parent.parent), "-q",
                               "--update", str(baseline)], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        (entry,) = json.loads(baseline.read_text())["loops"].values()
        assert entry["values_per_iter"] == 32, entry


if __name__ == "__main__":
    for name, test in sorted(globals().items()):
        if name.startswith("test_"):
            test()
            print(f"ok {name}")
