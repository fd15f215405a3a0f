/*
 * fastlane: the router's per-request hot path, run outside the Python interpreter.
 *
 * Python (router/router.py) owns every decision that is not per request: the routing
 * table, queues, deadlines' answers, retries, metrics export. This file owns what
 * happens millions of times: receive a client request, check its header, pick the
 * least-loaded worker with credit, forward the frames untouched; receive the worker's
 * reply, find the client's envelope, forward it back; hold requests in a per-model FIFO
 * while no worker has credit. Anything unusual (a malformed or unknown request, a model
 * that is failed or shutting down, a full queue, a worker event) is "punted": kept whole
 * and handed to Python, which runs the full checks and answers with the right error.
 * So the C path only ever accepts what the Python path would accept.
 *
 * It does not link against libzmq: Python passes the path of the libzmq that pyzmq
 * already loaded, and we resolve the few functions we call from that same copy, so
 * socket handles (pyzmq's Socket.underlying) are shared, not duplicated.
 *
 * Called only from the event-loop thread; ctypes releases the GIL around each call.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "fastlane_protocol.h" /* generated from router/protocol.py */

/* ---- the libzmq ABI we use (stable since 4.x) ------------------------------------ */
typedef struct { unsigned char _[64]; } __attribute__((aligned(8))) zmsg_t;
typedef struct { void *socket; int fd; short events; short revents; } zpoll_t;
#define Z_DONTWAIT 1
#define Z_SNDMORE 2
#define Z_POLLIN 1
#define Z_SRCFD 2 /* zmq_msg_get: the descriptor of the connection a message came in on */

static int (*z_msg_init)(zmsg_t *);
static int (*z_msg_init_size)(zmsg_t *, size_t);
static int (*z_msg_init_data)(zmsg_t *, void *, size_t, void (*)(void *, void *), void *);
static int (*z_msg_close)(zmsg_t *);
static void *(*z_msg_data)(zmsg_t *);
static size_t (*z_msg_size)(const zmsg_t *);
static int (*z_msg_more)(const zmsg_t *);
static int (*z_msg_get)(const zmsg_t *, int);
static int (*z_msg_recv)(zmsg_t *, void *, int);
static int (*z_msg_send)(zmsg_t *, void *, int);
static int (*z_msg_copy)(zmsg_t *, zmsg_t *);
static int (*z_errno)(void);
static int (*z_poll)(zpoll_t *, int, long);

/* FASTLANE_ABI is bumped whenever a signature changes, so a stale build is refused, not
 * misused; the digest covers every value the generated header holds. */
int fl_abi(void) { return FASTLANE_ABI; }
int64_t fl_protocol_digest(void) { return FL_PROTOCOL_DIGEST; }

int fl_bind(const char *libzmq_path) {
    /* RTLD_NOLOAD: only the copy already in this process will do. */
    void *h = dlopen(libzmq_path, RTLD_NOW | RTLD_NOLOAD);
    if (!h) return -1;
#define SYM(var, name) if (!(*(void **)&var = dlsym(h, name))) return -2
    SYM(z_msg_init, "zmq_msg_init");
    SYM(z_msg_init_size, "zmq_msg_init_size");
    SYM(z_msg_init_data, "zmq_msg_init_data");
    SYM(z_msg_close, "zmq_msg_close");
    SYM(z_msg_data, "zmq_msg_data");
    SYM(z_msg_size, "zmq_msg_size");
    SYM(z_msg_more, "zmq_msg_more");
    SYM(z_msg_get, "zmq_msg_get");
    SYM(z_msg_recv, "zmq_msg_recv");
    SYM(z_msg_send, "zmq_msg_send");
    SYM(z_msg_copy, "zmq_msg_copy");
    SYM(z_errno, "zmq_errno");
    SYM(z_poll, "zmq_poll");
#undef SYM
    return 0;
}

/* ---- this file's own limits (the wire's come from fastlane_protocol.h) --------------- */
#define MAX_CODES 32
#define MAX_BOUNDS 64
#define DRAIN_BATCH 512

/* The lane: a unix SOCK_SEQPACKET connection per worker that carries small requests
 * and their replies, one datagram per multipart message (see "the lane" below). */
_Static_assert(LANE_WORD == 4, "the lane's words are read as 32-bit little-endian");
enum { ITEM_LISTENER = -1, ITEM_PENDING = -2 };

static int send_bytes(void *sock, const void *data, size_t n, int flags);
#include "fastlane_peers.h" /* client connections: reply bytes held, their queue flows */

/* ---- records ---------------------------------------------------------------------- */
/* The latency histograms kept per worker: the router's queue, the wait at the worker (from
 * dispatch to its reply, less the compute), the batch's compute (timed by the worker, in
 * its reply header), end to end. */
enum { HIST_QUEUE, HIST_WAIT, HIST_COMPUTE, HIST_TOTAL, NHIST };
_Static_assert(NHIST == LATENCY_HISTOGRAMS, "router/protocol.py says otherwise");
typedef struct { zmsg_t *m; int n, cap; } msgvec;

typedef struct {
    int used, model, credit, load;
    int lane; /* the lane's socket, -1 without one */
    uint64_t served;
    unsigned char id[MAX_IDENTITY];
    size_t idlen;
    char version[MAX_VERSION_BYTES]; /* for the error replies C composes */
    size_t versionlen;
    /* per-worker metrics since the last drain: one bucket array per histogram (HIST_*) */
    uint64_t codes[MAX_CODES + 1];
    uint64_t hist[NHIST][MAX_BOUNDS + 1];
    double sums[NHIST];
} worker_t;

typedef struct {
    int used, open, retry, max_queue;
    double timeout_s;
    size_t namelen;
    char name[MAX_MODEL_NAME_BYTES];
    int *active, nactive, cap;
    /* The queue. Requests wait in their peer's flow (fastlane_peers.h), and the flows
     * take turns, one request each (rr: the next flow to serve), so one client's flood
     * delays another's request by at most one of its own per turn. Requests put back in
     * front (retries after a worker's loss) wait in q, served before every flow. A ring
     * of keys, oldest first: a request that left some other way (deadline, failed model)
     * leaves a stale key, skipped when reached. queued counts all of them. */
    ring_t front;
    int queued;
    flow_t *rr;
    unsigned char *full_error; /* the packed error map for OVERLOADED (max_queue) */
    size_t full_error_len;
    uint64_t refused; /* answered OVERLOADED by us since the last drain: full queue */
    uint64_t evicted; /* taken back out of the queue for another peer's request */
    uint64_t unread;  /* refused: their peer holds too many reply bytes */
} model_t;

typedef struct {
    uint32_t gen;
    int live, answered, attempts, worker, model, next_free;
    int whole;  /* every body frame kept: the request can be sent again */
    int queued; /* waiting in its model's queue (worker -1) */
    peer_t *peer; /* the client connection it came from (NULL: unknown) */
    flow_t *flow; /* the flow it waits in; NULL in the model's front ring or not queued */
    double arrived, dispatched, deadline;
    msgvec env;  /* identity (+ empty delimiter) */
    msgvec body; /* header + tensor frames kept for a retry; header only without retry */
} req_t;

typedef struct {
    int kind; /* PUNT_* */
    int worker;
    msgvec frames;
} punt_t;

typedef struct {
    void *frontend, *backend;
    worker_t *workers;
    int nworkers;
    model_t *models;
    int nmodels;
    req_t **reqs;
    int nreqs, free_head, live;
    punt_t *punts;
    int npunts, punt_cap;
    int expired;
    uint64_t dropped_replies;
    char codes[MAX_CODES][32];
    size_t codelen[MAX_CODES];
    int ncodes;
    double bounds[MAX_BOUNDS];
    int nbounds;
    msgvec scratch;
    /* the lane: its listening socket, connections waiting for their hello, and the
     * poll items fl_run rebuilds when either (or a worker's lane) changes */
    peers_t peers;
    unsigned char *unread_error; /* the packed error map for a peer over its byte cap */
    size_t unread_error_len;
    uint64_t unread_dropped; /* requests not even refused: their peer reads nothing */
    uint64_t gone_dropped;   /* queued requests dropped because their peer left */
    int lane_listen, npending, items_dirty;
    int pending[LANE_PENDING_MAX];
    unsigned char *lane_buf;
    zpoll_t *items;
    int *item_worker; /* per lane poll item: worker index, or ITEM_LISTENER / ITEM_PENDING */
    int nitems, items_cap;
    uint64_t lane_sent, lane_received;
} core_t;

/* ---- small helpers ------------------------------------------------------------------ */
static double now_s(void) {
    struct timespec ts; /* CLOCK_MONOTONIC: the clock behind Python's time.monotonic() */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int vec_reserve(msgvec *v, int n) {
    if (n <= v->cap) return 0;
    int cap = v->cap ? v->cap : 8;
    while (cap < n) cap *= 2;
    zmsg_t *m = realloc(v->m, (size_t)cap * sizeof(zmsg_t));
    if (!m) return -1;
    v->m = m;
    v->cap = cap;
    return 0;
}

static void vec_close(msgvec *v) {
    for (int i = 0; i < v->n; i++) z_msg_close(&v->m[i]);
    v->n = 0;
}

static void vec_free(msgvec *v) {
    vec_close(v);
    free(v->m);
    v->m = NULL;
    v->cap = 0;
}

/* Receive one whole multipart message into v (emptied first). 1: got one, 0: none. */
static int recv_message(void *sock, msgvec *v) {
    vec_close(v);
    for (;;) {
        if (vec_reserve(v, v->n + 1)) return -1;
        zmsg_t *m = &v->m[v->n];
        z_msg_init(m);
        if (z_msg_recv(m, sock, v->n ? 0 : Z_DONTWAIT) < 0) {
            z_msg_close(m);
            return v->n ? -1 : 0;
        }
        v->n++;
        if (!z_msg_more(m)) return 1;
    }
}

static inline unsigned char *mdata(zmsg_t *m) { return (unsigned char *)z_msg_data(m); }
static inline size_t msize(zmsg_t *m) { return z_msg_size(m); }

static int send_bytes(void *sock, const void *data, size_t n, int flags) {
    zmsg_t m;
    if (z_msg_init_size(&m, n)) return -1;
    if (n) memcpy(z_msg_data(&m), data, n);
    if (z_msg_send(&m, sock, flags) < 0) {
        z_msg_close(&m);
        return -1;
    }
    return 0;
}

/* Send a frame and keep ours: zmq_msg_copy shares the buffer of large messages. */
static int send_copy(void *sock, zmsg_t *src, int flags) {
    zmsg_t m;
    z_msg_init(&m);
    if (z_msg_copy(&m, src)) {
        z_msg_close(&m);
        return -1;
    }
    if (z_msg_send(&m, sock, flags) < 0) {
        z_msg_close(&m);
        return -1;
    }
    return 0;
}

/* ---- the header check: a strict msgpack walk --------------------------------------- */
/* Accept exactly what msgpack.unpackb(raw=False, strict_map_key=True, limits as in
 * router/protocol.py) accepts, or say "punt"; never accept what Python would reject. */
typedef struct {
    const unsigned char *p, *end;
    int bad;
} rd_t;

static int utf8_ok(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t len;
        unsigned cp;
        if (c >= 0xC2 && c <= 0xDF) { len = 2; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { len = 3; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; }
        else return 0;
        if (i + len > n) return 0;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (s[i + k] & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF))) return 0;
        if (cp >= 0xD800 && cp <= 0xDFFF) return 0; /* Python's codec refuses surrogates */
        i += len;
    }
    return 1;
}

