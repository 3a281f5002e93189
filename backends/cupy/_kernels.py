"""CUDA source of the cupy backend's kernels, generated per dtype (NumPy-free, CuPy-free).

``optim.load_module`` compiles it with NVRTC (options below), ``_emulate`` compiles the
same text with g++ to run it on the CPU in the tests.

One source per parameter dtype: ``T`` is ``float`` or ``double`` and every
elementwise operation is written once, in ``T``, in the reference's order of
operations. Only the global reductions are ``double`` (explicit casts), as the
spec requires. Kept importable without CuPy so the text can be checked (and
compiled with NVRTC, or run by the CPU emulator in ``_emulate``) anywhere.

Numerics
--------
* Compiled with ``--fmad=false``: ``b*m + c*g`` must round twice, as NumPy
  does; contracting it to an FMA changes the last bit of m, v and θ and then
  the trajectories drift apart from the reference. With no contraction, and
  NVRTC's defaults (IEEE division and square root, no flush-to-zero), Adam,
  AdamW and the Coupled Adam update are bit-for-bit the reference's
  arithmetic (``--ftz=false`` too: float32 subnormals are kept, as NumPy
  keeps them); only ``pow`` (FAdam with p ≠ 0.5, 1) and the float64 summation
  order of the reductions may differ in the last bits. The kernels are
  memory bound, so giving up FMA costs nothing measurable.
* Reductions are deterministic: every thread accumulates a fixed set of
  elements in a fixed order, blocks reduce through a fixed shared-memory tree
  into one partial per chunk, and a second kernel sums a tensor's partials in
  a fixed tree. No floating-point atomics anywhere.

Layout shared with the planner (``_plan``)
------------------------------------------
* chunk table, int64 rows of ``CW`` = 4: (tensor, start, stop, start % cols);
  one block per row; a block's threads take groups of ``VEC`` consecutive
  elements, group j of the chunk at ``start + (j*BLOCK + tid)*VEC`` (16-byte
  vector loads when every pointer of the tensor is 16-byte aligned; the same
  element-to-thread mapping otherwise, so results never depend on alignment);
* meta, int64 rows of ``MW`` = 8 per tensor: (size, first chunk, end chunk,
  rows, cols, partial base, row chunks, 0);
* pointer tables: one uint64 array per role (params, grads, m, v / f).
"""
from __future__ import annotations

import re

CW = 4   # chunk table row width
MW = 8   # meta row width
TW = 5   # column-tile row width (coupled column sums): tensor, r0, r1, c0, partial offset
CTW = 2  # column-finalize tile row width: tensor, c0

BLOCK = 256
#: elements per chunk (a multiple of every VEC); 64 KiB of float32 per array.
CHUNK = 16384

# Passed to NVRTC as they are. Not through cupy.RawModule: CuPy appends -ftz=true to every
# compile, and flushing float32 subnormals to zero changes results versus NumPy (e.g. Adam's
# v = (1-β2)·g² for |g| ~ 1e-18 is subnormal in float32). optim.py compiles with NVRTC itself.
COMPILE_OPTIONS = ("--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true", "-std=c++17")

_TYPES = {"float32": ("float", "f32", 4), "float64": ("double", "f64", 2)}

