/*
 * libvhost_shim.c: vhost-user back-end for virtio-fs (see libvhost_shim.h for
 * the contract).
 *
 * Strategy
 * --------
 * * Control plane.  The socket is read one message at a time, header first
 *   (recvmsg, collecting SCM_RIGHTS fds) then exactly `size` payload bytes.
 *   Partial reads are kept in the device, so a front-end that writes header
 *   and payload separately works and nothing ever blocks.  Every request's
 *   payload size and fd count is checked against what that request carries
 *   before it is acted on; anything unexpected closes the connection, never
 *   the process.  Replies always carry flags 0x5.
 *
 * * Memory.  A memory table is an immutable, reference-counted set of
 *   reference-counted regions.  SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG
 *   build a new table and swap it in; every in-flight request holds a
 *   reference to the table its iovecs point into, and each ring holds one on
 *   the table its pointers were resolved in, so nothing is unmapped while in
 *   use (an RCU-style swap without threads).
 *
 * * Rings.  Each descriptor is copied once into local memory before it is
 *   looked at; indirect tables are copied out whole; the readable bytes are
 *   copied into private memory (so the caller validates a copy the guest can
 *   no longer change), up to max_copy_bytes of them: the rest of a long
 *   request (WRITE data) stays in guest memory and is read or pwritev()-ed
 *   from there on demand, as QEMU's virtiofsd does.  Both the readable and the
 *   writable buffers are kept as iovecs into guest memory; the request's
 *   reference on the memory table keeps them mapped until it is pushed.
 *   Ring-structure violations mark the queue broken; nothing the guest
 *   writes can make the shim read or write outside the mapped regions, loop
 *   forever or allocate without bound (per-request caps plus a device-wide
 *   budget for in-flight copies).
 *
 * * Ordering.  C11 atomics on the shared ring fields: acquire on avail->idx,
 *   release on used->idx, and a full fence between publishing (used->idx or
 *   avail_event) and reading the driver's side (used_event, avail->flags,
 *   avail->idx), as the virtio spec requires on weakly ordered CPUs.
 */
#define _GNU_SOURCE
#include "libvhost_shim.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef VHS_PACKAGE_VERSION
#error "VHS_PACKAGE_VERSION must be defined by the build (native/build_vhost.py)"
#endif

/* ---------------------------------------------------------------------- */
/* Wire constants                                                          */

enum {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_RESET_OWNER = 4,
    VU_SET_MEM_TABLE = 5,
    VU_SET_LOG_BASE = 6,
    VU_SET_LOG_FD = 7,
    VU_SET_VRING_NUM = 8,
    VU_SET_VRING_ADDR = 9,
    VU_SET_VRING_BASE = 10,
    VU_GET_VRING_BASE = 11,
    VU_SET_VRING_KICK = 12,
    VU_SET_VRING_CALL = 13,
    VU_SET_VRING_ERR = 14,
    VU_GET_PROTOCOL_FEATURES = 15,
    VU_SET_PROTOCOL_FEATURES = 16,
    VU_GET_QUEUE_NUM = 17,
    VU_SET_VRING_ENABLE = 18,
    VU_GET_MAX_MEM_SLOTS = 36,
    VU_ADD_MEM_REG = 37,
    VU_REM_MEM_REG = 38,
};

#define VU_FLAG_VERSION 0x1u
#define VU_FLAG_VERSION_MASK 0x3u
#define VU_FLAG_REPLY 0x4u
#define VU_FLAG_NEED_REPLY 0x8u
#define VU_HDR_SIZE 12u
#define VU_MAX_FDS 8
#define VU_MEM_TABLE_MAX 8u
#define VU_REGION_SIZE 32u
#define VU_MAX_PAYLOAD (8u + VU_MEM_TABLE_MAX * VU_REGION_SIZE)
#define VU_VRING_IDX_MASK 0xffull
#define VU_VRING_NOFD 0x100ull

#define VRING_DESC_F_NEXT 1u
#define VRING_DESC_F_WRITE 2u
#define VRING_DESC_F_INDIRECT 4u
#define VRING_AVAIL_F_NO_INTERRUPT 1u

#define BIT(n) (1ull << (n))
#define SUPPORTED_FEATURES \
    (BIT(VHS_F_VERSION_1) | BIT(VHS_F_PROTOCOL_FEATURES) | BIT(VHS_F_INDIRECT_DESC) | BIT(VHS_F_EVENT_IDX))
#define SUPPORTED_PROTOCOL_FEATURES \
    (BIT(VHS_PF_MQ) | BIT(VHS_PF_REPLY_ACK) | BIT(VHS_PF_CONFIGURE_MEM_SLOTS))

/* Messages handled per dispatch call: a flooding front-end must not starve
 * the caller's event loop (the socket stays readable, so it comes back). */
#define DISPATCH_BUDGET 64
/* Kick fds the caller may still be watching when they are replaced. */
#define MAX_RETIRED 160

#define INLINE_IN 256u
#define INLINE_IOV 40u
#define INLINE_RIOV 8u

/* ---------------------------------------------------------------------- */
/* Types                                                                   */

struct region {
    uint64_t gpa, size, uva;
    uint8_t *host;
    void *map;
    size_t map_len;
    uint32_t refs;
};

struct memtab {
    uint32_t refs;
    uint32_t n;
    struct region *r[VHS_MAX_MEM_SLOTS];
};

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct slot {
    struct memtab *tab; /* non-NULL while in flight */
    char *in;           /* private copy of the first in_len readable bytes */
    uint32_t in_cap, in_len;
    uint64_t in_total;
    struct iovec *riov; /* where the readable bytes are in guest memory (up to max_in_bytes) */
    uint32_t riov_cap, nriov;
    struct iovec *iov;  /* the writable buffers */
    uint32_t iov_cap, niov;
    uint32_t out_cap;
    uint16_t flags;
    size_t charged; /* heap bytes counted in dev->mem_used */
    char in_inline[INLINE_IN];
    struct iovec riov_inline[INLINE_RIOV];
    struct iovec iov_inline[INLINE_IOV];
};

struct queue {
    uint32_t num;
    bool addr_set;
    uint64_t desc_uva, avail_uva, used_uva;
    uint8_t *desc, *avail, *used;
    struct memtab *ring_tab; /* table the three pointers above live in */
    bool ready;
    uint16_t last_avail, used_idx, signalled_used;
    bool signalled_valid;
    int kick_fd, call_fd, err_fd;
    bool started, enabled, broken;
    uint32_t inflight;
    uint64_t *inflight_bits;
    struct slot *slots;
    uint8_t *itab; /* private copy of the indirect table being walked */
    char err[192];
};

struct vhs_dev {
    int sock;
    struct vhs_config cfg;
    uint32_t copy_cap; /* min(max_copy_bytes, max_in_bytes) */
    uint64_t features, protocol_features;
    struct memtab *tab;
    struct queue q[VHS_MAX_QUEUES];
    uint32_t nq_used;
    bool dead;
    int dead_rc;

    /* message being received */
    uint8_t hdr[VU_HDR_SIZE];
    uint32_t hdr_got, pay_got;
    uint32_t req, flags, size;
    uint64_t payload_u64[(VU_MAX_PAYLOAD + 7) / 8]; /* aligned storage */
    int fds[VU_MAX_FDS];
    int nfds;

    int deferred_q;
    uint64_t mem_used;
    uint64_t inflight_total;
    int retired[MAX_RETIRED];
    int nretired;

    char err[256];
    char log[4096];
    size_t log_len;
    bool log_dropped;
};

/* ---------------------------------------------------------------------- */
/* Small helpers                                                           */

static int fail(vhs_dev *d, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(vhs_dev *d, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->err, sizeof d->err, fmt, ap);
    va_end(ap);
    return -code;
}

static void warn(vhs_dev *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void warn(vhs_dev *d, const char *fmt, ...)
{
    char line[320];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = strnlen(line, sizeof line);
    /* Bounded: a chatty front-end cannot grow this; the caller drains it. */
    if (d->log_len + len + 2 > sizeof d->log) {
        d->log_dropped = true;
        return;
    }
    memcpy(d->log + d->log_len, line, len);
    d->log_len += len;
    d->log[d->log_len++] = '\n';
    d->log[d->log_len] = '\0';
}

static const char *msg_name(uint32_t req)
{
    static const char *const names[] = {
        [1] = "GET_FEATURES", [2] = "SET_FEATURES", [3] = "SET_OWNER", [4] = "RESET_OWNER",
        [5] = "SET_MEM_TABLE", [6] = "SET_LOG_BASE", [7] = "SET_LOG_FD", [8] = "SET_VRING_NUM",
        [9] = "SET_VRING_ADDR", [10] = "SET_VRING_BASE", [11] = "GET_VRING_BASE",
        [12] = "SET_VRING_KICK", [13] = "SET_VRING_CALL", [14] = "SET_VRING_ERR",
        [15] = "GET_PROTOCOL_FEATURES", [16] = "SET_PROTOCOL_FEATURES", [17] = "GET_QUEUE_NUM",
        [18] = "SET_VRING_ENABLE", [19] = "SEND_RARP", [20] = "NET_SET_MTU",
        [21] = "SET_SLAVE_REQ_FD", [22] = "IOTLB_MSG", [23] = "SET_VRING_ENDIAN",
        [24] = "GET_CONFIG", [25] = "SET_CONFIG", [26] = "CREATE_CRYPTO_SESSION",
        [27] = "CLOSE_CRYPTO_SESSION", [28] = "POSTCOPY_ADVISE", [29] = "POSTCOPY_LISTEN",
        [30] = "POSTCOPY_END", [31] = "GET_INFLIGHT_FD", [32] = "SET_INFLIGHT_FD",
        [33] = "GPU_SET_SOCKET", [34] = "RESET_DEVICE", [35] = "VRING_KICK",
        [36] = "GET_MAX_MEM_SLOTS", [37] = "ADD_MEM_REG", [38] = "REM_MEM_REG",
        [39] = "SET_STATUS", [40] = "GET_STATUS",
    };
    if (req < sizeof names / sizeof names[0] && names[req])
        return names[req];
    return "UNKNOWN";
}

static void close_fd(int *fd)
{
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0 && !(fl & O_NONBLOCK))
        (void)fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void eventfd_signal(int fd)
{
    if (fd < 0)
        return;
    uint64_t one = 1;
    /* Non-blocking: EAGAIN means the counter is saturated, i.e. signalled. */
    ssize_t r;
    do {
        r = write(fd, &one, sizeof one);
    } while (r < 0 && errno == EINTR);
}

static inline uint16_t ld16(const uint8_t *p, int order)
{
    return le16toh(__atomic_load_n((const uint16_t *)(const void *)p, order));
}

static inline void st16(uint8_t *p, uint16_t v, int order)
{
    __atomic_store_n((uint16_t *)(void *)p, htole16(v), order);
}

static inline void st32(uint8_t *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)(void *)p, htole32(v), __ATOMIC_RELAXED);
}

