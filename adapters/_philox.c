/* CPU hot loop of NOLA basis regeneration (see docs/adapter-format.md).
 *
 * basis value e of a stream = 2*u - 1, u = Triton's uint_to_uniform_float of lane e%4 of
 * Philox4x32-10(counter = (c lo, c hi, 0, 0), key = (seed lo, seed hi)), c = stream*2^40 + e/4.
 * Each function equals this torch code of philox.py (bit for bit):
 *   contract(seed, stream, coeffs, n_cols, out):      (Python entry point)
 *       e = torch.arange(len(coeffs) * n_cols).view(len(coeffs), n_cols)
 *       out += coeffs @ basis_values(seed, stream, e)    # accumulated in fp32, j ascending
 *   values(seed, stream, start, out):                  (Python entry point)
 *       out[:] = basis_values(seed, stream, start + arange(len(out)))
 *   axpy_stream(seed, stream << 40, e0, count, a, out, write):
 *       v = basis_values(seed, stream, e0, count); out[:count] = v if write else out + a * v
 *   philox_block_portable / philox_block_avx2(seed, c_start, vals):
 *       vals[:] = _to_symmetric_uniform(_philox4x32(seed, c_start + arange(BLK)).reshape(-1))
 *   sym_uniform(x) / sym_uniform8(x):  _to_symmetric_uniform(x)    (1 or 8 words)
 *   mulhilo_epu32(x, m, lo):           (x * m) >> 32, *lo = x * m  (8 uint32 words)
 * The AVX2 block (intrinsics, picked at import when the CPU has AVX2; the portable loop
 * otherwise) does the same exact integer ops and the same IEEE float mul/sub sequence as
 * the scalar code: no FMA (-ffp-contract=off), so both give identical bits.
 * Both entry points release the GIL so Python threads can run streams in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#endif

#define BLK 32 /* counters per block (128 values): 4 interleaved AVX2 groups, measured best */
#define PHILOX_A 0xD2511F53u /* round multipliers and key increments of Philox4x32 */
#define PHILOX_B 0xCD9E8D57u
#define KEY_A 0x9E3779B9u
#define KEY_B 0xBB67AE85u
#define SCALE 4.6566127342e-10f

static inline float sym_uniform(uint32_t x) {
    int32_t i = (int32_t)x;
    i = i < 0 ? ~i : i;
    float u = (float)i * SCALE;
    return 2.0f * u - 1.0f;
}

/* vals[4*i + lane] = basis value of counter c_start + i, lane `lane`. Portable fallback. */
static void philox_block_portable(uint64_t seed, uint64_t c_start, float *vals) {
    uint32_t c0[BLK], c1[BLK], c2[BLK], c3[BLK];
    uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
    for (int i = 0; i < BLK; i++) {
        uint64_t c = c_start + (uint64_t)i;
        c0[i] = (uint32_t)c;
        c1[i] = (uint32_t)(c >> 32);
        c2[i] = 0;
        c3[i] = 0;
    }
    for (int r = 0; r < 10; r++) {
        for (int i = 0; i < BLK; i++) {
            uint64_t p0 = (uint64_t)PHILOX_A * c0[i];
            uint64_t p2 = (uint64_t)PHILOX_B * c2[i];
            uint32_t n0 = (uint32_t)(p2 >> 32) ^ c1[i] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ k1;
            c1[i] = (uint32_t)p2;
            c3[i] = (uint32_t)p0;
            c0[i] = n0;
            c2[i] = n2;
        }
        k0 += KEY_A;
        k1 += KEY_B;
    }
    for (int i = 0; i < BLK; i++) {
        vals[4 * i + 0] = sym_uniform(c0[i]);
        vals[4 * i + 1] = sym_uniform(c1[i]);
        vals[4 * i + 2] = sym_uniform(c2[i]);
        vals[4 * i + 3] = sym_uniform(c3[i]);
    }
}

#ifdef HAVE_AVX2_PATH
#define AVX2_INLINE __attribute__((target("avx2"))) static inline

/* High 32 bits of the eight 32x32->64 products x[i] * m, and their low 32 bits in *lo (m the
 * same in all lanes): one vpmuludq on the even lanes and one on the odd lanes give both
 * halves, with dword shuffles rather than shifts (Zen 1 has one vector shift pipe, two
 * shuffle pipes, and a slow vpmulld: 16% faster there than vpmulld for the low halves). */