static uint64_t rd_be(rd_t *r, int n) {
    if (r->end - r->p < n) { r->bad = 1; return 0; }
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | r->p[i];
    r->p += n;
    return v;
}

enum { T_NIL, T_BOOL, T_UINT, T_INT, T_FLOAT, T_STR, T_BIN, T_ARRAY, T_MAP };

typedef struct {
    int type;
    uint64_t u; /* uint value, or length of str/bin/array/map */
    int64_t i;
    const unsigned char *s; /* str/bin bytes */
} tok_t;

/* Read one token's head (containers: only their length). */
static int rd_tok(rd_t *r, tok_t *t) {
    if (r->p >= r->end) return -1;
    unsigned c = *r->p++;
    t->s = NULL;
    if (c <= 0x7f) { t->type = T_UINT; t->u = c; return 0; }
    if (c >= 0xe0) { t->type = T_INT; t->i = (int8_t)c; return 0; }
    if (c >= 0x80 && c <= 0x8f) { t->type = T_MAP; t->u = c & 0x0f; return 0; }
    if (c >= 0x90 && c <= 0x9f) { t->type = T_ARRAY; t->u = c & 0x0f; return 0; }
    size_t n = 0;
    switch (c) {
    case 0xc0: t->type = T_NIL; return 0;
    case 0xc2: case 0xc3: t->type = T_BOOL; t->u = c & 1; return 0;
    case 0xca: t->type = T_FLOAT; rd_be(r, 4); return r->bad ? -1 : 0;
    case 0xcb: t->type = T_FLOAT; rd_be(r, 8); return r->bad ? -1 : 0;
    case 0xcc: t->type = T_UINT; t->u = rd_be(r, 1); return r->bad ? -1 : 0;
    case 0xcd: t->type = T_UINT; t->u = rd_be(r, 2); return r->bad ? -1 : 0;
    case 0xce: t->type = T_UINT; t->u = rd_be(r, 4); return r->bad ? -1 : 0;
    case 0xcf: t->type = T_UINT; t->u = rd_be(r, 8); return r->bad ? -1 : 0;
    case 0xd0: t->type = T_INT; t->i = (int8_t)rd_be(r, 1); return r->bad ? -1 : 0;
    case 0xd1: t->type = T_INT; t->i = (int16_t)rd_be(r, 2); return r->bad ? -1 : 0;
    case 0xd2: t->type = T_INT; t->i = (int32_t)rd_be(r, 4); return r->bad ? -1 : 0;
    case 0xd3: t->type = T_INT; t->i = (int64_t)rd_be(r, 8); return r->bad ? -1 : 0;
    case 0xd9: t->type = T_STR; n = rd_be(r, 1); break;
    case 0xda: t->type = T_STR; n = rd_be(r, 2); break;
    case 0xdb: t->type = T_STR; n = rd_be(r, 4); break;
    case 0xc4: t->type = T_BIN; n = rd_be(r, 1); break;
    case 0xc5: t->type = T_BIN; n = rd_be(r, 2); break;
    case 0xc6: t->type = T_BIN; n = rd_be(r, 4); break;
    case 0xdc: t->type = T_ARRAY; t->u = rd_be(r, 2); return r->bad ? -1 : 0;
    case 0xdd: t->type = T_ARRAY; t->u = rd_be(r, 4); return r->bad ? -1 : 0;
    case 0xde: t->type = T_MAP; t->u = rd_be(r, 2); return r->bad ? -1 : 0;
    case 0xdf: t->type = T_MAP; t->u = rd_be(r, 4); return r->bad ? -1 : 0;
    default:
        if (c >= 0xa0 && c <= 0xbf) { t->type = T_STR; n = c & 0x1f; break; }
        return -1; /* 0xc1, ext types (refused by max_ext_len=0) */
    }
    if (r->bad || (size_t)(r->end - r->p) < n) return -1;
    t->s = r->p;
    t->u = n;
    r->p += n;
    if (t->type == T_STR && !utf8_ok(t->s, n)) return -1;
    return 0;
}

/* Skip one whole value (its head already read into t). */
static int rd_skip_rest(rd_t *r, const tok_t *t, int depth) {
    if (t->type == T_ARRAY || t->type == T_MAP) {
        if (depth >= MAX_NESTING) return -1; /* msgpack-python raises StackError */
        if (t->type == T_ARRAY && t->u > MAX_ARRAY_LEN) return -1;
        if (t->type == T_MAP && t->u > MAX_MAP_LEN) return -1;
        uint64_t items = t->type == T_MAP ? 2 * t->u : t->u;
        for (uint64_t k = 0; k < items; k++) {
            tok_t c;
            if (rd_tok(r, &c)) return -1;
            /* strict_map_key: a key must be str or bytes */
            if (t->type == T_MAP && !(k & 1) && c.type != T_STR && c.type != T_BIN) return -1;
            if (rd_skip_rest(r, &c, depth + 1)) return -1;
        }
    }
    return 0;
}

typedef struct {
    const unsigned char *model;
    size_t model_len;
    int has_timeout;
    uint64_t timeout_ms;
    int has_inputs;
    const unsigned char *id; /* the id's encoded value (head included), NULL without one */
    size_t id_len;
} route_t;

static int key_is(const tok_t *k, const char *name) {
    size_t n = strlen(name);
    return k->type == T_STR && k->u == n && memcmp(k->s, name, n) == 0;
}

/* 0: routable, fields filled. -1: punt to Python. */
static int parse_header(const unsigned char *p, size_t n, route_t *out) {
    if (n > MAX_HEADER_BYTES || n == 0) return -1;
    rd_t r = {p, p + n, 0};
    tok_t m;
    if (rd_tok(&r, &m) || m.type != T_MAP || m.u > MAX_MAP_LEN) return -1;
    memset(out, 0, sizeof(*out));
    /* duplicates: the last one wins, as in the Python dict */
    for (uint64_t i = 0; i < m.u; i++) {
        tok_t k, v;
        if (rd_tok(&r, &k)) return -1;
        if (k.type != T_STR && k.type != T_BIN) return -1;
        const unsigned char *id_start = r.p;
        if (rd_tok(&r, &v)) return -1;
        if (key_is(&k, "model")) {
            if (v.type != T_STR || v.u == 0 || v.u > MAX_MODEL_NAME_BYTES) return -1;
            out->model = v.s;
            out->model_len = v.u;
        } else if (key_is(&k, "timeout_ms")) {
            if (v.type == T_NIL) out->has_timeout = 0;
            else if (v.type == T_UINT && v.u > 0) { out->has_timeout = 1; out->timeout_ms = v.u; }
            /* a positive int in a signed encoding: msgpack-python decodes it the same */
            else if (v.type == T_INT && v.i > 0) { out->has_timeout = 1; out->timeout_ms = (uint64_t)v.i; }
            else return -1;
        } else if (key_is(&k, "id")) {
            if (v.type == T_STR || v.type == T_BIN) { if (v.u > MAX_ID_BYTES) return -1; }
            else if (v.type != T_NIL && v.type != T_UINT && v.type != T_INT) return -1;
            out->id = v.type == T_NIL ? NULL : id_start;
            out->id_len = (size_t)(r.p - id_start);
        } else if (key_is(&k, "inputs")) {
            out->has_inputs = v.type == T_ARRAY;
            if (!out->has_inputs) return -1;
        }
        if (rd_skip_rest(&r, &v, 1)) return -1;
    }
    if (r.p != r.end) return -1; /* trailing bytes: unpackb raises ExtraData */
    return out->model && out->has_inputs ? 0 : -1;
}

/* ---- lifetime ------------------------------------------------------------------------ */
core_t *fl_new(void *frontend, void *backend) {
    if (!z_msg_recv) return NULL;
    core_t *c = calloc(1, sizeof(core_t));
    if (!c) return NULL;
    c->frontend = frontend;
    c->backend = backend;
    c->free_head = -1;
    c->lane_listen = -1;
    c->items_dirty = 1;
    if (peers_init(&c->peers)) {
        free(c->peers.acct);
        free(c->peers.buckets);
        free(c);
        return NULL;
    }
    return c;
}

static void req_release(core_t *c, int idx);

void fl_free(core_t *c) {
    if (!c) return;
    for (int i = 0; i < c->nreqs; i++) {
        if (c->reqs[i]->live) req_release(c, i);
        vec_free(&c->reqs[i]->env);
        vec_free(&c->reqs[i]->body);
        free(c->reqs[i]);
    }
    free(c->reqs);
    for (int i = 0; i < c->npunts; i++) vec_free(&c->punts[i].frames);
    free(c->punts);
    for (int i = 0; i < c->nmodels; i++) {
        free(c->models[i].active);
        free(c->models[i].front.q);
        free(c->models[i].full_error);
    }
    peers_free(&c->peers);
    free(c->unread_error);
    free(c->models);
    for (int i = 0; i < c->nworkers; i++)
        if (c->workers[i].used && c->workers[i].lane >= 0) close(c->workers[i].lane);
    free(c->workers);
    for (int i = 0; i < c->npending; i++) close(c->pending[i]);
    if (c->lane_listen >= 0) close(c->lane_listen);
    free(c->lane_buf);
    free(c->items);
    free(c->item_worker);
    vec_free(&c->scratch);
    free(c);
}

