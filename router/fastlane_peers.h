/*
 * fastlane_peers.h: the frontend's peers (client connections) for router/fastlane.c,
 * which includes it once, after its libzmq bindings. Not a header of its own API.
 *
 * Why: libzmq holds a reply for a client that does not read in that connection's pipe,
 * bounded only by SNDHWM, which counts messages whatever their size (issue 17: one
 * DEALER that never read cost +550 MB). libzmq says nothing of how many bytes a pipe
 * holds, so we count them ourselves: every reply we send carries its protocol frame as
 * a zmq_msg_init_data message with a free function (a "marker"); libzmq calls it when
 * its engine has taken that reply for the wire, or when it drops the pipe because the
 * peer left. Bytes are added when the reply is sent and taken off in the free function,
 * so a peer's count is what libzmq still holds for it (give or take the one reply the
 * engine is writing). The free function runs on a libzmq I/O thread: the counters are
 * atomics, everything else belongs to the loop's thread.
 *
 * A peer also owns its flows: its requests waiting in one model's queue, which the
 * model serves round-robin between peers (see "queues" in fastlane.c).
 */
#include <stdatomic.h>

/* What a reply costs libzmq beyond its bytes: a zmq_msg_t per frame in the pipe. */
#define PEER_FRAME_COST 64
/* Past its cap a peer's requests are refused with a small error reply; those replies
 * count too, and once they add up to this much more the peer is simply not answered:
 * it is not reading them anyway. */
#define PEER_REFUSAL_SLACK (1 << 20)

typedef struct {
    _Atomic int64_t held;    /* reply bytes held by libzmq for all peers */
    _Atomic int64_t markers; /* markers libzmq has not released yet */
} peer_acct_t;

typedef struct flow flow_t;
typedef struct peer peer_t;

/* A ring of request keys, oldest first (the queues in fastlane.c). */
typedef struct {
    uint64_t *q;
    int head, count, cap;
} ring_t;

struct flow {
    int model;
    peer_t *peer;
    ring_t ring; /* request keys; stale ones (left some other way) skipped when reached */
    int queued;  /* live keys in ring */
    int linked; /* in the model's round-robin (exactly while queued > 0) */
    flow_t *prev, *next;  /* the model's round-robin, a circular list */
    flow_t *next_of_peer; /* the peer's flows, one per model it has queued for */
};

struct peer {
    _Atomic int64_t held;    /* reply bytes libzmq holds for this peer */
    _Atomic int64_t markers; /* its replies whose marker libzmq has not released */
    _Atomic int64_t refusals; /* of held, the bytes of our refusals (OVERLOADED) */
    peer_acct_t *acct;
    peer_t *next; /* hash chain */
    uint64_t hash;
    int requests; /* accepted and not yet released (queued or at a worker) */
    int fd;         /* the connection's descriptor (-1: unknown), and its socket's */
    ino_t ino;      /* identity: the number may be reused once it is closed */
    dev_t dev;
    flow_t *flows;
    size_t idlen;
    unsigned char id[MAX_IDENTITY];
};

typedef struct {
    peer_t **buckets;
    int nbuckets, count;
    peer_acct_t *acct;
    int64_t cap, total_cap; /* bytes; 0: no bound */
} peers_t;

typedef struct {
    unsigned char proto[PROTOCOL_LEN]; /* the frame's bytes: libzmq points into here */
    peer_t *peer;
    int64_t bytes;
    int refusal; /* a refusal: counted in the peer's refusals too */
} marker_t;

static uint64_t peer_hash(const unsigned char *id, size_t n) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ id[i]) * 1099511628211ull;
    return h;
}

static int peers_init(peers_t *ps) {
    ps->acct = calloc(1, sizeof(peer_acct_t));
    ps->nbuckets = 64;
    ps->buckets = calloc((size_t)ps->nbuckets, sizeof(peer_t *));
    return ps->acct && ps->buckets ? 0 : -1;
}

static void peers_grow(peers_t *ps) {
    int n = ps->nbuckets * 2;
    peer_t **b = calloc((size_t)n, sizeof(peer_t *));
    if (!b) return; /* longer chains, still correct */
    for (int i = 0; i < ps->nbuckets; i++) {
        for (peer_t *p = ps->buckets[i], *next; p; p = next) {
            next = p->next;
            p->next = b[p->hash & (uint64_t)(n - 1)];
            b[p->hash & (uint64_t)(n - 1)] = p;
        }
    }
    free(ps->buckets);
    ps->buckets = b;
    ps->nbuckets = n;
}

/* The peer with this routing id; created when absent (NULL only without memory). */
static peer_t *peer_get(peers_t *ps, const unsigned char *id, size_t n) {
    if (n == 0 || n > MAX_IDENTITY || !ps->buckets) return NULL;
    uint64_t h = peer_hash(id, n);
    for (peer_t *p = ps->buckets[h & (uint64_t)(ps->nbuckets - 1)]; p; p = p->next)
        if (p->hash == h && p->idlen == n && !memcmp(p->id, id, n)) return p;
    if (ps->count >= 2 * ps->nbuckets) peers_grow(ps);
    peer_t *p = calloc(1, sizeof(peer_t));
    if (!p) return NULL;
    p->acct = ps->acct;
    p->fd = -1;
    p->hash = h;
    p->idlen = n;
    memcpy(p->id, id, n);
    int b = (int)(h & (uint64_t)(ps->nbuckets - 1));
    p->next = ps->buckets[b];
    ps->buckets[b] = p;
    ps->count++;
    return p;
}

