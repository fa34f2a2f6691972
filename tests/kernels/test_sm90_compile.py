"""Ahead-of-time compile the Triton kernels for sm_90 (H100) on the CPU: no GPU needed.

Catches what the interpreter cannot: lowering errors, inline PTX (tanh.approx, ex2.f16x2) rejected by
ptxas, register spills, shared memory above the 227 KB limit, and falling off the wgmma/TMA path.
"""

import importlib
import os
import re
import subprocess
import tempfile

import pytest

try:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    _BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    SKIP = None if os.path.exists(os.path.join(_BIN, "ptxas")) else "triton's bundled ptxas is missing"
except Exception as exc:  # pragma: no cover - depends on the environment
    SKIP = f"triton is not importable ({type(exc).__name__}: {exc})"

pytestmark = pytest.mark.skipif(SKIP is not None or os.environ.get("TRITON_INTERPRET") == "1",
                                reason=SKIP or "TRITON_INTERPRET=1 replaces kernels by interpreted functions")

H100_SMEM = 232448


def _compile(jitfn, sig, consts, num_warps, num_stages, div16=()):
    """Compile jitfn for sm_90; return (ptx, shared bytes, registers, local (spill) bytes)."""
    names = jitfn.arg_names
    full = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    k = triton.compile(ASTSource(jitfn, full, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(k.asm["cubin"])
    try:
        res = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res, re.S)
    regs, local = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
    return k.asm["ptx"], k.metadata.shared, regs, local


def _assert_healthy(ptx, shared, regs, local, wgmma=r"wgmma\.mma_async"):
    assert re.search(wgmma, ptx), "kernel fell off the Hopper wgmma path"
    assert shared <= H100_SMEM, f"shared memory {shared} > {H100_SMEM}"
    assert local == 0, f"register spills ({local} bytes of local memory, {regs} registers)"


@pytest.mark.parametrize("dtype,zp", [("i8", False), ("i8", True), ("fp8e4nv", False)])
def test_scaled_mm_tma_compiles_for_sm90(dtype, zp):
    S = importlib.import_module("workbench.kernels.scaled_mm")
    bm, bn, bk, w, s, sub = S.TMA_CONFIGS[1]  # the largest-SMEM config (4 stages, 128x256x128)
    sig = {"a_desc": f"tensordesc<{dtype}[{bm}, {bk}]>", "b_desc": f"tensordesc<{dtype}[{bn}, {bk}]>",
           "c_desc": f"tensordesc<bf16[{bm}, {bn // 2}]>", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
           "bias_ptr": "*bf16", "a_zero_ptr": "*fp32", "b_sum_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "M_BUCKET": "i32"}
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPILOGUE_SUBTILE=sub, NUM_SMS=132,
                  ACC_DTYPE=tl.int32 if dtype == "i8" else tl.float32, OUT_DTYPE=tl.bfloat16, MAX_IMPRECISE=0,
                  HAS_BIAS=True, ACT=1, FAST=True, HAS_ZP=zp)
    ptx, shared, regs, local = _compile(S._scaled_mm_tma_kernel, sig, consts, w, s,
                                        div16=["a_scale_ptr", "b_scale_ptr", "bias_ptr", "a_zero_ptr", "b_sum_ptr",
                                               "N", "K"])
    _assert_healthy(ptx, shared, regs, local)
    assert "cp.async.bulk.tensor" in ptx and "tanh.approx.f32" in ptx


def test_w4a8_compiles_for_sm90_with_register_A_operand():
    W = importlib.import_module("workbench.kernels.w4a8_gemm")
    bn, bm, w, s = W.W4A8_CONFIGS[0]
    sig = dict(a_ptr="*i8", w_ptr="*u8", ws_ptr="*fp32", a_scale_ptr="*fp32", bias_ptr="*bf16", c_ptr="*bf16",
               M="i32", N="i32", K="i32", M_BUCKET="i32", stride_am="i32", stride_wn="i32", stride_wsn="i32",
               stride_cm="i32")
    consts = dict(BLOCK_N=bn, BLOCK_M=bm, GROUP=128, GROUP_M=8, HAS_BIAS=True, ACT=0, FAST=True)
    ptx, shared, regs, local = _compile(W._w4a8_kernel, sig, consts, w, s,
                                        div16=["a_ptr", "w_ptr", "ws_ptr", "a_scale_ptr", "bias_ptr", "c_ptr",
                                               "N", "K", "stride_am", "stride_wn", "stride_wsn", "stride_cm"])
    _assert_healthy(ptx, shared, regs, local, wgmma=r"wgmma\.mma_async\S*s32\.s8\.s8 \{[^}]*\}, \{")


@pytest.mark.parametrize("d,bn,f16x2", [(64, 128, False), (128, 64, True)])
def test_quant_attention_compiles_for_sm90(d, bn, f16x2):
    A = importlib.import_module("workbench.kernels.attention")
    sig = dict(q_ptr="*bf16", k_src=f"tensordesc<i8[{bn}, {d}]>", ks_ptr="*fp32",
               v_src=f"tensordesc<fp8e4nv[{d}, {bn}]>", vs_ptr="*fp32", vm_ptr="*fp32", o_ptr="*bf16",
               H="i32", NQ="i32", NK="i32", NK_PAD="i32", NKB="i32", qk_scale="fp32",
               stride_qb="i32", stride_qh="i32", stride_qn="i32", stride_qd="i32",
               stride_ob="i32", stride_oh="i32", stride_on="i32", stride_od="i32")
    consts = dict(HEAD_DIM=d, BLOCK_M=128, BLOCK_N=bn, USE_TMA=True, PV_FP8=True, PV_PROMOTE=True,
                  EXP_F16X2=f16x2, EMULATE_FP8=False, stride_qd=1, stride_od=1)
    ptx, shared, regs, local = _compile(A._sage_attn_kernel, sig, consts, 8, 3,
                                        div16=["q_ptr", "ks_ptr", "vs_ptr", "vm_ptr", "o_ptr", "NK_PAD",
                                               "stride_qb", "stride_qh", "stride_qn", "stride_ob", "stride_oh",
                                               "stride_on"])
    _assert_healthy(ptx, shared, regs, local, wgmma=r"wgmma\.mma_async\S*s32\.s8\.s8")
    assert re.search(r"wgmma\.mma_async\S*f32\.e4m3\.e4m3", ptx), "P.V is not an fp8 wgmma"
    assert "cvt.rn.f32.s32" not in ptx, "int32 scores converted with the slow I2F path"
    if f16x2:
        assert "ex2.approx.f16x2" in ptx


SM_REGS, SM_SMEM = 65536, 228 * 1024


@pytest.mark.parametrize("d", [64, 128])
def test_gluon_attention_compiles_for_sm90(d):
    """The Gluon kernel as `launch_fa3` builds it (`FA3_SCHEDULE`): int8 and fp8 wgmma from TMA-filled SMEM, no
    spills, no I2F, no shuffles of P before P.V (V^T comes permuted),
    ptxas keeps the wgmmas asynchronous (no C7514 serialization), and the occupancy the schedule is built for:
    four CTAs per SM at D=64 and three at D=128, by registers and by shared memory."""
    G = importlib.import_module("workbench.kernels.attention_sm90")
    if not G.HAS_GLUON:
        pytest.skip("this Triton has no Gluon")
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    bm, bn, warps = 64, 128, 4
    sched = G.FA3_SCHEDULE[d]
    kl = gl.NVMMASharedLayout.get_default_for([bn, d], gl.int8)
    vl = gl.NVMMASharedLayout.get_default_for([d, bn], gl.float8e4nv)
    sig = dict(q_ptr="*bf16", k_desc=f"tensordesc<i8[{bn}, {d}],{kl!r}>", ks_ptr="*fp32",
               v_desc=f"tensordesc<fp8e4nv[{d}, {bn}],{vl!r}>", vs_ptr="*fp32", vm_ptr="*fp32", o_ptr="*bf16",
               H="i32", NQ="i32", NK="i32", NK_PAD="i32", NKB="i32", qk_scale="fp32",
               stride_qb="i32", stride_qh="i32", stride_qn="i32", stride_qd="i32",
               stride_ob="i32", stride_oh="i32", stride_on="i32", stride_od="i32")
    consts = dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, STAGES=sched["stages"], num_warps=warps,
                  stride_qd=1, stride_od=1)
    fn = G._fa3_attn_kernel
    names = fn.arg_names
    full = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    div16 = ["q_ptr", "ks_ptr", "vs_ptr", "vm_ptr", "o_ptr", "stride_qb", "stride_qh", "stride_qn", "stride_ob",
             "stride_oh", "stride_on"]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    opts = dict(num_warps=warps, num_stages=1)
    if sched["maxnreg"]:
        opts["maxnreg"] = sched["maxnreg"]
    k = triton.compile(GluonASTSource(fn, full, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([os.path.join(_BIN, "ptxas"), "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    assert log.returncode == 0, log.stderr[-2000:]
    info = log.stdout + log.stderr
    assert "C7514" not in info, "ptxas serialized the wgmma pipeline"
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    assert "0 bytes spill stores" in info, info
    ctas = 4 if d == 64 else 3
    assert regs * 128 * ctas <= SM_REGS, f"{regs} registers: fewer than {ctas} CTAs per SM"
    assert k.metadata.shared * ctas <= SM_SMEM, f"{k.metadata.shared} B of shared memory: < {ctas} CTAs per SM"
    assert re.search(r"wgmma\.mma_async\S*s32\.s8\.s8", ptx) and re.search(r"wgmma\.mma_async\S*f32\.e4m3\.e4m3", ptx)
    assert "cp.async.bulk.tensor" in ptx and "cvt.rn.f32.s32" not in ptx
    assert "shfl.sync.idx" not in ptx, "P is shuffled into the wgmma A-operand layout (V^T permutation lost)"


@pytest.mark.parametrize("smooth_v", [True, False])
def test_attention_finalize_kernels_compile_for_sm90(smooth_v):
    """The two tiny reductions between the K/V passes and the attention kernel (only the interpreter runs them
    on the CPU): they compile for sm_90 without spills."""
    A = importlib.import_module("workbench.kernels.attention")
    sig = dict(part_ptr="*fp32", km_ptr="*fp32", vm_ptr="*fp32", vinv_ptr="*fp32", vs_ptr="*fp32", BH="i32",
               SPLITS="i32", NK_F="fp32")
    ptx, shared, regs, local = _compile(A._kv_stats_finalize_kernel, sig,
                                        dict(HEAD_DIM=128, SMOOTH_V=smooth_v, EPS=1e-8, QMAX=448.0, BLOCK_R=32), 4, 1)
    assert local == 0 and "div.rn.f32" in ptx
    sig = dict(vm_ptr="*fp32", vb_ptr="*fp32", out_ptr="*fp32", NKB="i32", NK_F="fp32")
    ptx, shared, regs, local = _compile(A._v_bias_finalize_kernel, sig, dict(HEAD_DIM=128, BLOCK_R=32), 4, 1)
    assert local == 0 and "div.rn.f32" in ptx


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "int8"])
def test_row_quantizers_compile_for_sm90(fp8):
    """The one-pass row quantizers at the models' widths (BLOCK_K 2048: CogVideoX 1,920, Wan 1,536) with everything
    fused: the plain / LayerNorm + AdaLN kernel and the residual + LayerNorm + AdaLN kernel of the fused blocks
    (bf16 rounding by bit arithmetic, the hardware e4m3 cast) compile without spills."""
    Q = importlib.import_module("workbench.kernels.act_quant")
    out = "fp8e4nv" if fp8 else "i8"
    sig = dict(x_ptr="*bf16", q_ptr=f"*{out}", s_ptr="*fp32", w_ptr="*bf16", b_ptr="*bf16", ms_ptr="*fp32",
               msh_ptr="*fp32", K="i32", stride_xm="i32", stride_qm="i32", rows_per_batch="i32", stride_mod="i32",
               eps="fp32")
    consts = dict(MODE=Q.MODE_LAYERNORM, HAS_W=True, HAS_B=True, HAS_MOD_SCALE=True, HAS_MOD_SHIFT=True,
                  OUT_FP8=fp8, EMULATE_FP8=False, FAST=True, BLOCK_K=2048)
    ptx, shared, regs, local = _compile(Q._row_quant_kernel, sig, consts, 4, 1)
    assert local == 0 and "rsqrt.approx" in ptx
    strides = ["sxb", "sxn", "syb", "syn", "sgb", "sgn", "scb", "scn", "shb", "shn", "srb", "srn", "sqb", "sqn", "ssb"]
    sig = dict(x_ptr="*bf16", y_ptr="*bf16", g_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", sc_ptr="*fp32",
               sh_ptr="*fp32", r_ptr="*bf16", q_ptr=f"*{out}", s_ptr="*fp32", N="i32", K="i32", eps="fp32",
               **{name: "i64" for name in strides})
    consts = dict(HAS_Y=True, HAS_GATE=True, NORM=True, HAS_W=True, HAS_B=True, HAS_SCALE=True, HAS_SHIFT=True,
                  OUT_FP8=fp8, EMULATE_FP8=False, BLOCK_K=2048)
    ptx, shared, regs, local = _compile(Q._residual_norm_quant_kernel, sig, consts, 4, 1)
    assert local == 0 and "rsqrt.approx" in ptx
    assert ("cvt.rn.satfinite.e4m3x2.f32" in ptx) == fp8, "the e4m3 codes do not use the hardware cast"


@pytest.mark.parametrize("d", [64, 128])
def test_kv_pass_launch_choices_compile_for_sm90_without_spills(d):
    """Every launch choice `scripts/kv_pass_sweep.py` can pick into `attention.KV_PASSES` (K and V blocks in one
    program or two, 4 or 8 warps; one or two statistics tiles a step) compiles for sm_90 without register spills;
    splitting K from V lowers the quant pass's registers at both head dims with 8 warps."""
    A = importlib.import_module("workbench.kernels.attention")
    sig = dict(k_ptr="*bf16", v_ptr="*bf16", km_ptr="*fp32", vm_ptr="*fp32", vinv_ptr="*fp32", vs_ptr="*fp32",
               k8_ptr="*i8", ks_ptr="*fp32", vt_ptr="*fp8e4nv", vb_ptr="*fp32", H="i32", NK="i32", NK_PAD="i32",
               NKB="i32", skb="i32", skh="i32", skn="i32", skd="i32", svb="i32", svh="i32", svn="i32", svd="i32")
    regs = {}
    for split in (False, True):
        for warps in (4, 8):
            consts = dict(HEAD_DIM=d, BLOCK_N=128, SMOOTH_K=True, SMOOTH_V=True, PV_FP8=True, EMULATE_FP8=False,
                          PERMUTE_V=True, SPLIT_KV=split, skd=1, svd=1)
            _, _, r, local = _compile(A._kv_quant_kernel, sig, consts, warps, 1,
                                      div16=["k_ptr", "v_ptr", "k8_ptr", "vt_ptr", "skn", "svn", "NK_PAD"])
            assert local == 0, f"quant pass split={split} warps={warps}: {local} bytes of spills"
            regs[split, warps] = r
    assert regs[True, 8] < regs[False, 8]
    sig = dict(k_ptr="*bf16", v_ptr="*bf16", ksum_ptr="*fp32", vsum_ptr="*fp32", vmin_ptr="*fp32", vmax_ptr="*fp32",
               H="i32", NK="i32", TOK_PER_SPLIT="i32", SPLITS="i32", skb="i32", skh="i32", skn="i32", skd="i32",
               svb="i32", svh="i32", svn="i32", svd="i32")
    for block_t, unroll in ((2048 // d, 1), (2048 // d, 2), (1024 // d, 2), (1024 // d, 1)):
        _, _, r, local = _compile(A._kv_stats_kernel, sig, dict(HEAD_DIM=d, BLOCK_T=block_t, UNROLL=unroll, skd=1,
                                                                 svd=1), 4, 1, div16=["k_ptr", "v_ptr", "skn", "svn"])
        assert local == 0, f"statistics pass BLOCK_T={block_t} UNROLL={unroll}: {local} bytes of spills"
