#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <vector>
static void add_one(const float* x, float* y, long n, bool stream) {
  const __m128 one = _mm_set1_ps(1.0f);
  if (stream) { for (long i = 0; i < n; i += 4) _mm_stream_ps(y + i, _mm_add_ps(_mm_load_ps(x + i), one)); _mm_sfence(); }
  else for (long i = 0; i < n; i += 4) _mm_store_ps(y + i, _mm_add_ps(_mm_load_ps(x + i), one));
}
static double t_of(const float* x, float* y, long n, bool s, int nt) {
  auto t0 = std::chrono::steady_clock::now();
  if (nt == 1) add_one(x, y, n, s);
  else {
#pragma omp parallel num_threads(nt)
    { int t = omp_get_thread_num(); long b = n / nt * t / 16 * 16, e = (t == nt - 1) ? n : n / nt * (t + 1) / 16 * 16; add_one(x + b, y + b, e - b, s); }
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
int main(int argc, char** argv) {
  int nt = atoi(argv[1]); int reps = argc > 2 ? atoi(argv[2]) : 5;
  for (long mib = 4; mib <= 128; mib *= 2) for (long bytes : {mib << 20, (mib << 20) * 3 / 2}) {
    if (bytes > (128l<<20)) continue;
    long n = bytes / 4;
    float* x = (float*)aligned_alloc(64, bytes), *yc = (float*)aligned_alloc(64, bytes), *ys = (float*)aligned_alloc(64, bytes);
    memset(x, 0, bytes); memset(yc, 0, bytes); memset(ys, 0, bytes);
    t_of(x, yc, n, false, nt); t_of(x, ys, n, true, nt);
    std::vector<double> c, s;
    for (int r = 0; r < reps; ++r) { c.push_back(t_of(x, yc, n, false, nt)); s.push_back(t_of(x, ys, n, true, nt)); }
    std::sort(c.begin(), c.end()); std::sort(s.begin(), s.end());
    printf("%6.1f MiB nt=%d best s/c %.3f  median s/c %.3f  (c %.3f ms)\n", bytes / 1048576.0, nt, s[0] / c[0], s[reps/2] / c[reps/2], c[0]*1e3);
    free(x); free(yc); free(ys);
  }
}