int fl_add_code(core_t *c, const char *code, size_t n) {
    if (c->ncodes >= MAX_CODES || n >= sizeof(c->codes[0])) return -1;
    memcpy(c->codes[c->ncodes], code, n);
    c->codelen[c->ncodes] = n;
    return c->ncodes++;
}

int fl_set_bounds(core_t *c, const double *bounds, int n) {
    if (n > MAX_BOUNDS) return -1;
    memcpy(c->bounds, bounds, (size_t)n * sizeof(double));
    c->nbounds = n;
    return 0;
}

/* ---- table edits (Python decides, we apply) ----------------------------------------- */
int fl_model_add(core_t *c, const char *name, size_t n) {
    if (n == 0 || n > MAX_MODEL_NAME_BYTES) return -1;
    int idx = -1;
    for (int i = 0; i < c->nmodels; i++)
        if (!c->models[i].used) { idx = i; break; }
    if (idx < 0) {
        model_t *m = realloc(c->models, (size_t)(c->nmodels + 1) * sizeof(model_t));
        if (!m) return -1;
        c->models = m;
        idx = c->nmodels++;
        memset(&c->models[idx], 0, sizeof(model_t));
    }
    model_t *m = &c->models[idx];
    free(m->active);
    free(m->front.q);
    free(m->full_error);
    memset(m, 0, sizeof(*m));
    m->used = 1;
    memcpy(m->name, name, n);
    m->namelen = n;
    return idx;
}

static int ring_push(ring_t *g, uint64_t key, int front);
static uint64_t ring_pop(ring_t *g);
static req_t *req_get(core_t *c, uint64_t key, int *idx_out);
static void rr_unlink(model_t *m, flow_t *f);

void fl_model_remove(core_t *c, int idx) {
    if (idx < 0 || idx >= c->nmodels) return;
    model_t *m = &c->models[idx];
    /* Its flows belong to peers that may outlive it: what they still hold (Python takes
     * a model's queue before removing it) moves to the front ring. */
    while (m->rr) {
        flow_t *f = m->rr;
        while (f->ring.count) {
            uint64_t key = ring_pop(&f->ring);
            req_t *r = req_get(c, key, NULL);
            if (r && r->queued && r->flow == f && ring_push(&m->front, key, 0) == 0) r->flow = NULL;
        }
        f->queued = 0;
        rr_unlink(m, f);
    }
    c->models[idx].used = 0;
    c->models[idx].open = 0;
    c->models[idx].nactive = 0;
}

/* open: we may take new requests ourselves (the pool accepts, the model is not failed). */
void fl_model_set(core_t *c, int idx, int open, int retry, double timeout_s, int max_queue) {
    model_t *m = &c->models[idx];
    m->open = open;
    m->retry = retry;
    m->timeout_s = timeout_s;
    m->max_queue = max_queue;
}

int fl_model_set_active(core_t *c, int idx, const int *workers, int n) {
    model_t *m = &c->models[idx];
    if (n > m->cap) {
        int *a = realloc(m->active, (size_t)n * sizeof(int));
        if (!a) return -1;
        m->active = a;
        m->cap = n;
    }
    if (n) memcpy(m->active, workers, (size_t)n * sizeof(int));
    m->nactive = n;
    return 0;
}

int fl_worker_add(core_t *c, const void *id, size_t n, int model, int credit,
                  const char *version, size_t vlen) {
    if (n == 0 || n > MAX_IDENTITY || vlen > MAX_VERSION_BYTES) return -1;
    int idx = -1;
    for (int i = 0; i < c->nworkers; i++)
        if (!c->workers[i].used) { idx = i; break; }
    if (idx < 0) {
        worker_t *w = realloc(c->workers, (size_t)(c->nworkers + 1) * sizeof(worker_t));
        if (!w) return -1;
        c->workers = w;
        idx = c->nworkers++;
    }
    worker_t *w = &c->workers[idx];
    memset(w, 0, sizeof(*w));
    w->used = 1;
    w->lane = -1; /* until the worker connects and says hello */
    w->model = model;
    w->credit = credit < 1 ? 1 : credit;
    memcpy(w->id, id, n);
    w->idlen = n;
    if (vlen) memcpy(w->version, version, vlen);
    w->versionlen = vlen;
    return idx;
}

static void lane_close(core_t *c, worker_t *w);

/* The caller has taken or forgotten every request the worker held. */
void fl_worker_remove(core_t *c, int idx) {
    if (idx < 0 || idx >= c->nworkers) return;
    lane_close(c, &c->workers[idx]);
    c->workers[idx].used = 0;
}

int fl_worker_load(core_t *c, int idx) { return c->workers[idx].load; }
uint64_t fl_worker_served(core_t *c, int idx) { return c->workers[idx].served; }

/* Copy out and reset one worker's request counters since the last call.
 * codes: ncodes+1 counts (last: statuses we do not know); hist: NHIST x (nbounds+1);
 * sums: NHIST (seconds, in HIST_* order). Returns the number of requests. */
uint64_t fl_worker_stats(core_t *c, int idx, uint64_t *codes, uint64_t *hist, double *sums) {
    worker_t *w = &c->workers[idx];
    uint64_t total = 0;
    for (int i = 0; i <= c->ncodes; i++) {
        codes[i] = i == c->ncodes ? w->codes[MAX_CODES] : w->codes[i];
        total += codes[i];
    }
    for (int h = 0; h < NHIST; h++) {
        memcpy(hist + h * (c->nbounds + 1), w->hist[h], (size_t)(c->nbounds + 1) * sizeof(uint64_t));
        sums[h] = w->sums[h];
    }
    memset(w->codes, 0, sizeof(w->codes));
    memset(w->hist, 0, sizeof(w->hist));
    memset(w->sums, 0, sizeof(w->sums));
    return total;
}

/* ---- requests in flight ---------------------------------------------------------- */
static req_t *req_get(core_t *c, uint64_t key, int *idx_out) {
    uint32_t idx = (uint32_t)(key & 0xffffffffu);
    if (idx >= (uint32_t)c->nreqs) return NULL;
    req_t *r = c->reqs[idx];
    if (!r->live || r->gen != (uint32_t)(key >> 32)) return NULL;
    if (idx_out) *idx_out = (int)idx;
    return r;
}

static uint64_t req_key(core_t *c, int idx) {
    return ((uint64_t)c->reqs[idx]->gen << 32) | (uint32_t)idx;
}

static int req_alloc(core_t *c) {
    int idx = c->free_head;
    if (idx >= 0) {
        c->free_head = c->reqs[idx]->next_free;
    } else {
        req_t **a = realloc(c->reqs, (size_t)(c->nreqs + 1) * sizeof(req_t *));
        if (!a) return -1;
        c->reqs = a;
        req_t *r = calloc(1, sizeof(req_t));
        if (!r) return -1;
        idx = c->nreqs++;
        c->reqs[idx] = r;
    }
    req_t *r = c->reqs[idx];
    r->gen++;
    r->live = 1;
    r->answered = 0;
    r->attempts = 0;
    r->queued = 0;
    r->whole = 0;
    r->worker = -1;
    r->peer = NULL;
    r->flow = NULL;
    c->live++;
    return idx;
}

static void unqueue(core_t *c, req_t *r);

/* Request idx came from the client whose routing id is env (a peer's first request
 * makes its record). */
static void req_set_peer(core_t *c, int idx, zmsg_t *env) {
    req_t *r = c->reqs[idx];
    r->peer = peer_get(&c->peers, mdata(env), msize(env));
    if (r->peer) r->peer->requests++;
}

/* Free a request: its frames, its hold on the worker's credit. */
static void req_release(core_t *c, int idx) {
    req_t *r = c->reqs[idx];
    if (!r->live) return;
    vec_close(&r->env);
    vec_close(&r->body);
    if (r->peer) {
        r->peer->requests--;
        r->peer = NULL; /* the loop's tick forgets a peer that holds nothing */
    }
    if (r->queued) {
        unqueue(c, r); /* its key in the ring is stale from now on */
    } else if (r->worker >= 0 && r->worker < c->nworkers && c->workers[r->worker].used) {
        worker_t *w = &c->workers[r->worker];
        if (w->load > 0) w->load--;
    }
    r->live = 0;
    r->next_free = c->free_head;
    c->free_head = idx;
    c->live--;
}

int fl_live(core_t *c) { return c->live; }
uint64_t fl_dropped_replies(core_t *c) { return c->dropped_replies; }

static int pick_worker(core_t *c, model_t *m) {
    int best = -1, best_load = 1 << 30;
    for (int i = 0; i < m->nactive; i++) {
        worker_t *w = &c->workers[m->active[i]];
        if (w->load < w->credit && w->load < best_load) {
            best = m->active[i];
            best_load = w->load;
        }
    }
    return best;
}

static int lane_send(core_t *c, worker_t *w, const unsigned char *key, msgvec *body);

/* Send [worker id, "R", key, body...] to the backend, or ["R", key, body...] down the
 * worker's lane. The first frame failing means the worker is gone (ROUTER_MANDATORY)
 * or full; nothing was sent then. Frames from keep on are the receiver's afterwards. */
static int send_to_worker(core_t *c, int widx, uint64_t key, msgvec *body, int keep) {
    worker_t *w = &c->workers[widx];
    unsigned char k[8];
    for (int i = 0; i < 8; i++) k[i] = (unsigned char)(key >> (8 * i)); /* little-endian */
    if (w->lane >= 0 && lane_send(c, w, k, body) == 0) {
        /* copied into the datagram: release what a zmq send would have taken */
        for (int i = keep; i < body->n; i++) {
            z_msg_close(&body->m[i]);
            z_msg_init(&body->m[i]);
        }
        return 0;
    }
    if (send_bytes(c->backend, w->id, w->idlen, Z_SNDMORE | Z_DONTWAIT)) return -1;
    send_bytes(c->backend, KIND_REQUEST, KIND_REQUEST_LEN, Z_SNDMORE);
    send_bytes(c->backend, k, 8, Z_SNDMORE);
    for (int i = 0; i < body->n; i++) {
        int flags = i + 1 < body->n ? Z_SNDMORE : 0;
        /* keep: header always (for error answers), tensors only when retries are on */
        if (i < keep) send_copy(c->backend, &body->m[i], flags);
        else z_msg_send(&body->m[i], c->backend, flags);
    }
    return 0;
}

