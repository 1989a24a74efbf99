// One LSTM layer step, forward and backward, fused for the CPU: the gate product, the pointwise
// cell and (backward) the products for the input and weight gradients, a few rows at a time so
// that a row's 4H gates never leave registers or L1. Compiled at first use by
// lstm_layer_cpu.py with the layer's sizes as constants: -DIN=<inputs> -DHID=<hidden>.
//
// Shapes (float32, row-major, contiguous but for x): x (n, IN) at any strides (an update rule's
// features come feature-major, (IN, n) transposed: benchmarks/results/README.md), h and c (n, HID), activations (n, 4HID)
// in torch's gate order i, f, g, o, as sigmoid (i, f, o) and tanh (g) values; tanh_c (n, HID).
// The forward reads the weight transposed, wt (IN + HID, 4HID); the backward reads it as torch
// stores it, zero-padded to KP columns, w (4HID, KP). 4HID must be a multiple of 16 (one vector
// is 16 floats). An optional linear head on h' (the update rule's output, one number per row):
// head (n) = h' head_w (HID) + head_b (1).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

#define G (4 * HID)
#define NV (G / 16)
#define K (IN + HID)
#define KP (((K) + 15) / 16 * 16)
#define KV (KP / 16)
#define TILE 4
// tiles whose rows' heads are summed together, after the tiles (see forward_all)
#define HEAD_TILES 4
// The input-gradient product's vector width: 8 pads its K columns less than 16 (K = 22: 24
// against 32) and costs no more where a 16-float operation takes two 8-float slots (AMD's
// AVX-512, AVX2); Intel's AVX-512 runs 16 floats in one slot. lstm_layer_cpu.py picks it.
#ifndef XL
#define XL 16
#endif
// rows whose weight gradient is summed on its own before it is added to the part's (a multiple
// of TILE, so that a part's tiles do not depend on where its blocks start)
#define BLOCK 1024
// per part, the gradients summed over rows besides the weight's: the bias's (4HID), the head
// weight's (HID) and the head bias's (1)
#define NSUM (G + HID + 1)

static_assert(G % 16 == 0, "4 * hidden size must be a multiple of 16");

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));

// The layer's input x (n, IN): contiguous, or at any strides (in elements). The contiguous
// one's offsets are constants: read through the strided one, a layer of 20 inputs ran its
// forward about 3% slower (unrecorded).
struct RowMajor {
  const float* p;
  float at(int64_t r, int k) const { return p[r * IN + k]; }
};
struct Strided {
  const float* p;
  int64_t row, col;
  float at(int64_t r, int k) const { return p[r * row + k * col]; }
};

// Keeps a vector in a register. GCC folds a weight vector's loads into the multiply-adds that
// use it, one load per row where the source loads it once per tile of rows; the input-gradient
// product then ran at about half the rate of the others (AMD EPYC, AVX-512; the layer's backward
// 1.2x-1.7x slower, benchmarks/results/README.md). Where the vector does not fit one register
// (or the constraint is not x86's), a no-op.
#if defined(__GNUC__) && (defined(__AVX512F__) || (defined(__AVX__) && XL == 8))
#define IN_REGISTER(v) asm volatile("" : "+v"(v))
#else
#define IN_REGISTER(v) ((void)0)
#endif

static inline v16 ld(const float* p) { return *(const v16u*)p; }
static inline void st(float* p, v16 v) { *(v16u*)p = v; }
// s - 0 is s for every s (-0 too), so this compiles to one broadcast; 0 + s does not (-0)
static inline v16 bc(float s) { return s - (v16){}; }

// A non-temporal store of 16 floats to p, 64-byte aligned: to memory, around the cache.
#if defined(__AVX512F__)
#define STREAMS
static inline void stream(float* p, v16 v) { _mm512_stream_ps(p, (__m512)v); }
#elif defined(__AVX__)
#define STREAMS
static inline void stream(float* p, v16 v) {
  __m256 half[2];
  memcpy(half, &v, sizeof v);
  _mm256_stream_ps(p, half[0]);
  _mm256_stream_ps(p + 8, half[1]);
}
#endif

// Writes R rows of HID floats (side by side in `rows`, 64-byte aligned) to `out` by streamed
// stores where whole aligned vectors cover them; false (nothing written) where they do not.
template <int R>
static inline bool stream_rows(float* out, const float* rows) {
#ifdef STREAMS
  if ((R * HID) % 16 == 0 && (uintptr_t)out % 64 == 0) {
    for (int v = 0; v < R * HID / 16; v++) stream(out + 16 * v, ld(rows + 16 * v));
    return true;
  }
#endif
  (void)out, (void)rows;
  return false;
}

