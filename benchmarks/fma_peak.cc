// This machine's float32 FMA peak: independent FMA chains held in registers, on 1 and 2 threads.
// The hardware bound under every matmul rate in benchmarks/throughput.py (RESULTS.md cites it).
//   g++ -O3 -march=native -pthread benchmarks/fma_peak.cc -o /tmp/fma_peak && /tmp/fma_peak
// 8-12 chains cover the FMA latency x units of current x86 cores. 256-bit FMAs (AVX2): on AVX-512
// hosts the 512-bit peak can be twice this. The value in parentheses only keeps the loop alive.
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>
template <int N> static float run(long iters) {
  __m256 a[N]; __m256 b = _mm256_set1_ps(0.5f), c = _mm256_set1_ps(0.5f);
  for (int i = 0; i < N; i++) a[i] = _mm256_set1_ps(i * 0.001f);
  for (long it = 0; it < iters; it++) {
#pragma GCC unroll 16
    for (int i = 0; i < N; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  float s = 0; for (int i = 0; i < N; i++) s += a[i][0];
  return s;
}
template <int N> void bench(int nt) {
  long iters = 100000000;
  auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> ts; std::vector<float> sink(nt);
  for (int t = 0; t < nt; t++) ts.emplace_back([&, t] { sink[t] = run<N>(iters); });
  for (auto& t : ts) t.join();
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  printf("chains %d threads %d: %.1f GFLOP/s (%.3f)\n", N, nt, nt * iters * (double)N * 8 * 2 / s / 1e9, sink[0]);
}
int main() {
  bench<8>(1);
  bench<12>(1);
  bench<8>(2);
  bench<12>(2);
}
