/* The fused block pass of layerfed.layers.fused for float32 replies, in one read per reply.
 *
 * For block j (CHUNK numbers) of every reply, in reply order: the float64 sum of squares of
 * the block and acc += w * x (acc = w * x for the first reply). The arithmetic is the same,
 * operation for operation, as the torch path in fused.py on a CPU where torch runs its AVX2
 * kernels, so both give the same bits:
 *   - torch.linalg.vector_norm (float64, contiguous): 4 lane sums (lane k takes elements
 *     k, k + 4, ...), folded s0 + s1 + s2 + s3 in that order, then the tail element by
 *     element, then sqrt. A float32 square is exact in float64, so x*x + s and fma(x, x, s)
 *     agree;
 *   - Tensor.add_(x, alpha=w): fma(x, w, acc) per element; torch.mul: w * x.
 * fused.py checks the bits against the torch path before it uses this kernel (and falls
 * back to torch when they differ). Compiled with -ffp-contract=off: every fused
 * multiply-add here is written out.
 *
 * The module is loaded with ctypes (the call releases the GIL, so threads can share the
 * blocks); the Python module object itself exports nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_X86 1
#else
#define LF_X86 0
#endif

#define LANES 4
#define GROUP 4

/* Generic C: the reference arithmetic, one reply at a time. */
static void lf_block_generic(const float *x, int64_t m, double w, double *acc, int first,
                             double *norm) {
    double s[LANES] = {0.0, 0.0, 0.0, 0.0};
    int64_t d = 0;
    for (; d < m - (m % LANES); d += LANES) {
        for (int k = 0; k < LANES; k++) {
            double v = (double)x[d + k];
            s[k] = fma(v, v, s[k]);
        }
    }
    double h = s[0];
    for (int k = 1; k < LANES; k++) h = h + s[k];
    for (; d < m; d++) {
        double v = (double)x[d];
        h = fma(v, v, h);
    }
    if (norm) *norm = sqrt(h);
    if (!acc) return;
    if (first) {
        for (d = 0; d < m; d++) acc[d] = w * (double)x[d];
    } else {
        for (d = 0; d < m; d++) acc[d] = fma((double)x[d], w, acc[d]);
    }
}

#if LF_X86
/* AVX2 + FMA: up to GROUP replies per sweep, so their sums of squares run side by side
 * and acc is loaded and stored once per sweep. Same arithmetic as lf_block_generic. */
__attribute__((target("avx2,fma"))) static inline void
lf_group_avx2(const float *const *x, const double *w, int g, int64_t m, double *acc, int first,
              double **norm) {
    __m256d s[GROUP], wv[GROUP];
    for (int r = 0; r < g; r++) {
        s[r] = _mm256_setzero_pd();
        wv[r] = _mm256_set1_pd(w[r]);
    }
    int64_t m4 = m - (m % LANES), d = 0;
    for (; d < m4; d += LANES) {
        __m256d a = acc && !first ? _mm256_loadu_pd(acc + d) : _mm256_setzero_pd();
        for (int r = 0; r < g; r++) {
            __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x[r] + d));
            if (norm) s[r] = _mm256_add_pd(s[r], _mm256_mul_pd(v, v));
            if (acc) a = (first && r == 0) ? _mm256_mul_pd(v, wv[0]) : _mm256_fmadd_pd(v, wv[r], a);
        }
        if (acc) _mm256_storeu_pd(acc + d, a);
    }
    for (int r = 0; r < g; r++) {
        double lane[LANES];
        _mm256_storeu_pd(lane, s[r]);
        double h = lane[0];
        for (int k = 1; k < LANES; k++) h = h + lane[k];
        for (int64_t t = m4; t < m; t++) {
            double v = (double)x[r][t];
            h = fma(v, v, h);
        }
        if (norm) *norm[r] = sqrt(h);
    }
    if (!acc) return;
    for (int64_t t = m4; t < m; t++) {
        double a = first ? 0.0 : acc[t];
        for (int r = 0; r < g; r++) {
            double v = (double)x[r][t];
            a = (first && r == 0) ? w[0] * v : fma(v, w[r], a);
        }
        acc[t] = a;
    }
}

__attribute__((target("avx2,fma"))) static void
lf_block_avx2(const float *const *x, const double *w, int g, int64_t m, double *acc, int first,
              double **norm) {
    switch (g) { /* a constant group size lets the compiler unroll the reply loop */
    case 1: lf_group_avx2(x, w, 1, m, acc, first, norm); break;
    case 2: lf_group_avx2(x, w, 2, m, acc, first, norm); break;
    case 3: lf_group_avx2(x, w, 3, m, acc, first, norm); break;
    default: lf_group_avx2(x, w, 4, m, acc, first, norm); break;
    }
}
#endif

/* 1 when this CPU runs the AVX2 path (else the generic one is used). */
int lf_has_avx2(void) {
#if LF_X86 && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Blocks b0..b1-1 of one array name over nrep float32 replies of n numbers each.
 * xs[i]: reply i's numbers; ws[i]: its weight; acc: n float64 (NULL: no sum);
 * norms: nrep x nblocks float64, row-major (NULL: no norms); simd: use AVX2 when 1. */
void lf_fused_f32(const float *const *xs, const double *ws, int64_t nrep, int64_t n, int64_t chunk,
                  int64_t b0, int64_t b1, double *acc, double *norms, int64_t nblocks, int simd) {
    for (int64_t j = b0; j < b1; j++) {
        int64_t start = j * chunk;
        int64_t m = n - start < chunk ? n - start : chunk;
        double *a = acc ? acc + start : NULL;
#if LF_X86
        if (simd) {
            for (int64_t i = 0; i < nrep; i += GROUP) {
                int g = (int)(nrep - i < GROUP ? nrep - i : GROUP);
                const float *x[GROUP];
                double *nr[GROUP];
                for (int r = 0; r < g; r++) {
                    x[r] = xs[i + r] + start;
                    nr[r] = norms ? norms + (i + r) * nblocks + j : NULL;
                }
                lf_block_avx2(x, ws + i, g, m, a, i == 0, norms ? nr : NULL);
            }
            continue;
        }
#endif
        for (int64_t i = 0; i < nrep; i++) {
            double *nr = norms ? norms + i * nblocks + j : NULL;
            lf_block_generic(xs[i] + start, m, ws[i], a, i == 0, nr);
        }
    }
}

static struct PyModuleDef lf_module = {
    PyModuleDef_HEAD_INIT, "_fused_kernel",
    "C kernel of layerfed.layers.fused (loaded with ctypes).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fused_kernel(void) { return PyModule_Create(&lf_module); }