# Kernel signatures: the single source of truth for argument order and C types.
# "T" is the parameter dtype; "ptr" a device array (int64 / uint64 / float64 / int32).
SIGNATURES: dict[str, list[tuple[str, str]]] = {
    "all_finite": [("const long long*", "chunks"), ("const unsigned long long*", "G"), ("int*", "flag")],
    "adam": [("const long long*", "chunks"), ("const unsigned long long*", "P"),
             ("const unsigned long long*", "G"), ("const unsigned long long*", "M"),
             ("const unsigned long long*", "V"), ("int", "mode"),
             ("T", "wd"), ("T", "decay"), ("T", "b1"), ("T", "omb1"), ("T", "b2"), ("T", "omb2"),
             ("T", "step_size"), ("T", "bc2s"), ("T", "eps")],
    "sumsq": [("const long long*", "chunks"), ("const unsigned long long*", "G"), ("double*", "partial")],
    "fadam_eps": [("const long long*", "meta"), ("const double*", "partial"), ("double*", "scal"),
                  ("double", "eps"), ("double", "eps2"), ("double", "two_p"), ("int", "two_p_is_one"),
                  ("T", "eps2p"), ("T", "tiny")],
    "fadam_precond": [("const long long*", "chunks"), ("const unsigned long long*", "P"),
                      ("const unsigned long long*", "G"), ("const unsigned long long*", "F"),
                      ("const double*", "scal"), ("double*", "partial2"),
                      ("T", "b2h"), ("T", "omb2h"), ("int", "pmode"), ("T", "pp")],
    "fadam_scales": [("const long long*", "meta"), ("const double*", "partial2"), ("double*", "scal"),
                     ("double", "clip")],
    "fadam_apply": [("const long long*", "chunks"), ("const unsigned long long*", "P"),
                    ("const unsigned long long*", "G"), ("const unsigned long long*", "M"),
                    ("const unsigned long long*", "F"), ("const double*", "scal"),
                    ("int", "pmode"), ("T", "pp"), ("T", "b1"), ("T", "omb1"), ("T", "lr"), ("T", "wd")],
    "colsumsq": [("const long long*", "tiles"), ("const long long*", "meta"),
                 ("const unsigned long long*", "G"), ("double*", "partial")],
    "coupled_v": [("const long long*", "ctiles"), ("const long long*", "meta"), ("const double*", "partial"),
                  ("const unsigned long long*", "Vc"), ("T", "b2"), ("T", "omb2")],
    "coupled_apply": [("const long long*", "chunks"), ("const long long*", "meta"),
                      ("const unsigned long long*", "P"), ("const unsigned long long*", "G"),
                      ("const unsigned long long*", "M"), ("const unsigned long long*", "Vc"),
                      ("T", "decay"), ("T", "b1"), ("T", "omb1"), ("T", "step_size"), ("T", "bc2s"),
                      ("T", "eps")],
}

#: kernels whose arithmetic is elementwise in T (checked: no float64 except explicit reduction casts)
ELEMENTWISE = ("all_finite", "adam", "sumsq", "fadam_precond", "fadam_apply", "colsumsq",
               "coupled_v", "coupled_apply")
#: per-tensor finalizers, float64 on purpose (the spec's host-side scalar math, done on the device)
FINALIZE = ("fadam_eps", "fadam_scales")


def ctype(dtype: str) -> str:
    return _TYPES[str(dtype)][0]


def suffix(dtype: str) -> str:
    return _TYPES[str(dtype)][1]


def vec(dtype: str) -> int:
    """Elements per 16-byte vector access."""
    return _TYPES[str(dtype)][2]


def kernel_name(name: str, dtype: str) -> str:
    return f"fo_{name}_{suffix(dtype)}"


def _params(name: str, dtype: str) -> str:
    t = ctype(dtype)
    out = []
    for c, arg in SIGNATURES[name]:
        c = t if c == "T" else c
        if c.endswith("*"):
            c = c + " __restrict__"
        out.append(f"{c} {arg}")
    return ", ".join(out)