static void punt(core_t *c, int kind, int worker, msgvec *frames) {
    if (c->npunts == c->punt_cap) {
        int cap = c->punt_cap ? 2 * c->punt_cap : 16;
        punt_t *p = realloc(c->punts, (size_t)cap * sizeof(punt_t));
        if (!p) { vec_close(frames); return; }
        c->punts = p;
        c->punt_cap = cap;
    }
    punt_t *p = &c->punts[c->npunts++];
    p->kind = kind;
    p->worker = worker;
    p->frames = *frames; /* take the frames; the caller's vector starts empty */
    frames->m = NULL;
    frames->n = frames->cap = 0;
}

static void punt_notice(core_t *c, int kind, int worker) {
    msgvec none = {NULL, 0, 0};
    punt(c, kind, worker, &none);
}

int fl_punt_count(core_t *c) { return c->npunts; }
int fl_punt_kind(core_t *c, int i) { return c->punts[i].kind; }
int fl_punt_worker(core_t *c, int i) { return c->punts[i].worker; }
int fl_punt_nframes(core_t *c, int i) { return c->punts[i].frames.n; }

size_t fl_punt_frame(core_t *c, int i, int j, const unsigned char **data) {
    zmsg_t *m = &c->punts[i].frames.m[j];
    *data = mdata(m);
    return msize(m);
}

void fl_punt_clear(core_t *c) {
    for (int i = 0; i < c->npunts; i++) vec_free(&c->punts[i].frames);
    c->npunts = 0;
}

/* ---- queues ------------------------------------------------------------------------ */
static int ring_push(ring_t *g, uint64_t key, int front) {
    if (g->count == g->cap) {
        int cap = g->cap ? 2 * g->cap : 16;
        uint64_t *q = malloc((size_t)cap * sizeof(uint64_t));
        if (!q) return -1;
        for (int i = 0; i < g->count; i++) q[i] = g->q[(g->head + i) % g->cap];
        free(g->q);
        g->q = q;
        g->cap = cap;
        g->head = 0;
    }
    if (front) {
        g->head = (g->head + g->cap - 1) % g->cap;
        g->q[g->head] = key;
    } else {
        g->q[(g->head + g->count) % g->cap] = key;
    }
    g->count++;
    return 0;
}

static uint64_t ring_pop(ring_t *g) {
    uint64_t key = g->q[g->head];
    g->head = (g->head + 1) % g->cap;
    g->count--;
    return key;
}

static uint64_t ring_pop_back(ring_t *g) {
    g->count--;
    return g->q[(g->head + g->count) % g->cap];
}

/* Whether key is a request waiting in ring f (a flow), or in the front ring (f NULL). */
static req_t *queued_in(core_t *c, uint64_t key, const flow_t *f, int *idx) {
    req_t *r = req_get(c, key, idx);
    return r && r->queued && r->flow == f ? r : NULL;
}

/* Drop stale keys when they outnumber the live ones, so a ring stays bounded. */
static void ring_compact(core_t *c, ring_t *g, const flow_t *f, int live) {
    if (g->count <= 64 || g->count <= 2 * live) return;
    int n = 0;
    for (int i = 0; i < g->count; i++) {
        uint64_t key = g->q[(g->head + i) % g->cap];
        if (queued_in(c, key, f, NULL)) g->q[(g->head + n++) % g->cap] = key;
    }
    g->count = n;
}

/* The model's round-robin of flows: a circular list, m->rr the next to serve. */
static void rr_link(model_t *m, flow_t *f) {
    if (!m->rr) {
        f->prev = f->next = f;
        m->rr = f;
    } else { /* at the tail: just before the next to serve */
        f->next = m->rr;
        f->prev = m->rr->prev;
        m->rr->prev->next = f;
        m->rr->prev = f;
    }
    f->linked = 1;
}

static void rr_unlink(model_t *m, flow_t *f) {
    if (!f->linked) return;
    if (f->next == f) m->rr = NULL;
    else {
        f->prev->next = f->next;
        f->next->prev = f->prev;
        if (m->rr == f) m->rr = f->next;
    }
    f->prev = f->next = NULL;
    f->linked = 0;
}

/* Peer p's flow in model mi; made when absent and `make` (NULL: none, or no memory). */
static flow_t *flow_of(peer_t *p, int mi, int make) {
    for (flow_t *f = p->flows; f; f = f->next_of_peer)
        if (f->model == mi) return f;
    if (!make) return NULL;
    flow_t *f = calloc(1, sizeof(flow_t));
    if (!f) return NULL;
    f->model = mi;
    f->peer = p;
    f->next_of_peer = p->flows;
    p->flows = f;
    return f;
}

/* Request r leaves its model's queue, whichever way (dispatched, expired, answered). */
static void unqueue(core_t *c, req_t *r) {
    model_t *m = &c->models[r->model];
    flow_t *f = r->flow;
    m->queued--;
    r->queued = 0;
    r->flow = NULL;
    if (!f) return;
    if (--f->queued <= 0) { /* every key left in its ring is stale */
        f->queued = 0;
        f->ring.count = f->ring.head = 0;
        rr_unlink(m, f);
    } else {
        ring_compact(c, &f->ring, f, f->queued);
    }
}

/* Queue request idx: at the back of its peer's flow, or (front: a retry) in the
 * model's front ring, served before any flow. */
static void enqueue(core_t *c, int idx, int front) {
    req_t *r = c->reqs[idx];
    model_t *m = &c->models[r->model];
    flow_t *f = !front && r->peer ? flow_of(r->peer, r->model, 1) : NULL;
    if (ring_push(f ? &f->ring : &m->front, req_key(c, idx), front)) {
        r->deadline = 0.0; /* no memory to queue it: let the sweep answer it now */
        c->expired = 1;
        return;
    }
    r->queued = 1;
    r->worker = -1;
    r->flow = f;
    m->queued++;
    if (f && f->queued++ == 0) rr_link(m, f);
}

/* The next request to serve (0: none) and the ring it heads: the front ring first, then
 * the flow whose turn it is. Stale keys met on the way are dropped. */
static uint64_t queue_peek(core_t *c, model_t *m, ring_t **from) {
    while (m->front.count) {
        uint64_t key = m->front.q[m->front.head];
        if (queued_in(c, key, NULL, NULL)) { *from = &m->front; return key; }
        ring_pop(&m->front);
    }
    while (m->rr) {
        flow_t *f = m->rr;
        while (f->ring.count) {
            uint64_t key = f->ring.q[f->ring.head];
            if (queued_in(c, key, f, NULL)) { *from = &f->ring; return key; }
            ring_pop(&f->ring);
        }
        f->queued = 0; /* counted keys it did not hold: never expected; stay consistent */
        rr_unlink(m, f);
    }
    return 0;
}

static int send_to_worker(core_t *c, int widx, uint64_t key, msgvec *body, int keep);
static void punt_notice(core_t *c, int kind, int worker);
static int pick_worker(core_t *c, model_t *m);
static void refuse_queued(core_t *c, model_t *m, int idx);

/* Send queued requests while workers have credit: retries first, then one request per
 * flow in turn. */
static void dispatch_queue(core_t *c, int mi, double now) {
    model_t *m = &c->models[mi];
    while (m->queued) {
        ring_t *from;
        uint64_t key = queue_peek(c, m, &from);
        if (!key) break;
        int wi = pick_worker(c, m);
        if (wi < 0) break;
        int idx;
        req_t *r = req_get(c, key, &idx);
        ring_pop(from);
        flow_t *f = r->flow;
        unqueue(c, r);
        if (f && f->linked && m->rr == f) m->rr = f->next; /* its turn is taken */
        if (r->deadline <= now) { /* waited too long: the sweep answers it */
            r->worker = -1;
            c->expired = 1;
            continue;
        }
        if (peer_verdict(&c->peers, r->peer)) { /* its client stopped reading meanwhile */
            refuse_queued(c, m, idx);
            continue;
        }
        int keep = m->retry ? r->body.n : 1;
        if (send_to_worker(c, wi, key, &r->body, keep)) {
            enqueue(c, idx, 1); /* back in front; Python drops the worker */
            punt_notice(c, PUNT_UNREACHABLE, wi);
            break;
        }
        for (int i = keep; i < r->body.n; i++) z_msg_close(&r->body.m[i]);
        r->whole = keep == r->body.n;
        r->body.n = keep;
        r->worker = wi;
        r->attempts++;
        r->dispatched = now;
        c->workers[wi].load++;
    }
    ring_compact(c, &m->front, NULL, m->queued);
}

void fl_kick(core_t *c, int mi) { dispatch_queue(c, mi, now_s()); }
int fl_queued(core_t *c, int mi) { return c->models[mi].queued; }

/* Take every queued request of a model out of its queue (the model failed); returns
 * their keys; Python answers each and forgets it. */
int fl_queue_take(core_t *c, int mi, uint64_t *keys, int max) {
    model_t *m = &c->models[mi];
    int n = 0;
    while (n < max && m->front.count) {
        uint64_t key = ring_pop(&m->front);
        req_t *r = queued_in(c, key, NULL, NULL);
        if (r) {
            unqueue(c, r);
            keys[n++] = key;
        }
    }
    while (n < max && m->rr) {
        flow_t *f = m->rr;
        if (!f->ring.count) { /* never expected, see queue_peek */
            f->queued = 0;
            rr_unlink(m, f);
            continue;
        }
        uint64_t key = ring_pop(&f->ring);
        req_t *r = queued_in(c, key, f, NULL);
        if (r) {
            unqueue(c, r); /* unlinks f with its last one */
            keys[n++] = key;
        }
    }
    return n;
}

/* The flow holding the most of model m's queue. */
static flow_t *top_flow(model_t *m) {
    flow_t *top = m->rr;
    if (!top) return NULL;
    for (flow_t *f = top->next; f != m->rr; f = f->next)
        if (f->queued > top->queued) top = f;
    return top;
}