/* Remember which connection a peer's messages come in on (fd from ZMQ_SRCFD). */
static void peer_learn_socket(peer_t *p, int fd) {
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) return;
    p->fd = fd;
    p->ino = st.st_ino;
    p->dev = st.st_dev;
}

static int64_t peer_held(peer_t *p) { return atomic_load_explicit(&p->held, memory_order_relaxed); }

static void peer_free(peer_t *p) {
    for (flow_t *f = p->flows, *next; f; f = next) {
        next = f->next_of_peer;
        free(f->ring.q);
        free(f);
    }
    free(p);
}

/* Forget peers that hold nothing: no request and no reply in libzmq. Their flows are all
 * empty (a queued request counts among requests). The acquire pairs with the release in
 * marker_free: a marker's last touch of its peer is that decrement. */
static int peers_gc(peers_t *ps) {
    int freed = 0;
    for (int i = 0; i < ps->nbuckets; i++) {
        peer_t **link = &ps->buckets[i];
        while (*link) {
            peer_t *p = *link;
            if (p->requests == 0 && atomic_load_explicit(&p->markers, memory_order_acquire) == 0) {
                *link = p->next;
                peer_free(p);
                ps->count--;
                freed++;
            } else {
                link = &p->next;
            }
        }
    }
    return freed;
}

/* At the core's end. A peer libzmq still holds replies for (the frontend is closed after
 * the core) is left allocated, with the counters, for its markers to find. */
static void peers_free(peers_t *ps) {
    int kept = 0;
    for (int i = 0; i < ps->nbuckets; i++) {
        for (peer_t *p = ps->buckets[i], *next; p; p = next) {
            next = p->next;
            if (atomic_load_explicit(&p->markers, memory_order_acquire) == 0) peer_free(p);
            else kept++;
        }
    }
    if (!kept && ps->acct && atomic_load_explicit(&ps->acct->markers, memory_order_acquire) == 0)
        free(ps->acct);
    free(ps->buckets);
    ps->buckets = NULL;
}

/* libzmq's free function for a marker, on whichever thread closes the message. */
static void marker_free(void *data, void *hint) {
    (void)data;
    marker_t *mk = hint;
    peer_t *p = mk->peer;
    peer_acct_t *a = p->acct;
    int64_t n = mk->bytes;
    if (mk->refusal) atomic_fetch_sub_explicit(&p->refusals, n, memory_order_relaxed);
    free(mk);
    atomic_fetch_sub_explicit(&a->held, n, memory_order_relaxed);
    atomic_fetch_sub_explicit(&a->markers, 1, memory_order_relaxed);
    atomic_fetch_sub_explicit(&p->held, n, memory_order_relaxed);
    atomic_fetch_sub_explicit(&p->markers, 1, memory_order_release); /* the last touch */
}

/* Send the protocol frame of a reply of `bytes` to peer p (NULL: unknown, uncounted);
 * `refusal`: the reply refuses a request because p holds too many. */
static int send_protocol_frame(void *sock, peer_t *p, int64_t bytes, int refusal, int flags) {
    marker_t *mk = p ? malloc(sizeof(marker_t)) : NULL;
    if (!mk) return send_bytes(sock, PROTOCOL, PROTOCOL_LEN, flags);
    memcpy(mk->proto, PROTOCOL, PROTOCOL_LEN);
    mk->peer = p;
    mk->bytes = bytes;
    mk->refusal = refusal;
    if (refusal) atomic_fetch_add_explicit(&p->refusals, bytes, memory_order_relaxed);
    /* counted before the send: the free function may run at once on another thread */
    atomic_fetch_add_explicit(&p->markers, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->held, bytes, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->acct->markers, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&p->acct->held, bytes, memory_order_relaxed);
    zmsg_t m;
    if (z_msg_init_data(&m, mk->proto, PROTOCOL_LEN, marker_free, mk)) {
        marker_free(mk->proto, mk);
        return send_bytes(sock, PROTOCOL, PROTOCOL_LEN, flags);
    }
    if (z_msg_send(&m, sock, flags) < 0) {
        z_msg_close(&m); /* calls marker_free */
        return -1;
    }
    return 0;
}

/* Whether a new request from p may be served: 0 yes, 1 refuse it (answer an error), 2
 * drop it (p holds even the refusals unread). Past the total, a peer holding any reply
 * at all is refused: a REQ client has read its last reply before it sends again. */
static int peer_verdict(peers_t *ps, peer_t *p) {
    if (!p) return 0;
    int64_t held = peer_held(p);
    int over = (ps->cap > 0 && held > ps->cap) ||
               (ps->total_cap > 0 && held > 0 &&
                atomic_load_explicit(&ps->acct->held, memory_order_relaxed) > ps->total_cap);
    if (!over) return 0;
    return atomic_load_explicit(&p->refusals, memory_order_relaxed) > PEER_REFUSAL_SLACK ? 2 : 1;
}