// exp by Cody-Waite range reduction and Cephes' degree-6 polynomial (about 1 ulp over the
// clamped range), branch-free so that it stays in vector registers: exp(x) = p 2^n, p returned.
static inline v16 exp_reduced(v16 x, v16* n_out) {
  const v16 magic = bc(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  v16 n = (x * bc(1.44269504088896341f) + magic) - magic;
  v16 r = x - n * bc(0.693359375f) - n * bc(-2.12194440e-4f);
  v16 p = bc(1.9875691500e-4f);
  p = p * r + bc(1.3981999507e-3f);
  p = p * r + bc(8.3334519073e-3f);
  p = p * r + bc(4.1665795894e-2f);
  p = p * r + bc(1.6666665459e-1f);
  p = p * r + bc(5.0000001201e-1f);
  *n_out = n;
  return p * r * r + r + bc(1.0f);
}

#ifdef __AVX512F__
// vscalefps multiplies by 2^n with IEEE overflow to inf and underflow to 0 and lets NaN
// through: the bits of the version below wherever that one does not clamp (|x| < 88.37), and
// no clamp to the normal range, without its integer exponent arithmetic and overflow select
// (benchmarks/results/kernel_ab_scalef.md)
static inline v16 vexp(v16 x) {
  // past +-104, 2^n alone over- or underflows; max(-104, x) and min(104, x) keep NaN
  x = (v16)_mm512_min_ps((__m512)bc(104.0f), _mm512_max_ps((__m512)bc(-104.0f), (__m512)x));
  v16 n;
  const v16 p = exp_reduced(x, &n);
  return (v16)_mm512_scalef_ps((__m512)p, (__m512)n);
}
#else
static inline v16 vexp(v16 x) {
  const float hi = 88.3762626647949f;
  // past log(FLT_MAX) exp overflows to inf, as torch's does, so that a sigmoid gate saturates
  // to exactly 0, not to exp(-hi) = 4e-39: a forget gate of 0 times an infinite c is NaN in
  // torch, and 4e-39 times c = 1e36 is 4e-3
  const auto overflow = x > bc(88.72283935546875f);
  // written so that NaN compares false and passes through: exp(NaN) is NaN, as in torch
  x = x > bc(hi) ? bc(hi) : x;
  x = x < bc(-hi) ? bc(-hi) : x;
  v16 n;
  const v16 p = exp_reduced(x, &n);
  i16 e = (__builtin_convertvector(n, i16) + 127) << 23;
  v16 s;
  memcpy(&s, &e, sizeof s);
  return overflow ? bc(__builtin_inff()) : p * s;
}
#endif

static inline v16 vsigmoid(v16 z) { return bc(1.0f) / (bc(1.0f) + vexp(-z)); }

// 1 for the sigmoid gates, 2 for the tanh gate g: tanh(z) = 2 sigmoid(2z) - 1
static inline v16 gate_scale(int v) {
  v16 s;
  for (int l = 0; l < 16; l++) {
    int j = 16 * v + l;
    s[l] = (j >= 2 * HID && j < 3 * HID) ? 2.0f : 1.0f;
  }
  return s;
}

// The linear head of R rows of h': the R rows' sums side by side (independent chains of fused
// multiply-adds), each in the order j = 0, 1, ...: a row's head does not depend on where its
// tile starts, nor on how many rows are summed side by side.
template <int R>
static inline void head_rows(int64_t row0, const float* h_out, const float* head_w, const float* head_b,
                             float* head_out) {
#ifdef __AVX512F__
  if constexpr (R % 16 == 0) {
    // 16 rows side by side in each vector's lanes, each row's column j gathered: the same
    // multiply-adds in the same order, one instruction for 16 chains
    constexpr int V = R / 16;
    const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                             _mm512_set1_epi32(HID));
    const float* rows = h_out + row0 * HID;
    __m512 head[V];
    for (int v = 0; v < V; v++) head[v] = _mm512_setzero_ps();
    for (int j = 0; j < HID; j++)
      for (int v = 0; v < V; v++)
        head[v] = _mm512_fmadd_ps(_mm512_i32gather_ps(lanes, rows + 16 * HID * v + j, 4), _mm512_set1_ps(head_w[j]), head[v]);
    for (int v = 0; v < V; v++) _mm512_storeu_ps(head_out + row0 + 16 * v, _mm512_add_ps(head[v], _mm512_set1_ps(*head_b)));
    return;
  }
#endif
  float head[R] = {0};
  for (int j = 0; j < HID; j++)
    for (int r = 0; r < R; r++) head[r] = __builtin_fmaf(h_out[(row0 + r) * HID + j], head_w[j], head[r]);
  for (int r = 0; r < R; r++) head_out[row0 + r] = head[r] + *head_b;
}