AVX2_INLINE __m256i mulhilo_epu32(__m256i x, __m256i m, __m256i *lo) {
    __m256i even = _mm256_mul_epu32(x, m);
    __m256i odd = _mm256_mul_epu32(_mm256_shuffle_epi32(x, 0xF5), m);
    *lo = _mm256_blend_epi32(even, _mm256_shuffle_epi32(odd, 0xA0), 0xAA);
    return _mm256_blend_epi32(_mm256_shuffle_epi32(even, 0xF5), odd, 0xAA);
}

/* sym_uniform on 8 lanes: same float ops in the same order. */
AVX2_INLINE __m256 sym_uniform8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srai_epi32(x, 31)); /* x < 0 ? ~x : x */
    __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(x), _mm256_set1_ps(SCALE));
    return _mm256_sub_ps(_mm256_mul_ps(_mm256_set1_ps(2.0f), u), _mm256_set1_ps(1.0f));
}

/* Same contract as philox_block_portable, for BLK = 32 counters as 4 groups of 8 that run
 * interleaved (instruction-level parallelism; 16 state registers). Lane j of group g holds
 * counter 8g + perm[j] (0,2,4,6 | 1,3,5,7), so that a 4x4 transpose inside each 128-bit
 * half puts the 32 values of the group in element order without cross-half shuffles. */
__attribute__((target("avx2"))) static void philox_block_avx2(uint64_t seed, uint64_t c_start,
                                                               float *vals) {
    enum { NG = BLK / 8 };
    const __m256i perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    const __m256i ma = _mm256_set1_epi32((int)PHILOX_A), mb = _mm256_set1_epi32((int)PHILOX_B);
    const __m256i lo_base = _mm256_set1_epi32((int)(uint32_t)c_start);
    const __m256i hi_plus1 = _mm256_set1_epi32((int)((uint32_t)(c_start >> 32) + 1u));
    __m256i c0[NG], c1[NG], c2[NG], c3[NG];
    __m256i k0 = _mm256_set1_epi32((int)(uint32_t)seed);
    __m256i k1 = _mm256_set1_epi32((int)(uint32_t)(seed >> 32));
    for (int g = 0; g < NG; g++) {
        /* 64-bit counter c_start + off as (lo, hi): hi gets the carry where lo < off. */
        __m256i off = _mm256_add_epi32(perm, _mm256_set1_epi32(8 * g));
        __m256i lo = _mm256_add_epi32(lo_base, off);
        __m256i no_carry = _mm256_cmpeq_epi32(_mm256_max_epu32(lo, off), lo); /* -1 or 0 */
        /* Round 1 with c2 = c3 = 0, so p2 = 0. */
        c0[g] = _mm256_xor_si256(_mm256_add_epi32(hi_plus1, no_carry), k0);
        c1[g] = _mm256_setzero_si256();
        c2[g] = _mm256_xor_si256(mulhilo_epu32(lo, ma, &c3[g]), k1);
    }
    for (int r = 1; r < 10; r++) {
        k0 = _mm256_add_epi32(k0, _mm256_set1_epi32((int)KEY_A));
        k1 = _mm256_add_epi32(k1, _mm256_set1_epi32((int)KEY_B));
        for (int g = 0; g < NG; g++) {
            __m256i lo2, lo0;
            __m256i hi2 = mulhilo_epu32(c2[g], mb, &lo2), hi0 = mulhilo_epu32(c0[g], ma, &lo0);
            c0[g] = _mm256_xor_si256(_mm256_xor_si256(hi2, c1[g]), k0);
            c2[g] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[g]), k1);
            c1[g] = lo2;
            c3[g] = lo0;
        }
    }
    for (int g = 0; g < NG; g++) {
        __m256 w0 = sym_uniform8(c0[g]), w1 = sym_uniform8(c1[g]);
        __m256 w2 = sym_uniform8(c2[g]), w3 = sym_uniform8(c3[g]);
        /* w_i lane j = word i of counter perm[j]. Store s gets lanes s | s+4, i.e. counters
         * 8g + 2s, 8g + 2s + 1, words 0..3 each: 8 values in element order. */
        __m256d t0 = _mm256_castps_pd(_mm256_unpacklo_ps(w0, w1));
        __m256d t1 = _mm256_castps_pd(_mm256_unpacklo_ps(w2, w3));
        __m256d t2 = _mm256_castps_pd(_mm256_unpackhi_ps(w0, w1));
        __m256d t3 = _mm256_castps_pd(_mm256_unpackhi_ps(w2, w3));
        float *v = vals + 32 * g;
        _mm256_storeu_ps(v + 0, _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t1)));
        _mm256_storeu_ps(v + 8, _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t1)));
        _mm256_storeu_ps(v + 16, _mm256_castpd_ps(_mm256_unpacklo_pd(t2, t3)));
        _mm256_storeu_ps(v + 24, _mm256_castpd_ps(_mm256_unpackhi_pd(t2, t3)));
    }
}