/* Take the newest request out of flow f: its key, 0 if none. */
static uint64_t flow_take_newest(core_t *c, flow_t *f) {
    while (f->ring.count) {
        uint64_t key = ring_pop_back(&f->ring);
        if (queued_in(c, key, f, NULL)) return key;
    }
    return 0;
}

/* ---- the frontend fast path ------------------------------------------------------ */
static int find_model(core_t *c, const unsigned char *name, size_t n) {
    for (int i = 0; i < c->nmodels; i++) {
        model_t *m = &c->models[i];
        if (m->used && m->namelen == n && memcmp(m->name, name, n) == 0) return i;
    }
    return -1;
}

static int refuse(core_t *c, int mi, zmsg_t *env, int nenv, peer_t *peer, zmsg_t *hdr,
                  const unsigned char *error, size_t error_len);
static int make_room(core_t *c, model_t *m, int mi, peer_t *peer);

/* Try to dispatch one client message. 0: done (sent, queued or refused), -1: punt it
 * whole. */
static int accept_request(core_t *c, msgvec *v, double now) {
    int nenv = v->n >= 2 && msize(&v->m[1]) == 0 ? 2 : 1;
    if (v->n - nenv < 2) return -1;
    zmsg_t *proto = &v->m[nenv];
    if (msize(proto) != PROTOCOL_LEN || memcmp(mdata(proto), PROTOCOL, PROTOCOL_LEN)) return -1;
    route_t rt;
    zmsg_t *hdr = &v->m[nenv + 1];
    if (parse_header(mdata(hdr), msize(hdr), &rt)) return -1;
    int mi = find_model(c, rt.model, rt.model_len);
    if (mi < 0 || !c->models[mi].open) return -1;
    model_t *m = &c->models[mi];
    peer_t *peer = peer_get(&c->peers, mdata(&v->m[0]), msize(&v->m[0]));
    if (peer && peer->fd < 0) peer_learn_socket(peer, z_msg_get(hdr, Z_SRCFD));
    int verdict = peer_verdict(&c->peers, peer);
    if (verdict) { /* it holds more replies than it may: the frames go with the next recv */
        if (verdict == 1 && c->unread_error &&
            refuse(c, mi, v->m, nenv, peer, hdr, c->unread_error, c->unread_error_len))
            m->unread++;
        else c->unread_dropped++;
        return 0;
    }
    int wi = m->queued ? -1 : pick_worker(c, m);
    if (wi < 0 && m->queued >= m->max_queue && !make_room(c, m, mi, peer)) {
        if (!m->full_error) return -1; /* Python answers OVERLOADED */
        if (!refuse(c, mi, v->m, nenv, peer, hdr, m->full_error, m->full_error_len))
            c->dropped_replies++;
        m->refused++;
        return 0;
    }

    int idx = req_alloc(c);
    if (idx < 0) return -1;
    req_t *r = c->reqs[idx];
    if (peer) {
        r->peer = peer;
        peer->requests++;
    }
    uint64_t key = req_key(c, idx);
    double deadline = now + (rt.has_timeout ? (double)rt.timeout_ms / 1000.0 : m->timeout_s);
    if (wi < 0) { /* no credit anywhere: wait in line, every frame kept */
        if (vec_reserve(&r->env, nenv) || vec_reserve(&r->body, v->n - nenv - 1)) {
            req_release(c, idx);
            return -1;
        }
        for (int i = 0; i < nenv; i++) r->env.m[i] = v->m[i];
        r->env.n = nenv;
        for (int i = nenv + 1; i < v->n; i++) r->body.m[r->body.n++] = v->m[i];
        z_msg_close(proto);
        v->n = 0;
        r->model = mi;
        r->arrived = now;
        r->dispatched = now;
        r->deadline = deadline;
        r->whole = 1;
        enqueue(c, idx, 0);
        return 0;
    }
    /* the envelope stays with us; the body (header onwards) goes to the worker */
    msgvec body = {v->m + nenv + 1, v->n - nenv - 1, 0};
    int keep = m->retry ? body.n : 1;
    if (send_to_worker(c, wi, key, &body, keep)) {
        r->worker = -1;
        req_release(c, idx);
        punt_notice(c, PUNT_UNREACHABLE, wi);
        return -1; /* Python drops the worker, then re-routes this request */
    }
    if (vec_reserve(&r->env, nenv) || vec_reserve(&r->body, keep)) {
        /* out of memory after sending: the reply will be dropped; better than a crash */
        r->worker = wi;
        r->model = mi;
        c->workers[wi].load++;
        r->deadline = now;
        return 0;
    }
    for (int i = 0; i < nenv; i++) r->env.m[i] = v->m[i]; /* moved: zmq_msg_t relocates */
    r->env.n = nenv;
    for (int i = 0; i < keep; i++) r->body.m[i] = body.m[i];
    r->body.n = keep;
    r->whole = keep == body.n;
    /* the frames sent or moved above are no longer ours; close only the proto frame */
    z_msg_close(proto);
    v->n = 0;
    r->worker = wi;
    r->model = mi;
    r->attempts = 1;
    r->arrived = now;
    r->dispatched = now;
    r->deadline = deadline;
    c->workers[wi].load++;
    return 0;
}

static int drain_frontend(core_t *c, double now) {
    int handled = 0;
    for (; handled < DRAIN_BATCH; handled++) {
        int got = recv_message(c->frontend, &c->scratch);
        if (got <= 0) break;
        if (accept_request(c, &c->scratch, now)) punt(c, PUNT_FRONTEND, -1, &c->scratch);
    }
    return handled;
}

/* ---- the backend fast path ------------------------------------------------------- */
static int code_index(core_t *c, zmsg_t *m) {
    size_t n = msize(m);
    const unsigned char *s = mdata(m);
    for (int i = 0; i < c->ncodes; i++)
        if (c->codelen[i] == n && memcmp(c->codes[i], s, n) == 0) return i;
    return MAX_CODES;
}