template <int R, class X>
static inline void forward_rows(int64_t row0, X x, const float* h, const float* c, const float* wt,
                                const float* bias, float* act_out, float* tanh_c_out, float* h_out, float* c_out,
                                const float* head_w, const float* head_b, float* head_out) {
  v16 acc[R][NV];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) acc[r][v] = ld(bias + 16 * v);
  for (int k = 0; k < K; k++) {
    v16 w[NV];
    for (int v = 0; v < NV; v++) w[v] = ld(wt + k * G + 16 * v);
    for (int r = 0; r < R; r++) {
      v16 xk = bc(k < IN ? x.at(row0 + r, k) : h[(row0 + r) * HID + (k - IN)]);
      for (int v = 0; v < NV; v++) acc[r][v] += xk * w[v];
    }
  }
  float a[R][G] __attribute__((aligned(64)));
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) {
      v16 s = gate_scale(v);
      st(a[r] + 16 * v, vsigmoid(acc[r][v] * s) * s - (s - bc(1.0f)));
    }
  // the R rows' c' side by side, so that tanh(c') runs on full vectors (HID = 20: 5 for 4 rows
  // where a vector per row took 8)
  constexpr int CV = (R * HID + 15) / 16;
  float c_new[16 * CV] __attribute__((aligned(64))) = {0};
  for (int r = 0; r < R; r++)
    for (int j = 0; j < HID; j++)
      c_new[r * HID + j] = a[r][HID + j] * c[(row0 + r) * HID + j] + a[r][j] * a[r][2 * HID + j];
  float tanh_c[16 * CV] __attribute__((aligned(64)));
  for (int v = 0; v < CV; v++) st(tanh_c + 16 * v, bc(2.0f) * vsigmoid(bc(2.0f) * ld(c_new + 16 * v)) - bc(1.0f));
  for (int r = 0; r < R; r++)
    for (int j = 0; j < HID; j++) h_out[(row0 + r) * HID + j] = a[r][3 * HID + j] * tanh_c[r * HID + j];
  // c' is read next by the next step's forward and backward, after the other layers' traffic
  // has evicted it: written around the cache, as the saved activations below, where whole
  // aligned vectors cover the tile
  if (!stream_rows<R>(c_out + row0 * HID, c_new))
    for (int r = 0; r < R; r++) memcpy(c_out + (row0 + r) * HID, c_new + r * HID, HID * sizeof(float));
  if (head_out) head_rows<R>(row0, h_out, head_w, head_b, head_out);
  if (!act_out) return;
#ifdef STREAMS
  // what the backward reads, and only it, steps later: written around the cache (no read of its
  // lines first, no eviction of what the next layer and step read), where whole aligned vectors
  // cover it (a truncation of meta-training 1.02x to 1.06x faster: benchmarks/results/kernel_ab_stream*.md)
  float* act_tile = act_out + row0 * G;
  float* tanh_c_tile = tanh_c_out + row0 * HID;
  if ((R * HID) % 16 == 0 && ((uintptr_t)act_tile % 64 | (uintptr_t)tanh_c_tile % 64) == 0) {
    for (int v = 0; v < R * NV; v++) stream(act_tile + 16 * v, ld(&a[0][0] + 16 * v));
    for (int v = 0; v < R * HID / 16; v++) stream(tanh_c_tile + 16 * v, ld(tanh_c + 16 * v));
    return;
  }
#endif
  for (int r = 0; r < R; r++) {
    memcpy(act_out + (row0 + r) * G, a[r], sizeof a[r]);
    memcpy(tanh_c_out + (row0 + r) * HID, tanh_c + r * HID, HID * sizeof(float));
  }
}