_HEADER = r"""
// fisheropt cupy backend, dtype {DTYPE}: generated by fisheropt.backends.cupy._kernels
typedef {CT} T;
#define VEC {VEC}
#define BLOCK {BLOCK}
#define CW {CW}
#define MW {MW}
#define TW {TW}
#define CTW {CTW}

struct __align__(16) VecT {{ T x[VEC]; }};

// Pointers read from the tables are generic to the compiler; saying they are global
// gives ld.global / st.global (vector) instructions instead of generic ones.
#ifndef FO_ASSUME_GLOBAL
#define FO_ASSUME_GLOBAL(ptr) __builtin_assume(__isGlobal(ptr))
#endif

__device__ __forceinline__ bool aligned16(unsigned long long a) {{ return (a & 15ull) == 0ull; }}

// Load / store one group of VEC consecutive elements; `full`: whole group in range and aligned.
__device__ __forceinline__ void load_group(const T* a, long long base, long long stop, bool full, T* out) {{
    if (full) {{
        const VecT w = *reinterpret_cast<const VecT*>(a + base);
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = w.x[k];
    }} else {{
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = (base + k < stop) ? a[base + k] : (T)0;
    }}
}}

__device__ __forceinline__ void store_group(T* a, long long base, long long stop, bool full, const T* in) {{
    if (full) {{
        VecT w;
#pragma unroll
        for (int k = 0; k < VEC; ++k) w.x[k] = in[k];
        *reinterpret_cast<VecT*>(a + base) = w;
    }} else {{
#pragma unroll
        for (int k = 0; k < VEC; ++k) if (base + k < stop) a[base + k] = in[k];
    }}
}}

// f^p for FAdam: pmode 0 -> sqrt (p = 0.5), 1 -> f (p = 1), 2 -> pow(f, p).
__device__ __forceinline__ T pow_p(T x, int pmode, T pp) {{
    return pmode == 0 ? {SQRT}(x) : (pmode == 1 ? x : {POW}(x, pp));
}}

// Deterministic block sum (fixed tree); all BLOCK threads must call it.
__device__ __forceinline__ double block_sum(double x, double* sh) {{
    sh[threadIdx.x] = x;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {{
        if ((int)threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }}
    const double r = sh[0];
    __syncthreads();
    return r;
}}

#define CHUNK_HEADER \
    const long long* ch = chunks + (long long)CW * blockIdx.x; \
    const int t = (int)ch[0]; \
    const long long start = ch[1]; \
    const long long stop = ch[2];

#define FOR_GROUPS(base) \
    for (long long base = start + (long long)threadIdx.x * VEC; base < stop; base += (long long)BLOCK * VEC)
"""

