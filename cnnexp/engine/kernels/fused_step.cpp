// One whole SGD training step of a small CNN (Conv2d / ReLU / MaxPool2d(2) /
// flatten / Linear, softmax cross-entropy), forward, backward and update, in
// one call. At batch 4 PyTorch spends most of a step on per-operator cost and
// generic kernels; here every layer runs as a plain loop nest over buffers
// allocated once, sized for these shapes.
//
// Layout: activations are NCHW float, compact, with zeroed slack at the end so
// that vector loads may run past a plane. A convolution (stride 1) is computed
// "full width": output position p = oh * Wp + ow for every ow < Wp, so the
// input for tap (ci, kh, kw) is the input at p + ci*Hp*Wp + kh*Wp + kw, one
// contiguous run for the whole output plane. The columns ow >= OW are garbage
// and are dropped when the output is compacted (their gradient is zero).
// Register-blocked loops use the vector extensions GCC and Clang share, so
// the compiler emits AVX-512, AVX2, SSE or NEON from the same source
// (-march=native).
//
// The entry points trust nothing: cnx_create checks the whole layer
// description against the parameter buffer and every allocation (sizes in
// size_t, overflow checked) and says why it refuses; cnx_step checks the
// batch size and the labels before it changes anything.
//
// Built and loaded by cnnexp/engine/kernels/build.py; called through ctypes.

#include <cmath>
#include <cstdarg>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr int CB = 4;  // output channels per register block
constexpr int NB = 4;  // vectors of positions per register block
constexpr int TB = 4;  // taps per weight-gradient block
#elif defined(__AVX__)
constexpr int VL = 8;
constexpr int CB = 3;
constexpr int NB = 3;
constexpr int TB = 3;
#else
constexpr int VL = 4;
constexpr int CB = 3;
constexpr int NB = 3;
constexpr int TB = 3;
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

