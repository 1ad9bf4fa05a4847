/* Random-read latency of this machine's memory over a buffer of N GiB (ci/memlat runs it), on
 * transparent huge pages (as the scale runs' heap: mimalloc asks for them, and a large run's
 * heap sits almost entirely on them) and on 4 KiB pages. Each read's address depends on the value the
 * previous read returned, so reads cannot overlap: the figure is the latency of one read that
 * misses the caches. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Returns 0, or 1 when the buffer cannot be had. */
static int measure(size_t gib, int huge) {
    size_t n = gib << 27; /* 8-byte words */
    size_t bytes = n * sizeof(uint64_t);
    uint64_t *a = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) {
        fprintf(stderr, "memlat: cannot map %zu GiB\n", gib);
        return 1;
    }
    madvise(a, bytes, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    double t0 = now();
    for (size_t i = 0; i < n; i++)
        a[i] = i;
    double t1 = now();
    const size_t reads = 5000000;
    uint64_t p = 0;
    for (size_t k = 0; k < reads; k++)
        p = a[(p * 0x9E3779B97F4A7C15ULL + k) % n];
    double t2 = now();
    printf("%zu GiB, %s: random read %.0f ns, first touch %.2f s/GiB (checksum %llu)\n", gib,
           huge ? "huge pages" : "4 KiB pages", (t2 - t1) / reads * 1e9, (t1 - t0) / gib,
           (unsigned long long)p);
    munmap(a, bytes);
    return 0;
}

int main(int argc, char **argv) {
    size_t gib = argc > 1 ? strtoul(argv[1], NULL, 10) : 1;
    if (gib == 0) {
        fprintf(stderr, "usage: memlat GIB (a whole number of GiB, at least 1)\n");
        return 2;
    }
    return measure(gib, 1) || measure(gib, 0);
}