_BODIES = {
    # ---- pre-step check: one int flag, set (never cleared) by any block that sees a NaN/Inf.
    "all_finite": r"""
    CHUNK_HEADER
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    const bool al = aligned16(G[t]);
    bool bad = false;
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T gr[VEC];
        load_group(g, base, stop, full, gr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) bad = bad || !isfinite(gr[k]);
    }
    if (bad) *flag = 1;
""",
    # ---- Adam (mode 0: no decay, 1: L2 decay g += wd*θ) and AdamW (mode 2: θ *= 1 - lr*wd).
    "adam": r"""
    CHUNK_HEADER
    T* p = (T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* m = (T*)M[t]; FO_ASSUME_GLOBAL(m);
    T* v = (T*)V[t]; FO_ASSUME_GLOBAL(v);
    const bool al = aligned16(P[t] | G[t] | M[t] | V[t]);
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T pr[VEC], gr[VEC], mr[VEC], vr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(m, base, stop, full, mr);
        load_group(v, base, stop, full, vr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            T gi = gr[k];
            if (mode == 1) gi = gi + wd * pr[k];
            if (mode == 2) pr[k] = pr[k] * decay;
            mr[k] = b1 * mr[k] + omb1 * gi;
            vr[k] = b2 * vr[k] + omb2 * (gi * gi);
            const T denom = {SQRT}(vr[k]) / bc2s + eps;
            pr[k] = pr[k] - step_size * (mr[k] / denom);
        }
        store_group(p, base, stop, full, pr);
        store_group(m, base, stop, full, mr);
        store_group(v, base, stop, full, vr);
    }
""",
    # ---- FAdam pass 1: per-chunk float64 sum of g^2 (for RMS(g)).
    "sumsq": r"""
    CHUNK_HEADER
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    const bool al = aligned16(G[t]);
    double acc = 0;
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T gr[VEC];
        load_group(g, base, stop, full, gr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) { const double x = (double)gr[k]; acc += x * x; }
    }
    __shared__ double sh[BLOCK];
    const double s = block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
""",
    # ---- FAdam finalize 1 (one block per tensor): eps_t from RMS(g), as refimpl.fadam.adaptive_epsilon.
    "fadam_eps": r"""
    const long long* mt = meta + (long long)MW * blockIdx.x;
    const long long n = mt[0], cb = mt[1], ce = mt[2];
    double acc = 0;
    for (long long c = cb + threadIdx.x; c < ce; c += BLOCK) acc += partial[c];
    __shared__ double sh[BLOCK];
    const double s = block_sum(acc, sh);
    if (threadIdx.x == 0) {
        const double r = (n == 0) ? 0.0 : sqrt(s / (double)n);
        const double x = eps2 * r;
        const double lo = (x < eps) ? x : eps;                 // Python min(eps, eps2*rms)
        const double pw = two_p_is_one ? lo : pow(lo, two_p);  // ** (2p)
        T et = (T)pw;
        if (et == (T)0) et = eps2p;                             // eps ** (2p) where that is 0
        if (tiny > et) et = tiny;                               // max(eps_t, finfo.tiny)
        scal[3 * blockIdx.x] = (double)et;
    }
""",
    # ---- FAdam pass 2: f update (written), float64 sums of g_bar^2 and w_bar^2 per chunk.
    "fadam_precond": r"""
    CHUNK_HEADER
    const T* p = (const T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* f = (T*)F[t]; FO_ASSUME_GLOBAL(f);
    const bool al = aligned16(P[t] | G[t] | F[t]);
    const T et = (T)scal[3 * t];
    double ag = 0, aw = 0;
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T pr[VEC], gr[VEC], fr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(f, base, stop, full, fr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T fi = b2h * fr[k] + omb2h * (gr[k] * gr[k]);
            fr[k] = fi;
            const T denom = pow_p(fi, pmode, pp) + et;
            const T gb = gr[k] / denom;
            const T wb = pr[k] / denom;
            if (full || base + k < stop) {
                const double a = (double)gb;
                const double b = (double)wb;
                ag += a * a;
                aw += b * b;
            }
        }
        store_group(f, base, stop, full, fr);
    }
    __shared__ double sh[BLOCK];
    const double sg = block_sum(ag, sh);
    const double sw = block_sum(aw, sh);
    if (threadIdx.x == 0) {
        partial2[2 * (long long)blockIdx.x] = sg;
        partial2[2 * (long long)blockIdx.x + 1] = sw;
    }
""",
    # ---- FAdam finalize 2 (one block per tensor): clip scales max(1, RMS/c) for g_bar and w_bar.
    "fadam_scales": r"""
    const long long* mt = meta + (long long)MW * blockIdx.x;
    const long long n = mt[0], cb = mt[1], ce = mt[2];
    double ag = 0, aw = 0;
    for (long long c = cb + threadIdx.x; c < ce; c += BLOCK) { ag += partial2[2 * c]; aw += partial2[2 * c + 1]; }
    __shared__ double sh[BLOCK];
    const double sg = block_sum(ag, sh);
    const double sw = block_sum(aw, sh);
    if (threadIdx.x == 0) {
        const double qg = ((n == 0) ? 0.0 : sqrt(sg / (double)n)) / clip;
        const double qw = ((n == 0) ? 0.0 : sqrt(sw / (double)n)) / clip;
        scal[3 * blockIdx.x + 1] = (qg > 1.0) ? qg : 1.0;    // Python max(1.0, rms/c)
        scal[3 * blockIdx.x + 2] = (qw > 1.0) ? qw : 1.0;
    }
""",
    # ---- FAdam pass 3: momentum of the clipped natural gradient, preconditioned weight decay, θ.
    "fadam_apply": r"""
    CHUNK_HEADER
    T* p = (T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* m = (T*)M[t]; FO_ASSUME_GLOBAL(m);
    const T* f = (const T*)F[t]; FO_ASSUME_GLOBAL(f);
    const bool al = aligned16(P[t] | G[t] | M[t] | F[t]);
    const T et = (T)scal[3 * t];
    const T sg = (T)scal[3 * t + 1];
    const T sw = (T)scal[3 * t + 2];
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        T pr[VEC], gr[VEC], mr[VEC], fr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(m, base, stop, full, mr);
        load_group(f, base, stop, full, fr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T denom = pow_p(fr[k], pmode, pp) + et;
            T gb = gr[k] / denom;
            gb = gb / sg;
            mr[k] = b1 * mr[k] + omb1 * gb;
            T wb = pr[k] / denom;
            wb = wb / sw;
            pr[k] = pr[k] - lr * (mr[k] + wd * wb);
        }
        store_group(p, base, stop, full, pr);
        store_group(m, base, stop, full, mr);
    }
""",
    # ---- Coupled Adam pass 1: float64 column sums of g^2 over a tile of rows (thread = column).
    "colsumsq": r"""
    const long long* tl = tiles + (long long)TW * blockIdx.x;
    const int t = (int)tl[0];
    const long long r0 = tl[1], r1 = tl[2];
    const long long c = tl[3] + threadIdx.x;
    const long long d = meta[(long long)MW * t + 4];
    if (c < d) {
        const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
        double acc = 0;
#pragma unroll 8
        for (long long r = r0; r < r1; ++r) { const double x = (double)g[r * d + c]; acc += x * x; }
        partial[tl[4] + c] = acc;
    }
""",
    # ---- Coupled Adam pass 2: column mean over all rows (fixed order), v_col EMA.
    "coupled_v": r"""
    const int t = (int)ctiles[(long long)CTW * blockIdx.x];
    const long long c = ctiles[(long long)CTW * blockIdx.x + 1] + threadIdx.x;
    const long long* mt = meta + (long long)MW * t;
    const long long rows = mt[3], d = mt[4], pbase = mt[5], nrc = mt[6];
    if (c < d) {
        double s = 0;
        for (long long k = 0; k < nrc; ++k) s += partial[pbase + k * d + c];
        const T cm = (T)(s / (double)rows);
        T* v = (T*)Vc[t]; FO_ASSUME_GLOBAL(v);
        v[c] = b2 * v[c] + omb2 * cm;
    }
""",
    # ---- Coupled Adam pass 3: AdamW with the per-column second moment.
    "coupled_apply": r"""
    CHUNK_HEADER
    const long long d = meta[(long long)MW * t + 4];
    T* p = (T*)P[t]; FO_ASSUME_GLOBAL(p);
    const T* g = (const T*)G[t]; FO_ASSUME_GLOBAL(g);
    T* m = (T*)M[t]; FO_ASSUME_GLOBAL(m);
    const T* v = (const T*)Vc[t]; FO_ASSUME_GLOBAL(v);
    const bool al = aligned16(P[t] | G[t] | M[t]);
    FOR_GROUPS(base) {
        const bool full = al && base + VEC <= stop;
        // column of element `base`: (start % d) + offset in chunk, reduced mod d without a
        // 64-bit division (offset < chunk < 2^31, so 32 bits suffice below 2^31 columns)
        long long col = ch[3] + (base - start);
        if (d >= 0x80000000LL) { if (col >= d) col -= d; }
        else col = (long long)((unsigned)col % (unsigned)d);
        T pr[VEC], gr[VEC], mr[VEC];
        load_group(p, base, stop, full, pr);
        load_group(g, base, stop, full, gr);
        load_group(m, base, stop, full, mr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const T denom = {SQRT}(v[col]) / bc2s + eps;
            pr[k] = pr[k] * decay;
            mr[k] = b1 * mr[k] + omb1 * gr[k];
            pr[k] = pr[k] - step_size * (mr[k] / denom);
            if (++col == d) col = 0;
        }
        store_group(p, base, stop, full, pr);
        store_group(m, base, stop, full, mr);
    }
""",
}


