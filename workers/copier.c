/* Copies of received request bytes into the worker's pinned staging arenas, on threads
 * of their own that never take Python's GIL (workers/copier.py loads this with ctypes).
 *
 * A GPU worker receives each image as a zeromq frame and must copy it into pinned memory
 * before the device can read it: 30-70 us for 300 KiB on the hosts we measured. A
 * Python thread doing those copies has to win the GIL back from the serving loop after
 * every one, so adding threads made the worker slower; these threads only lock a mutex.
 *
 * Work arrives as (destination, source, length) triples; each is cut into chunks so
 * that several threads share a large input. Every chunk gets a sequence number, and
 * `prefix` is the number below which all chunks are done: a caller waits for "everything
 * submitted up to seq N" (a ticket), whatever order the threads finished in.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CP_ABI 1
#define CHUNK ((size_t)128 * 1024)
#define MAX_THREADS 16

typedef struct {
    char *dst;
    const char *src;
    size_t n;
} job_t;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t work; /* jobs queued, or stopping */
    pthread_cond_t done; /* prefix moved, or ring space freed */
    job_t *jobs;          /* ring of cap jobs, by seq % cap */
    unsigned char *finished;
    uint64_t cap;
    uint64_t next;   /* seq the next submitted chunk gets */
    uint64_t taken;  /* seq of the next chunk a thread takes */
    uint64_t prefix; /* every chunk below this seq is copied */
    int stop;
    int nthreads;
    pthread_t threads[MAX_THREADS];
} copier_t;

int cp_abi(void) { return CP_ABI; }

static void *run(void *arg) {
    copier_t *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->stop && c->taken == c->next) pthread_cond_wait(&c->work, &c->mu);
        if (c->taken == c->next) break; /* stopping, and nothing left to copy */
        uint64_t seq = c->taken++;
        job_t job = c->jobs[seq % c->cap];
        pthread_mutex_unlock(&c->mu);
        memcpy(job.dst, job.src, job.n);
        pthread_mutex_lock(&c->mu);
        c->finished[seq % c->cap] = 1;
        uint64_t p = c->prefix;
        while (p < c->taken && c->finished[p % c->cap]) {
            c->finished[p % c->cap] = 0;
            p++;
        }
        if (p != c->prefix) {
            /* Written under the lock, read without it by cp_done. */
            __atomic_store_n(&c->prefix, p, __ATOMIC_RELEASE);
            pthread_cond_broadcast(&c->done);
        }
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

void cp_free(copier_t *c);

copier_t *cp_new(int nthreads, int cap) {
    if (nthreads < 1 || nthreads > MAX_THREADS || cap < 1) return NULL;
    copier_t *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->cap = (uint64_t)cap;
    c->jobs = calloc((size_t)cap, sizeof *c->jobs);
    c->finished = calloc((size_t)cap, 1);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->done, NULL);
    if (!c->jobs || !c->finished) {
        cp_free(c);
        return NULL;
    }
    for (int i = 0; i < nthreads; i++) {
        if (pthread_create(&c->threads[i], NULL, run, c) != 0) {
            cp_free(c);
            return NULL;
        }
        c->nthreads++;
    }
    return c;
}

/* Queue count copies; returns the ticket: once cp_done() reaches it, all are done.
 * Blocks while the ring is full (the threads free it as they go). */
uint64_t cp_submit(copier_t *c, char *const *dst, const char *const *src, const size_t *n,
                   int count) {
    pthread_mutex_lock(&c->mu);
    for (int i = 0; i < count; i++) {
        size_t off = 0;
        do {
            while (c->next - c->prefix >= c->cap) pthread_cond_wait(&c->done, &c->mu);
            size_t len = n[i] - off < CHUNK ? n[i] - off : CHUNK;
            c->jobs[c->next % c->cap] = (job_t){dst[i] + off, src[i] + off, len};
            c->next++;
            off += len;
            /* One sleeping thread per chunk, woken as it is queued: the first copies
             * start while the rest are being queued. */
            pthread_cond_signal(&c->work);
        } while (off < n[i]);
    }
    uint64_t ticket = c->next;
    pthread_mutex_unlock(&c->mu);
    return ticket;
}

/* Sequence number below which every chunk is copied (no lock: a polling read). */
uint64_t cp_done(copier_t *c) { return __atomic_load_n(&c->prefix, __ATOMIC_ACQUIRE); }

/* Block until every chunk below ticket is copied. */
void cp_wait(copier_t *c, uint64_t ticket) {
    if (cp_done(c) >= ticket) return;
    pthread_mutex_lock(&c->mu);
    while (c->prefix < ticket) pthread_cond_wait(&c->done, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

/* Finish what was queued, stop the threads and free everything. */
void cp_free(copier_t *c) {
    if (!c) return;
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < c->nthreads; i++) pthread_join(c->threads[i], NULL);
    pthread_cond_destroy(&c->work);
    pthread_cond_destroy(&c->done);
    pthread_mutex_destroy(&c->mu);
    free(c->jobs);
    free(c->finished);
    free(c);
}