/* u16 ring indices wrap; this is the kernel's vring_need_event(). */
static inline bool need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* ---------------------------------------------------------------------- */
/* Memory table                                                            */

static void region_unref(struct region *r)
{
    if (r && --r->refs == 0) {
        munmap(r->map, r->map_len);
        free(r);
    }
}

static struct memtab *memtab_ref(struct memtab *t)
{
    if (t)
        t->refs++;
    return t;
}

static void memtab_unref(struct memtab *t)
{
    if (t && --t->refs == 0) {
        for (uint32_t i = 0; i < t->n; i++)
            region_unref(t->r[i]);
        free(t);
    }
}

/* Host pointer for [gpa, gpa+len) if it lies in one region; *span is how many
 * bytes from gpa stay inside that region (to split ranges across regions). */
static uint8_t *gpa_lookup(const struct memtab *t, uint64_t gpa, uint64_t *span)
{
    if (!t)
        return NULL;
    for (uint32_t i = 0; i < t->n; i++) {
        const struct region *r = t->r[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            *span = r->size - (gpa - r->gpa);
            return r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

static uint8_t *uva_range(const struct memtab *t, uint64_t uva, uint64_t len)
{
    if (!t)
        return NULL;
    for (uint32_t i = 0; i < t->n; i++) {
        const struct region *r = t->r[i];
        if (uva >= r->uva && uva - r->uva < r->size && len <= r->size - (uva - r->uva))
            return r->host + (uva - r->uva);
    }
    return NULL;
}

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    /* Inclusive ends avoid overflow: both ranges were checked not to wrap. */
    uint64_t a_end = a + (alen - 1), b_end = b + (blen - 1);
    return a <= b_end && b <= a_end;
}

struct wire_region {
    uint64_t gpa, size, uva, mmap_offset;
};

static void parse_region(const uint8_t *p, struct wire_region *w)
{
    memcpy(&w->gpa, p, 8);
    memcpy(&w->size, p + 8, 8);
    memcpy(&w->uva, p + 16, 8);
    memcpy(&w->mmap_offset, p + 24, 8);
}

/* Validate one region against itself, the regions already in `t`, and its fd;
 * then map it.  Returns NULL with the reason in `why`. */
static struct region *region_map(const struct wire_region *w, int fd, const struct memtab *t,
                                 char *why, size_t why_len)
{
    if (w->size == 0) {
        snprintf(why, why_len, "region gpa=%#" PRIx64 " has size 0", w->gpa);
        return NULL;
    }
    if (w->gpa > UINT64_MAX - (w->size - 1) || w->uva > UINT64_MAX - (w->size - 1) ||
        w->mmap_offset > UINT64_MAX - w->size) {
        snprintf(why, why_len,
                 "region gpa=%#" PRIx64 " size=%#" PRIx64 " uva=%#" PRIx64 " off=%#" PRIx64
                 " wraps the 64-bit address space",
                 w->gpa, w->size, w->uva, w->mmap_offset);
        return NULL;
    }
    for (uint32_t i = 0; t && i < t->n; i++) {
        const struct region *o = t->r[i];
        if (ranges_overlap(w->gpa, w->size, o->gpa, o->size) ||
            ranges_overlap(w->uva, w->size, o->uva, o->size)) {
            snprintf(why, why_len,
                     "region gpa=%#" PRIx64 " size=%#" PRIx64 " overlaps region gpa=%#" PRIx64
                     " size=%#" PRIx64,
                     w->gpa, w->size, o->gpa, o->size);
            return NULL;
        }
    }
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        snprintf(why, why_len, "region gpa=%#" PRIx64 ": fd cannot be inspected", w->gpa);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(why, why_len, "region gpa=%#" PRIx64 ": fd is not a memfd or file (mode %#o)",
                 w->gpa, (unsigned)st.st_mode);
        return NULL;
    }
    /* A region past the end of its file would fault (SIGBUS) on first touch. */
    if ((uint64_t)st.st_size < w->mmap_offset + w->size) {
        snprintf(why, why_len,
                 "region gpa=%#" PRIx64 ": file is %#" PRIx64 " bytes, region needs %#" PRIx64,
                 w->gpa, (uint64_t)st.st_size, w->mmap_offset + w->size);
        return NULL;
    }
    /* mmap_offset need not be page aligned (QEMU sends 0xc0000; hugetlbfs needs
     * 2M/1G): map from the aligned-down offset and add the remainder. */
    uint64_t align = (uint64_t)sysconf(_SC_PAGESIZE);
    if (st.st_blksize > 0 && (uint64_t)st.st_blksize > align &&
        ((uint64_t)st.st_blksize & ((uint64_t)st.st_blksize - 1)) == 0)
        align = (uint64_t)st.st_blksize;
    uint64_t map_off = w->mmap_offset & ~(align - 1);
    uint64_t delta = w->mmap_offset - map_off;
    uint64_t map_len = w->size + delta;
    if (map_len < w->size || map_len > (uint64_t)SIZE_MAX || map_off > (uint64_t)INT64_MAX) {
        snprintf(why, why_len, "region gpa=%#" PRIx64 " is too large to map", w->gpa);
        return NULL;
    }
    void *map = mmap(NULL, (size_t)map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)map_off);
    if (map == MAP_FAILED) {
        snprintf(why, why_len, "region gpa=%#" PRIx64 " size=%#" PRIx64 ": mmap failed: %s", w->gpa,
                 w->size, strerror(errno));
        return NULL;
    }
    struct region *r = calloc(1, sizeof *r);
    if (!r) {
        munmap(map, (size_t)map_len);
        snprintf(why, why_len, "out of memory");
        return NULL;
    }
    r->gpa = w->gpa;
    r->size = w->size;
    r->uva = w->uva;
    r->map = map;
    r->map_len = (size_t)map_len;
    r->host = (uint8_t *)map + delta;
    r->refs = 1;
    return r;
}

static struct memtab *memtab_new(void)
{
    struct memtab *t = calloc(1, sizeof *t);
    if (t)
        t->refs = 1;
    return t;
}

/* ---------------------------------------------------------------------- */
/* Queues                                                                  */