static int bucket(core_t *c, double v) {
    int lo = 0, hi = c->nbounds; /* bisect_left: a value equal to a bound goes in its bucket */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (c->bounds[mid] < v) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static void observe(core_t *c, worker_t *w, int h, double v) {
    w->hist[h][bucket(c, v)]++;
    w->sums[h] += v;
}

/* timed: the reply carried the worker's wait and compute (else they count nowhere). */
static void record(core_t *c, worker_t *w, int code, double queue, double total, int timed,
                   double wait, double compute) {
    w->codes[code]++;
    observe(c, w, HIST_QUEUE, queue);
    observe(c, w, HIST_TOTAL, total);
    if (timed) {
        observe(c, w, HIST_WAIT, wait);
        observe(c, w, HIST_COMPUTE, compute);
    }
}

/* A msgpack unsigned integer of any width at p: its size in bytes, 0 if it is none. */
static size_t mp_uint(const unsigned char *p, size_t n, uint64_t *v) {
    if (n < 1) return 0;
    if (p[0] <= 0x7f) { *v = p[0]; return 1; }
    size_t w = p[0] == 0xcc ? 1 : p[0] == 0xcd ? 2 : p[0] == 0xce ? 4 : p[0] == 0xcf ? 8 : 0;
    if (!w || n < 1 + w) return 0;
    uint64_t x = 0;
    for (size_t i = 1; i <= w; i++) x = (x << 8) | p[i];
    *v = x;
    return 1 + w;
}

/* The fixstr key at p if it is key: its size, else 0. */
static size_t mp_key(const unsigned char *p, size_t n, const char *key, size_t len) {
    if (n < 1 + len || p[0] != (0xa0 | len) || memcmp(p + 1, key, len)) return 0;
    return 1 + len;
}

_Static_assert(REPLY_WAIT_KEY_LEN < 32 && REPLY_COMPUTE_KEY_LEN < 32, "fixstr keys");

/* The batch's compute time the worker put in a reply header, in seconds: 1 if it is
 * there, else 0. The worker writes wait_us and compute_us as the map's first two entries
 * (workers/codec.py), so they are found in its first 30 bytes without walking the rest; a
 * header laid out otherwise is simply untimed. The worker's wait_us is what it saw itself
 * after reading the request; the router's wait (complete) also covers the request's time
 * in the worker's socket and the hops, so it is not read here. */
static int reply_compute(zmsg_t *m, double *compute) {
    const unsigned char *p = mdata(m);
    size_t n = msize(m), off = 1, k;
    uint64_t w, cp;
    if (n < 1 || (p[0] & 0xf0) != 0x80 || (p[0] & 0x0f) < 2) return 0; /* a fixmap of 2+ */
    if (!(k = mp_key(p + off, n - off, REPLY_WAIT_KEY, REPLY_WAIT_KEY_LEN))) return 0;
    off += k;
    if (!(k = mp_uint(p + off, n - off, &w))) return 0;
    off += k;
    if (!(k = mp_key(p + off, n - off, REPLY_COMPUTE_KEY, REPLY_COMPUTE_KEY_LEN))) return 0;
    off += k;
    if (!mp_uint(p + off, n - off, &cp)) return 0;
    *compute = (double)cp * 1e-6;
    return 1;
}

/* Peer p is gone (ROUTER_MANDATORY says so when a reply cannot be routed): its queued
 * requests can never be answered, so they go now rather than take workers' time. */
static void peer_left(core_t *c, peer_t *p) {
    if (!p) return;
    for (flow_t *f = p->flows; f; f = f->next_of_peer) {
        uint64_t key;
        while (f->queued && (key = flow_take_newest(c, f))) {
            int idx;
            if (req_get(c, key, &idx)) {
                req_release(c, idx);
                c->gone_dropped++;
            }
        }
    }
}

/* The frontend closed connection fd (the door's monitor says so): the peers that came in
 * on it have left. A peer is matched by the socket's inode too, since the number may
 * already belong to a new connection by now. */
void fl_peer_closed(core_t *c, int fd) {
    for (int i = 0; i < c->peers.nbuckets; i++) {
        for (peer_t *p = c->peers.buckets[i]; p; p = p->next) {
            if (p->fd != fd) continue;
            struct stat st;
            if (fstat(fd, &st) == 0 && st.st_ino == p->ino && st.st_dev == p->dev) continue;
            p->fd = -1;
            peer_left(c, p);
        }
    }
}

static void complete(core_t *c, msgvec *v, double now) {
    /* wid, "R", key, status, reply header, *outputs */
    if (msize(&v->m[2]) != 8) { c->dropped_replies++; return; }
    const unsigned char *k = mdata(&v->m[2]);
    uint64_t key = 0;
    for (int i = 7; i >= 0; i--) key = (key << 8) | k[i];
    int idx;
    req_t *r = req_get(c, key, &idx);
    if (!r) { c->dropped_replies++; return; } /* answered and forgotten, or its worker dropped */
    if (r->worker >= 0 && c->workers[r->worker].used) {
        worker_t *w = &c->workers[r->worker];
        w->served++;
        if (!r->answered) {
            int code = code_index(c, &v->m[3]);
            /* The worker's side, split: its compute, and all the rest from dispatch to
             * this reply (the wait at the worker: its socket, its gather, the running
             * batch ahead, the hops). */
            double compute = 0, wait = 0;
            int timed = reply_compute(&v->m[4], &compute);
            if (timed) wait = now - r->dispatched > compute ? now - r->dispatched - compute : 0;
            record(c, w, code, r->dispatched - r->arrived, now - r->arrived, timed, wait, compute);
        }
    }
    if (r->answered) { /* the client already has its DEADLINE_EXCEEDED */
        c->dropped_replies++;
        int mi = r->model;
        req_release(c, idx);
        if (c->models[mi].queued) dispatch_queue(c, mi, now);
        return;
    }
    int64_t bytes = PROTOCOL_LEN + PEER_FRAME_COST * (r->env.n + 1 + v->n - 4);
    for (int i = 0; i < r->env.n; i++) bytes += (int64_t)msize(&r->env.m[i]);
    for (int i = 4; i < v->n; i++) bytes += (int64_t)msize(&v->m[i]);
    int ok = 1;
    for (int i = 0; i < r->env.n && ok; i++) {
        ok = send_copy(c->frontend, &r->env.m[i], Z_SNDMORE | Z_DONTWAIT) == 0;
        if (!ok && i == 0 && z_errno() == EHOSTUNREACH) peer_left(c, r->peer);
    }
    if (ok) ok = send_protocol_frame(c->frontend, r->peer, bytes, 0, Z_SNDMORE | Z_DONTWAIT) == 0;
    for (int i = 4; i < v->n && ok; i++) {
        int flags = (i + 1 < v->n ? Z_SNDMORE : 0) | Z_DONTWAIT;
        ok = z_msg_send(&v->m[i], c->frontend, flags) >= 0;
        if (ok) z_msg_init(&v->m[i]); /* sent: leave a closable empty message behind */
    }
    if (!ok) c->dropped_replies++; /* the client left; nobody to answer */
    int mi = r->model;
    req_release(c, idx);
    if (c->models[mi].queued) dispatch_queue(c, mi, now);
}

/* A worker's message [identity, kind, ...], from the backend socket or a lane. */
static void backend_message(core_t *c, msgvec *v, double now) {
    if (v->n >= 5 && msize(&v->m[1]) == KIND_REQUEST_LEN &&
        !memcmp(mdata(&v->m[1]), KIND_REQUEST, KIND_REQUEST_LEN))
        complete(c, v, now);
    else punt(c, PUNT_BACKEND, -1, v); /* events, and anything Python should judge */
}

static int drain_backend(core_t *c, double now) {
    int handled = 0;
    for (; handled < DRAIN_BATCH; handled++) {
        int got = recv_message(c->backend, &c->scratch);
        if (got <= 0) break;
        backend_message(c, &c->scratch, now);
    }
    return handled;
}

/* ---- the lane ------------------------------------------------------------------------ */
/* A request through the backend socket is handed from thread to thread: our libzmq I/O
 * thread, the worker's I/O thread, the worker's loop; the reply the same way back. On a
 * virtual machine each wake-up costs tens of microseconds, so a small request spends
 * more time being handed over than being computed. The lane is a unix SOCK_SEQPACKET
 * connection from each worker to us: one sendmsg(2) here wakes the worker's loop itself,
 * and its reply wakes this loop. Everything else (events, control, messages over
 * LANE_MAX_BYTES, and whatever finds the lane's socket buffer full) stays on the backend
 * socket, and a reply may come either way.
 *
 * Datagram: u32 frame count, u32 length of each frame, then the frames back to back, all
 * little-endian. The worker connects to lane_listen and sends its identity as its first
 * datagram (its hello); until then the connection is "pending". */
static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void lane_close(core_t *c, worker_t *w) {
    if (w->lane < 0) return;
    close(w->lane);
    w->lane = -1;
    c->items_dirty = 1;
}

/* 0: sent whole. -1: not sent (too big, socket buffer full, or the lane broke). */
static int lane_send(core_t *c, worker_t *w, const unsigned char *key, msgvec *body) {
    int n = 2 + body->n;
    if (n > LANE_MAX_FRAMES) return -1;
    unsigned char head[LANE_WORD * (1 + LANE_MAX_FRAMES)];
    struct iovec iov[1 + LANE_MAX_FRAMES];
    size_t total = LANE_WORD * (size_t)(1 + n) + KIND_REQUEST_LEN + 8;
    put_le32(head, (uint32_t)n);
    put_le32(head + 4, KIND_REQUEST_LEN);
    put_le32(head + 2 * LANE_WORD, 8);
    iov[0] = (struct iovec){head, LANE_WORD * (size_t)(1 + n)};
    iov[1] = (struct iovec){(void *)KIND_REQUEST, KIND_REQUEST_LEN};
    iov[2] = (struct iovec){(void *)key, 8};
    for (int i = 0; i < body->n; i++) {
        size_t len = msize(&body->m[i]);
        total += len;
        if (total > LANE_MAX_BYTES) return -1;
        put_le32(head + LANE_WORD * (3 + i), (uint32_t)len);
        iov[3 + i] = (struct iovec){mdata(&body->m[i]), len};
    }
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov;
    mh.msg_iovlen = (size_t)(1 + n);
    ssize_t sent;
    do sent = sendmsg(w->lane, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (sent < 0 && errno == EINTR);
    if (sent == (ssize_t)total) {
        c->lane_sent++;
        return 0;
    }
    if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)) return -1;
    lane_close(c, w); /* the worker is gone or broke the protocol: backend socket only */
    return -1;
}

/* A datagram from worker w as a backend message [w's identity, frames...] in v.
 * 0: done; -1: malformed (only a broken worker sends that). */
static int lane_unpack(worker_t *w, const unsigned char *p, size_t n, msgvec *v) {
    vec_close(v);
    if (n < LANE_WORD) return -1;
    uint32_t count = get_le32(p);
    if (count == 0 || count > LANE_MAX_FRAMES || n < LANE_WORD * (1 + (size_t)count)) return -1;
    size_t off = LANE_WORD * (1 + (size_t)count);
    if (vec_reserve(v, (int)count + 1)) return -1;
    if (z_msg_init_size(&v->m[0], w->idlen)) return -1;
    memcpy(mdata(&v->m[0]), w->id, w->idlen);
    v->n = 1;
    for (uint32_t i = 0; i < count; i++) {
        size_t len = get_le32(p + LANE_WORD * (1 + (size_t)i));
        if (len > n - off) return -1;
        if (z_msg_init_size(&v->m[v->n], len)) return -1;
        if (len) memcpy(mdata(&v->m[v->n]), p + off, len);
        v->n++;
        off += len;
    }
    return off == n ? 0 : -1;
}

/* Every datagram waiting on worker wi's lane; a reply is completed as one from the
 * backend socket would be, anything else punted the same way. */
static int lane_read(core_t *c, int wi, double now) {
    int handled = 0;
    if (!c->lane_buf && !(c->lane_buf = malloc(LANE_MAX_BYTES))) return 0;
    for (; handled < DRAIN_BATCH; handled++) {
        worker_t *w = &c->workers[wi];
        if (w->lane < 0) break;
        /* MSG_TRUNC: the datagram's real length, so an oversized one is caught */
        ssize_t n = recv(w->lane, c->lane_buf, LANE_MAX_BYTES, MSG_DONTWAIT | MSG_TRUNC);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n <= 0 || n > LANE_MAX_BYTES || lane_unpack(w, c->lane_buf, (size_t)n, &c->scratch)) {
            lane_close(c, w); /* closed (the worker exited) or broken: backend socket only */
            break;
        }
        c->lane_received++;
        backend_message(c, &c->scratch, now);
    }
    return handled;
}

static void lane_accept(core_t *c) {
    for (;;) {
        int fd = accept4(c->lane_listen, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return; /* EAGAIN: no more; anything else: try again on the next wake-up */
        }
        if (c->npending == LANE_PENDING_MAX) {
            close(fd); /* that worker keeps using the backend socket */
            continue;
        }
        c->pending[c->npending++] = fd;
        c->items_dirty = 1;
    }
}

/* Pending connection i: its hello names a worker we know without a lane, or it goes. */
static void lane_hello(core_t *c, int i) {
    int fd = c->pending[i];
    unsigned char id[MAX_IDENTITY + 1];
    ssize_t n = recv(fd, id, sizeof id, MSG_DONTWAIT | MSG_TRUNC);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    c->pending[i] = c->pending[--c->npending];
    c->items_dirty = 1;
    if (n > 0 && n <= MAX_IDENTITY) {
        for (int wi = 0; wi < c->nworkers; wi++) {
            worker_t *w = &c->workers[wi];
            if (w->used && w->lane < 0 && w->idlen == (size_t)n && !memcmp(w->id, id, (size_t)n)) {
                w->lane = fd;
                return;
            }
        }
    }
    close(fd);
}

/* Take over a listening SOCK_SEQPACKET socket (non-blocking). */
void fl_lane_listen(core_t *c, int fd) {
    if (c->lane_listen >= 0) close(c->lane_listen);
    c->lane_listen = fd;
    c->items_dirty = 1;
}

int fl_worker_lane(core_t *c, int idx) { return c->workers[idx].lane >= 0; }
uint64_t fl_lane_sent(core_t *c) { return c->lane_sent; }
uint64_t fl_lane_received(core_t *c) { return c->lane_received; }