static inline vf ld(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void st(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
static inline vf splat(float s) { return vf{} + s; }
static inline float hsum(vf v) { float s = 0; for (int i = 0; i < VL; i++) s += v[i]; return s; }
static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Even and odd lanes of the pair (a, b): the deinterleave of 2x2 pooling.
// __builtin_shufflevector (Clang, GCC >= 12) takes constant lane lists;
// older GCC has only __builtin_shuffle with a mask vector.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#if defined(__AVX512F__)
#define EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#elif defined(__AVX__)
#define EVEN_LANES 0, 2, 4, 6, 8, 10, 12, 14
#define ODD_LANES 1, 3, 5, 7, 9, 11, 13, 15
#else
#define EVEN_LANES 0, 2, 4, 6
#define ODD_LANES 1, 3, 5, 7
#endif
static inline vf even_lanes(vf a, vf b) { return __builtin_shufflevector(a, b, EVEN_LANES); }
static inline vf odd_lanes(vf a, vf b) { return __builtin_shufflevector(a, b, ODD_LANES); }
#else
static inline vi lane_mask(int first) { vi m; for (int i = 0; i < VL; i++) m[i] = 2 * i + first; return m; }
static inline vf even_lanes(vf a, vf b) { return __builtin_shuffle(a, b, lane_mask(0)); }
static inline vf odd_lanes(vf a, vf b) { return __builtin_shuffle(a, b, lane_mask(1)); }
#endif

enum { CONV = 1, RELU = 2, POOL = 3, FLAT = 4, LINEAR = 5 };
constexpr int SPEC_VERSION = 2, SPEC_HEADER = 6, SPEC_LAYER = 8, SLACK = 8192;
// Per-image sizes index with int; anything near this is not a small CNN.
constexpr long PER_IMAGE_MAX = INT_MAX / 8;

struct Layer {
    int type, cin, cout, k, pad, w_off, b_off;
    int C, H, W;          // input shape
    int OC, OH, OW;       // output shape
    // convolution geometry
    int Hp, Wp, P, Pr, Q, Qr, FP, GS, T;
    std::vector<int> off;  // input offset of each tap (ci, kh, kw)
    float *xpad = nullptr, *full = nullptr, *gfull = nullptr, *gin_full = nullptr;
    uint8_t* argmax = nullptr;  // per pooled output: which of the 2x2 inputs won
};

struct Net {
    int nmax, C, H, W, classes;
    std::vector<Layer> layers;
    std::vector<float*> act, gact;  // act[i] is layer i's input; act.back() the logits
    std::vector<int> size;          // floats per image of act[i]
    float *params, *grads, *mom;
    long nparams;
    std::vector<void*> blocks;      // every buffer allocated for this net, freed with it
    ~Net() { for (void* p : blocks) std::free(p); }
};

// `count` zeroed elements of `elem` bytes plus slack (vector loads may run past
// a plane), 64-byte aligned; nullptr when the size overflows or the memory is
// not there. calloc takes fresh zero pages from the OS for large buffers, so
// a buffer costs memory only as far as a step uses it.
static void* zalloc_bytes(Net& net, size_t count, size_t elem) {
    size_t bytes;
    if (__builtin_mul_overflow(count, elem, &bytes) || __builtin_add_overflow(bytes, (size_t)SLACK * 4 + 64, &bytes))
        return nullptr;
    void* raw = std::calloc(1, bytes);
    if (!raw) return nullptr;
    net.blocks.push_back(raw);
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~static_cast<uintptr_t>(63));
}

static float* zalloc(Net& net, size_t n) { return static_cast<float*>(zalloc_bytes(net, n, sizeof(float))); }

static bool fail(char* err, int err_len, const char* fmt, ...) {
    if (err && err_len > 0) {
        va_list args;
        va_start(args, fmt);
        std::vsnprintf(err, (size_t)err_len, fmt, args);
        va_end(args);
    }
    return false;
}

// ------------------------------------------------------------------ convolution
template <int C_, int N_>
static inline void conv_fwd_block(const float* in, const int* off, int T, const float* w, const float* bias,
                                  float* out, int PS, int j) {
    vf acc[C_][N_];
    for (int c = 0; c < C_; c++)
        for (int r = 0; r < N_; r++) acc[c][r] = splat(bias ? bias[c] : 0.0f);
    for (int t = 0; t < T; t++) {
        const float* s = in + off[t] + j;
        vf x[N_];
        for (int r = 0; r < N_; r++) x[r] = ld(s + r * VL);
        for (int c = 0; c < C_; c++) {
            float wv = w[c * T + t];
            for (int r = 0; r < N_; r++) acc[c][r] += wv * x[r];
        }
    }
    for (int c = 0; c < C_; c++)
        for (int r = 0; r < N_; r++) st(out + c * PS + j + r * VL, acc[c][r]);
}

// out[c][j..] for the channels [0, cb) of a block, nb vectors at j
template <int C_>
static void conv_fwd_nb(int nb, const float* in, const int* off, int T, const float* w, const float* bias,
                        float* out, int PS, int j) {
    switch (nb) {
        case 1: conv_fwd_block<C_, 1>(in, off, T, w, bias, out, PS, j); break;
        case 2: conv_fwd_block<C_, 2>(in, off, T, w, bias, out, PS, j); break;
        case 3: conv_fwd_block<C_, 3>(in, off, T, w, bias, out, PS, j); break;
        default: conv_fwd_block<C_, NB>(in, off, T, w, bias, out, PS, j); break;
    }
}

static void conv_fwd_any(int cb, int nb, const float* in, const int* off, int T, const float* w, const float* bias,
                         float* out, int PS, int j) {
    switch (cb) {
        case 1: conv_fwd_nb<1>(nb, in, off, T, w, bias, out, PS, j); break;
        case 2: conv_fwd_nb<2>(nb, in, off, T, w, bias, out, PS, j); break;
        case 3: conv_fwd_nb<3>(nb, in, off, T, w, bias, out, PS, j); break;
        default: conv_fwd_nb<CB>(nb, in, off, T, w, bias, out, PS, j); break;
    }
}

static void conv_forward(Net& net, Layer& L, const float* x, float* y, int n) {
    const float* w = net.params + L.w_off;
    const float* b = L.b_off >= 0 ? net.params + L.b_off : nullptr;
    for (int i = 0; i < n; i++) {
        const float* in = x + (long)i * L.C * L.H * L.W;
        if (L.pad) {
            float* xp = L.xpad + (long)i * L.C * L.Hp * L.Wp;
            for (int c = 0; c < L.C; c++)
                for (int h = 0; h < L.H; h++)
                    std::memcpy(xp + c * L.Hp * L.Wp + (h + L.pad) * L.Wp + L.pad, in + (c * L.H + h) * L.W,
                                L.W * 4);
            in = xp;
        }
        float* full = L.full + (long)i * L.cout * L.Pr;
        for (int co = 0; co < L.cout; co += CB) {
            int cb = L.cout - co < CB ? L.cout - co : CB;
            for (int j = 0; j < L.Pr; j += NB * VL) {
                int nb = (L.Pr - j) / VL < NB ? (L.Pr - j) / VL : NB;
                conv_fwd_any(cb, nb, in, L.off.data(), L.T, w + co * L.T, b ? b + co : nullptr,
                             full + co * L.Pr, L.Pr, j);
            }
        }
        float* out = y + (long)i * L.cout * L.OH * L.OW;
        for (int co = 0; co < L.cout; co++)
            for (int oh = 0; oh < L.OH; oh++)
                std::memcpy(out + (co * L.OH + oh) * L.OW, full + co * L.Pr + oh * L.Wp, L.OW * 4);
    }
}

// gradient of the weights for channels [co, co+C_) and taps [t0, t0+T_)
template <int C_, int T_>
static void conv_wgrad_block(const Layer& L, const float* x, int n, int co, int t0, float* gw) {
    vf acc[C_][T_];
    for (int c = 0; c < C_; c++)
        for (int t = 0; t < T_; t++) acc[c][t] = vf{};
    for (int i = 0; i < n; i++) {
        const float* in = L.pad ? L.xpad + (long)i * L.C * L.Hp * L.Wp : x + (long)i * L.C * L.H * L.W;
        const float* g = L.gfull + ((long)i * L.cout + co) * L.GS + L.FP;
        const float* s[T_];
        for (int t = 0; t < T_; t++) s[t] = in + L.off[t0 + t];
        for (int p = 0; p < L.Pr; p += VL) {
            vf gv[C_], xv[T_];
            for (int c = 0; c < C_; c++) gv[c] = ld(g + c * L.GS + p);
            for (int t = 0; t < T_; t++) xv[t] = ld(s[t] + p);
            for (int c = 0; c < C_; c++)
                for (int t = 0; t < T_; t++) acc[c][t] += gv[c] * xv[t];
        }
    }
    for (int c = 0; c < C_; c++)
        for (int t = 0; t < T_; t++) gw[(co + c) * L.T + t0 + t] = hsum(acc[c][t]);
}

template <int C_>
static void conv_wgrad_tb(int tb, const Layer& L, const float* x, int n, int co, int t0, float* gw) {
    switch (tb) {
        case 1: conv_wgrad_block<C_, 1>(L, x, n, co, t0, gw); break;
        case 2: conv_wgrad_block<C_, 2>(L, x, n, co, t0, gw); break;
        case 3: conv_wgrad_block<C_, 3>(L, x, n, co, t0, gw); break;
        default: conv_wgrad_block<C_, TB>(L, x, n, co, t0, gw); break;
    }
}

// gradient of the (padded) input for channels [ci, ci+C_), N_ vectors at q
template <int C_, int N_>
static void conv_dgrad_block(const Layer& L, const float* w, const float* g, float* gin, int ci, int q) {
    vf acc[C_][N_];
    for (int c = 0; c < C_; c++)
        for (int r = 0; r < N_; r++) acc[c][r] = vf{};
    const int kk = L.k * L.k;
    for (int co = 0; co < L.cout; co++) {
        const float* gp = g + (long)co * L.GS + L.FP + q;
        const float* wp = w + (long)co * L.T + ci * kk;
        for (int kh = 0; kh < L.k; kh++)
            for (int kw = 0; kw < L.k; kw++) {
                const float* s = gp - (kh * L.Wp + kw);
                vf gv[N_];
                for (int r = 0; r < N_; r++) gv[r] = ld(s + r * VL);
                for (int c = 0; c < C_; c++) {
                    float wv = wp[c * kk + kh * L.k + kw];
                    for (int r = 0; r < N_; r++) acc[c][r] += wv * gv[r];
                }
            }
    }
    for (int c = 0; c < C_; c++)
        for (int r = 0; r < N_; r++) st(gin + (long)(ci + c) * L.Qr + q + r * VL, acc[c][r]);
}

template <int C_>
static void conv_dgrad_nb(int nb, const Layer& L, const float* w, const float* g, float* gin, int ci, int q) {
    switch (nb) {
        case 1: conv_dgrad_block<C_, 1>(L, w, g, gin, ci, q); break;
        case 2: conv_dgrad_block<C_, 2>(L, w, g, gin, ci, q); break;
        case 3: conv_dgrad_block<C_, 3>(L, w, g, gin, ci, q); break;
        default: conv_dgrad_block<C_, NB>(L, w, g, gin, ci, q); break;
    }
}

static void conv_backward(Net& net, Layer& L, const float* x, const float* gy, float* gx, int n) {
    const float* w = net.params + L.w_off;
    float* gw = net.grads + L.w_off;
    // The output gradient, full width, garbage columns and borders zero.
    for (int i = 0; i < n; i++)
        for (int co = 0; co < L.cout; co++) {
            float* g = L.gfull + ((long)i * L.cout + co) * L.GS + L.FP;
            const float* src = gy + ((long)i * L.cout + co) * L.OH * L.OW;
            for (int oh = 0; oh < L.OH; oh++) std::memcpy(g + oh * L.Wp, src + oh * L.OW, L.OW * 4);
        }
    if (L.b_off >= 0) {
        float* gb = net.grads + L.b_off;
        const int plane = L.OH * L.OW;
        for (int co = 0; co < L.cout; co++) {
            float s = 0;
            for (int i = 0; i < n; i++) {
                const float* src = gy + ((long)i * L.cout + co) * plane;
                for (int p = 0; p < plane; p++) s += src[p];
            }
            gb[co] = s;
        }
    }
    for (int co = 0; co < L.cout; co += CB) {
        int cb = L.cout - co < CB ? L.cout - co : CB;
        for (int t0 = 0; t0 < L.T; t0 += TB) {
            int tb = L.T - t0 < TB ? L.T - t0 : TB;
            switch (cb) {
                case 1: conv_wgrad_tb<1>(tb, L, x, n, co, t0, gw); break;
                case 2: conv_wgrad_tb<2>(tb, L, x, n, co, t0, gw); break;
                case 3: conv_wgrad_tb<3>(tb, L, x, n, co, t0, gw); break;
                default: conv_wgrad_tb<CB>(tb, L, x, n, co, t0, gw); break;
            }
        }
    }
    if (!gx) return;
    for (int i = 0; i < n; i++) {
        const float* g = L.gfull + (long)i * L.cout * L.GS;
        float* gin = L.gin_full;
        for (int ci = 0; ci < L.cin; ci += CB) {
            int cb = L.cin - ci < CB ? L.cin - ci : CB;
            for (int q = 0; q < L.Qr; q += NB * VL) {
                int nb = (L.Qr - q) / VL < NB ? (L.Qr - q) / VL : NB;
                switch (cb) {
                    case 1: conv_dgrad_nb<1>(nb, L, w, g, gin, ci, q); break;
                    case 2: conv_dgrad_nb<2>(nb, L, w, g, gin, ci, q); break;
                    case 3: conv_dgrad_nb<3>(nb, L, w, g, gin, ci, q); break;
                    default: conv_dgrad_nb<CB>(nb, L, w, g, gin, ci, q); break;
                }
            }
        }
        float* dst = gx + (long)i * L.C * L.H * L.W;
        for (int c = 0; c < L.C; c++)
            for (int h = 0; h < L.H; h++)
                std::memcpy(dst + (c * L.H + h) * L.W, gin + (long)c * L.Qr + (h + L.pad) * L.Wp + L.pad, L.W * 4);
    }
}

// ------------------------------------------------------------------ the other layers
static void relu_forward(const float* x, float* y, long m) {
    for (long i = 0; i < m; i++) y[i] = x[i] < 0.0f ? 0.0f : x[i];  // NaN passes, as in torch
}

static void relu_backward(const float* y, const float* gy, float* gx, long m) {
    for (long i = 0; i < m; i++) gx[i] = y[i] > 0.0f ? gy[i] : 0.0f;
}

// 2x2 max-pooling, stride 2. Which of the four inputs won is kept as a code
// 0..3 (row-major in the window) for the backward pass. torch's rule: the
// first maximum in scan order wins, and a NaN beats everything. Rows are
// short (14 or 5 outputs here), so each row is one or two vector blocks:
// even and odd columns are separated by shuffles and the window's maximum is
// found with vector compares and selects, free of branches (which random
// data mispredicts).
static void pool_forward(const Layer& L, const float* x, float* y, int n) {
    const long planes = (long)n * L.C;
    const int OW = L.OW;
    for (long pl = 0; pl < planes; pl++) {
        const float* in = x + (long)pl * L.H * L.W;
        float* out = y + (long)pl * L.OH * OW;
        uint8_t* code = L.argmax + (long)pl * L.OH * OW;
        for (int oh = 0; oh < L.OH; oh++) {
            const float* r0 = in + (2 * oh) * L.W;
            const float* r1 = r0 + L.W;
            for (int ow = 0; ow < OW; ow += VL) {
                // may read past the row: into the next row or the buffer's slack, never used
                const vf x0 = ld(r0 + 2 * ow), x1 = ld(r0 + 2 * ow + VL);
                const vf y0 = ld(r1 + 2 * ow), y1 = ld(r1 + 2 * ow + VL);
                const vf a = even_lanes(x0, x1), b = odd_lanes(x0, x1);
                const vf c = even_lanes(y0, y1), d = odd_lanes(y0, y1);
                vf m = a;
                vi k = vi{};
                vi t = (b > m) | (b != b);
                m = t ? b : m; k = t ? vi{} + 1 : k;
                t = (c > m) | (c != c);
                m = t ? c : m; k = t ? vi{} + 2 : k;
                t = (d > m) | (d != d);
                m = t ? d : m; k = t ? vi{} + 3 : k;
                const int cnt = OW - ow < VL ? OW - ow : VL;
                for (int j = 0; j < cnt; j++) {
                    out[oh * OW + ow + j] = m[j];
                    code[oh * OW + ow + j] = (uint8_t)k[j];
                }
            }
        }
    }
}

static void pool_backward(const Layer& L, const float* gy, float* gx, int n) {
    std::memset(gx, 0, (size_t)n * L.C * L.H * L.W * 4);
    const long planes = (long)n * L.C;
    for (long pl = 0; pl < planes; pl++) {
        float* g = gx + (long)pl * L.H * L.W;
        const uint8_t* code = L.argmax + (long)pl * L.OH * L.OW;
        const float* src = gy + (long)pl * L.OH * L.OW;
        for (int oh = 0; oh < L.OH; oh++)
            for (int ow = 0; ow < L.OW; ow++) {
                const int k = code[oh * L.OW + ow];
                g[(2 * oh + (k >> 1)) * L.W + 2 * ow + (k & 1)] = src[oh * L.OW + ow];
            }
    }
}

static void linear_forward(Net& net, const Layer& L, const float* x, float* y, int n) {
    const float* w = net.params + L.w_off;
    const float* b = L.b_off >= 0 ? net.params + L.b_off : nullptr;
    const int I = L.cin, O = L.cout, Iv = I / VL * VL;
    for (int o = 0; o < O; o++) {
        const float* wr = w + (long)o * I;
        for (int i = 0; i < n; i++) {
            const float* xr = x + (long)i * I;
            vf acc = vf{};
            for (int j = 0; j < Iv; j += VL) acc += ld(wr + j) * ld(xr + j);
            float s = hsum(acc);
            for (int j = Iv; j < I; j++) s += wr[j] * xr[j];
            y[(long)i * O + o] = s + (b ? b[o] : 0.0f);
        }
    }
}

static void linear_backward(Net& net, const Layer& L, const float* x, const float* gy, float* gx, int n) {
    const float* w = net.params + L.w_off;
    float* gw = net.grads + L.w_off;
    const int I = L.cin, O = L.cout;
    for (int o = 0; o < O; o++) {
        float* __restrict gr = gw + (long)o * I;
        const float g0 = gy[o];
        const float* __restrict x0 = x;
        for (int j = 0; j < I; j++) gr[j] = g0 * x0[j];
        for (int i = 1; i < n; i++) {
            const float gi = gy[(long)i * O + o];
            const float* __restrict xi = x + (long)i * I;
            for (int j = 0; j < I; j++) gr[j] += gi * xi[j];
        }
    }
    if (L.b_off >= 0) {
        float* gb = net.grads + L.b_off;
        for (int o = 0; o < O; o++) {
            float s = 0;
            for (int i = 0; i < n; i++) s += gy[(long)i * O + o];
            gb[o] = s;
        }
    }
    if (!gx) return;
    for (int i = 0; i < n; i++) {
        float* __restrict d = gx + (long)i * I;
        std::memset(d, 0, I * 4);
        for (int o = 0; o < O; o++) {
            const float g = gy[(long)i * O + o];
            const float* __restrict wr = w + (long)o * I;
            for (int j = 0; j < I; j++) d[j] += g * wr[j];
        }
    }
}

// softmax cross-entropy, mean over the batch: gradient (softmax - onehot) / n
static void loss_backward(const float* z, const int64_t* y, float* g, int n, int K) {
    for (int i = 0; i < n; i++) {
        const float* zr = z + (long)i * K;
        float* gr = g + (long)i * K;
        float m = zr[0];
        for (int c = 1; c < K; c++) m = zr[c] > m ? zr[c] : m;
        float s = 0;
        for (int c = 0; c < K; c++) { gr[c] = std::exp(zr[c] - m); s += gr[c]; }
        const float inv = 1.0f / s;
        for (int c = 0; c < K; c++) gr[c] = (gr[c] * inv - (c == y[i] ? 1.0f : 0.0f)) / n;
    }
}

// ------------------------------------------------------------------ the step
extern "C" {

int cnx_vector_width() { return VL; }

// Reads the layer description into `net`, checking it; false (and why, in err) when it is not sound.
static bool build_net(Net& net, const int* spec, long spec_len, char* err, int err_len) {
    if (spec_len < SPEC_HEADER) return fail(err, err_len, "the layer description is %ld ints long", spec_len);
    if (spec[0] != SPEC_VERSION)
        return fail(err, err_len, "layer description version %d, this library reads %d", spec[0], SPEC_VERSION);
    const int nl = spec[1];
    if (nl < 1 || spec_len != SPEC_HEADER + (long)nl * SPEC_LAYER)
        return fail(err, err_len, "%d layers do not match a description of %ld ints", nl, spec_len);
    net.nmax = spec[2]; net.C = spec[3]; net.H = spec[4]; net.W = spec[5];
    if (net.nmax < 1) return fail(err, err_len, "a batch of %d images", net.nmax);
    if (net.C < 1 || net.H < 1 || net.W < 1 || (long)net.C * net.H * net.W > PER_IMAGE_MAX)
        return fail(err, err_len, "an input of shape (%d, %d, %d)", net.C, net.H, net.W);
    // a parameter block [off, off + count) must lie inside the flat buffer
    auto inside = [&](long off, long count) { return off >= 0 && count >= 0 && off + count <= net.nparams; };
    int C = net.C, H = net.H, W = net.W;
    net.size.push_back(C * H * W);
    for (int li = 0; li < nl; li++) {
        const int* s = spec + SPEC_HEADER + li * SPEC_LAYER;
        Layer L{};
        L.type = s[0]; L.C = C; L.H = H; L.W = W;
        L.OC = C; L.OH = H; L.OW = W;
        if (L.type == CONV) {
            L.cin = s[1]; L.cout = s[2]; L.k = s[3]; L.pad = s[4]; L.w_off = s[5]; L.b_off = s[6];
            if (L.cin != C || L.cout < 1 || L.k < 1 || L.pad < 0 || L.cout > PER_IMAGE_MAX / L.k)
                return fail(err, err_len, "layer %d: a convolution %d->%d, kernel %d, padding %d after %d channels",
                            li, L.cin, L.cout, L.k, L.pad, C);
            L.Hp = H + 2 * L.pad; L.Wp = W + 2 * L.pad;
            L.OC = L.cout; L.OH = L.Hp - L.k + 1; L.OW = L.Wp - L.k + 1;
            if (L.OH < 1 || L.OW < 1) return fail(err, err_len, "layer %d: a %dx%d image is smaller than the kernel",
                                                  li, H, W);
            const long T = (long)L.cin * L.k * L.k;
            if (!inside(L.w_off, T * L.cout) || (L.b_off != -1 && !inside(L.b_off, L.cout)))
                return fail(err, err_len, "layer %d: parameters outside the buffer of %ld", li, net.nparams);
            L.P = L.OH * L.Wp; L.Pr = round_up(L.P, VL);
            L.Q = L.Hp * L.Wp; L.Qr = round_up(L.Q, VL);
            L.FP = round_up((L.k - 1) * L.Wp + L.k - 1, VL);
            L.GS = L.FP + (L.Qr > L.Pr ? L.Qr : L.Pr) + NB * VL;
            L.T = (int)T;
            if ((long)L.cout * L.GS > PER_IMAGE_MAX || (long)L.cin * L.Qr > PER_IMAGE_MAX)
                return fail(err, err_len, "layer %d: a convolution too large for this step", li);
            for (int ci = 0; ci < L.cin; ci++)
                for (int kh = 0; kh < L.k; kh++)
                    for (int kw = 0; kw < L.k; kw++) L.off.push_back(ci * L.Hp * L.Wp + kh * L.Wp + kw);
        } else if (L.type == POOL) {
            if (H < 2 || W < 2) return fail(err, err_len, "layer %d: a 2x2 pooling of a %dx%d image", li, H, W);
            L.OH = H / 2; L.OW = W / 2;
        } else if (L.type == FLAT) {
            L.OC = C * H * W; L.OH = 1; L.OW = 1;
        } else if (L.type == LINEAR) {
            L.cin = s[1]; L.cout = s[2]; L.w_off = s[3]; L.b_off = s[4];
            if (L.cin != C * H * W || L.cout < 1 || L.cout > PER_IMAGE_MAX)
                return fail(err, err_len, "layer %d: a linear layer %d->%d after %d features", li, L.cin, L.cout,
                            C * H * W);
            if (!inside(L.w_off, (long)L.cin * L.cout) || (L.b_off != -1 && !inside(L.b_off, L.cout)))
                return fail(err, err_len, "layer %d: parameters outside the buffer of %ld", li, net.nparams);
            L.OC = L.cout; L.OH = 1; L.OW = 1;
        } else if (L.type != RELU) {
            return fail(err, err_len, "layer %d has the unknown kind %d", li, L.type);
        }
        if ((long)L.OC * L.OH * L.OW > PER_IMAGE_MAX) return fail(err, err_len, "layer %d: an output too large", li);
        C = L.OC; H = L.OH; W = L.OW;
        net.layers.push_back(L);
        net.size.push_back(C * H * W);
    }
    if (H != 1 || W != 1) return fail(err, err_len, "the chain ends in a %dx%d image, not logits", H, W);
    net.classes = C;
    return true;
}

// The buffers of every layer for batches of up to nmax images.
static bool allocate(Net& net, char* err, int err_len) {
    const size_t nmax = (size_t)net.nmax;
    bool ok = true;
    for (Layer& L : net.layers) {
        if (L.type == CONV) {
            if (L.pad) ok = ok && (L.xpad = zalloc(net, nmax * L.cin * L.Hp * L.Wp));
            ok = ok && (L.full = zalloc(net, nmax * L.cout * L.Pr)) && (L.gfull = zalloc(net, nmax * L.cout * L.GS))
                 && (L.gin_full = zalloc(net, (size_t)L.cin * L.Qr));
        } else if (L.type == POOL) {
            ok = ok && (L.argmax = static_cast<uint8_t*>(zalloc_bytes(net, nmax * L.C * L.OH * L.OW, 1)));
        }
    }
    for (int sz : net.size) {
        float *a = ok ? zalloc(net, nmax * sz) : nullptr, *g = a ? zalloc(net, nmax * sz) : nullptr;
        ok = ok && a && g;
        net.act.push_back(a);
        net.gact.push_back(g);
    }
    if (ok) return true;
    size_t total = 0;
    for (int sz : net.size) total += 2 * nmax * (size_t)sz * sizeof(float);
    return fail(err, err_len, "could not allocate the buffers for batches of %d images (over %.3g GB)", net.nmax,
                total / 1e9);
}

// spec: [version, n_layers, nmax, C, H, W] then n_layers x [type, a, b, c, d, e, f, g].
// nullptr, with the reason in err, when the description or the buffers are not sound.
void* cnx_create(const int* spec, long spec_len, float* params, float* grads, float* mom, long nparams, char* err,
                 int err_len) {
    if (!spec || !params || !grads || nparams < 1) {
        fail(err, err_len, "no layer description or parameter buffers");
        return nullptr;
    }
    Net* net = nullptr;
    try {
        net = new Net();
        net->params = params; net->grads = grads; net->mom = mom; net->nparams = nparams;
        if (build_net(*net, spec, spec_len, err, err_len) && allocate(*net, err, err_len)) return net;
    } catch (const std::bad_alloc&) {
        fail(err, err_len, "out of memory while reading the layer description");
    }
    delete net;  // frees every buffer allocated so far
    return nullptr;
}

void cnx_destroy(void* handle) { delete static_cast<Net*>(handle); }

// The CPU features this library was compiled for (-march=native), checked at
// run time: a library from a shared cache, built on another CPU, must not run
// instructions this one lacks. 1 when every one is present. Compiled for the
// baseline architecture, so the check itself runs anywhere.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("arch=x86-64"))) int cnx_cpu_supported() {
    __builtin_cpu_init();
    int ok = 1;
#if defined(__AVX512F__)
    ok &= __builtin_cpu_supports("avx512f") != 0;
#endif
#if defined(__AVX512BW__)
    ok &= __builtin_cpu_supports("avx512bw") != 0;
#endif
#if defined(__AVX512VL__)
    ok &= __builtin_cpu_supports("avx512vl") != 0;
#endif
#if defined(__AVX2__)
    ok &= __builtin_cpu_supports("avx2") != 0;
#endif
#if defined(__FMA__)
    ok &= __builtin_cpu_supports("fma") != 0;
#endif
#if defined(__AVX__)
    ok &= __builtin_cpu_supports("avx") != 0;
#endif
#if defined(__SSE4_2__)
    ok &= __builtin_cpu_supports("sse4.2") != 0;
#endif
    return ok;
}
#else
int cnx_cpu_supported() { return 1; }  // the cache key (the CPU's feature line) tells such CPUs apart
#endif

// One step on n <= nmax images. x is uint8 (normalised here as (x - shift) / scale
// per channel, as cnnexp.data.Normalizer does) or float32 already normalised.
// The logits go to `logits`; the parameters, gradients and momentum buffer are
// updated in place (torch.optim.SGD's rule, dampening 0).
// Returns 0 after the step; -1 for a batch of n outside [1, nmax] or missing
// buffers; 1 + i when label y[i] is outside [0, classes). Nothing is changed
// unless it returns 0.
int cnx_step(void* handle, const void* x, int x_is_uint8, const float* shift, const float* scale,
             const int64_t* y, int n, float* logits, float lr, float momentum, float weight_decay, int nesterov) {
    if (!handle || !x || !y || !logits || (x_is_uint8 && (!shift || !scale))) return -1;
    Net& net = *static_cast<Net*>(handle);
    if (n < 1 || n > net.nmax) return -1;
    for (int i = 0; i < n; i++)
        if (y[i] < 0 || y[i] >= net.classes) return 1 + i;
    const int plane = net.H * net.W, m0 = net.size[0];
    float* a0 = net.act[0];
    if (x_is_uint8) {
        const uint8_t* u = static_cast<const uint8_t*>(x);
        for (int i = 0; i < n; i++)
            for (int c = 0; c < net.C; c++) {
                const long base = (long)i * m0 + (long)c * plane;
                const float sh = shift[c], sc = scale[c];
                for (int p = 0; p < plane; p++) a0[base + p] = ((float)u[base + p] - sh) / sc;
            }
    } else {
        std::memcpy(a0, x, (size_t)n * m0 * 4);
    }
    const int nl = (int)net.layers.size();
    for (int li = 0; li < nl; li++) {
        Layer& L = net.layers[li];
        const float* in = net.act[li];
        float* out = net.act[li + 1];
        switch (L.type) {
            case CONV: conv_forward(net, L, in, out, n); break;
            case RELU: relu_forward(in, out, (long)n * net.size[li]); break;
            case POOL: pool_forward(L, in, out, n); break;
            case FLAT: std::memcpy(out, in, (size_t)n * net.size[li] * 4); break;
            case LINEAR: linear_forward(net, L, in, out, n); break;
        }
    }
    const float* z = net.act[nl];
    std::memcpy(logits, z, (size_t)n * net.classes * 4);
    loss_backward(z, y, net.gact[nl], n, net.classes);
    for (int li = nl - 1; li >= 0; li--) {
        Layer& L = net.layers[li];
        const float* gy = net.gact[li + 1];
        float* gx = li > 0 ? net.gact[li] : nullptr;  // the input needs no gradient
        switch (L.type) {
            case CONV: conv_backward(net, L, net.act[li], gy, gx, n); break;
            case RELU: if (gx) relu_backward(net.act[li + 1], gy, gx, (long)n * net.size[li]); break;
            case POOL: if (gx) pool_backward(L, gy, gx, n); break;
            case FLAT: if (gx) std::memcpy(gx, gy, (size_t)n * net.size[li] * 4); break;
            case LINEAR: linear_backward(net, L, net.act[li], gy, gx, n); break;
        }
    }
    float* __restrict p = net.params;
    const float* __restrict g = net.grads;
    float* __restrict b = net.mom;
    const long m = net.nparams;
    const float wd = weight_decay, mu = momentum;
    if (b && nesterov) {
        for (long i = 0; i < m; i++) {
            const float d = g[i] + wd * p[i];
            b[i] = mu * b[i] + d;
            p[i] -= lr * (d + mu * b[i]);
        }
    } else if (b) {
        for (long i = 0; i < m; i++) {
            b[i] = mu * b[i] + (g[i] + wd * p[i]);
            p[i] -= lr * b[i];
        }
    } else {
        for (long i = 0; i < m; i++) p[i] -= lr * (g[i] + wd * p[i]);
    }
    return 0;
}

}  // extern "C"
