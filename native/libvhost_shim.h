/*
 * libvhost_shim: the back-end side of vhost-user for a virtio-fs device.
 *
 * What this owns: the vhost-user control socket (one message at a time,
 * non-blocking), the guest memory table (mmap of the region fds, GPA and
 * front-end-virtual translation), and the split virtqueues (popping
 * descriptor chains, pushing used entries, EVENT_IDX notification).
 *
 * What it does not own: FUSE.  Requests leave this layer as a private copy of
 * the device-readable bytes (for a long request only its first max_copy_bytes:
 * the rest, WRITE data, is read or pwritev()-ed from guest memory on demand)
 * plus a writable capacity; replies come back as bytes or as (fd, offset,
 * length) ranges that are preadv()-ed straight into the guest's writable
 * buffers.
 *
 * Execution model: single-threaded and non-blocking.  Every entry point is
 * called from the thread that owns the device (the asyncio loop); the shim
 * never blocks, never starts threads and never calls back into the caller.
 * The caller watches the socket and the kick fds and calls in:
 *
 *     socket readable  -> vhs_dev_dispatch()
 *     kick readable    -> vhs_queue_drain_kick(); vhs_queue_pop() until empty
 *     PARTIAL request  -> vhs_req_read_in() / vhs_req_pwrite_in() (before the push)
 *     reply ready      -> vhs_req_complete() or vhs_req_write()/vhs_req_pread()
 *                         + vhs_req_push()
 *     end of a batch   -> vhs_queue_notify()   (one call per batch)
 *     deferred stop    -> vhs_dev_finish_deferred() after completions
 *
 * Errors: functions returning int give >= 0 on success and a negative errno
 * on failure.  -ECONNRESET: the front-end hung up.  -EPROTO: the front-end
 * broke the protocol (the caller must drop the connection).  -EINVAL: the
 * caller misused the API (bad queue index, head not in flight).  The text of
 * the last failure is available from vhs_dev_error().
 *
 * The guest is never trusted: a malformed ring marks only that queue broken
 * (reason in vhs_queue_error(), err eventfd signalled) until the front-end's
 * next GET_VRING_BASE / SET_VRING_BASE cycle.
 */
#ifndef NYDUS_VFS_LIBVHOST_SHIM_H
#define NYDUS_VFS_LIBVHOST_SHIM_H

#include <stddef.h>
#include <stdint.h>

/* Bumped whenever a declaration below changes meaning. */
#define VHS_ABI_VERSION 3

/* Hard limits (the run-time configuration may only lower them). */
#define VHS_MAX_QUEUES 64
#define VHS_MAX_QUEUE_SIZE 32768
#define VHS_MAX_MEM_SLOTS 64

/* virtio / vhost-user feature bits this shim can implement. */
#define VHS_F_INDIRECT_DESC 28
#define VHS_F_EVENT_IDX 29
#define VHS_F_PROTOCOL_FEATURES 30
#define VHS_F_VERSION_1 32

#define VHS_PF_MQ 0
#define VHS_PF_REPLY_ACK 3
#define VHS_PF_CONFIGURE_MEM_SLOTS 15

/* Bits returned by vhs_dev_dispatch(). */
#define VHS_EV_QUEUES 0x1   /* a queue's kick fd or running state changed */
#define VHS_EV_DEFERRED 0x2 /* a GET_VRING_BASE reply waits for in-flight requests:
                               stop reading the socket until vhs_dev_finish_deferred() */
#define VHS_EV_LOG 0x4      /* warnings are waiting in vhs_dev_take_log() */
#define VHS_EV_MEMTABLE 0x8 /* the memory table changed */

/* Bits stored in *status by vhs_queue_pop(). */
#define VHS_POP_MORE 0x1      /* the batch filled up and more requests are available */
#define VHS_POP_BROKEN 0x2    /* the queue became broken during this call */
#define VHS_POP_THROTTLED 0x4 /* stopped because the in-flight memory budget is used up;
                                 pop again after completions */