/* The poll set: frontend, backend, the caller's extra items, then the lane's sockets. */
static int build_items(core_t *c, zpoll_t *extra, int nextra) {
    int need = 2 + nextra + (c->lane_listen >= 0) + c->npending;
    for (int i = 0; i < c->nworkers; i++) need += c->workers[i].used && c->workers[i].lane >= 0;
    if (need > c->items_cap) {
        zpoll_t *items = realloc(c->items, (size_t)need * sizeof(zpoll_t));
        if (!items) return -1;
        c->items = items;
        int *who = realloc(c->item_worker, (size_t)need * sizeof(int));
        if (!who) return -1;
        c->item_worker = who;
        c->items_cap = need;
    }
    int n = 0;
    c->items[n++] = (zpoll_t){c->frontend, 0, Z_POLLIN, 0};
    c->items[n++] = (zpoll_t){c->backend, 0, Z_POLLIN, 0};
    for (int i = 0; i < nextra; i++) c->items[n++] = extra[i];
    if (c->lane_listen >= 0) {
        c->item_worker[n] = ITEM_LISTENER;
        c->items[n++] = (zpoll_t){NULL, c->lane_listen, Z_POLLIN, 0};
    }
    for (int i = 0; i < c->npending; i++) {
        c->item_worker[n] = ITEM_PENDING;
        c->items[n++] = (zpoll_t){NULL, c->pending[i], Z_POLLIN, 0};
    }
    for (int i = 0; i < c->nworkers; i++) {
        if (!c->workers[i].used || c->workers[i].lane < 0) continue;
        c->item_worker[n] = i;
        c->items[n++] = (zpoll_t){NULL, c->workers[i].lane, Z_POLLIN, 0};
    }
    c->nitems = n;
    c->items_dirty = 0;
    return 0;
}

/* Serve what the lane's sockets had ready (their items follow the first lane_from). */
static int serve_lanes(core_t *c, int lane_from, double now) {
    int handled = 0, hellos = 0;
    for (int i = lane_from; i < c->nitems; i++) {
        if (!c->items[i].revents) continue;
        int who = c->item_worker[i];
        if (who >= 0) handled += lane_read(c, who, now);
        else hellos = 1; /* a hello, or a new connection whose hello is likely there */
        if (who == ITEM_LISTENER) lane_accept(c);
    }
    /* hellos after the loop: answering one reorders the pending list */
    for (int i = c->npending - 1; hellos && i >= 0; i--) lane_hello(c, i);
    return handled;
}

/* ---- the loop ----------------------------------------------------------------------- */
/* Serve until Python has something to do: punted messages, an extra item readable,
 * credit freed for a model with a queue, or timeout_ms elapsed. While traffic flows,
 * keep polling without sleeping for spin_us: a sleeping thread takes tens of
 * microseconds to wake, which is most of a small request's round trip. */
int fl_run(core_t *c, zpoll_t *extra, int nextra, long timeout_ms, long spin_us) {
    c->items_dirty = 1; /* the caller's items may have changed since the last call */
    double start = now_s(), deadline = start + (double)timeout_ms / 1000.0;
    double busy_until = 0.0;
    for (;;) {
        if (c->items_dirty && build_items(c, extra, nextra)) return RUN_ERROR;
        zpoll_t *items = c->items;
        int lane_from = 2 + nextra;
        double now = now_s();
        long wait;
        if (now < busy_until) wait = 0;
        else {
            wait = (long)((deadline - now) * 1000.0 + 0.999);
            if (wait < 0) wait = 0;
        }
        for (int i = 0; i < c->nitems; i++) items[i].revents = 0;
        int rc = z_poll(items, c->nitems, wait);
        if (rc < 0) return z_errno() == EINTR ? RUN_EINTR : RUN_ERROR;
        int flags = 0, handled = 0;
        now = now_s();
        for (int i = 0; i < nextra; i++) {
            extra[i].revents = items[2 + i].revents;
            if (items[2 + i].revents) flags |= RUN_EXTRA;
        }
        if (c->nitems > lane_from) handled += serve_lanes(c, lane_from, now);
        if (items[1].revents & Z_POLLIN) handled += drain_backend(c, now);
        if (items[0].revents & Z_POLLIN) handled += drain_frontend(c, now);
        if (c->npunts) flags |= RUN_PUNTS;
        if (c->expired) {
            c->expired = 0;
            flags |= RUN_EXPIRED;
        }
        if (flags) return flags;
        if (handled) busy_until = now + (double)spin_us * 1e-6;
        else if (now >= deadline) return RUN_TIMEOUT;
    }
}

/* ---- Python's half of a request's life ------------------------------------------------ */
/* Queue a request Python holds (a header only Python could judge) at the back, or a
 * retried one at the front; fl_kick sends it. Frames are copied. Returns the key. */
int64_t fl_enqueue(core_t *c, int midx, const unsigned char **env, const size_t *envlen,
                   int nenv, const unsigned char **body, const size_t *bodylen, int nbody,
                   double arrived, double deadline, int attempts, int front) {
    int idx = req_alloc(c);
    if (idx < 0) return -1;
    req_t *r = c->reqs[idx];
    if (vec_reserve(&r->body, nbody) || vec_reserve(&r->env, nenv)) goto fail;
    for (; r->body.n < nbody; r->body.n++) {
        if (z_msg_init_size(&r->body.m[r->body.n], bodylen[r->body.n])) goto fail;
        if (bodylen[r->body.n]) memcpy(z_msg_data(&r->body.m[r->body.n]), body[r->body.n], bodylen[r->body.n]);
    }
    for (; r->env.n < nenv; r->env.n++) {
        if (z_msg_init_size(&r->env.m[r->env.n], envlen[r->env.n])) goto fail;
        if (envlen[r->env.n]) memcpy(z_msg_data(&r->env.m[r->env.n]), env[r->env.n], envlen[r->env.n]);
    }
    if (r->env.n) req_set_peer(c, idx, &r->env.m[0]);
    r->model = midx;
    r->attempts = attempts;
    r->arrived = arrived;
    r->dispatched = arrived;
    r->deadline = deadline;
    r->whole = 1;
    enqueue(c, idx, front);
    return (int64_t)req_key(c, idx);
fail:
    req_release(c, idx);
    return -1;
}

/* A worker is leaving: requeue (at the front, oldest first) what may be retried; return
 * the keys of the rest, which Python answers WORKER_LOST and forgets. Answered requests
 * (their client has a DEADLINE_EXCEEDED already) are simply dropped. */
int fl_worker_drop(core_t *c, int widx, uint64_t *lost, int max) {
    int n = 0, nretry = 0;
    int *retry = malloc((size_t)(c->nreqs ? c->nreqs : 1) * sizeof(int));
    for (int i = 0; i < c->nreqs; i++) {
        req_t *r = c->reqs[i];
        if (!r->live || r->queued || r->worker != widx) continue;
        model_t *m = &c->models[r->model];
        if (r->answered) {
            req_release(c, i);
        } else if (retry && m->retry && r->whole && r->attempts < 2) {
            retry[nretry++] = i;
        } else if (n < max) {
            lost[n++] = req_key(c, i);
        }
    }
    /* newest first onto the front, so the oldest ends up first in line */
    for (int a = 1; a < nretry; a++) { /* insertion sort by arrival; few requests */
        int v = retry[a], b = a - 1;
        while (b >= 0 && c->reqs[retry[b]]->arrived > c->reqs[v]->arrived) {
            retry[b + 1] = retry[b];
            b--;
        }
        retry[b + 1] = v;
    }
    for (int k = nretry - 1; k >= 0; k--) enqueue(c, retry[k], 1);
    free(retry);
    c->workers[widx].load = 0;
    return n;
}

static void info_fill(req_t *r, req_info_t *out) {
    out->worker = r->worker;
    out->model = r->model;
    out->attempts = r->attempts;
    out->answered = r->answered;
    out->whole = r->whole;
    out->queued = r->queued;
    out->delivered = UNDELIVERED;
    out->arrived = r->arrived;
    out->dispatched = r->dispatched;
    out->deadline = r->deadline;
}

int fl_info(core_t *c, uint64_t key, req_info_t *out) {
    req_t *r = req_get(c, key, NULL);
    if (!r) return -1;
    info_fill(r, out);
    return 0;
}

/* ---- error replies for the requests C holds ----------------------------------------- */
/* msgpack heads, the shortest form, as msgpack-python writes them. */
static size_t put_str_head(unsigned char *p, size_t n) {
    if (n < 32) { p[0] = (unsigned char)(0xa0 | n); return 1; }
    if (n < 256) { p[0] = 0xd9; p[1] = (unsigned char)n; return 2; }
    p[0] = 0xda; p[1] = (unsigned char)(n >> 8); p[2] = (unsigned char)n; return 3;
}

static size_t put_str(unsigned char *p, const void *s, size_t n) {
    size_t h = put_str_head(p, n);
    if (n) memcpy(p + h, s, n);
    return h + n;
}

/* The reply header protocol.error_header() would write for a request of model mi whose
 * header is hdr, held by worker wi (-1: none): the map {ok: false, model, version,
 * error: <the template>, id (when the request had one)}, keys in that order. The id is
 * copied as the client encoded it. 0: done, -1: no memory. */
static int compose_error_for(core_t *c, int mi, int wi, zmsg_t *hdr, const unsigned char *error,
                             size_t error_len, zmsg_t *out) {
    const unsigned char *model = NULL, *version = NULL;
    size_t model_len = 0, version_len = 0;
    if (mi >= 0 && mi < c->nmodels && c->models[mi].used) {
        model = (const unsigned char *)c->models[mi].name;
        model_len = c->models[mi].namelen;
    }
    if (wi >= 0 && wi < c->nworkers && c->workers[wi].used) {
        version = (const unsigned char *)c->workers[wi].version;
        version_len = c->workers[wi].versionlen;
    }
    route_t rt;
    int has_id = hdr && !parse_header(mdata(hdr), msize(hdr), &rt) && rt.id != NULL;
    /* map head, 4 keys of at most 8 bytes, two strings of at most 3 + 255 bytes */
    size_t cap = 1 + 4 * 8 + 1 + 2 * (3 + 255) + error_len + (has_id ? 3 + rt.id_len : 0);
    if (z_msg_init_size(out, cap)) return -1;
    unsigned char *p = mdata(out), *start = p;
    *p++ = has_id ? 0x85 : 0x84;
    p += put_str(p, "ok", 2);
    *p++ = 0xc2; /* false */
    p += put_str(p, "model", 5);
    p += put_str(p, model, model_len);
    p += put_str(p, "version", 7);
    p += put_str(p, version, version_len);
    p += put_str(p, "error", 5);
    memcpy(p, error, error_len);
    p += error_len;
    if (has_id) {
        p += put_str(p, "id", 2);
        memcpy(p, rt.id, rt.id_len);
        p += rt.id_len;
    }
    /* zmq cannot shrink a message in place: copy into one of the exact size */
    zmsg_t exact;
    size_t n = (size_t)(p - start);
    if (z_msg_init_size(&exact, n)) { z_msg_close(out); return -1; }
    memcpy(mdata(&exact), start, n);
    z_msg_close(out);
    *out = exact;
    return 0;
}

