// Decode attention on CPU: single-token queries over a paged KV cache, as an XLA FFI custom call.
//
// Why native: on XLA:CPU each decode block is a gather of pages, a conversion to float32 and small
// batched dots, and the gathered float32 copy of every key and value costs more than reading the
// pages (see benchmarks/RESULTS.md). Here each (token, kv head) streams its keys and values from
// the pages once, converting a row at a time in L1.
//
// Contract (built by jaxserve/ops/native/__init__.py from the step's AttentionPlan):
//   q          f32 [tokens, kv_heads, group, head_dim]  scaled (and folded) queries
//   k, v       codes [layers, pages, page_size, kv_heads, head_dim]  f32 | bf16 bits (u16) | s8 | e4m3 bits (u8)
//   layer      s32 []
//   tables     s32 [tokens, width]  each token's sequence's page table
//   position   s32 [tokens]  the query's position; it sees keys (position - window, position]
//   decode_ids s32 [>= num_decode]  the single-token queries
//   num_decode s32 []
//   out        f32 [tokens, kv_heads, group, head_dim]  decode rows filled, all other rows zero
// Attributes: sliding_window (0: none), soft_cap (0: none).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

float BitsToFloat(uint32_t bits) { return __builtin_bit_cast(float, bits); }

// float8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff NaN.
struct E4M3Table {
  float value[256];
  E4M3Table() {
    for (int code = 0; code < 256; ++code) {
      const int exponent = (code >> 3) & 15, mantissa = code & 7;
      float magnitude = exponent == 0 ? std::ldexp(mantissa / 8.0f, -6)
                                      : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
      if (exponent == 15 && mantissa == 7) magnitude = NAN;
      value[code] = (code & 128) ? -magnitude : magnitude;
    }
  }
};
const E4M3Table kE4M3;

// Codes of one page format -> float32.
struct F32Codes {
  using T = float;
  static float Load(T x) { return x; }
};
struct BF16Codes {
  using T = uint16_t;
  static float Load(T x) { return BitsToFloat(uint32_t(x) << 16); }
};
struct S8Codes {
  using T = int8_t;
  static float Load(T x) { return float(x); }
};
struct E4M3Codes {
  using T = uint8_t;
  static float Load(T x) { return kE4M3.value[x]; }
};

// exp(x) for x <= 0 (scores minus their max): 2^round(x log2 e) times a degree-6 polynomial of
// 2^f on |f| <= 1/2 (relative error ~1e-7); a plain loop of these vectorizes, std::exp does not.
inline float ExpNonPositive(float x) {
  const float t = std::max(x, -87.0f) * 1.44269504088896341f;
  const float whole = std::nearbyint(t);
  const float f = (t - whole) * 0.693147180559945309f;
  const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
  return p * BitsToFloat(uint32_t(int32_t(whole) + 127) << 23);
}

constexpr int64_t kMaxHeadDim = 256;

struct Problem {
  const float* q;
  const void* k;
  const void* v;
  float* out;
  const int32_t* tables;
  const int32_t* position;
  const int32_t* decode_ids;
  int64_t layer, num_pages, page_size, kv_heads, group, head_dim, width, window;
  float soft_cap;
};

// Calls row(codes, i) for keys first..last (i counting from 0) of kv head `head`, walking the
// page table a page at a time (no division per key). `pages` is the whole [layers, pages,
// page_size, kv_heads, head_dim] array.
template <class T, class Row>
void ForEachRow(const Problem& p, const T* pages, const int32_t* table, int64_t head, int64_t first,
                int64_t last, Row row) {
  const int64_t slot_stride = p.kv_heads * p.head_dim, page_stride = p.page_size * slot_stride;
  const T* base = pages + p.layer * p.num_pages * page_stride + head * p.head_dim;
  int64_t i = 0;
  for (int64_t key = first; key <= last;) {
    const int64_t slot = key % p.page_size, end = std::min(last + 1, key - slot + p.page_size);
    const T* codes = base + table[key / p.page_size] * page_stride + slot * slot_stride;
    for (; key < end; ++key, ++i, codes += slot_stride) row(codes, i);
  }
}

// Scratch per worker thread: scores [group, keys].
struct Scratch {
  std::vector<float> scores;
};

