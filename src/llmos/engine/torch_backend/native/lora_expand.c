/* Each row's own LoRA adapter added to a decode step's fused base output, in one call a group.
 *
 * A row of y holds the group's base output (ostart[j] .. ostart[j] + owidth[j] for part j) and,
 * from column hoff[j], part j's A outputs for every resident adapter. Row r uses the adapter whose
 * columns are col[r] .. col[r] + cnt[r] (cnt 0: none); part j's B is bt[j], stored transposed
 * (one row of owidth[j] outputs per adapter column). Only the rows' own adapters' B are read.
 *
 * Why: a decode step is memory-bound; the masked block product of the torch path reads every
 * adapter's B plus the block's zeros and costs two oneDNN calls a group. Each output's adapter
 * term is summed in float32 and added to the base output, rounded once, as oneDNN's bf16 products do. */
#include <stdint.h>
#include <string.h>

#define BLOCK 32

static inline float from_bf16(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float from_f32(float v) { return v; }
static inline float to_f32(float v) { return v; }

#define DEFINE_EXPAND(NAME, T, LOAD, STORE)                                                          \
    void NAME(int rows, int parts, T *y, int64_t ldy, const int64_t *hoff, const int64_t *ostart,    \
              const int64_t *owidth, const T *const *bt, const int32_t *col, const int32_t *cnt) {   \
        for (int r = 0; r < rows; r++) {                                                             \
            int c = col[r], n = cnt[r];                                                              \
            if (n <= 0) continue;                                                                    \
            T *yr = y + (int64_t)r * ldy;                                                            \
            float hv[n];                                                                             \
            for (int j = 0; j < parts; j++) {                                                        \
                int64_t w = owidth[j];                                                               \
                T *yo = yr + ostart[j];                                                              \
                const T *b0 = bt[j] + (int64_t)c * w;                                                \
                for (int k = 0; k < n; k++) hv[k] = LOAD(yr[hoff[j] + c + k]);                       \
                int64_t o = 0;                                                                       \
                for (; o + BLOCK <= w; o += BLOCK) {                                                 \
                    float a[BLOCK];                                                                  \
                    for (int i = 0; i < BLOCK; i++) a[i] = 0.0f;                          \
                    for (int k = 0; k < n; k++) {                                                    \
                        const T *b = b0 + (int64_t)k * w + o;                                        \
                        float s = hv[k];                                                             \
                        for (int i = 0; i < BLOCK; i++) a[i] += s * LOAD(b[i]);                      \
                    }                                                                                \
                    for (int i = 0; i < BLOCK; i++) yo[o + i] = STORE(LOAD(yo[o + i]) + a[i]);                         \
                }                                                                                    \
                for (; o < w; o++) {                                                                 \
                    float a = 0.0f;                                                                  \
                    for (int k = 0; k < n; k++) a += hv[k] * LOAD(b0[(int64_t)k * w + o]);           \
                    yo[o] = STORE(LOAD(yo[o]) + a);                                                  \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }

DEFINE_EXPAND(lora_expand_bf16, uint16_t, from_bf16, to_bf16)
DEFINE_EXPAND(lora_expand_f32, float, from_f32, to_f32)