/* ... for request r (the kept header is its first body frame). */
static int compose_error(core_t *c, req_t *r, const unsigned char *error, size_t error_len,
                         zmsg_t *out) {
    return compose_error_for(c, r->model, r->worker, r->body.n ? &r->body.m[0] : NULL, error,
                             error_len, out);
}

/* Send [envelope, protocol, header] to a client; the header is zmq's once sent, else
 * closed here. 1: delivered. */
static int send_error_reply(core_t *c, zmsg_t *env, int nenv, peer_t *peer, zmsg_t *header,
                            int refusal) {
    int64_t bytes = PROTOCOL_LEN + (int64_t)msize(header) + PEER_FRAME_COST * (nenv + 2);
    for (int j = 0; j < nenv; j++) bytes += (int64_t)msize(&env[j]);
    int ok = 1;
    for (int j = 0; j < nenv && ok; j++)
        ok = send_copy(c->frontend, &env[j], Z_SNDMORE | Z_DONTWAIT) == 0;
    if (ok) ok = send_protocol_frame(c->frontend, peer, bytes, refusal, Z_SNDMORE | Z_DONTWAIT) == 0;
    if (ok) ok = z_msg_send(header, c->frontend, Z_DONTWAIT) >= 0; /* sent: zmq owns it */
    if (!ok) z_msg_close(header);
    return ok;
}

/* Answer a request we did not take (its frames: the envelope env, its header hdr) with
 * an error template. 1: delivered. */
static int refuse(core_t *c, int mi, zmsg_t *env, int nenv, peer_t *peer, zmsg_t *hdr,
                  const unsigned char *error, size_t error_len) {
    zmsg_t header;
    if (compose_error_for(c, mi, -1, hdr, error, error_len, &header)) return 0;
    return send_error_reply(c, env, nenv, peer, &header, error == c->unread_error);
}

/* A request taken out of the queue is not served after all: its client holds more
 * unread replies than it may. Answered OVERLOADED (or not at all, if it reads nothing),
 * and released. */
static void refuse_queued(core_t *c, model_t *m, int idx) {
    req_t *r = c->reqs[idx];
    zmsg_t header;
    if (peer_verdict(&c->peers, r->peer) == 1 && c->unread_error &&
        compose_error(c, r, c->unread_error, c->unread_error_len, &header) == 0 &&
        send_error_reply(c, r->env.m, r->env.n, r->peer, &header, 1))
        m->unread++;
    else c->unread_dropped++;
    req_release(c, idx);
}

/* Model mi's queue is full and peer wants in. Fair share: if another peer holds at
 * least two more of the queue than this one, its newest request is answered OVERLOADED
 * and gives up its place (1); otherwise this one is refused (0). So a flood from one
 * connection fills the queue only until others come, and never pushes them out. */
static int make_room(core_t *c, model_t *m, int mi, peer_t *peer) {
    flow_t *mine = peer ? flow_of(peer, mi, 0) : NULL;
    int have = mine ? mine->queued : 0;
    flow_t *top = top_flow(m);
    if (!top || top == mine || top->queued < have + 2 || !m->full_error) return 0;
    uint64_t key = flow_take_newest(c, top);
    int idx;
    req_t *r = key ? req_get(c, key, &idx) : NULL;
    if (!r) return 0;
    zmsg_t header;
    int ok = compose_error(c, r, m->full_error, m->full_error_len, &header) == 0 &&
             send_error_reply(c, r->env.m, r->env.n, r->peer, &header, 0);
    if (!ok) c->dropped_replies++;
    m->evicted++;
    req_release(c, idx);
    return 1;
}

/* Answer each request in keys with an error, composed from `error` (the packed
 * {"code", "message"} map Python hands over once for the whole batch), and forget it
 * when `forget` is set; otherwise it stays in flight, marked answered (its worker may
 * still reply: that reply is dropped). infos[i] says what request i was, and whether its
 * client got the answer (delivered). One call, whatever the number of requests: Python
 * no longer reads a request's frames back to learn its id. Returns how many answers
 * could not be delivered. */
int fl_fail(core_t *c, const uint64_t *keys, int n, const unsigned char *error, size_t error_len,
            int forget, req_info_t *infos) {
    int undelivered = 0;
    for (int i = 0; i < n; i++) {
        int idx;
        req_t *r = req_get(c, keys[i], &idx);
        if (!r) {
            memset(&infos[i], 0, sizeof infos[i]);
            infos[i].worker = infos[i].model = -1;
            infos[i].delivered = NO_SUCH_REQUEST;
            continue;
        }
        info_fill(r, &infos[i]);
        r->answered = 1;
        zmsg_t header;
        int ok = compose_error(c, r, error, error_len, &header) == 0 &&
                 send_error_reply(c, r->env.m, r->env.n, r->peer, &header, 0);
        if (!ok) undelivered++;
        infos[i].delivered = ok ? DELIVERED : UNDELIVERED;
        if (forget) req_release(c, idx);
    }
    return undelivered;
}

int fl_forget(core_t *c, uint64_t key) {
    int idx;
    if (!req_get(c, key, &idx)) return -1;
    req_release(c, idx);
    return 0;
}

/* Requests past their deadline, in three lists: unanswered ones that never reached a
 * worker (queued), unanswered ones a worker holds (held), and answered ones whose worker
 * stayed silent past deadline + grace (overdue). Python answers the first two with
 * DEADLINE_EXCEEDED, and treats the workers of the third as hung. */
int fl_sweep(core_t *c, double now, double grace, uint64_t *queued, int *nqueued,
             uint64_t *held, int *nheld, uint64_t *overdue, int max) {
    int nq = 0, nh = 0, no = 0;
    for (int i = 0; i < c->nreqs; i++) {
        req_t *r = c->reqs[i];
        if (!r->live || r->deadline > now) continue;
        if (!r->answered) {
            if (r->worker < 0) {
                if (nq < max) queued[nq++] = req_key(c, i);
            } else if (nh < max) {
                held[nh++] = req_key(c, i);
            }
        } else if (r->deadline + grace <= now && no < max) {
            overdue[no++] = req_key(c, i);
        }
    }
    *nqueued = nq;
    *nheld = nh;
    return no;
}

/* For tests: run the header check alone. 0: routable (model at p + *model_off). */
int fl_check_header(const unsigned char *p, size_t n, size_t *model_off, size_t *model_len,
                    uint64_t *timeout_ms) {
    route_t rt;
    if (parse_header(p, n, &rt)) return -1;
    *model_off = (size_t)(rt.model - p);
    *model_len = rt.model_len;
    *timeout_ms = rt.has_timeout ? rt.timeout_ms : 0;
    return 0;
}

/* ---- bounds on what clients may hold ----------------------------------------------- */
static int set_blob(unsigned char **dst, size_t *dst_len, const unsigned char *src, size_t n) {
    unsigned char *b = n ? malloc(n) : NULL;
    if (n && !b) return -1;
    if (n) memcpy(b, src, n);
    free(*dst);
    *dst = b;
    *dst_len = n;
    return 0;
}

/* The reply bytes a client connection may leave unread, and all of them together
 * (0: no bound), and the packed error map a refused request is answered with. */
int fl_set_reply_limits(core_t *c, int64_t per_peer, int64_t total, const unsigned char *error,
                        size_t error_len) {
    c->peers.cap = per_peer;
    c->peers.total_cap = total;
    return set_blob(&c->unread_error, &c->unread_error_len, error, error_len);
}

/* The packed error map for OVERLOADED when model mi's queue is full (NULL: Python answers). */
int fl_model_set_full_error(core_t *c, int mi, const unsigned char *error, size_t error_len) {
    model_t *m = &c->models[mi];
    return set_blob(&m->full_error, &m->full_error_len, error, error_len);
}

/* Requests of model mi we answered OVERLOADED since the last call: out[0] the queue was
 * full, out[1] given up for another peer's, out[2] their peer held too many replies. */
void fl_model_rejections(core_t *c, int mi, uint64_t *out) {
    model_t *m = &c->models[mi];
    out[0] = m->refused;
    out[1] = m->evicted;
    out[2] = m->unread;
    m->refused = m->evicted = m->unread = 0;
}

/* Forget peers that hold nothing, then describe the rest: out[0] peers, out[1] reply
 * bytes libzmq holds for them, out[2] the most one peer holds, out[3] peers past their
 * cap, out[4] requests dropped unanswered (their peer reads nothing), out[5] queued
 * requests dropped because their peer left. The last two count from the start. */
void fl_peer_stats(core_t *c, int64_t *out) {
    peers_gc(&c->peers);
    int64_t most = 0, over = 0;
    for (int i = 0; i < c->peers.nbuckets; i++) {
        for (peer_t *p = c->peers.buckets[i]; p; p = p->next) {
            int64_t held = peer_held(p);
            if (held > most) most = held;
            if (c->peers.cap > 0 && held > c->peers.cap) over++;
        }
    }
    out[0] = c->peers.count;
    out[1] = atomic_load_explicit(&c->peers.acct->held, memory_order_relaxed);
    out[2] = most;
    out[3] = over;
    out[4] = (int64_t)c->unread_dropped;
    out[5] = (int64_t)c->gone_dropped;
}

/* Give the allocator's free pages back to the kernel, in every arena (libzmq's I/O
 * threads allocate in arenas of their own). glibc returns only the top of a heap by
 * itself; the buffers of replies, requests and connections that come and go leave free
 * memory between live blocks that it keeps: in the soak poold's RSS grew by a few MiB a
 * minute with the memory in use flat (mallinfo2: 15-24 MiB in use, ~30 MiB free and
 * kept). 1: some memory was released. */
int fl_trim(void) { return malloc_trim(0); }