static void queue_set_broken(vhs_dev *d, struct queue *q, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void queue_set_broken(vhs_dev *d, struct queue *q, const char *fmt, ...)
{
    (void)d;
    if (q->broken)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(q->err, sizeof q->err, fmt, ap);
    va_end(ap);
    q->broken = true;
    eventfd_signal(q->err_fd);
}

static bool queue_resolve(struct queue *q, struct memtab *t)
{
    if (!q->addr_set || q->num == 0 || !t)
        return false;
    uint64_t n = q->num;
    uint8_t *desc = uva_range(t, q->desc_uva, 16 * n);
    uint8_t *avail = uva_range(t, q->avail_uva, 6 + 2 * n);
    uint8_t *used = uva_range(t, q->used_uva, 6 + 8 * n);
    if (!desc || !avail || !used)
        return false;
    if (((uintptr_t)desc & 15) || ((uintptr_t)avail & 1) || ((uintptr_t)used & 3))
        return false;
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    if (q->ring_tab != t) {
        memtab_ref(t);
        memtab_unref(q->ring_tab);
        q->ring_tab = t;
    }
    q->ready = true;
    return true;
}

static void queue_unresolve(struct queue *q)
{
    q->desc = q->avail = q->used = NULL;
    memtab_unref(q->ring_tab);
    q->ring_tab = NULL;
    q->ready = false;
}

static void queue_sync_used(struct queue *q)
{
    if (q->ready) {
        q->used_idx = ld16(q->used + 2, __ATOMIC_ACQUIRE);
        q->signalled_valid = false;
    }
}

static bool queue_running(const struct queue *q, const vhs_dev *d)
{
    return q->started && q->enabled && q->ready && !q->broken &&
           d->deferred_q != (int)(q - d->q);
}

static void slot_reset(vhs_dev *d, struct slot *s)
{
    if (s->in != s->in_inline)
        free(s->in);
    if (s->iov != s->iov_inline)
        free(s->iov);
    if (s->riov != s->riov_inline)
        free(s->riov);
    s->in = s->in_inline;
    s->in_cap = INLINE_IN;
    s->iov = s->iov_inline;
    s->iov_cap = INLINE_IOV;
    s->riov = s->riov_inline;
    s->riov_cap = INLINE_RIOV;
    s->in_len = 0;
    s->in_total = 0;
    s->niov = 0;
    s->nriov = 0;
    s->out_cap = 0;
    s->flags = 0;
    d->mem_used -= s->charged;
    s->charged = 0;
}

static void queue_free_arrays(struct queue *q)
{
    free(q->slots);
    free(q->inflight_bits);
    free(q->itab);
    q->slots = NULL;
    q->inflight_bits = NULL;
    q->itab = NULL;
}

static void queue_free_ring_state(vhs_dev *d, struct queue *q)
{
    if (q->slots) {
        for (uint32_t i = 0; i < q->num; i++) {
            struct slot *s = &q->slots[i];
            if (s->tab) {
                memtab_unref(s->tab);
                s->tab = NULL;
                d->inflight_total--;
            }
            slot_reset(d, s);
        }
    }
    queue_free_arrays(q);
    q->inflight = 0;
}

static int queue_alloc(vhs_dev *d, struct queue *q, uint32_t num)
{
    queue_free_ring_state(d, q);
    q->slots = calloc(num, sizeof *q->slots);
    q->inflight_bits = calloc((num + 63) / 64, sizeof(uint64_t));
    q->itab = malloc((size_t)num * 16);
    if (!q->slots || !q->inflight_bits || !q->itab) {
        queue_free_arrays(q);
        q->num = 0;
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < num; i++) {
        q->slots[i].in = q->slots[i].in_inline;
        q->slots[i].in_cap = INLINE_IN;
        q->slots[i].iov = q->slots[i].iov_inline;
        q->slots[i].iov_cap = INLINE_IOV;
        q->slots[i].riov = q->slots[i].riov_inline;
        q->slots[i].riov_cap = INLINE_RIOV;
    }
    q->num = num;
    return 0;
}

/* Retire a kick fd: the caller may still have it registered with epoll, and
 * closing it under epoll would leave a stale registration (the front-end
 * holds the same open file).  vhs_dev_close_retired() closes it later. */
static void retire_fd(vhs_dev *d, int *fd)
{
    if (*fd < 0)
        return;
    if (d->nretired < MAX_RETIRED)
        d->retired[d->nretired++] = *fd;
    else
        close(*fd);
    *fd = -1;
}

void vhs_dev_close_retired(vhs_dev *d)
{
    for (int i = 0; i < d->nretired; i++)
        close(d->retired[i]);
    d->nretired = 0;
}

/* ---------------------------------------------------------------------- */
/* Descriptor chains                                                       */

enum { WALK_OK = 0, WALK_BROKEN = 1, WALK_THROTTLE = 2 };

static int charge(vhs_dev *d, struct slot *s, size_t add)
{
    /* With nothing in flight anywhere, a request may always proceed: the
     * per-request caps bound it, and waiting could never end. */
    if (d->inflight_total > 0 && d->mem_used + add > d->cfg.max_inflight_bytes)
        return -1;
    d->mem_used += add;
    s->charged += add;
    return 0;
}

static int grow_in(vhs_dev *d, struct queue *q, struct slot *s, uint32_t need)
{
    if (need <= s->in_cap)
        return WALK_OK;
    uint64_t cap = (uint64_t)s->in_cap * 2;
    if (cap < need)
        cap = need;
    if (cap > d->copy_cap)
        cap = d->copy_cap;
    size_t add = (size_t)cap - (s->in == s->in_inline ? 0 : s->in_cap);
    if (charge(d, s, add) != 0)
        return WALK_THROTTLE;
    char *p = s->in == s->in_inline ? malloc((size_t)cap) : realloc(s->in, (size_t)cap);
    if (!p) {
        queue_set_broken(d, q, "out of memory copying a %u-byte request", need);
        return WALK_BROKEN;
    }
    if (s->in == s->in_inline)
        memcpy(p, s->in_inline, s->in_len);
    s->in = p;
    s->in_cap = (uint32_t)cap;
    return WALK_OK;
}

/* Double an iovec array of the slot (the readable or the writable one),
 * moving it off its inline storage the first time. */
static int grow_vec(vhs_dev *d, struct queue *q, struct slot *s, struct iovec **vec, uint32_t *cap,
                    uint32_t n, struct iovec *inline_vec, const char *what)
{
    uint64_t ncap = (uint64_t)*cap * 2;
    size_t add = (size_t)ncap * sizeof(struct iovec) -
                 (*vec == inline_vec ? 0 : (size_t)*cap * sizeof(struct iovec));
    if (charge(d, s, add) != 0)
        return WALK_THROTTLE;
    struct iovec *p = *vec == inline_vec ? malloc((size_t)ncap * sizeof *p)
                                         : realloc(*vec, (size_t)ncap * sizeof *p);
    if (!p) {
        queue_set_broken(d, q, "out of memory mapping a %s buffer", what);
        return WALK_BROKEN;
    }
    if (*vec == inline_vec)
        memcpy(p, inline_vec, n * sizeof *p);
    *vec = p;
    *cap = (uint32_t)ncap;
    return WALK_OK;
}

static bool range_wraps(uint64_t addr, uint32_t len)
{
    return len > 0 && addr > UINT64_MAX - (len - 1);
}

/* One guest page run of a readable descriptor.  While under max_in_bytes it
 * is remembered as an iovec (merged with the previous one when the two touch)
 * and, while under the copy cap, copied into the request; past max_in_bytes
 * it is only counted (the range is still validated). */
static int add_in_piece(vhs_dev *d, struct queue *q, struct slot *s, const uint8_t *host, uint64_t piece)
{
    if (s->in_total < d->cfg.max_in_bytes) {
        uint64_t room = d->cfg.max_in_bytes - s->in_total;
        uint32_t take = (uint32_t)(piece < room ? piece : room);
        struct iovec *last = s->nriov ? &s->riov[s->nriov - 1] : NULL;
        if (last && (const uint8_t *)last->iov_base + last->iov_len == host) {
            last->iov_len += take;
        } else {
            if (s->nriov == s->riov_cap) {
                int rc = grow_vec(d, q, s, &s->riov, &s->riov_cap, s->nriov, s->riov_inline, "readable");
                if (rc != WALK_OK)
                    return rc;
            }
            s->riov[s->nriov].iov_base = (void *)host;
            s->riov[s->nriov].iov_len = take;
            s->nriov++;
        }
        /* in_len == in_total until the copy cap is reached. */
        if (s->in_len < d->copy_cap) {
            uint32_t copy = d->copy_cap - s->in_len;
            if (copy > take)
                copy = take;
            int rc = grow_in(d, q, s, s->in_len + copy);
            if (rc != WALK_OK)
                return rc;
            memcpy(s->in + s->in_len, host, copy);
            s->in_len += copy;
        }
    }
    s->in_total += piece;
    return WALK_OK;
}

/* One guest page run of a writable descriptor: becomes an iovec while under
 * max_out_bytes; past the cap it is dropped (the range is still validated). */
static int add_out_piece(vhs_dev *d, struct queue *q, struct slot *s, uint8_t *host, uint64_t piece)
{
    if (s->out_cap < d->cfg.max_out_bytes) {
        uint64_t room = d->cfg.max_out_bytes - s->out_cap;
        uint32_t take = (uint32_t)(piece < room ? piece : room);
        if (s->niov == s->iov_cap) {
            int rc = grow_vec(d, q, s, &s->iov, &s->iov_cap, s->niov, s->iov_inline, "writable");
            if (rc != WALK_OK)
                return rc;
        }
        s->iov[s->niov].iov_base = host;
        s->iov[s->niov].iov_len = take;
        s->niov++;
        s->out_cap += take;
    }
    return WALK_OK;
}

/* Add one non-empty descriptor to the slot, split where guest memory regions
 * split it; a range that wraps or leaves guest memory breaks the queue. */
static int add_buffer(vhs_dev *d, struct queue *q, struct slot *s, uint16_t head,
                      const struct desc *dd, bool writable)
{
    const char *kind = writable ? "writable" : "readable";
    if (range_wraps(dd->addr, dd->len)) {
        queue_set_broken(d, q, "head %u: %s buffer gpa=%#" PRIx64 " len=%u wraps", head, kind,
                         dd->addr, dd->len);
        return WALK_BROKEN;
    }
    uint64_t gpa = dd->addr, rem = dd->len;
    while (rem > 0) {
        uint64_t span;
        uint8_t *host = gpa_lookup(d->tab, gpa, &span);
        if (!host) {
            queue_set_broken(d, q, "head %u: %s buffer gpa=%#" PRIx64 " len=%u is outside guest memory",
                             head, kind, dd->addr, dd->len);
            return WALK_BROKEN;
        }
        uint64_t piece = rem < span ? rem : span;
        int rc = writable ? add_out_piece(d, q, s, host, piece) : add_in_piece(d, q, s, host, piece);
        if (rc != WALK_OK)
            return rc;
        gpa += piece;
        rem -= piece;
    }
    return WALK_OK;
}

static void load_guest_desc(const uint8_t *p, struct desc *out)
{
    out->addr = le64toh(__atomic_load_n((const uint64_t *)(const void *)p, __ATOMIC_RELAXED));
    out->len = le32toh(__atomic_load_n((const uint32_t *)(const void *)(p + 8), __ATOMIC_RELAXED));
    out->flags = le16toh(__atomic_load_n((const uint16_t *)(const void *)(p + 12), __ATOMIC_RELAXED));
    out->next = le16toh(__atomic_load_n((const uint16_t *)(const void *)(p + 14), __ATOMIC_RELAXED));
}

static void load_private_desc(const uint8_t *p, struct desc *out)
{
    memcpy(&out->addr, p, 8);
    memcpy(&out->len, p + 8, 4);
    memcpy(&out->flags, p + 12, 2);
    memcpy(&out->next, p + 14, 2);
    out->addr = le64toh(out->addr);
    out->len = le32toh(out->len);
    out->flags = le16toh(out->flags);
    out->next = le16toh(out->next);
}

static bool copy_from_guest(const struct memtab *t, uint64_t gpa, uint32_t len, uint8_t *dst)
{
    if (range_wraps(gpa, len))
        return false;
    while (len > 0) {
        uint64_t span;
        uint8_t *host = gpa_lookup(t, gpa, &span);
        if (!host)
            return false;
        uint32_t piece = (uint32_t)(len < span ? len : span);
        memcpy(dst, host, piece);
        dst += piece;
        gpa += piece;
        len -= piece;
    }
    return true;
}

static int walk_chain(vhs_dev *d, struct queue *q, uint16_t head, struct slot *s)
{
    const uint8_t *table = q->desc;
    bool indirect = false, seen_write = false;
    uint32_t tlen = q->num, idx = head, steps = 0;

    for (;;) {
        struct desc dd;
        if (idx >= tlen) {
            queue_set_broken(d, q, "head %u: next index %u is out of range (%s table of %u)", head,
                             idx, indirect ? "indirect" : "descriptor", tlen);
            return WALK_BROKEN;
        }
        if (++steps > tlen) {
            queue_set_broken(d, q, "head %u: descriptor chain loops (more than %u %s descriptors)",
                             head, tlen, indirect ? "indirect" : "direct");
            return WALK_BROKEN;
        }
        if (indirect)
            load_private_desc(table + (size_t)idx * 16, &dd);
        else
            load_guest_desc(table + (size_t)idx * 16, &dd);

        if (dd.flags & VRING_DESC_F_INDIRECT) {
            if (indirect) {
                queue_set_broken(d, q, "head %u: INDIRECT descriptor inside an indirect table", head);
                return WALK_BROKEN;
            }
            if (!(d->features & BIT(VHS_F_INDIRECT_DESC))) {
                queue_set_broken(d, q, "head %u: INDIRECT descriptor but INDIRECT_DESC not negotiated",
                                 head);
                return WALK_BROKEN;
            }
            if (dd.flags & VRING_DESC_F_NEXT) {
                queue_set_broken(d, q, "head %u: INDIRECT descriptor has NEXT set", head);
                return WALK_BROKEN;
            }
            if (dd.len == 0 || dd.len % 16 != 0 || dd.len / 16 > q->num) {
                queue_set_broken(d, q,
                                 "head %u: indirect table length %u is not a non-zero multiple of 16 "
                                 "within %u entries",
                                 head, dd.len, q->num);
                return WALK_BROKEN;
            }
            if (!copy_from_guest(d->tab, dd.addr, dd.len, q->itab)) {
                queue_set_broken(d, q, "head %u: indirect table gpa=%#" PRIx64 " len=%u is not mapped",
                                 head, dd.addr, dd.len);
                return WALK_BROKEN;
            }
            table = q->itab;
            tlen = dd.len / 16;
            idx = 0;
            steps = 0;
            indirect = true;
            continue;
        }

        /* Zero-length descriptors carry nothing: skipped, not an error. */
        if (dd.len != 0) {
            int rc;
            if (dd.flags & VRING_DESC_F_WRITE) {
                seen_write = true;
                rc = add_buffer(d, q, s, head, &dd, true);
            } else {
                if (seen_write) {
                    queue_set_broken(d, q, "head %u: readable descriptor after a writable one", head);
                    return WALK_BROKEN;
                }
                rc = add_buffer(d, q, s, head, &dd, false);
            }
            if (rc != WALK_OK)
                return rc;
        }
        if (!(dd.flags & VRING_DESC_F_NEXT))
            return WALK_OK;
        idx = dd.next;
    }
}

static inline bool bit_test(const uint64_t *bits, uint32_t i)
{
    return (bits[i / 64] >> (i % 64)) & 1;
}

static inline void bit_set(uint64_t *bits, uint32_t i)
{
    bits[i / 64] |= 1ull << (i % 64);
}

static inline void bit_clear(uint64_t *bits, uint32_t i)
{
    bits[i / 64] &= ~(1ull << (i % 64));
}

static struct queue *get_queue(vhs_dev *d, uint32_t qi)
{
    if (qi >= d->cfg.max_queues) {
        fail(d, EINVAL, "queue %u out of range (max %u)", qi, d->cfg.max_queues);
        return NULL;
    }
    return &d->q[qi];
}

int vhs_queue_pop(vhs_dev *d, uint32_t qi, struct vhs_req *reqs, int max, int *status)
{
    *status = 0;
    struct queue *q = get_queue(d, qi);
    if (!q)
        return -EINVAL;
    if (max <= 0 || !queue_running(q, d))
        return 0;
    int n = 0;
    const uint32_t num = q->num;
    const bool event_idx = d->features & BIT(VHS_F_EVENT_IDX);
    while (n < max) {
        uint16_t avail_idx = ld16(q->avail + 2, __ATOMIC_ACQUIRE);
        if (avail_idx == q->last_avail) {
            if (!event_idx)
                break;
            /* Ask for a kick at the next entry, then re-check: an entry
             * published before the driver saw avail_event would otherwise
             * never be kicked (a lost wake-up). */
            st16(q->used + 4 + 8 * (size_t)num, q->last_avail, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            avail_idx = ld16(q->avail + 2, __ATOMIC_ACQUIRE);
            if (avail_idx == q->last_avail)
                break;
        }
        uint16_t pending = (uint16_t)(avail_idx - q->last_avail);
        if (pending > num) {
            queue_set_broken(d, q, "avail index moved from %u to %u (queue size %u)", q->last_avail,
                             avail_idx, num);
            *status |= VHS_POP_BROKEN;
            break;
        }
        uint16_t head = ld16(q->avail + 4 + 2 * (size_t)(q->last_avail % num), __ATOMIC_RELAXED);
        if (head >= num) {
            queue_set_broken(d, q, "avail ring entry %u names head %u (queue size %u)", q->last_avail,
                             head, num);
            *status |= VHS_POP_BROKEN;
            break;
        }
        if (bit_test(q->inflight_bits, head)) {
            queue_set_broken(d, q, "head %u made available again while still in flight", head);
            *status |= VHS_POP_BROKEN;
            break;
        }
        struct slot *s = &q->slots[head];
        int rc = walk_chain(d, q, head, s);
        if (rc != WALK_OK) {
            slot_reset(d, s);
            *status |= rc == WALK_THROTTLE ? VHS_POP_THROTTLED : VHS_POP_BROKEN;
            break;
        }
        if (s->in_total > d->cfg.max_in_bytes) {
            s->flags |= VHS_REQ_OVERSIZE;
            if (s->in_len > VHS_OVERSIZE_PREFIX)
                s->in_len = VHS_OVERSIZE_PREFIX;
        } else if (s->in_total > s->in_len) {
            s->flags |= VHS_REQ_PARTIAL;
        }
        s->tab = memtab_ref(d->tab);
        bit_set(q->inflight_bits, head);
        q->inflight++;
        d->inflight_total++;
        q->last_avail++;
        struct vhs_req *r = &reqs[n++];
        r->data = s->in;
        r->in_len = s->in_len;
        r->in_total = s->in_total > UINT32_MAX ? UINT32_MAX : (uint32_t)s->in_total;
        r->out_cap = s->out_cap;
        r->head = head;
        r->flags = s->flags;
    }
    if (n == max && !(*status & (VHS_POP_BROKEN | VHS_POP_THROTTLED))) {
        /* A full batch must leave either "more" for the caller or an armed
         * avail_event; otherwise the driver's next publish may not kick. */
        if (ld16(q->avail + 2, __ATOMIC_ACQUIRE) != q->last_avail) {
            *status |= VHS_POP_MORE;
        } else if (event_idx) {
            st16(q->used + 4 + 8 * (size_t)num, q->last_avail, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (ld16(q->avail + 2, __ATOMIC_ACQUIRE) != q->last_avail)
                *status |= VHS_POP_MORE;
        }
    }
    return n;
}

static struct slot *inflight_slot(vhs_dev *d, uint32_t qi, uint16_t head, struct queue **qout)
{
    struct queue *q = get_queue(d, qi);
    if (!q)
        return NULL;
    if (head >= q->num || !q->inflight_bits || !bit_test(q->inflight_bits, head)) {
        fail(d, EINVAL, "queue %u: head %u is not in flight", qi, head);
        return NULL;
    }
    *qout = q;
    return &q->slots[head];
}

/* Walk an iovec array to byte offset off: index and offset within it (the
 * callers have checked that off lies inside the array). */
static void vec_seek(const struct iovec *v, uint32_t n, uint32_t off, uint32_t *idx, size_t *within)
{
    uint32_t i = 0;
    while (i < n && off >= v[i].iov_len) {
        off -= (uint32_t)v[i].iov_len;
        i++;
    }
    *idx = i;
    *within = off;
}

/* 0 when a file range of len bytes may start at file_off (off_t can hold its
 * end), else -EINVAL with the reason recorded. */
static int check_file_off(vhs_dev *d, int64_t file_off, uint32_t len)
{
    if (file_off < 0 || (uint64_t)file_off > (uint64_t)INT64_MAX - len)
        return fail(d, EINVAL, "file offset %" PRId64 " is invalid", file_off);
    return 0;
}

/* The pieces of the iovec list v (n entries) that cover [off, off + len),
 * at most max of them, into out; returns how many.  They cover fewer than
 * len bytes when max runs out (the caller's short-I/O handling applies). */
static int vec_window(const struct iovec *v, uint32_t n, uint32_t off, uint32_t len,
                      struct iovec *out, int max)
{
    int cnt = 0;
    uint32_t i;
    size_t within;
    vec_seek(v, n, off, &i, &within);
    while (cnt < max && len > 0 && i < n) {
        size_t room = v[i].iov_len - within;
        size_t take = len < room ? len : room;
        out[cnt].iov_base = (char *)v[i].iov_base + within;
        out[cnt].iov_len = take;
        cnt++;
        len -= (uint32_t)take;
        within = 0;
        i++;
    }
    return cnt;
}

/* Copy len bytes between buf and the iovec list v at byte offset off: into
 * the list when to_vec, out of it otherwise.  The caller has checked that
 * [off, off + len) lies inside the list. */
static void vec_copy(const struct iovec *v, uint32_t n, uint32_t off, char *buf, uint32_t len,
                     bool to_vec)
{
    uint32_t i;
    size_t within;
    vec_seek(v, n, off, &i, &within);
    while (len > 0) {
        size_t room = v[i].iov_len - within;
        size_t take = len < room ? len : room;
        char *at = (char *)v[i].iov_base + within;
        if (to_vec)
            memcpy(at, buf, take);
        else
            memcpy(buf, at, take);
        buf += take;
        len -= (uint32_t)take;
        within = 0;
        i++;
    }
}

/* The in-flight slot whose readable bytes [off, off+len) are in guest memory. */
static struct slot *readable_range(vhs_dev *d, uint32_t qi, uint16_t head, uint32_t off, uint32_t len,
                                   const char *what)
{
    struct queue *q;
    struct slot *s = inflight_slot(d, qi, head, &q);
    if (!s)
        return NULL;
    if (s->flags & VHS_REQ_OVERSIZE) {
        fail(d, EINVAL, "queue %u head %u: %s of an oversize request", qi, head, what);
        return NULL;
    }
    /* 64-bit sum: off + len cannot wrap. */
    if ((uint64_t)off + len > s->in_total) {
        fail(d, EINVAL, "queue %u head %u: %s of %u bytes at %u exceeds %" PRIu64 " readable", qi,
             head, what, len, off, s->in_total);
        return NULL;
    }
    return s;
}

int vhs_req_read_in(vhs_dev *d, uint32_t qi, uint16_t head, uint32_t off, char *buf, uint32_t len)
{
    struct slot *s = readable_range(d, qi, head, off, len, "read");
    if (!s)
        return -EINVAL;
    vec_copy(s->riov, s->nriov, off, buf, len, false);
    return 0;
}

int64_t vhs_req_pwrite_in(vhs_dev *d, uint32_t qi, uint16_t head, uint32_t off, int fd,
                          int64_t file_off, uint32_t len)
{
    struct slot *s = readable_range(d, qi, head, off, len, "pwrite");
    if (!s)
        return -EINVAL;
    if (check_file_off(d, file_off, len) < 0)
        return -EINVAL;
    /* One system call, as a write(2) would be: past IOV_MAX pieces (only a
     * guest that splits its data into tiny descriptors gets there) the write
     * is short and the caller's short-write handling applies. */
    struct iovec v[IOV_MAX];
    int cnt = vec_window(s->riov, s->nriov, off, len, v, IOV_MAX);
    ssize_t r;
    do {
        /* pwrite for one piece (the common small WRITE): no iovec import. */
        r = cnt == 1 ? pwrite(fd, v[0].iov_base, v[0].iov_len, (off_t)file_off)
                     : pwritev(fd, v, cnt, (off_t)file_off);
    } while (r < 0 && errno == EINTR);
    if (r < 0)
        return fail(d, errno, "pwritev(fd %d, %u bytes at %" PRId64 "): %s", fd, len, file_off,
                    strerror(errno));
    return r;
}

int vhs_req_write(vhs_dev *d, uint32_t qi, uint16_t head, uint32_t off, const char *buf,
                  uint32_t len)
{
    struct queue *q;
    struct slot *s = inflight_slot(d, qi, head, &q);
    if (!s)
        return -EINVAL;
    if (off > s->out_cap || len > s->out_cap - off)
        return fail(d, EMSGSIZE, "queue %u head %u: write of %u bytes at %u exceeds %u writable",
                    qi, head, len, off, s->out_cap);
    vec_copy(s->iov, s->niov, off, (char *)buf, len, true);
    return 0;
}

int64_t vhs_req_pread(vhs_dev *d, uint32_t qi, uint16_t head, uint32_t off, int fd,
                      int64_t file_off, uint32_t len)
{
    struct queue *q;
    struct slot *s = inflight_slot(d, qi, head, &q);
    if (!s)
        return -EINVAL;
    if (off > s->out_cap || len > s->out_cap - off)
        return fail(d, EMSGSIZE, "queue %u head %u: read of %u bytes at %u exceeds %u writable", qi,
                    head, len, off, s->out_cap);
    if (check_file_off(d, file_off, len) < 0)
        return -EINVAL;
    uint32_t done = 0;
    while (done < len) {
        struct iovec v[64];
        int cnt = vec_window(s->iov, s->niov, off + done, len - done, v, 64);
        ssize_t r = preadv(fd, v, cnt, (off_t)(file_off + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return fail(d, errno, "preadv(fd %d, %u bytes at %" PRId64 "): %s", fd, len - done,
                        file_off + done, strerror(errno));
        }
        if (r == 0)
            break;
        done += (uint32_t)r;
    }
    return done;
}

static void slot_complete(vhs_dev *d, struct queue *q, uint16_t head, uint32_t used_len)
{
    struct slot *s = &q->slots[head];
    if (q->ready) {
        uint8_t *e = q->used + 4 + 8 * (size_t)(q->used_idx % q->num);
        st32(e, head);
        st32(e + 4, used_len);
        q->used_idx++;
        /* Release: the used element and every reply byte written into guest
         * buffers become visible before the driver can see the new index. */
        st16(q->used + 2, q->used_idx, __ATOMIC_RELEASE);
    }
    bit_clear(q->inflight_bits, head);
    q->inflight--;
    d->inflight_total--;
    memtab_unref(s->tab);
    s->tab = NULL;
    slot_reset(d, s);
}

int vhs_req_push(vhs_dev *d, uint32_t qi, uint16_t head, uint32_t used_len)
{
    struct queue *q;
    struct slot *s = inflight_slot(d, qi, head, &q);
    if (!s)
        return -EINVAL;
    if (used_len > s->out_cap) {
        uint32_t cap = s->out_cap;
        slot_complete(d, q, head, 0);
        return fail(d, EMSGSIZE, "queue %u head %u: used length %u exceeds %u writable; pushed 0",
                    qi, head, used_len, cap);
    }
    slot_complete(d, q, head, used_len);
    return 0;
}

int vhs_req_complete(vhs_dev *d, uint32_t qi, uint16_t head, const char *buf, uint32_t len)
{
    struct queue *q;
    struct slot *s = inflight_slot(d, qi, head, &q);
    if (!s)
        return -EINVAL;
    if (len > s->out_cap) {
        uint32_t cap = s->out_cap;
        slot_complete(d, q, head, 0);
        return fail(d, EMSGSIZE, "queue %u head %u: reply of %u bytes exceeds %u writable; pushed 0",
                    qi, head, len, cap);
    }
    /* Fast path: most replies fit the first writable buffer. */
    if (s->niov > 0 && len <= s->iov[0].iov_len) {
        memcpy(s->iov[0].iov_base, buf, len);
    } else {
        int rc = vhs_req_write(d, qi, head, 0, buf, len);
        if (rc < 0)
            return rc;
    }
    slot_complete(d, q, head, len);
    return 0;
}

int64_t vhs_req_complete_file(vhs_dev *d, uint32_t qi, uint16_t head, const char *hdr,
                              uint32_t hdr_len, int fd, int64_t file_off, uint32_t len)
{
    struct queue *q;
    struct slot *s = inflight_slot(d, qi, head, &q);
    if (!s)
        return -EINVAL;
    if (hdr_len > s->out_cap || len > s->out_cap - hdr_len)
        return fail(d, EMSGSIZE, "queue %u head %u: reply of %u + %u bytes exceeds %u writable", qi,
                    head, hdr_len, len, s->out_cap);
    int rc = vhs_req_write(d, qi, head, 0, hdr, hdr_len);
    if (rc < 0)
        return rc;
    int64_t got = vhs_req_pread(d, qi, head, hdr_len, fd, file_off, len);
    if (got == (int64_t)len)
        slot_complete(d, q, head, hdr_len + len);
    return got;
}

int vhs_queue_notify(vhs_dev *d, uint32_t qi)
{
    struct queue *q = get_queue(d, qi);
    if (!q)
        return -EINVAL;
    if (!q->ready || (q->signalled_valid && q->signalled_used == q->used_idx))
        return 0;
    bool need;
    /* Full fence: our used->idx store must be visible before we read the
     * driver's suppression state, or both sides may decide not to act. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (d->features & BIT(VHS_F_EVENT_IDX)) {
        uint16_t used_event = ld16(q->avail + 4 + 2 * (size_t)q->num, __ATOMIC_RELAXED);
        need = !q->signalled_valid || need_event(used_event, q->used_idx, q->signalled_used);
    } else {
        need = !(ld16(q->avail, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    q->signalled_used = q->used_idx;
    q->signalled_valid = true;
    if (need && q->call_fd >= 0) {
        eventfd_signal(q->call_fd);
        return 1;
    }
    return 0;
}

int vhs_queue_drain_kick(vhs_dev *d, uint32_t qi)
{
    struct queue *q = get_queue(d, qi);
    if (!q)
        return -EINVAL;
    if (q->kick_fd >= 0) {
        uint64_t buf[8];
        ssize_t r;
        do {
            r = read(q->kick_fd, buf, sizeof buf);
        } while (r < 0 && errno == EINTR);
    }
    return 0;
}

int vhs_queue_info(vhs_dev *d, uint32_t qi, struct vhs_queue_info *out)
{
    if (!get_queue(d, qi))
        return -EINVAL;
    const struct queue *q = &d->q[qi];
    out->kick_fd = q->kick_fd;
    out->call_fd = q->call_fd;
    out->num = q->num;
    out->inflight = q->inflight;
    out->last_avail = q->last_avail;
    out->used_idx = q->used_idx;
    out->started = q->started;
    out->enabled = q->enabled;
    out->ready = q->ready;
    out->broken = q->broken;
    out->running = queue_running(q, d);
    out->stopping = d->deferred_q == (int)qi;
    return 0;
}

const char *vhs_queue_error(const vhs_dev *d, uint32_t qi)
{
    if (qi >= d->cfg.max_queues)
        return "queue index out of range";
    return d->q[qi].err;
}

/* ---------------------------------------------------------------------- */
/* Control messages                                                        */

enum { MSG_OK = 0, MSG_NACK = 1 };

static const uint8_t *payload(const vhs_dev *d)
{
    return (const uint8_t *)d->payload_u64;
}

static uint64_t payload_u64(const vhs_dev *d)
{
    uint64_t v;
    memcpy(&v, payload(d), 8);
    return v;
}

static void payload_state(const vhs_dev *d, uint32_t *index, uint32_t *num)
{
    memcpy(index, payload(d), 4);
    memcpy(num, payload(d) + 4, 4);
}

static int send_reply(vhs_dev *d, uint32_t req, const void *body, uint32_t size)
{
    uint8_t buf[VU_HDR_SIZE + 16];
    uint32_t hdr[3] = {req, VU_FLAG_VERSION | VU_FLAG_REPLY, size};
    memcpy(buf, hdr, VU_HDR_SIZE);
    memcpy(buf + VU_HDR_SIZE, body, size);
    size_t total = VU_HDR_SIZE + size;
    ssize_t n;
    do {
        n = send(d->sock, buf, total, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    /* A 20-byte reply that does not fit means the front-end stopped reading. */
    if (n != (ssize_t)total)
        return fail(d, ECONNRESET, "cannot send %s reply: %s", msg_name(req),
                    n < 0 ? strerror(errno) : "short write");
    return 0;
}

static int reply_u64(vhs_dev *d, uint64_t v)
{
    return send_reply(d, d->req, &v, 8);
}

/* Also sent long after the request (deferred), so it names the request itself. */
static int reply_vring_base(vhs_dev *d, uint32_t index)
{
    uint32_t body[2] = {index, d->q[index].last_avail};
    return send_reply(d, VU_GET_VRING_BASE, body, 8);
}

static uint32_t expected_fds(const vhs_dev *d)
{
    switch (d->req) {
    case VU_SET_MEM_TABLE: {
        uint32_t n;
        memcpy(&n, payload(d), 4);
        return n;
    }
    case VU_ADD_MEM_REG:
        return 1;
    case VU_SET_VRING_KICK:
    case VU_SET_VRING_CALL:
    case VU_SET_VRING_ERR:
        return (payload_u64(d) & VU_VRING_NOFD) ? 0 : 1;
    default:
        return 0;
    }
}

/* Payload size check made as soon as the header is in, before reading more. */
static int check_header(vhs_dev *d)
{
    if ((d->flags & VU_FLAG_VERSION_MASK) != VU_FLAG_VERSION)
        return fail(d, EPROTO, "%s: unsupported message version (flags %#x)", msg_name(d->req),
                    d->flags);
    if (d->flags & VU_FLAG_REPLY)
        return fail(d, EPROTO, "%s: front-end sent a message with the REPLY flag (flags %#x)",
                    msg_name(d->req), d->flags);
    bool slots = d->cfg.protocol_features & BIT(VHS_PF_CONFIGURE_MEM_SLOTS);
    int want;
    switch (d->req) {
    case VU_GET_FEATURES:
    case VU_SET_OWNER:
    case VU_GET_PROTOCOL_FEATURES:
    case VU_GET_QUEUE_NUM:
        want = 0;
        break;
    case VU_GET_MAX_MEM_SLOTS:
        if (!slots)
            goto unknown;
        want = 0;
        break;
    case VU_SET_FEATURES:
    case VU_SET_PROTOCOL_FEATURES:
    case VU_SET_VRING_KICK:
    case VU_SET_VRING_CALL:
    case VU_SET_VRING_ERR:
    case VU_SET_VRING_NUM:
    case VU_SET_VRING_BASE:
    case VU_GET_VRING_BASE:
    case VU_SET_VRING_ENABLE:
        want = 8;
        break;
    case VU_SET_VRING_ADDR:
        want = 40;
        break;
    case VU_ADD_MEM_REG:
    case VU_REM_MEM_REG:
        if (!slots)
            goto unknown;
        want = 40;
        break;
    case VU_SET_MEM_TABLE:
        if (d->size < 8 || d->size > VU_MAX_PAYLOAD || (d->size - 8) % VU_REGION_SIZE != 0)
            return fail(d, EPROTO, "SET_MEM_TABLE: payload of %u bytes is not 8 + 32 x regions (<= %u)",
                        d->size, VU_MEM_TABLE_MAX);
        return 0;
    default:
        goto unknown;
    }
    if (d->size != (uint32_t)want)
        return fail(d, EPROTO, "%s: payload is %u bytes, expected %d", msg_name(d->req), d->size,
                    want);
    return 0;
unknown:
    return fail(d, EPROTO, "unsupported request %u (%s); closing the connection", d->req,
                msg_name(d->req));
}

static void rx_reset(vhs_dev *d)
{
    for (int i = 0; i < d->nfds; i++)
        close_fd(&d->fds[i]);
    d->nfds = 0;
    d->hdr_got = d->pay_got = 0;
    d->req = d->flags = d->size = 0;
}

/* 1: a whole message is in; 0: need more bytes (EAGAIN); <0: error. */
static int rx_step(vhs_dev *d)
{
    for (;;) {
        uint8_t *dst;
        size_t want;
        if (d->hdr_got < VU_HDR_SIZE) {
            dst = d->hdr + d->hdr_got;
            want = VU_HDR_SIZE - d->hdr_got;
        } else if (d->pay_got < d->size) {
            dst = (uint8_t *)d->payload_u64 + d->pay_got;
            want = d->size - d->pay_got;
        } else {
            return 1;
        }
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(sizeof(int) * VU_MAX_FDS)];
        } cbuf;
        struct iovec iov = {.iov_base = dst, .iov_len = want};
        struct msghdr mh = {0};
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.buf;
        mh.msg_controllen = sizeof cbuf.buf;
        ssize_t n = recvmsg(d->sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return fail(d, ECONNRESET, "recvmsg: %s", strerror(errno));
        }
        bool too_many = false;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            size_t cnt = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < cnt; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
                if (d->nfds < VU_MAX_FDS)
                    d->fds[d->nfds++] = fd;
                else {
                    close(fd);
                    too_many = true;
                }
            }
        }
        if (n == 0)
            return fail(d, ECONNRESET, "front-end closed the connection");
        if (too_many || (mh.msg_flags & MSG_CTRUNC))
            return fail(d, EPROTO, "more than %d file descriptors on one message", VU_MAX_FDS);
        if (d->hdr_got < VU_HDR_SIZE) {
            d->hdr_got += (uint32_t)n;
            if (d->hdr_got == VU_HDR_SIZE) {
                uint32_t h[3];
                memcpy(h, d->hdr, sizeof h);
                d->req = h[0];
                d->flags = h[1];
                d->size = h[2];
                int rc = check_header(d);
                if (rc < 0)
                    return rc;
            }
        } else {
            d->pay_got += (uint32_t)n;
        }
    }
}

static int vring_index(vhs_dev *d, uint32_t index, struct queue **out)
{
    if (index >= d->cfg.max_queues)
        return fail(d, EPROTO, "%s: ring index %u out of range (this back-end accepts %u queues)",
                    msg_name(d->req), index, d->cfg.max_queues);
    if (index + 1 > d->nq_used)
        d->nq_used = index + 1;
    *out = &d->q[index];
    return 0;
}

static void swap_table(vhs_dev *d, struct memtab *t)
{
    struct memtab *old = d->tab;
    d->tab = t;
    for (uint32_t i = 0; i < d->nq_used; i++) {
        struct queue *q = &d->q[i];
        if (!q->addr_set)
            continue;
        bool was_ready = q->ready;
        if (!queue_resolve(q, t) && was_ready)
            /* The old mapping (still referenced by the ring) keeps working:
             * better than stopping a queue the guest is using. */
            warn(d, "queue %u: rings not inside the new memory table; keeping the previous mapping", i);
    }
    memtab_unref(old);
}

static int handle_set_mem_table(vhs_dev *d)
{
    uint32_t n;
    memcpy(&n, payload(d), 4);
    if (n > VU_MEM_TABLE_MAX || d->size != 8 + n * VU_REGION_SIZE)
        return fail(d, EPROTO, "SET_MEM_TABLE: %u regions in a %u-byte payload", n, d->size);
    struct memtab *t = memtab_new();
    if (!t) {
        warn(d, "SET_MEM_TABLE: out of memory");
        return MSG_NACK;
    }
    for (uint32_t i = 0; i < n; i++) {
        struct wire_region w;
        char why[200];
        parse_region(payload(d) + 8 + i * VU_REGION_SIZE, &w);
        struct region *r = region_map(&w, d->fds[i], t, why, sizeof why);
        if (!r) {
            warn(d, "SET_MEM_TABLE rejected: %s", why);
            memtab_unref(t);
            return MSG_NACK;
        }
        t->r[t->n++] = r;
    }
    swap_table(d, t);
    return MSG_OK;
}

static struct memtab *memtab_clone(const struct memtab *old)
{
    struct memtab *t = memtab_new();
    if (!t)
        return NULL;
    for (uint32_t i = 0; old && i < old->n; i++) {
        t->r[t->n++] = old->r[i];
        old->r[i]->refs++;
    }
    return t;
}

static int handle_add_mem_reg(vhs_dev *d)
{
    struct wire_region w;
    char why[200];
    parse_region(payload(d) + 8, &w);
    uint32_t have = d->tab ? d->tab->n : 0;
    if (have >= d->cfg.max_mem_slots) {
        warn(d, "ADD_MEM_REG rejected: all %u memory slots are in use", d->cfg.max_mem_slots);
        return MSG_NACK;
    }
    struct region *r = region_map(&w, d->fds[0], d->tab, why, sizeof why);
    if (!r) {
        warn(d, "ADD_MEM_REG rejected: %s", why);
        return MSG_NACK;
    }
    struct memtab *t = memtab_clone(d->tab);
    if (!t) {
        region_unref(r);
        warn(d, "ADD_MEM_REG: out of memory");
        return MSG_NACK;
    }
    t->r[t->n++] = r;
    swap_table(d, t);
    return MSG_OK;
}

static int handle_rem_mem_reg(vhs_dev *d)
{
    struct wire_region w;
    parse_region(payload(d) + 8, &w);
    const struct memtab *cur = d->tab;
    uint32_t found = UINT32_MAX;
    for (uint32_t i = 0; cur && i < cur->n; i++) {
        const struct region *r = cur->r[i];
        if (r->gpa == w.gpa && r->size == w.size && r->uva == w.uva) {
            found = i;
            break;
        }
    }
    if (found == UINT32_MAX) {
        warn(d, "REM_MEM_REG rejected: no region gpa=%#" PRIx64 " size=%#" PRIx64 " uva=%#" PRIx64,
             w.gpa, w.size, w.uva);
        return MSG_NACK;
    }
    struct memtab *t = memtab_new();
    if (!t) {
        warn(d, "REM_MEM_REG: out of memory");
        return MSG_NACK;
    }
    for (uint32_t i = 0; i < cur->n; i++) {
        if (i == found)
            continue;
        t->r[t->n++] = cur->r[i];
        cur->r[i]->refs++;
    }
    swap_table(d, t);
    return MSG_OK;
}

static int handle_vring_fd(vhs_dev *d, int *ev)
{
    uint64_t v = payload_u64(d);
    struct queue *q;
    int rc = vring_index(d, (uint32_t)(v & VU_VRING_IDX_MASK), &q);
    if (rc < 0)
        return rc;
    if (v & ~(VU_VRING_IDX_MASK | VU_VRING_NOFD))
        return fail(d, EPROTO, "%s: reserved bits set in %#" PRIx64, msg_name(d->req), v);
    int fd = -1;
    if (!(v & VU_VRING_NOFD)) {
        fd = d->fds[0];
        d->fds[0] = -1; /* ownership moves to the queue */
        /* The front-end's event notifiers are non-blocking already; this
         * guards against a pipe that is never drained blocking us. */
        set_nonblock(fd);
    }
    switch (d->req) {
    case VU_SET_VRING_KICK:
        retire_fd(d, &q->kick_fd);
        q->kick_fd = fd;
        q->started = true;
        /* Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: a ring
         * starts enabled (vhost-user spec, "Ring states"). */
        if (!(d->features & BIT(VHS_F_PROTOCOL_FEATURES)))
            q->enabled = true;
        queue_sync_used(q);
        *ev |= VHS_EV_QUEUES;
        break;
    case VU_SET_VRING_CALL:
        close_fd(&q->call_fd);
        q->call_fd = fd;
        /* An interrupt raised on the old fd during the swap may be lost:
         * regenerate it (spurious interrupts are harmless, lost ones hang). */
        if (q->started)
            eventfd_signal(q->call_fd);
        break;
    default:
        close_fd(&q->err_fd);
        q->err_fd = fd;
        break;
    }
    return MSG_OK;
}

static int handle_message(vhs_dev *d, int *ev)
{
    uint32_t index, num;
    struct queue *q;
    int rc;

    if ((uint32_t)d->nfds != expected_fds(d) &&
        !(d->req == VU_REM_MEM_REG && d->nfds == 1)) /* QEMU may attach the fd; ignore it */
        return fail(d, EPROTO, "%s: %d file descriptors attached, expected %u", msg_name(d->req),
                    d->nfds, expected_fds(d));

    switch (d->req) {
    case VU_GET_FEATURES:
        return reply_u64(d, d->cfg.features);
    case VU_SET_FEATURES: {
        uint64_t v = payload_u64(d);
        if (v & ~d->cfg.features) {
            warn(d, "SET_FEATURES %#" PRIx64 " acks bits never offered (%#" PRIx64 "); ignoring them",
                 v, v & ~d->cfg.features);
            v &= d->cfg.features;
        }
        if (!(v & BIT(VHS_F_VERSION_1))) {
            warn(d, "SET_FEATURES %#" PRIx64 " lacks VIRTIO_F_VERSION_1; refused", v);
            return MSG_NACK;
        }
        d->features = v;
        return MSG_OK;
    }
    case VU_SET_OWNER:
        return MSG_OK;
    case VU_GET_PROTOCOL_FEATURES:
        return reply_u64(d, d->cfg.protocol_features);
    case VU_SET_PROTOCOL_FEATURES: {
        uint64_t v = payload_u64(d);
        if (v & ~d->cfg.protocol_features) {
            warn(d, "SET_PROTOCOL_FEATURES %#" PRIx64 " acks bits never offered; ignoring them", v);
            v &= d->cfg.protocol_features;
        }
        d->protocol_features = v;
        return MSG_OK;
    }
    case VU_GET_QUEUE_NUM:
        return reply_u64(d, d->cfg.queue_num);
    case VU_GET_MAX_MEM_SLOTS:
        return reply_u64(d, d->cfg.max_mem_slots);
    case VU_SET_MEM_TABLE:
        rc = handle_set_mem_table(d);
        *ev |= VHS_EV_MEMTABLE | VHS_EV_QUEUES;
        return rc;
    case VU_ADD_MEM_REG:
        rc = handle_add_mem_reg(d);
        *ev |= VHS_EV_MEMTABLE | VHS_EV_QUEUES;
        return rc;
    case VU_REM_MEM_REG:
        rc = handle_rem_mem_reg(d);
        *ev |= VHS_EV_MEMTABLE | VHS_EV_QUEUES;
        return rc;
    case VU_SET_VRING_NUM:
        payload_state(d, &index, &num);
        if ((rc = vring_index(d, index, &q)) < 0)
            return rc;
        if (num == 0 || (num & (num - 1)) || num > d->cfg.max_queue_size) {
            warn(d, "SET_VRING_NUM %u for queue %u: not a power of two in 1..%u", num, index,
                 d->cfg.max_queue_size);
            return MSG_NACK;
        }
        if (q->started || q->inflight) {
            warn(d, "SET_VRING_NUM for running queue %u refused (stop it with GET_VRING_BASE)",
                 index);
            return MSG_NACK;
        }
        if (num != q->num) {
            queue_unresolve(q);
            if (queue_alloc(d, q, num) < 0) {
                warn(d, "SET_VRING_NUM %u: out of memory", num);
                return MSG_NACK;
            }
            if (q->addr_set)
                queue_resolve(q, d->tab);
        }
        *ev |= VHS_EV_QUEUES;
        return MSG_OK;
    case VU_SET_VRING_ADDR: {
        uint32_t flags;
        uint64_t a[4];
        memcpy(&index, payload(d), 4);
        memcpy(&flags, payload(d) + 4, 4);
        memcpy(a, payload(d) + 8, 32);
        if ((rc = vring_index(d, index, &q)) < 0)
            return rc;
        /* Wire order: desc, used, avail, log. */
        q->desc_uva = a[0];
        q->used_uva = a[1];
        q->avail_uva = a[2];
        q->addr_set = true;
        queue_unresolve(q);
        *ev |= VHS_EV_QUEUES;
        if (q->num == 0) {
            warn(d, "SET_VRING_ADDR for queue %u before SET_VRING_NUM", index);
            return MSG_NACK;
        }
        if ((a[0] & 15) || (a[1] & 3) || (a[2] & 1) || !queue_resolve(q, d->tab)) {
            warn(d,
                 "SET_VRING_ADDR queue %u: desc=%#" PRIx64 " used=%#" PRIx64 " avail=%#" PRIx64
                 " not aligned or not inside one memory region",
                 index, a[0], a[1], a[2]);
            return MSG_NACK;
        }
        if (q->started)
            queue_sync_used(q);
        return MSG_OK;
    }
    case VU_SET_VRING_BASE:
        payload_state(d, &index, &num);
        if ((rc = vring_index(d, index, &q)) < 0)
            return rc;
        if (num > 0xffff) {
            warn(d, "SET_VRING_BASE %u for queue %u exceeds 16 bits", num, index);
            return MSG_NACK;
        }
        if (q->started || q->inflight) {
            warn(d, "SET_VRING_BASE for running queue %u refused (stop it with GET_VRING_BASE)",
                 index);
            return MSG_NACK;
        }
        q->last_avail = (uint16_t)num;
        q->broken = false;
        q->err[0] = '\0';
        *ev |= VHS_EV_QUEUES;
        return MSG_OK;
    case VU_GET_VRING_BASE:
        payload_state(d, &index, &num);
        if ((rc = vring_index(d, index, &q)) < 0)
            return rc;
        q->started = false;
        q->enabled = false;
        retire_fd(d, &q->kick_fd);
        q->broken = false;
        q->err[0] = '\0';
        *ev |= VHS_EV_QUEUES;
        if (q->inflight) {
            /* Answered from vhs_dev_finish_deferred() once the caller has
             * pushed every in-flight request (QEMU waits for the reply). */
            d->deferred_q = (int)index;
            *ev |= VHS_EV_DEFERRED;
            return MSG_OK;
        }
        return reply_vring_base(d, index);
    case VU_SET_VRING_KICK:
    case VU_SET_VRING_CALL:
    case VU_SET_VRING_ERR:
        return handle_vring_fd(d, ev);
    case VU_SET_VRING_ENABLE:
        payload_state(d, &index, &num);
        if ((rc = vring_index(d, index, &q)) < 0)
            return rc;
        if (num > 1) {
            warn(d, "SET_VRING_ENABLE %u for queue %u is not 0 or 1", num, index);
            return MSG_NACK;
        }
        q->enabled = num == 1;
        *ev |= VHS_EV_QUEUES;
        return MSG_OK;
    default:
        return fail(d, EPROTO, "unsupported request %u (%s)", d->req, msg_name(d->req));
    }
}

static bool has_own_reply(uint32_t req)
{
    switch (req) {
    case VU_GET_FEATURES:
    case VU_GET_PROTOCOL_FEATURES:
    case VU_GET_QUEUE_NUM:
    case VU_GET_MAX_MEM_SLOTS:
    case VU_GET_VRING_BASE:
        return true;
    default:
        return false;
    }
}

int vhs_dev_dispatch(vhs_dev *d)
{
    int ev = 0;
    if (d->dead)
        return d->dead_rc;
    for (int budget = DISPATCH_BUDGET; budget > 0; budget--) {
        if (d->deferred_q >= 0) {
            ev |= VHS_EV_DEFERRED;
            break;
        }
        int rc = rx_step(d);
        if (rc == 0)
            break;
        if (rc > 0) {
            rc = handle_message(d, &ev);
            if (rc >= 0 && !has_own_reply(d->req) && (d->flags & VU_FLAG_NEED_REPLY) &&
                (d->protocol_features & BIT(VHS_PF_REPLY_ACK)))
                rc = reply_u64(d, rc == MSG_NACK ? 1 : 0);
            rx_reset(d);
        }
        if (rc < 0) {
            rx_reset(d);
            d->dead = true;
            d->dead_rc = rc;
            return rc;
        }
    }
    if (d->log_len)
        ev |= VHS_EV_LOG;
    return ev;
}

int vhs_dev_finish_deferred(vhs_dev *d)
{
    if (d->deferred_q < 0)
        return 1;
    if (d->dead)
        return d->dead_rc;
    uint32_t index = (uint32_t)d->deferred_q;
    if (d->q[index].inflight)
        return 0;
    d->deferred_q = -1;
    int rc = reply_vring_base(d, index);
    if (rc < 0) {
        d->dead = true;
        d->dead_rc = rc;
        return rc;
    }
    return 1;
}

/* ---------------------------------------------------------------------- */
/* Device lifetime and queries                                             */

const char *vhs_version(void)
{
    return VHS_PACKAGE_VERSION;
}

int vhs_abi_version(void)
{
    return VHS_ABI_VERSION;
}

void vhs_default_config(struct vhs_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->features = SUPPORTED_FEATURES;
    cfg->protocol_features = SUPPORTED_PROTOCOL_FEATURES;
    cfg->queue_num = 2;
    cfg->max_queues = 17;
    cfg->max_queue_size = 1024;
    cfg->max_mem_slots = 32;
    cfg->max_in_bytes = (1u << 20) + (64u << 10);
    cfg->max_copy_bytes = cfg->max_in_bytes;
    cfg->max_out_bytes = (1u << 20) + (64u << 10);
    cfg->max_inflight_bytes = 64ull << 20;
}

vhs_dev *vhs_dev_new(int sock_fd, const struct vhs_config *cfg)
{
    if (sock_fd < 0 || !cfg || cfg->max_queues == 0 || cfg->max_queues > VHS_MAX_QUEUES ||
        cfg->max_queue_size == 0 || cfg->max_queue_size > VHS_MAX_QUEUE_SIZE ||
        (cfg->max_queue_size & (cfg->max_queue_size - 1)) || cfg->max_mem_slots == 0 ||
        cfg->max_mem_slots > VHS_MAX_MEM_SLOTS || (cfg->features & ~SUPPORTED_FEATURES) ||
        !(cfg->features & BIT(VHS_F_VERSION_1)) ||
        (cfg->protocol_features & ~SUPPORTED_PROTOCOL_FEATURES) || cfg->max_in_bytes < 4096 ||
        cfg->max_out_bytes < 4096 || cfg->max_copy_bytes < VHS_OVERSIZE_PREFIX)
        return NULL;
    vhs_dev *d = calloc(1, sizeof *d);
    if (!d)
        return NULL;
    d->sock = sock_fd;
    d->cfg = *cfg;
    d->copy_cap = cfg->max_copy_bytes < cfg->max_in_bytes ? cfg->max_copy_bytes : cfg->max_in_bytes;
    d->deferred_q = -1;
    for (int i = 0; i < VU_MAX_FDS; i++)
        d->fds[i] = -1;
    for (int i = 0; i < VHS_MAX_QUEUES; i++) {
        d->q[i].kick_fd = d->q[i].call_fd = d->q[i].err_fd = -1;
    }
    set_nonblock(sock_fd);
    return d;
}

void vhs_dev_free(vhs_dev *d)
{
    if (!d)
        return;
    rx_reset(d);
    for (int i = 0; i < VHS_MAX_QUEUES; i++) {
        struct queue *q = &d->q[i];
        queue_free_ring_state(d, q);
        queue_unresolve(q);
        close_fd(&q->kick_fd);
        close_fd(&q->call_fd);
        close_fd(&q->err_fd);
    }
    vhs_dev_close_retired(d);
    memtab_unref(d->tab);
    free(d);
}

const char *vhs_dev_error(const vhs_dev *d)
{
    return d->err;
}

size_t vhs_dev_take_log(vhs_dev *d, char *buf, size_t cap)
{
    if (cap == 0)
        return 0;
    size_t n = d->log_len < cap - 1 ? d->log_len : cap - 1;
    memcpy(buf, d->log, n);
    buf[n] = '\0';
    if (d->log_dropped && n + 40 < cap) {
        const char *more = "(further warnings were dropped)\n";
        memcpy(buf + n, more, strlen(more) + 1);
        n += strlen(more);
    }
    d->log_len = 0;
    d->log[0] = '\0';
    d->log_dropped = false;
    return n;
}

uint64_t vhs_dev_features(const vhs_dev *d)
{
    return d->features;
}

uint64_t vhs_dev_protocol_features(const vhs_dev *d)
{
    return d->protocol_features;
}

uint32_t vhs_dev_num_queues(const vhs_dev *d)
{
    return d->nq_used;
}

uint32_t vhs_dev_num_regions(const vhs_dev *d)
{
    return d->tab ? d->tab->n : 0;
}
