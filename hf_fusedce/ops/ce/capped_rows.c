/* Softcapped cross-entropy rows in one call per chunk: the native twin of torch_impl's "capped" mode
 * (_capped_block_rows + the chunk's factor), for float32 and bfloat16 chunks on CPU. Built on first use by
 * cpu_native.py with the system C compiler; the transcendental functions come in as pointers (MKL's VML
 * vsTanh / vsExp, as libtorch_cpu exports them: the same routines torch's tanh_ and exp_ run).
 *
 * Per row r of z (n x v, row stride ld), with t = tanh(in_scale z), e = exp(cap t):
 *   sum_out[r] = sum_j e_j, t_target_out[r] = t at ids[r], mean_t_out[r] = mean_j t_j (when asked);
 *   with compute_grad, z_j <- (factor e_j + shift[r]) (1 - t_j^2),
 *   factor = (base[r] + 2 z_loss coef[r] log(sum)) / sum.
 * The row's t stays in a per-thread float32 buffer (scratch + thread * v) between the two passes over the row;
 * e is recomputed in the second pass from t (one exp per element more, one buffer less).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

typedef void (*vfun)(int n, const float *in, float *out);

enum { TILE = 2048 };

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static void load_scaled(const void *row, int is_bf16, int64_t j0, int len, float scale, float *out) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)row + j0;
        for (int i = 0; i < len; i++) out[i] = bf16_to_float(src[i]) * scale;
    } else {
        const float *src = (const float *)row + j0;
        for (int i = 0; i < len; i++) out[i] = src[i] * scale;
    }
}

static void one_row(void *row, int is_bf16, int64_t v, float in_scale, float cap, int64_t id, float *t,
                    float *sum_out, float *t_target_out, float *mean_t_out, int compute_grad, float base,
                    float coef, float shift, float z_loss, vfun vtanh, vfun vexp) {
    float e[TILE];
    double sum = 0.0, sum_t = 0.0;
    for (int64_t j0 = 0; j0 < v; j0 += TILE) {
        int len = (int)(v - j0 < TILE ? v - j0 : TILE);
        load_scaled(row, is_bf16, j0, len, in_scale, e);
        vtanh(len, e, t + j0);
        for (int i = 0; i < len; i++) e[i] = cap * t[j0 + i];
        vexp(len, e, e);
        float acc = 0.0f, acc_t = 0.0f;
#pragma omp simd reduction(+ : acc, acc_t)
        for (int i = 0; i < len; i++) {
            acc += e[i];
            acc_t += t[j0 + i];
        }
        sum += acc;
        sum_t += acc_t;
    }
    *sum_out = (float)sum;
    *t_target_out = t[id];
    if (mean_t_out) *mean_t_out = (float)(sum_t / (double)v);
    if (!compute_grad) return;
    float s = (float)sum;
    float factor = (base + 2.0f * z_loss * coef * logf(s)) / s;
    for (int64_t j0 = 0; j0 < v; j0 += TILE) {
        int len = (int)(v - j0 < TILE ? v - j0 : TILE);
        for (int i = 0; i < len; i++) e[i] = cap * t[j0 + i];
        vexp(len, e, e);
        for (int i = 0; i < len; i++) {
            float ti = t[j0 + i];
            e[i] = (factor * e[i] + shift) * (1.0f - ti * ti);
        }
        if (is_bf16) {
            uint16_t *dst = (uint16_t *)row + j0;
            for (int i = 0; i < len; i++) dst[i] = float_to_bf16(e[i]);
        } else {
            memcpy((float *)row + j0, e, (size_t)len * sizeof(float));
        }
    }
}

void capped_rows(void *z, int64_t n, int64_t v, int64_t ld, int is_bf16, float in_scale, float cap,
                 const int64_t *ids, float *sum_out, float *t_target_out, float *mean_t_out, int compute_grad,
                 const float *base, const float *coef, const float *shift, float z_loss, vfun vtanh, vfun vexp,
                 float *scratch, int threads) {
    size_t elem = is_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        float *t = scratch + (int64_t)omp_get_thread_num() * v;
        one_row((char *)z + (size_t)(r * ld) * elem, is_bf16, v, in_scale, cap, ids[r], t, sum_out + r,
                t_target_out + r, mean_t_out ? mean_t_out + r : NULL, compute_grad, compute_grad ? base[r] : 0.0f,
                compute_grad ? coef[r] : 0.0f, shift ? shift[r] : 0.0f, z_loss, vtanh, vexp);
    }
}