// The rows of part p of `parts` contiguous parts (each a multiple of TILE rows but the last).
static inline void part_rows(int64_t n, int parts, int p, int64_t* begin, int64_t* end) {
  int64_t step = (n + parts - 1) / parts;
  step = (step + TILE - 1) / TILE * TILE;
  *begin = p * step < n ? p * step : n;
  *end = *begin + step < n ? *begin + step : n;
}

template <class X>
static void forward_all(int64_t n, int parts, X x, const float* h, const float* c, const float* wt, const float* bias,
                        float* act_out, float* tanh_c_out, float* h_out, float* c_out, const float* head_w,
                        const float* head_b, float* head_out) {
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
  for (int p = 0; p < parts; p++) {
    int64_t begin, end;
    part_rows(n, parts, p, &begin, &end);
    int64_t row = begin;
    // the heads of HEAD_TILES tiles' rows summed side by side after those tiles: a tile's own
    // four rows were four chains of HID dependent multiply-adds that the rest of the tile's work
    // did not hide (kernel_ab.py with the streamed stores: benchmarks/results/kernel_ab_s23.md;
    // each row still sums in the order j = 0, 1, ..., so the bits are the same)
    if (head_out)
      for (; row + HEAD_TILES * TILE <= end; row += HEAD_TILES * TILE) {
        for (int t = 0; t < HEAD_TILES; t++)
          forward_rows<TILE>(row + t * TILE, x, h, c, wt, bias, act_out, tanh_c_out, h_out, c_out, head_w, head_b, nullptr);
        head_rows<HEAD_TILES * TILE>(row, h_out, head_w, head_b, head_out);
      }
    for (; row + TILE <= end; row += TILE)
      forward_rows<TILE>(row, x, h, c, wt, bias, act_out, tanh_c_out, h_out, c_out, head_w, head_b, head_out);
    for (; row < end; row++)
      forward_rows<1>(row, x, h, c, wt, bias, act_out, tanh_c_out, h_out, c_out, head_w, head_b, head_out);
#ifdef STREAMS
    _mm_sfence();  // the streamed stores ordered before whatever reads them next
#endif
  }
}

// n rows in `parts` parts, one OpenMP thread each; x's strides in elements. act_out and
// tanh_c_out may be null (no backward to come); head_w, head_b and head_out too (no head).
extern "C" void lstm_layer_forward(int64_t n, int parts, const float* x, int64_t x_row, int64_t x_col, const float* h,
                                   const float* c, const float* wt, const float* bias, float* act_out,
                                   float* tanh_c_out, float* h_out, float* c_out, const float* head_w,
                                   const float* head_b, float* head_out) {
  if (x_row == IN && x_col == 1)
    forward_all(n, parts, RowMajor{x}, h, c, wt, bias, act_out, tanh_c_out, h_out, c_out, head_w, head_b, head_out);
  else
    forward_all(n, parts, Strided{x, x_row, x_col}, h, c, wt, bias, act_out, tanh_c_out, h_out, c_out, head_w, head_b,
                head_out);
}

