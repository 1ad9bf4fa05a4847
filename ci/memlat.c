/* Random-read latency of this machine's memory over a buffer of N GiB (ci/memlat runs it).
 * Each read's address depends on the value the previous read returned, so reads cannot
 * overlap: the figure is the latency of one cache- and TLB-missing read. The scale runs are
 * bound by it (madsim polls tasks in random order over a heap of gigabytes), so a wall time is
 * best quoted with this figure from the same hour. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
    if (gib == 0) {
        fprintf(stderr, "usage: memlat GIB (a whole number of GiB, at least 1)\n");
        return 2;
    }
    size_t n = gib << 27; /* 8-byte words */
    uint64_t *a = malloc(n * sizeof *a);
    if (!a) {
        fprintf(stderr, "memlat: cannot allocate %zu GiB\n", gib);
        return 1;
    }
    double t0 = now();
    for (size_t i = 0; i < n; i++)
        a[i] = i;
    double t1 = now();
    const size_t reads = 5000000;
    uint64_t p = 0;
    for (size_t k = 0; k < reads; k++)
        p = a[(p * 0x9E3779B97F4A7C15ULL + k) % n];
    double t2 = now();
    printf("%zu GiB: first touch %.2f s/GiB, random read %.0f ns (checksum %llu)\n", gib,
           (t1 - t0) / gib, (t2 - t1) / reads * 1e9, (unsigned long long)p);
    free(a);
    return 0;
}
