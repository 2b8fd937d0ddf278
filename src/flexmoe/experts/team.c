/* Python work on PyTorch's own OpenMP threads.
 *
 * flexmoe_on_team(work, threads) calls work() once on each thread of an OpenMP team of
 * `threads` (the caller is one of them) and returns when all have returned. `work` is
 * a ctypes callback: it takes the GIL itself, and the per-expert GEMMs it calls let go
 * of it while they run. Run this way, work spread over the cores uses the threads the
 * runtime already keeps (and spins) instead of starting threads of its own, which on a
 * machine with as many OpenMP threads as cores would share the cores with the spinning
 * ones. */
#include <omp.h>

typedef void (*flexmoe_work)(void);

int flexmoe_on_team(flexmoe_work work, int threads) {
    if (threads < 1) return -1;
#pragma omp parallel num_threads(threads)
    work();
    return 0;
}