// HEAD: h''s gradient has a head's part, grad_head[row] head_w[j].
template <int R, bool HEAD, class X>
static inline void backward_rows(int64_t row0, X x, const float* h, const float* c, const float* act,
                                 const float* tanh_c, const float* grad_h, const float* grad_h_more,
                                 const float* grad_c, const float* grad_head, const float* head_w,
                                 const float* w, float* grad_wt, float* grad_sums, float* grad_x,
                                 float* grad_h_prev, float* grad_c_prev) {
  float d_gates[R][G] __attribute__((aligned(64)));
  // h''s and c''s gradients gathered first into local rows, so that the main loop has no test
  // of an absent (null) gradient: with one, the compiler's vectorised loop ran only where every
  // gradient was given (with grad_h_more null, as under a head, the backward took 1.2x longer in
  // an unrecorded A/B)
  float head_weight[HID], head_sum[HID + 1] = {0};
  // the R rows' gradients of c side by side, written out together (see below)
  float grad_c_rows[R * HID] __attribute__((aligned(64)));
  if (HEAD) memcpy(head_weight, head_w, sizeof head_weight);
  for (int r = 0; r < R; r++) {
    const int64_t row = row0 + r;
    const float* a = act + row * G;
    const float* t = tanh_c + row * HID;
    const float* cr = c + row * HID;
    float dh[HID], dc_more[HID];
    if (grad_h)
      memcpy(dh, grad_h + row * HID, sizeof dh);
    else
      memset(dh, 0, sizeof dh);
    if (grad_h_more)
      for (int j = 0; j < HID; j++) dh[j] += grad_h_more[row * HID + j];
    const float d_head = HEAD ? grad_head[row] : 0.0f;
    if (HEAD)
      for (int j = 0; j < HID; j++) dh[j] += d_head * head_weight[j];
    if (grad_c)
      memcpy(dc_more, grad_c + row * HID, sizeof dc_more);
    else
      memset(dc_more, 0, sizeof dc_more);
    for (int j = 0; j < HID; j++) {
      float i = a[j], f = a[HID + j], g = a[2 * HID + j], o = a[3 * HID + j];
      float dc = dh[j] * o * (1.0f - t[j] * t[j]) + dc_more[j];
      d_gates[r][j] = dc * g * i * (1.0f - i);
      d_gates[r][HID + j] = dc * cr[j] * f * (1.0f - f);
      d_gates[r][2 * HID + j] = dc * i * (1.0f - g * g);
      d_gates[r][3 * HID + j] = dh[j] * t[j] * o * (1.0f - o);
      grad_c_rows[r * HID + j] = dc * f;
    }
    if (HEAD) {  // the head's weight and bias gradients; o tanh(c') is h', as the forward computed it
      for (int j = 0; j < HID; j++) head_sum[j] += d_head * (a[3 * HID + j] * t[j]);
      head_sum[HID] += d_head;
    }
  }
  if (HEAD)
    for (int j = 0; j <= HID; j++) grad_sums[G + j] += head_sum[j];
  // the gradients of c and h are read next by the previous step's backward of this layer, after
  // the other layers' traffic has evicted them: written around the cache where whole aligned
  // vectors cover the tile, as the forward's saved activations
  if (!stream_rows<R>(grad_c_prev + row0 * HID, grad_c_rows)) memcpy(grad_c_prev + row0 * HID, grad_c_rows, sizeof grad_c_rows);
  for (int v = 0; v < NV; v++) {
    v16 s = ld(grad_sums + 16 * v);
    for (int r = 0; r < R; r++) s += ld(&d_gates[r][16 * v]);
    st(grad_sums + 16 * v, s);
  }
  // grad_wt[k] += sum over rows of [x, h][k] * d_gates, the rows' d_gates held in registers
  v16 dg[R][NV];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < NV; v++) dg[r][v] = ld(&d_gates[r][16 * v]);
  for (int k = 0; k < K; k++) {
    v16 acc[NV];
    for (int v = 0; v < NV; v++) acc[v] = ld(grad_wt + k * G + 16 * v);
    for (int r = 0; r < R; r++) {
      v16 xk = bc(k < IN ? x.at(row0 + r, k) : h[(row0 + r) * HID + (k - IN)]);
      for (int v = 0; v < NV; v++) acc[v] += xk * dg[r][v];
    }
    for (int v = 0; v < NV; v++) st(grad_wt + k * G + 16 * v, acc[v]);
  }
  if (!grad_x && !grad_h_prev) return;
  // [grad_x, grad_h] = d_gates @ w, in vectors of XL floats (the columns rounded up to XL)
  typedef float vx __attribute__((vector_size(4 * XL)));
  typedef float vxu __attribute__((vector_size(4 * XL), aligned(4)));
  constexpr int KX = (K + XL - 1) / XL;
  vx acc[R][KX];
  for (int r = 0; r < R; r++)
    for (int v = 0; v < KX; v++) acc[r][v] = (vx){};
  for (int j = 0; j < G; j++) {
    vx wj[KX];
    for (int v = 0; v < KX; v++) {
      wj[v] = *(const vxu*)(w + j * KP + XL * v);
      IN_REGISTER(wj[v]);
    }
    for (int r = 0; r < R; r++) {
      vx d = d_gates[r][j] - (vx){};
      for (int v = 0; v < KX; v++) acc[r][v] += d * wj[v];
    }
  }
  float grad_h_rows[R * HID] __attribute__((aligned(64)));
  for (int r = 0; r < R; r++) {
    const int64_t row = row0 + r;
    float out[KP] __attribute__((aligned(64)));
    for (int v = 0; v < KX; v++) *(vxu*)(out + XL * v) = acc[r][v];
    if (grad_x) memcpy(grad_x + row * IN, out, IN * sizeof(float));
    memcpy(grad_h_rows + r * HID, out + IN, HID * sizeof(float));
  }
  if (grad_h_prev && !stream_rows<R>(grad_h_prev + row0 * HID, grad_h_rows))
    memcpy(grad_h_prev + row0 * HID, grad_h_rows, sizeof grad_h_rows);
}