/* Bits of vhs_req.flags (at most one is set; OVERSIZE wins). */
#define VHS_REQ_OVERSIZE 0x1 /* the readable part exceeded max_in_bytes: only its
                                first VHS_OVERSIZE_PREFIX bytes were copied */
#define VHS_REQ_PARTIAL 0x2  /* the readable part exceeded max_copy_bytes: only its
                                first max_copy_bytes were copied; the rest is
                                available through vhs_req_read_in/pwrite_in */
#define VHS_OVERSIZE_PREFIX 64

struct vhs_config {
    uint64_t features;          /* virtio feature bits offered (GET_FEATURES) */
    uint64_t protocol_features; /* protocol feature bits offered */
    uint32_t queue_num;         /* answer to GET_QUEUE_NUM */
    uint32_t max_queues;        /* ring indices accepted: 0 .. max_queues-1 */
    uint32_t max_queue_size;    /* largest SET_VRING_NUM accepted (power of two) */
    uint32_t max_mem_slots;     /* answer to GET_MAX_MEM_SLOTS and region limit */
    uint32_t max_in_bytes;      /* cap on one request's readable part */
    uint32_t max_copy_bytes;    /* readable bytes copied at pop (>= VHS_OVERSIZE_PREFIX; above
                                   max_in_bytes means max_in_bytes, the default) */
    uint32_t max_out_bytes;     /* cap on one request's writable part (clamped, not failed) */
    uint64_t max_inflight_bytes; /* heap held by all in-flight requests (copies, iovecs) */
};

/* One popped request.  'data' stays valid until the request is pushed. */
struct vhs_req {
    const char *data;  /* private copy of the device-readable bytes (a prefix if flagged) */
    uint32_t in_len;   /* bytes at 'data' */
    uint32_t in_total; /* readable bytes the chain described (> in_len if OVERSIZE or PARTIAL) */
    uint32_t out_cap;  /* device-writable bytes available for the reply */
    uint16_t head;     /* descriptor head: the request's id within its queue */
    uint16_t flags;    /* VHS_REQ_* */
};

struct vhs_queue_info {
    int kick_fd;       /* -1 when none (not started, or NOFD: poll) */
    int call_fd;       /* -1 when none */
    uint32_t num;      /* queue size, 0 before SET_VRING_NUM */
    uint32_t inflight; /* popped, not yet pushed */
    uint16_t last_avail;
    uint16_t used_idx;
    uint8_t started;   /* SET_VRING_KICK seen since the last GET_VRING_BASE */
    uint8_t enabled;
    uint8_t ready;     /* ring addresses resolved */
    uint8_t broken;
    uint8_t running;   /* started && enabled && ready && !broken: pop it */
    uint8_t stopping;  /* a GET_VRING_BASE reply for it is deferred */
};

typedef struct vhs_dev vhs_dev;

const char *vhs_version(void);
int vhs_abi_version(void);
void vhs_default_config(struct vhs_config *cfg);

/* The socket stays owned by the caller (never closed here); it is switched to
 * non-blocking mode.  Returns NULL only when out of memory or cfg is invalid. */
vhs_dev *vhs_dev_new(int sock_fd, const struct vhs_config *cfg);
/* Closes every fd received from the front-end and unmaps guest memory. */
void vhs_dev_free(vhs_dev *dev);

int vhs_dev_dispatch(vhs_dev *dev);
/* 1: the deferred reply was sent (or none was pending); 0: still waiting. */
int vhs_dev_finish_deferred(vhs_dev *dev);
const char *vhs_dev_error(const vhs_dev *dev);
/* Close the kick fds retired since the last call.  Call it after removing
 * them from your poller (closing an fd still registered with epoll leaves a
 * stale registration, because the front-end holds the same open file). */
void vhs_dev_close_retired(vhs_dev *dev);
/* Copies pending warning lines (NUL-terminated, '\n'-separated) into buf and
 * clears them; returns the length copied. */