def kernel_source(name: str, dtype: str) -> str:
    """The definition of one kernel for one dtype (no header)."""
    dtype = str(dtype)
    body = _BODIES[name].replace("{SQRT}", "sqrtf" if dtype == "float32" else "sqrt")
    return (f'extern "C" __global__ void __launch_bounds__(BLOCK) '
            f"{kernel_name(name, dtype)}({_params(name, dtype)})\n{{{body}}}\n")


def header(dtype: str, block: int = BLOCK) -> str:
    dtype = str(dtype)
    ct = ctype(dtype)
    return _HEADER.format(DTYPE=dtype, CT=ct, VEC=vec(dtype), BLOCK=int(block), CW=CW, MW=MW, TW=TW, CTW=CTW,
                          SQRT="sqrtf" if ct == "float" else "sqrt", POW="powf" if ct == "float" else "pow")


def source(dtype: str, block: int = BLOCK) -> str:
    """The whole CUDA translation unit for one dtype."""
    if block < 32 or block & (block - 1):
        raise ValueError("block must be a power of two >= 32")
    return header(dtype, block) + "\n".join(kernel_source(n, dtype) for n in SIGNATURES)


_FLOAT_LITERAL = re.compile(r"(?<![\w.])(\d+\.\d*|\.\d+|\d+[eE][-+]?\d+)([fFlL]?)(?![\w.])")


def float_literals(text: str) -> list[str]:
    """Floating-point literals in C source text (``1.0``, ``2e-3``, ``0.5f``); used by the tests."""
    return [m.group(0) for m in _FLOAT_LITERAL.finditer(text)]