template <class X>
static void backward_all(int64_t n, int parts, X x, const float* h, const float* c, const float* act,
                         const float* tanh_c, const float* grad_h, const float* grad_h_more, const float* grad_c,
                         const float* grad_head, const float* head_w, const float* w, float* grad_wt,
                         float* grad_sums, float* grad_x, float* grad_h_prev, float* grad_c_prev) {
#pragma omp parallel for num_threads(parts) schedule(static, 1) if (parts > 1)
  for (int p = 0; p < parts; p++) {
    int64_t begin, end;
    part_rows(n, parts, p, &begin, &end);
    float* gw = grad_wt + (int64_t)p * K * G;
    float* gb = grad_sums + (int64_t)p * NSUM;
    // summed in blocks of BLOCK rows, then the blocks' sums: one running float32 sum over a
    // million rows put the bias gradient 1e-3 off (relative; BLAS's sum 2e-7). The block sums
    // into gw, gb (a separate buffer there ran 3% slower), then moves to total.
    float* total = static_cast<float*>(malloc(sizeof(float) * (K * G + NSUM)));
    memcpy(total, gw, sizeof(float) * K * G);
    memcpy(total + K * G, gb, sizeof(float) * NSUM);
    memset(gw, 0, sizeof(float) * K * G);
    memset(gb, 0, sizeof(float) * NSUM);
    const auto rows = grad_head ? backward_rows<TILE, true, X> : backward_rows<TILE, false, X>;
    const auto one_row = grad_head ? backward_rows<1, true, X> : backward_rows<1, false, X>;
    for (int64_t block = begin; block < end; block += BLOCK) {
      const int64_t stop = block + BLOCK < end ? block + BLOCK : end;
      int64_t row = block;
      for (; row + TILE <= stop; row += TILE)
        rows(row, x, h, c, act, tanh_c, grad_h, grad_h_more, grad_c, grad_head, head_w, w, gw, gb, grad_x, grad_h_prev,
             grad_c_prev);
      for (; row < stop; row++)
        one_row(row, x, h, c, act, tanh_c, grad_h, grad_h_more, grad_c, grad_head, head_w, w, gw, gb, grad_x,
                grad_h_prev, grad_c_prev);
      for (int64_t k = 0; k < (int64_t)K * G; k++) total[k] += gw[k], gw[k] = 0.0f;
      for (int j = 0; j < NSUM; j++) total[K * G + j] += gb[j], gb[j] = 0.0f;
    }
    memcpy(gw, total, sizeof(float) * K * G);
    memcpy(gb, total + K * G, sizeof(float) * NSUM);
    free(total);
#ifdef STREAMS
    _mm_sfence();  // the streamed stores ordered before whatever reads them next
#endif
  }
}

// n rows in `parts` parts, one OpenMP thread each; x's strides in elements. grad_h,
// grad_h_more (two parts of h''s gradient), grad_c (c''s) and grad_head (the head's, n) may be
// null (zero; no head: head_w null too); grad_x and grad_h_prev may be null (not wanted). Part p
// accumulates (+=) its rows' weight gradient into grad_wt + p K 4HID (a (K, 4HID) block) and the
// bias's, head weight's and head bias's into grad_sums + p NSUM.
extern "C" void lstm_layer_backward(int64_t n, int parts, const float* x, int64_t x_row, int64_t x_col, const float* h,
                                    const float* c, const float* act, const float* tanh_c, const float* grad_h,
                                    const float* grad_h_more, const float* grad_c, const float* grad_head,
                                    const float* head_w, const float* w, float* grad_wt, float* grad_sums,
                                    float* grad_x, float* grad_h_prev, float* grad_c_prev) {
  if (x_row == IN && x_col == 1)
    backward_all(n, parts, RowMajor{x}, h, c, act, tanh_c, grad_h, grad_h_more, grad_c, grad_head, head_w, w, grad_wt,
                 grad_sums, grad_x, grad_h_prev, grad_c_prev);
  else
    backward_all(n, parts, Strided{x, x_row, x_col}, h, c, act, tanh_c, grad_h, grad_h_more, grad_c, grad_head, head_w,
                 w, grad_wt, grad_sums, grad_x, grad_h_prev, grad_c_prev);
}