static int use_avx2; /* set once at import: the CPU has AVX2 */
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* out[n] += a * value(e0 + n) for n < count (out[n] = value(e0 + n) if write).
 * Counts what is left rather than comparing end positions, which could wrap near 2^64. */
CLONES
static void axpy_stream(uint64_t seed, uint64_t base, uint64_t e0, uint64_t count, float a,
                        float *out, int write) {
    float vals[4 * BLK];
    for (uint64_t done = 0; done < count;) {
        uint64_t e = e0 + done, c_start = e / 4, skip = e - 4 * c_start;
#ifdef HAVE_AVX2_PATH
        if (use_avx2)
            philox_block_avx2(seed, base + c_start, vals);
        else
#endif
            philox_block_portable(seed, base + c_start, vals);
        uint64_t n = 4 * BLK - skip < count - done ? 4 * BLK - skip : count - done;
        const float *v = vals + skip;
        float *o = out + done;
        if (write)
            for (uint64_t i = 0; i < n; i++) o[i] = v[i];
        else
            for (uint64_t i = 0; i < n; i++) o[i] += a * v[i];
        done += n;
    }
}

static int parse_stream(unsigned long long seed, unsigned long long stream) {
    if (seed >= (1ULL << 63) || stream >= (1ULL << 24)) {
        PyErr_SetString(PyExc_ValueError, "seed must be < 2^63 and stream < 2^24");
        return -1;
    }
    return 0;
}

static PyObject *contract(PyObject *self, PyObject *args) {
    unsigned long long seed, stream, n_cols;
    Py_buffer coeffs, out;
    if (!PyArg_ParseTuple(args, "KKy*Kw*", &seed, &stream, &coeffs, &n_cols, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t k = coeffs.len / (Py_ssize_t)sizeof(float);
    if (parse_stream(seed, stream) == 0) {
        if ((uint64_t)out.len != n_cols * sizeof(float)) {
            PyErr_SetString(PyExc_ValueError, "out must hold n_cols float32 values");
        } else {
            const float *a = (const float *)coeffs.buf;
            Py_BEGIN_ALLOW_THREADS
            for (Py_ssize_t j = 0; j < k; j++)
                axpy_stream(seed, stream << 40, (uint64_t)j * n_cols, n_cols, a[j],
                            (float *)out.buf, 0);
            Py_END_ALLOW_THREADS
            result = Py_None;
            Py_INCREF(result);
        }
    }
    PyBuffer_Release(&coeffs);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *values(PyObject *self, PyObject *args) {
    unsigned long long seed, stream, start;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "KKKw*", &seed, &stream, &start, &out)) return NULL;
    PyObject *result = NULL;
    if (parse_stream(seed, stream) == 0) {
        Py_BEGIN_ALLOW_THREADS
        axpy_stream(seed, stream << 40, start, (uint64_t)out.len / sizeof(float), 0.0f,
                    (float *)out.buf, 1);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"contract", contract, METH_VARARGS, "out += coeffs @ basis(seed, stream) rows (float32)"},
    {"values", values, METH_VARARGS, "out[:] = basis values start.. of (seed, stream)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox", NULL, -1, methods};

PyMODINIT_FUNC PyInit__philox(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2") != 0;
#endif
    return PyModule_Create(&module);
}