// One (decode token, kv head): a pass over its keys, softmax, a pass over its values. D is the
// head dim when known at compile time (loops then unroll into whole vectors), 0 otherwise.
template <class Codes, int D>
void AttendOne(const Problem& p, int64_t token, int64_t head, Scratch& scratch) {
  using T = typename Codes::T;
  const int64_t d = D ? D : p.head_dim, g = p.group;
  const int64_t last = p.position[token];
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, last - p.window + 1) : 0;
  const int64_t n = last + 1 - first;
  const int32_t* table = p.tables + token * p.width;
  const float* q = p.q + (token * p.kv_heads + head) * g * d;  // [group, head_dim]
  float* out = p.out + (token * p.kv_heads + head) * g * d;
  scratch.scores.resize(g * n);
  float* scores = scratch.scores.data();
  float row[kMaxHeadDim];

  ForEachRow(p, static_cast<const T*>(p.k), table, head, first, last, [&](const T* codes, int64_t i) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) row[c] = Codes::Load(codes[c]);
    for (int64_t h = 0; h < g; ++h) {
      const float* qh = q + h * d;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < d; ++c) s += qh[c] * row[c];
      scores[h * n + i] = s;
    }
  });
  float normalizer[64];  // per query head of the group (checked <= 64)
  for (int64_t h = 0; h < g; ++h) {
    float* s = scores + h * n;
    if (p.soft_cap > 0)
      for (int64_t i = 0; i < n; ++i) s[i] = p.soft_cap * std::tanh(s[i] / p.soft_cap);
    const float m = *std::max_element(s, s + n);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      s[i] = ExpNonPositive(s[i] - m);
      sum += s[i];
    }
    normalizer[h] = 1.0f / sum;
  }
  std::fill(out, out + g * d, 0.0f);
  ForEachRow(p, static_cast<const T*>(p.v), table, head, first, last, [&](const T* codes, int64_t i) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) row[c] = Codes::Load(codes[c]);
    for (int64_t h = 0; h < g; ++h) {
      const float w = scores[h * n + i];
      float* oh = out + h * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) oh[c] += w * row[c];
    }
  });
  for (int64_t h = 0; h < g; ++h) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) out[h * d + c] *= normalizer[h];
  }
}

// Work items claimed from a shared counter by the calling thread and by helpers on XLA's intra-op
// pool. A helper that starts after every item is claimed touches only the counter, so the call
// may return while late helpers are still queued (they hold the state through a shared_ptr).
struct Work {
  std::atomic<int64_t> next{0}, done{0};
  int64_t total = 0;
  std::function<void(int64_t)> item;

  void Run() {
    for (int64_t i; (i = next.fetch_add(1)) < total;) {
      item(i);
      done.fetch_add(1);
    }
  }
};

template <class Codes, int D>
void AttendAll(ffi::ThreadPool& pool, const Problem& p, int64_t num_decode) {
  auto work = std::make_shared<Work>();
  work->total = num_decode * p.kv_heads;
  work->item = [&p](int64_t i) {
    thread_local Scratch scratch;
    AttendOne<Codes, D>(p, p.decode_ids[i / p.kv_heads], i % p.kv_heads, scratch);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), work->total) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load() < work->total) std::this_thread::yield();
}

// Rejects page ids and positions outside the arrays before any thread reads them.
ffi::Error Validate(const Problem& p, int64_t num_decode, int64_t tokens) {
  for (int64_t i = 0; i < num_decode; ++i) {
    const int64_t t = p.decode_ids[i];
    if (t < 0 || t >= tokens) return ffi::Error::InvalidArgument("decode token id out of range");
    const int64_t last = p.position[t];
    if (last < 0 || last >= p.width * p.page_size) return ffi::Error::InvalidArgument("position beyond the page table");
    for (int64_t j = 0; j <= last / p.page_size; ++j) {
      const int64_t page = p.tables[t * p.width + j];
      if (page < 0 || page >= p.num_pages) return ffi::Error::InvalidArgument("page id out of range");
    }
  }
  return ffi::Error::Success();
}

template <class Codes>
ffi::Error ByHeadDim(ffi::ThreadPool& pool, const Problem& p, int64_t count) {
  switch (p.head_dim) {
    case 64: AttendAll<Codes, 64>(pool, p, count); break;
    case 128: AttendAll<Codes, 128>(pool, p, count); break;
    default: AttendAll<Codes, 0>(pool, p, count);
  }
  return ffi::Error::Success();
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                           ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> tables,
                           ffi::Buffer<ffi::S32> position, ffi::Buffer<ffi::S32> decode_ids,
                           ffi::Buffer<ffi::S32> num_decode, ffi::ResultBuffer<ffi::F32> out,
                           int64_t sliding_window, float soft_cap) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = tables.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || td.size() != 2 || k.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("decode_attention: unexpected operand ranks or types");
  Problem p{q.typed_data(), k.untyped_data(), v.untyped_data(), out->typed_data(), tables.typed_data(),
            position.typed_data(), decode_ids.typed_data(), layer.typed_data()[0], kd[1], kd[2], kd[3],
            qd[2], qd[3], td[1], sliding_window, soft_cap};
  if (kd[3] != qd[1] || kd[4] != qd[3] || p.layer < 0 || p.layer >= kd[0])
    return ffi::Error::InvalidArgument("decode_attention: query and page shapes disagree");
  if (p.head_dim > kMaxHeadDim || p.group > 64)
    return ffi::Error::InvalidArgument("decode_attention: head_dim > 256 or more than 64 query heads per kv head");
  const int64_t count = num_decode.typed_data()[0];
  if (count < 0 || count > int64_t(decode_ids.element_count()))
    return ffi::Error::InvalidArgument("decode_attention: num_decode out of range");
  if (ffi::Error error = Validate(p, count, qd[0]); error.failure()) return error;
  std::memset(p.out, 0, out->size_bytes());
  switch (k.element_type()) {
    case ffi::F32: return ByHeadDim<F32Codes>(pool, p, count);
    case ffi::U16: return ByHeadDim<BF16Codes>(pool, p, count);
    case ffi::S8: return ByHeadDim<S8Codes>(pool, p, count);
    case ffi::U8: return ByHeadDim<E4M3Codes>(pool, p, count);
    default: return ffi::Error::InvalidArgument("decode_attention: unsupported page dtype");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("sliding_window")
                                  .Attr<float>("soft_cap"));
