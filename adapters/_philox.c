/* CPU hot loop of NOLA basis regeneration (see docs/adapter-format.md).
 *
 * contract(seed, stream, coeffs, n_cols, out) is equal to this torch code:
 *     e = torch.arange(len(coeffs) * n_cols).view(len(coeffs), n_cols)
 *     out += coeffs @ basis_values(seed, stream, e)      # accumulated in fp32, j ascending
 * values(seed, stream, start, out) writes basis_values(seed, stream, start + arange(len(out))).
 *
 * basis value e of a stream = 2*u - 1, u = Triton's uint_to_uniform_float of lane e%4 of
 * Philox4x32-10(counter = (c lo, c hi, 0, 0), key = (seed lo, seed hi)), c = stream*2^40 + e/4.
 * Both functions release the GIL so Python threads can run streams in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define BLK 64 /* counters per block: 256 values, small enough for registers + L1 */

static inline float sym_uniform(uint32_t x) {
    int32_t i = (int32_t)x;
    i = i < 0 ? ~i : i;
    float u = (float)i * 4.6566127342e-10f;
    return 2.0f * u - 1.0f;
}

/* vals[4*i + lane] = basis value of counter c_start + i, lane `lane`. */
__attribute__((target_clones("avx2", "default")))
static void philox_block(uint64_t seed, uint64_t c_start, float *vals) {
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
            uint64_t p0 = (uint64_t)0xD2511F53u * c0[i];
            uint64_t p2 = (uint64_t)0xCD9E8D57u * c2[i];
            uint32_t n0 = (uint32_t)(p2 >> 32) ^ c1[i] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ k1;
            c1[i] = (uint32_t)p2;
            c3[i] = (uint32_t)p0;
            c0[i] = n0;
            c2[i] = n2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    for (int i = 0; i < BLK; i++) {
        vals[4 * i + 0] = sym_uniform(c0[i]);
        vals[4 * i + 1] = sym_uniform(c1[i]);
        vals[4 * i + 2] = sym_uniform(c2[i]);
        vals[4 * i + 3] = sym_uniform(c3[i]);
    }
}

/* out[n] += a * value(e0 + n) for n < count. */
__attribute__((target_clones("avx2", "default")))
static void axpy_stream(uint64_t seed, uint64_t base, uint64_t e0, uint64_t count, float a,
                        float *out, int write) {
    float vals[4 * BLK];
    uint64_t e = e0, end = e0 + count;
    while (e < end) {
        uint64_t c_start = e / 4;
        philox_block(seed, base + c_start, vals);
        uint64_t blk_end = 4 * (c_start + BLK);
        uint64_t stop = blk_end < end ? blk_end : end;
        const float *v = vals + (e - 4 * c_start);
        float *o = out + (e - e0);
        uint64_t n = stop - e;
        if (write)
            for (uint64_t i = 0; i < n; i++) o[i] = v[i];
        else
            for (uint64_t i = 0; i < n; i++) o[i] += a * v[i];
        e = stop;
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

PyMODINIT_FUNC PyInit__philox(void) { return PyModule_Create(&module); }