size_t vhs_dev_take_log(vhs_dev *dev, char *buf, size_t cap);
uint64_t vhs_dev_features(const vhs_dev *dev);          /* acked by SET_FEATURES */
uint64_t vhs_dev_protocol_features(const vhs_dev *dev); /* acked by SET_PROTOCOL_FEATURES */
uint32_t vhs_dev_num_queues(const vhs_dev *dev);        /* highest ring index used + 1 */
uint32_t vhs_dev_num_regions(const vhs_dev *dev);

int vhs_queue_info(vhs_dev *dev, uint32_t q, struct vhs_queue_info *out);
const char *vhs_queue_error(const vhs_dev *dev, uint32_t q);
int vhs_queue_drain_kick(vhs_dev *dev, uint32_t q);
int vhs_queue_pop(vhs_dev *dev, uint32_t q, struct vhs_req *reqs, int max, int *status);
/* 1 if the call eventfd was signalled, 0 if not needed. */
int vhs_queue_notify(vhs_dev *dev, uint32_t q);

/* The readable part in guest memory.  Every in-flight request that is not
 * OVERSIZE has its readable bytes [0, in_total) available here, PARTIAL or
 * not; the request's reference on the memory table keeps them mapped until it
 * is pushed, whatever the front-end does to the table meanwhile.  These read
 * guest memory as it is *now*: the guest may change it at any time, also in
 * the middle of the call, but that can only change its own data (what gets
 * written to the file), never what the shim or the caller reads or writes.
 * Whatever the caller validates (FUSE headers, names, sizes) must therefore
 * come from the private copy at 'data', never from these calls.
 * Both return -EINVAL, touching nothing, when head is not in flight, the
 * request is OVERSIZE, or [off, off+len) is not inside [0, in_total) (off+len
 * is computed without overflow). */

/* Copy readable bytes [off, off+len) into buf; 0 on success. */
int vhs_req_read_in(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t off, char *buf, uint32_t len);
/* One pwritev() of readable bytes [off, off+len) to fd at file_off, straight
 * from guest memory; returns the bytes written (short as a write(2) may be,
 * also when the range spans more than IOV_MAX guest buffers) or -errno
 * (-EINVAL also for a negative file_off, or pwritev's own EINVAL). */
int64_t vhs_req_pwrite_in(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t off, int fd,
                          int64_t file_off, uint32_t len);

/* Copy len bytes into the request's writable part at byte offset off. */
int vhs_req_write(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t off,
                  const char *buf, uint32_t len);
/* preadv() up to len bytes of fd at file_off into the writable part at off;
 * returns the bytes read (short only at end of file) or -errno. */
int64_t vhs_req_pread(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t off,
                      int fd, int64_t file_off, uint32_t len);
/* Return the chain to the guest with used length used_len (0 for no reply).
 * A used_len above the writable capacity is pushed as 0 and -EMSGSIZE returned. */
int vhs_req_push(vhs_dev *dev, uint32_t q, uint16_t head, uint32_t used_len);
/* The common READ reply in one call: hdr at offset 0, then len bytes of fd at
 * file_off preadv()-ed right after it, then pushed with used length
 * hdr_len + len.  Returns the bytes read from fd; when that is short of len
 * (or negative: -errno) nothing is pushed and the caller must still complete
 * the request (typically with an error reply). */
int64_t vhs_req_complete_file(vhs_dev *dev, uint32_t q, uint16_t head, const char *hdr,
                              uint32_t hdr_len, int fd, int64_t file_off, uint32_t len);
/* vhs_req_write(buf at 0) + vhs_req_push(len).  A reply larger than the
 * writable part is not written: the chain is pushed with used length 0 and
 * -EMSGSIZE returned. */
int vhs_req_complete(vhs_dev *dev, uint32_t q, uint16_t head, const char *buf, uint32_t len);

#endif
