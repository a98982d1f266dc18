/* wiretun._speedups: the session's per-packet loops in C (optional; wiretun.session has the same loops
 * in pure Python and uses them when this module is not built or WIRETUN_NO_SPEEDUPS=1 is set).
 *
 * Every function works on a Wintun ring given as two memoryviews of the same memory, exactly as
 * wiretun.ring.Ring exposes it: ``words`` (the ring from its first byte: Head, Tail, Alertable, ...) and
 * ``data`` (the ring's Data array, 12 bytes further on, capacity + 0x10000 bytes long). The capacity
 * follows from the length of ``data``. Offsets are offsets into Data, as in wiretun.ring.
 *
 * The semantics are those of the pure-Python loops in wiretun.session, step for step (which packet goes
 * where, when a packet is dropped, when the loop stops, which errno ends it); the unit tests compare the
 * two on the same input. The GIL is released around the system calls (for a whole run of them, not per
 * packet: no Python object is touched meanwhile, and the buffers stay exported so the memory cannot go
 * away). Errors from the kernel are returned as errno values, so that the caller can bookkeep what was
 * done before raising the exception the Python path raises; EINTR is retried after running the signal
 * handlers, as os.readv/os.writev do (an exception from a handler propagates, as it does there).
 *
 * Packet views are memoryviews of ``data`` sharing its managed buffer, as ``data[a:b]`` would be: they
 * keep the ring memory alive on their own. Calls on one ring must not overlap (the session holds the
 * ring's lock around each); while a call runs, the buffers it was given stay exported, so the memory
 * cannot be unmapped under it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>
#include <stdarg.h>
#include <structmember.h>
#include <pthread.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
/* The ring is little-endian; so is the memory layout these loops assume. Big-endian hosts use the
 * pure-Python path (wiretun.ring handles byte order there). */
#error "wiretun._speedups supports little-endian hosts only"
#endif

#define RING_HEADER 12u
#define HEAD_WORD 0
#define TAIL_WORD 1
#define MIN_CAPACITY 0x20000u
#define MAX_CAPACITY 0x4000000u
#define TRAILING_SIZE 0x10000u
#define MAX_PACKET_SIZE 0xFFFFu
#define MAX_RECORD_SIZE 0x10004u
#define READ_SPAN MAX_PACKET_SIZE
#define VNET_HDR_SIZE 10
#define CHUNK 64 /* packets per GIL release (views are made with the GIL held, between runs) */

/* Status codes besides errno values (which are positive). */
#define ST_SHORT_READ (-1) /* rx: the kernel returned fewer bytes than the virtio-net header */
#define ST_BAD_RECORD (-1) /* tx: a Size in the send ring is impossible */
#define ST_NOT_SIMPLE (-1) /* tx_direct: this item needs the Python path (not a flat byte buffer, bad size) */

/* ------------------------------------------------------------------------------------------------ */
/* Argument helpers                                                                                  */

static int
get_long(PyObject *obj, const char *what, long lo, long hi, long *out)
{
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s %R is out of range: must be %ld..%ld", what, obj, lo, hi);
        }
        return -1;
    }
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s %ld is out of range: must be %ld..%ld", what, v, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

static int
get_fd(PyObject *obj, int *fd)
{
    long v;
    if (get_long(obj, "fd", 0, INT32_MAX, &v) < 0)
        return -1;
    *fd = (int)v;
    return 0;
}

static int
get_list_or_none(PyObject *obj, const char *what, PyObject **out)
{
    if (obj == Py_None) {
        *out = NULL;
        return 0;
    }
    if (!PyList_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list or None, not %.100s", what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = obj;
    return 0;
}

/* A writable buffer of at least ``min`` bytes. */
static int
get_writable(PyObject *obj, const char *what, Py_ssize_t min, Py_buffer *b)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE) < 0) {
        /* Say which argument it was; keep the type of the original error (TypeError / BufferError). */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        /* A read-only buffer says BufferError; for the caller it is the wrong type of argument. */
        PyObject *kind = (type == NULL || PyErr_GivenExceptionMatches(type, PyExc_BufferError)) ? PyExc_TypeError
                                                                                              : type;
        PyErr_Format(kind, "%s must be a writable contiguous buffer: %S", what, value ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    if (b->len < min) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, needs at least %zd", what, b->len, min);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static int
get_readable(PyObject *obj, const char *what, Py_ssize_t min, Py_buffer *b)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_SIMPLE) < 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(type ? type : PyExc_TypeError, "%s must be a contiguous buffer: %S", what,
                     value ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    if (b->len < min) {
        PyErr_Format(PyExc_ValueError, "%s has %zd bytes, needs at least %zd", what, b->len, min);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

/* The ring: ``words`` is the ring itself (Head, Tail, Alertable, Data[capacity + 0x10000]), its length
 * gives the capacity; ``data`` is a 1-D unsigned-byte memoryview starting at Data[0] (12 bytes into words;
 * packet views are slices of it) and at least as long as Data; it may run on further (an offload
 * session's receive ring has a little slack after the trailing area for frames). */
typedef struct {
    Py_buffer wb, db;
    volatile uint32_t *words;
    unsigned char *data;
    uint32_t cap, mask;
} Ring;

static int
get_ring(PyObject *words_obj, PyObject *data_obj, Ring *ring)
{
    if (!PyMemoryView_Check(data_obj)) {
        PyErr_Format(PyExc_TypeError, "data must be a memoryview (the ring's Data array), not %.100s",
                     Py_TYPE(data_obj)->tp_name);
        return -1;
    }
    Py_buffer *mv = PyMemoryView_GET_BUFFER(data_obj);
    if (mv->ndim != 1 || mv->itemsize != 1 || (mv->format && strcmp(mv->format, "B") != 0)) {
        PyErr_SetString(PyExc_ValueError, "data must be a 1-D memoryview of unsigned bytes (format 'B')");
        return -1;
    }
    if (get_writable(words_obj, "words", RING_HEADER, &ring->wb) < 0)
        return -1;
    if (get_writable(data_obj, "data", 0, &ring->db) < 0) {
        PyBuffer_Release(&ring->wb);
        return -1;
    }
    Py_ssize_t cap = ring->wb.len - RING_HEADER - TRAILING_SIZE;
    const char *problem = NULL;
    if (cap < MIN_CAPACITY || cap > MAX_CAPACITY || (cap & (cap - 1)) != 0)
        problem = "words is not a ring: it must be 12 + capacity + 0x10000 bytes with a power-of-two "
                  "capacity from 0x20000 to 0x4000000";
    else if ((char *)ring->wb.buf + RING_HEADER != (char *)ring->db.buf ||
             ring->db.len < ring->wb.len - (Py_ssize_t)RING_HEADER)
        problem = "words and data are not views of one ring (data must start 12 bytes into words and run "
                  "at least to the ring's end)";
    else if (((uintptr_t)ring->wb.buf & 3) != 0)
        problem = "the ring is not 4-byte aligned";
    if (problem) {
        PyErr_Format(PyExc_ValueError, "%s (words has %zd bytes, data %zd)", problem, ring->wb.len,
                     ring->db.len);
        PyBuffer_Release(&ring->db);
        PyBuffer_Release(&ring->wb);
        return -1;
    }
    ring->words = (volatile uint32_t *)ring->wb.buf;
    ring->data = (unsigned char *)ring->db.buf;
    ring->cap = (uint32_t)cap;
    ring->mask = (uint32_t)cap - 1;
    return 0;
}

static void
release_ring(Ring *ring)
{
    PyBuffer_Release(&ring->db);
    PyBuffer_Release(&ring->wb);
}

static inline uint32_t
load_word(Ring *ring, int index)
{
    return __atomic_load_n(&ring->words[index], __ATOMIC_ACQUIRE);
}

static inline void
store_word(Ring *ring, int index, uint32_t value)
{
    /* Release: the packet bytes and Size words written before are visible before the index moves. */
    __atomic_store_n(&ring->words[index], value, __ATOMIC_RELEASE);
}

static inline void
store_size(Ring *ring, uint32_t record, uint32_t size)
{
    *(volatile uint32_t *)(ring->data + record) = size;
}

static inline uint32_t
load_size(Ring *ring, uint32_t record)
{
    return *(volatile uint32_t *)(ring->data + record);
}

static int
check_index(Ring *ring, const char *what, uint32_t value)
{
    if (value >= ring->cap || (value & 3)) {
        PyErr_Format(PyExc_ValueError, "ring %s 0x%x is not a 4-aligned offset below capacity 0x%x", what,
                     (unsigned)value, (unsigned)ring->cap);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* Packet views                                                                                      */

/* data[offset:offset + size] as a memoryview sharing data's managed buffer. On the CPython versions whose
 * memoryview slicing is known (3.11 to 3.13) the new view is made by copying data's view and narrowing it,
 * which is what slicing does inside, minus the slice and int objects; elsewhere it is a real slice. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000
#define FAST_VIEWS 1
#else
#define FAST_VIEWS 0
#endif

static PyObject *
make_view(PyObject *data_obj, Py_ssize_t offset, Py_ssize_t size)
{
#if FAST_VIEWS
    PyObject *view = PyMemoryView_FromObject(data_obj); /* shares data's managed buffer */
    if (view == NULL)
        return NULL;
    Py_buffer *b = PyMemoryView_GET_BUFFER(view);
    /* data is 1-D, itemsize 1, stride 1 (checked in get_ring): a narrower window of it stays contiguous,
     * so the view's flags (C and Fortran contiguous) stay right. */
    b->buf = (char *)b->buf + offset;
    b->len = size;
    b->shape[0] = size;
    return view;
#else
    return PySequence_GetSlice(data_obj, offset, offset + size);
#endif
}

/* ------------------------------------------------------------------------------------------------ */
/* Receive                                                                                           */

/* Packets read while the GIL was released, waiting for their views (made with the GIL held), and where
 * those go. ``frames``: a record holds the 10-byte header, then the packet; the view covers the packet
 * only and headers (or NULL) gets the header as bytes. offsets (or NULL) gets each data offset. */
typedef struct {
    uint32_t offset[CHUNK]; /* data offset of each record's contents (record offset + 4) */
    uint32_t size[CHUNK];   /* its stored Size */
    int n;
    int frames;
    PyObject *data_obj, *views, *offsets, *headers;
    const unsigned char *data;
} Pending;

/* Make views (and offset ints, and for frames header bytes) for the pending packets and append them. */
static int
flush_pending(Pending *p)
{
    PyObject *data_obj = p->data_obj, *views = p->views, *offsets = p->offsets, *headers = p->headers;
    const unsigned char *data = p->data;
    for (int i = 0; i < p->n; i++) {
        Py_ssize_t skip = p->frames ? VNET_HDR_SIZE : 0;
        PyObject *view = make_view(data_obj, (Py_ssize_t)p->offset[i] + skip, (Py_ssize_t)p->size[i] - skip);
        if (view == NULL)
            return -1;
        int rc = PyList_Append(views, view);
        Py_DECREF(view);
        if (rc < 0)
            return -1;
        if (offsets) {
            PyObject *o = PyLong_FromUnsignedLong(p->offset[i]);
            if (o == NULL)
                return -1;
            rc = PyList_Append(offsets, o);
            Py_DECREF(o);
            if (rc < 0)
                return -1;
        }
        if (headers) {
            PyObject *h = PyBytes_FromStringAndSize((const char *)data + p->offset[i], VNET_HDR_SIZE);
            if (h == NULL)
                return -1;
            rc = PyList_Append(headers, h);
            Py_DECREF(h);
            if (rc < 0)
                return -1;
        }
    }
    p->n = 0;
    return 0;
}

/* The system calls with the GIL released (``*ts`` is the saved thread state). On EINTR the signal
 * handlers run with the GIL and the call is retried, as os.readv / FileIO.readinto / os.writev do.
 * Returns what the call returned, -1 with errno set, or -2 if a handler raised. */
#define RETRYING(call)                                                                                   \
    for (;;) {                                                                                           \
        Py_ssize_t n_ = (call);                                                                          \
        if (n_ >= 0 || errno != EINTR)                                                                   \
            return n_;                                                                                   \
        PyEval_RestoreThread(*ts);                                                                       \
        int rc_ = PyErr_CheckSignals();                                                                  \
        *ts = PyEval_SaveThread();                                                                       \
        if (rc_ < 0)                                                                                     \
            return -2;                                                                                   \
    }

static Py_ssize_t
readv_nogil(int fd, struct iovec *iov, PyThreadState **ts)
{
    RETRYING(readv(fd, iov, 2))
}

static Py_ssize_t
read_nogil(int fd, void *buf, size_t len, PyThreadState **ts)
{
    RETRYING(read(fd, buf, len))
}

static Py_ssize_t
writev_nogil(int fd, struct iovec *iov, PyThreadState **ts)
{
    RETRYING(writev(fd, iov, 2))
}

static Py_ssize_t
write_nogil(int fd, const void *buf, size_t len, PyThreadState **ts)
{
    RETRYING(write(fd, buf, len))
}

/* One packet read for rx_pull: the header into ``hdr`` (10 bytes), the packet at ``dst``. When the 6
 * bytes before the Size word (dst - 10 .. dst - 4) belong to records this very call wrote (not published,
 * no view of them handed out yet: nobody may look at them), one plain read() lands header and packet in
 * one piece at dst - 10; the header is copied out and those 6 bytes put back. A read() into one buffer
 * costs the kernel noticeably less than a readv() of two. Elsewhere it is readv(header, packet). */
static Py_ssize_t
read_packet(int fd, unsigned char *hdr, unsigned char *dst, int in_place, PyThreadState **ts)
{
    if (in_place) {
        unsigned char saved[6];
        memcpy(saved, dst - VNET_HDR_SIZE, sizeof saved);
        Py_ssize_t n = read_nogil(fd, dst - VNET_HDR_SIZE, VNET_HDR_SIZE + READ_SPAN, ts);
        int err = errno;
        if (n > 0)
            memcpy(hdr, dst - VNET_HDR_SIZE, n < VNET_HDR_SIZE ? (size_t)n : VNET_HDR_SIZE);
        memcpy(dst - VNET_HDR_SIZE, saved, sizeof saved);
        errno = err;
        return n;
    }
    struct iovec iov[2];
    iov[0].iov_base = hdr;
    iov[0].iov_len = VNET_HDR_SIZE;
    iov[1].iov_base = dst;
    iov[1].iov_len = READ_SPAN;
    return readv_nogil(fd, iov, ts);
}

/* Shared argument checks of rx_pull and rx_frames. */
static int
get_rx_lists(PyObject *views_obj, PyObject *offsets_obj, PyObject **offsets)
{
    if (!PyList_Check(views_obj)) {
        PyErr_Format(PyExc_TypeError, "views must be a list, not %.100s", Py_TYPE(views_obj)->tp_name);
        return -1;
    }
    return get_list_or_none(offsets_obj, "offsets", offsets);
}

/* The buffers of rx_pull and rx_one, taken in this order: the ring, hdr (at least hdr_need bytes) and
 * scratch (at least READ_SPAN). On failure nothing is held; else release_rx_buffers gives them back. */
static int
get_rx_buffers(PyObject *words_obj, PyObject *data_obj, PyObject *hdr_obj, Py_ssize_t hdr_need,
               PyObject *scratch_obj, Ring *ring, Py_buffer *hb, Py_buffer *sb)
{
    if (get_ring(words_obj, data_obj, ring) < 0)
        return -1;
    if (get_writable(hdr_obj, "hdr", hdr_need, hb) < 0) {
        release_ring(ring);
        return -1;
    }
    if (get_writable(scratch_obj, "scratch", READ_SPAN, sb) < 0) {
        PyBuffer_Release(hb);
        release_ring(ring);
        return -1;
    }
    return 0;
}

static void
release_rx_buffers(Ring *ring, Py_buffer *hb, Py_buffer *sb)
{
    PyBuffer_Release(sb);
    PyBuffer_Release(hb);
    release_ring(ring);
}

/* Load and check the receive ring's Tail, then Head (ValueError naming a bad one). */
static int
load_rx_indices(Ring *ring, uint32_t *tail, uint32_t *head)
{
    *tail = load_word(ring, TAIL_WORD);
    *head = load_word(ring, HEAD_WORD);
    if (check_index(ring, "Tail", *tail) < 0 || check_index(ring, "Head", *head) < 0)
        return -1;
    return 0;
}

/* The receive ring's free span at Tail, shared by rx_pull and rx_frames (load_rx_indices). Free space is
 * the linear [d - 4, end): d is Tail + 4 (where the next record's contents go) and end is Head - 4, plus
 * the capacity unless Head is past Tail. */
static int
ring_span(Ring *ring, uint32_t *tail, int64_t *end, int64_t *d)
{
    uint32_t r, head;
    if (load_rx_indices(ring, &r, &head) < 0)
        return -1;
    *tail = r;
    *end = head > r ? (int64_t)head - 4 : (int64_t)head - 4 + ring->cap;
    *d = (int64_t)r + 4;
    return 0;
}

static void
init_pending(Pending *p, Ring *ring, PyObject *data_obj, int frames, PyObject *views, PyObject *offsets,
             PyObject *headers)
{
    p->n = 0;
    p->frames = frames;
    p->data_obj = data_obj;
    p->views = views;
    p->offsets = offsets;
    p->headers = headers;
    p->data = ring->data;
}

/* A failed read (n < 0, GIL released): -2 means a signal handler raised (failed), else errno is the
 * status that ends the loop. */
static inline void
read_failed(Py_ssize_t n, int *failed, int *status)
{
    if (n == -2)
        *failed = 1;
    else
        *status = errno;
}

/* Record a packet of n bytes whose contents are at data offset d (GIL released, ``*ts`` saved): write its
 * Size, queue it, and make the views of a full chunk with the GIL held. -1 if that raised. */
static inline int
add_record(Ring *ring, Pending *p, int64_t d, Py_ssize_t n, PyThreadState **ts)
{
    store_size(ring, (uint32_t)(d - 4), (uint32_t)n);
    p->offset[p->n] = (uint32_t)d;
    p->size[p->n] = (uint32_t)n;
    if (++p->n == CHUNK) {
        PyEval_RestoreThread(*ts);
        int rc = flush_pending(p);
        *ts = PyEval_SaveThread();
        if (rc < 0)
            return -1;
    }
    return 0;
}

/* End of rx_pull / rx_frames (GIL held): make the last views and, if any packet was read, publish Tail
 * (the record at d - 4, wrapped). r is the Tail found at the start. Returns the result tuple, or NULL
 * when ``failed`` (a signal handler raised during a read) or making a view raised: then nothing is
 * published, as in Python. */
static PyObject *
rx_finish(Ring *ring, Pending *p, int failed, uint32_t r, int64_t d, Py_ssize_t count, int status,
          Py_ssize_t dropped)
{
    if (failed || flush_pending(p) < 0)
        return NULL;
    int64_t tail = d - 4;
    if (tail >= (int64_t)ring->cap)
        tail -= ring->cap;
    if (count > 0)
        store_word(ring, TAIL_WORD, (uint32_t)tail);
    else
        tail = r;
    return Py_BuildValue("(nkin)", count, (unsigned long)tail, status, dropped);
}

/* The loop of rx_pull on a ring already taken (see rx_pull_doc); returns rx_pull's result tuple. */
static PyObject *
pull_packets(Ring *ring, int fd, long max_count, unsigned char *hdr, long stride, unsigned char *scratch,
             PyObject *data_obj, PyObject *views, PyObject *offsets)
{
    PyObject *result = NULL;
    const int64_t cap = ring->cap;
    uint32_t r;
    int64_t end, d;
    if (ring_span(ring, &r, &end, &d) < 0)
        goto done;

    {
        /* Linear offsets, as in Session._pull: free space is [d - 4, end); stop is the last data offset
         * from which a blind read of 0xFFFF bytes can neither overrun Head nor need wrapping. */
        int64_t mine = -1; /* first record this call wrote since the last wrap (contiguous up to d - 4) */
        Py_ssize_t left = max_count, count = 0, dropped = 0;
        int status = 0, failed = 0;
        Pending pending;
        init_pending(&pending, ring, data_obj, 0, views, offsets, NULL);

        PyThreadState *ts = PyEval_SaveThread();
        while (left > 0) {
            if (d - 4 >= cap) { /* wrapped past the end: back to the start of Data */
                d -= cap;
                end -= cap;
                mine = -1;
            }
            int64_t stop = end - MAX_RECORD_SIZE;
            if (stop > cap - 1)
                stop = cap - 1;
            stop += 4;
            Py_ssize_t n;
            if (d <= stop) {
                Py_ssize_t todo = left;
                for (Py_ssize_t i = 0; i < todo; i++) {
                    int in_place = mine >= 0 && d - VNET_HDR_SIZE >= mine;
                    n = read_packet(fd, hdr + count * stride, ring->data + d, in_place, &ts);
                    if (n < 0) {
                        read_failed(n, &failed, &status);
                        goto stopped;
                    }
                    n -= VNET_HDR_SIZE;
                    if (n < 0) {
                        status = ST_SHORT_READ;
                        goto stopped;
                    }
                    if (mine < 0)
                        mine = d - 4;
                    count++;
                    if (add_record(ring, &pending, d, n, &ts) < 0) {
                        failed = 1;
                        goto stopped;
                    }
                    d += (n + 7) & ~3;
                    if (d > stop)
                        break;
                }
                left = max_count - count;
            }
            else {
                left -= 1;
                struct iovec iov[2];
                iov[0].iov_base = hdr + count * stride;
                iov[0].iov_len = VNET_HDR_SIZE;
                iov[1].iov_base = scratch;
                iov[1].iov_len = READ_SPAN;
                n = readv_nogil(fd, iov, &ts);
                if (n < 0) {
                    read_failed(n, &failed, &status);
                    goto stopped;
                }
                n -= VNET_HDR_SIZE;
                if (n < 0) {
                    status = ST_SHORT_READ;
                    goto stopped;
                }
                if (((n + 7) & ~3) > end - (d - 4)) {
                    dropped++; /* as Wintun's driver drops when the ring is full */
                    continue;
                }
                memcpy(ring->data + d, scratch, (size_t)n);
                if (mine < 0)
                    mine = d - 4;
                count++;
                if (add_record(ring, &pending, d, n, &ts) < 0) {
                    failed = 1;
                    goto stopped;
                }
                d += (n + 7) & ~3;
            }
        }
    stopped:
        PyEval_RestoreThread(ts);
        result = rx_finish(ring, &pending, failed, r, d, count, status, dropped);
    }
done:
    return result;
}

PyDoc_STRVAR(rx_pull_doc,
"rx_pull(fd, words, data, max_count, hdr, hdr_stride, scratch, views, offsets)\n"
"    -> (count, tail, status, dropped)\n\n"
"Read up to max_count packets from the TUN queue fd into the ring at its Tail (Session._pull).\n\n"
"Each read puts the 10-byte virtio-net header at hdr[k * hdr_stride:] (k = the packet's index in this\n"
"call; stride 0 reuses one scratch header) and the packet at Tail + 4 when 0xFFFF bytes of room are\n"
"there, else into scratch (>= 0xFFFF bytes) and then into the ring if it fits, or drops it. Writes each\n"
"Size, appends each packet's view to views and its data offset to offsets (a list, or None), and, if\n"
"any packet was read, publishes Tail. Returns the packets read, the new Tail, the status that ended\n"
"the loop (0: max_count reached, EAGAIN: queue empty, another errno, or -1: a read shorter than the\n"
"header) and the packets dropped for lack of room. Bytes past Tail may be used as scratch meanwhile.");

static PyObject *
rx_pull(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 9) {
        PyErr_Format(PyExc_TypeError, "rx_pull takes 9 arguments (%zd given)", nargs);
        return NULL;
    }
    int fd;
    long max_count, stride;
    PyObject *views = args[7], *offsets;
    if (get_fd(args[0], &fd) < 0 || get_long(args[3], "max_count", 0, PY_SSIZE_T_MAX / 2, &max_count) < 0 ||
        get_long(args[5], "hdr_stride", 0, 0x10000, &stride) < 0 || get_rx_lists(args[7], args[8], &offsets) < 0)
        return NULL;
    if (stride != 0 && stride < VNET_HDR_SIZE) {
        PyErr_Format(PyExc_ValueError, "hdr_stride %ld must be 0 or at least %d", stride, VNET_HDR_SIZE);
        return NULL;
    }
    Py_ssize_t hdr_need = VNET_HDR_SIZE;
    if (stride && max_count > 0) {
        if (max_count - 1 > (PY_SSIZE_T_MAX - VNET_HDR_SIZE) / stride) {
            PyErr_Format(PyExc_ValueError, "max_count %ld is too large for hdr_stride %ld", max_count, stride);
            return NULL;
        }
        hdr_need = (Py_ssize_t)(max_count - 1) * stride + VNET_HDR_SIZE;
    }
    Ring ring;
    Py_buffer hb, sb;
    if (get_rx_buffers(args[1], args[2], args[4], hdr_need, args[6], &ring, &hb, &sb) < 0)
        return NULL;

    PyObject *result = pull_packets(&ring, fd, max_count, (unsigned char *)hb.buf, stride,
                                    (unsigned char *)sb.buf, args[2], views, offsets);
    release_rx_buffers(&ring, &hb, &sb);
    return result;
}

/* An offload session's receive ring stores frames: the kernel's read, header and packet, in one record
 * (Size counts the header). A read is offered one byte more than the largest frame, so that a longer
 * one (which the kernel would cut) is seen and dropped; the ring's memory runs on far enough past the
 * trailing area for a blind read of that size at any record below the capacity. */
#define FRAME_MAX (VNET_HDR_SIZE + MAX_PACKET_SIZE)
#define FRAME_SPAN (FRAME_MAX + 1)
#define FRAME_RECORD ((4 + FRAME_SPAN + 3) & ~3)

PyDoc_STRVAR(rx_frames_doc,
"rx_frames(fd, words, data, max_count, scratch, views, offsets, headers)\n"
"    -> (count, tail, status, dropped)\n\n"
"rx_pull for an offload session (Session._pull_frames): each read lands whole, header and packet, in\n"
"one record at Tail + 4 when there is room for the largest frame, else in scratch (>= 0x1000A bytes) and\n"
"then in the ring if it fits. A read of 10 bytes or less, or longer than 10 + 0xFFFF, or that does not\n"
"fit, is dropped. Each view covers the packet after the header; headers (a list, or None) gets each\n"
"header as bytes. data must reach at least capacity + 0x1000A bytes. Returns as rx_pull does (status 0,\n"
"EAGAIN or another errno).");

static PyObject *
rx_frames(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "rx_frames takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    int fd;
    long max_count;
    PyObject *views = args[5], *offsets, *headers;
    if (get_fd(args[0], &fd) < 0 || get_long(args[3], "max_count", 0, PY_SSIZE_T_MAX / 2, &max_count) < 0 ||
        get_rx_lists(args[5], args[6], &offsets) < 0 || get_list_or_none(args[7], "headers", &headers) < 0)
        return NULL;
    Ring ring;
    Py_buffer sb;
    if (get_ring(args[1], args[2], &ring) < 0)
        return NULL;
    if (ring.db.len < (Py_ssize_t)ring.cap + FRAME_SPAN) {
        PyErr_Format(PyExc_ValueError, "data has %zd bytes; frames need capacity + 0x%x = %zd", ring.db.len,
                     (unsigned)FRAME_SPAN, (Py_ssize_t)ring.cap + FRAME_SPAN);
        release_ring(&ring);
        return NULL;
    }
    if (get_writable(args[4], "scratch", FRAME_SPAN, &sb) < 0) {
        release_ring(&ring);
        return NULL;
    }
    PyObject *result = NULL;
    const int64_t cap = ring.cap;
    uint32_t r;
    int64_t end, d;
    if (ring_span(&ring, &r, &end, &d) < 0)
        goto done;
    {
        Py_ssize_t count = 0, dropped = 0;
        int status = 0, failed = 0;
        unsigned char *scratch = (unsigned char *)sb.buf;
        Pending pending;
        init_pending(&pending, &ring, args[2], 1, views, offsets, headers);

        PyThreadState *ts = PyEval_SaveThread();
        for (long i = 0; i < max_count; i++) {
            if (d - 4 >= cap) {
                d -= cap;
                end -= cap;
            }
            Py_ssize_t n;
            if (d - 4 + FRAME_RECORD <= end) { /* room for the largest frame: straight into the ring */
                n = read_nogil(fd, ring.data + d, FRAME_SPAN, &ts);
                if (n < 0) {
                    read_failed(n, &failed, &status);
                    break;
                }
                if (n <= VNET_HDR_SIZE || n > FRAME_MAX) {
                    dropped++; /* cut (longer than any IP packet may be) or headerless */
                    continue;
                }
            }
            else {
                n = read_nogil(fd, scratch, FRAME_SPAN, &ts);
                if (n < 0) {
                    read_failed(n, &failed, &status);
                    break;
                }
                if (n <= VNET_HDR_SIZE || n > FRAME_MAX || ((n + 7) & ~3) > end - (d - 4)) {
                    dropped++;
                    continue;
                }
                memcpy(ring.data + d, scratch, (size_t)n);
            }
            count++;
            if (add_record(&ring, &pending, d, n, &ts) < 0) {
                failed = 1;
                break;
            }
            d += (n + 7) & ~3;
        }
        PyEval_RestoreThread(ts);
        result = rx_finish(&ring, &pending, failed, r, d, count, status, dropped);
    }
done:
    PyBuffer_Release(&sb);
    release_ring(&ring);
    return result;
}

PyDoc_STRVAR(rx_one_doc,
"rx_one(fd, words, data, hdr, scratch) -> memoryview | int\n\n"
"Read one packet from the TUN queue fd into the ring at Tail (Session._pull_one): the header into\n"
"hdr[:10], the packet at Tail + 4 (or through scratch when there are less than 0x10004 bytes free; a\n"
"packet that does not fit is dropped). Writes its Size, publishes Tail and returns its view. Returns\n"
"-1 when the queue is empty (EAGAIN), -2 when the packet was dropped and -3 for a read shorter than\n"
"the header; raises OSError for any other error of the read. The ring is unchanged unless a view is\n"
"returned.");

static PyObject *
rx_one(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "rx_one takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    int fd;
    if (get_fd(args[0], &fd) < 0)
        return NULL;
    Ring ring;
    Py_buffer hb, sb;
    if (get_rx_buffers(args[1], args[2], args[3], VNET_HDR_SIZE, args[4], &ring, &hb, &sb) < 0)
        return NULL;
    PyObject *result = NULL;
    uint32_t r, head;
    if (load_rx_indices(&ring, &r, &head) < 0)
        goto done;
    {
        uint32_t free_bytes = (head - r - 4) & ring.mask;
        int direct = free_bytes >= MAX_RECORD_SIZE;
        struct iovec iov[2];
        iov[0].iov_base = hb.buf;
        iov[0].iov_len = VNET_HDR_SIZE;
        iov[1].iov_base = direct ? ring.data + r + 4 : (unsigned char *)sb.buf;
        iov[1].iov_len = READ_SPAN;
        PyThreadState *ts = PyEval_SaveThread();
        Py_ssize_t n = readv_nogil(fd, iov, &ts);
        int err = errno;
        PyEval_RestoreThread(ts);
        if (n == -2)
            goto done;
        if (n < 0) {
            if (err == EAGAIN || err == EWOULDBLOCK) {
                result = PyLong_FromLong(-1);
                goto done;
            }
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        n -= VNET_HDR_SIZE;
        if (n < 0) {
            result = PyLong_FromLong(-3);
            goto done;
        }
        if (!direct) {
            if ((uint32_t)((n + 7) & ~3) > free_bytes) {
                result = PyLong_FromLong(-2);
                goto done;
            }
            memcpy(ring.data + r + 4, sb.buf, (size_t)n);
        }
        store_size(&ring, r, (uint32_t)n);
        PyObject *view = make_view(args[2], (Py_ssize_t)r + 4, n);
        if (view == NULL)
            goto done;
        store_word(&ring, TAIL_WORD, (r + (uint32_t)((n + 7) & ~3)) & ring.mask);
        result = view;
    }
done:
    release_rx_buffers(&ring, &hb, &sb);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* Send                                                                                              */

PyDoc_STRVAR(tx_flush_doc,
"tx_flush(fd, words, data, hdr) -> status\n\n"
"Write every packet between the ring's Head and Tail to the TUN queue fd, in order, each as one\n"
"writev of hdr (10 bytes) and the packet (Session._flush), and store Head past the packets written.\n"
"Returns 0 when Head reached Tail; an errno when a write failed (Head is then the record of that\n"
"packet, not written); -1 when the Size at Head is impossible (over 0xFFFF or running past Tail).");

static PyObject *
tx_flush(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "tx_flush takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    int fd;
    if (get_fd(args[0], &fd) < 0)
        return NULL;
    Ring ring;
    Py_buffer hb;
    if (get_ring(args[1], args[2], &ring) < 0)
        return NULL;
    if (get_readable(args[3], "hdr", VNET_HDR_SIZE, &hb) < 0) {
        release_ring(&ring);
        return NULL;
    }
    PyObject *result = NULL;
    uint32_t head = load_word(&ring, HEAD_WORD);
    uint32_t tail = load_word(&ring, TAIL_WORD);
    if (check_index(&ring, "Head", head) < 0 || check_index(&ring, "Tail", tail) < 0)
        goto done;
    if (head == tail) {
        result = PyLong_FromLong(0);
        goto done;
    }
    {
        int status = 0, failed = 0;
        struct iovec iov[2];
        iov[0].iov_base = hb.buf;
        iov[0].iov_len = VNET_HDR_SIZE;
        PyThreadState *ts = PyEval_SaveThread();
        while (head != tail) {
            uint32_t size = load_size(&ring, head);
            uint32_t rec = (size + 7) & ~3u;
            if (size > MAX_PACKET_SIZE || rec > ((tail - head) & ring.mask)) {
                status = ST_BAD_RECORD;
                break;
            }
            iov[1].iov_base = ring.data + head + 4;
            iov[1].iov_len = size;
            Py_ssize_t n = writev_nogil(fd, iov, &ts);
            if (n < 0) {
                if (n == -2)
                    failed = 1;
                else
                    status = errno;
                break;
            }
            head = (head + rec) & ring.mask;
        }
        PyEval_RestoreThread(ts);
        store_word(&ring, HEAD_WORD, head); /* also when a handler raised: what was written is gone */
        if (!failed)
            result = PyLong_FromLong(status);
    }
done:
    PyBuffer_Release(&hb);
    release_ring(&ring);
    return result;
}

PyDoc_STRVAR(tx_direct_doc,
"tx_direct(fd, hdr, packets, start, headers) -> (index, status)\n\n"
"Write packets[start:] (a list or tuple) to the TUN queue fd, each as one writev of a header and the\n"
"packet, straight from the caller's buffers (Session._send_direct). The header is hdr (10 bytes), or\n"
"with headers (a list or tuple, or None) headers[i]. Stops at the first item that fails. Returns\n"
"(len(packets), 0) when all were written, else the index of the item that stopped it (not written) and\n"
"why: its errno, or -1 for an item left to the Python path (not bytes, bytearray or a 1-D byte\n"
"memoryview, not 1..0xFFFF bytes long, or its header not 10 bytes of type bytes).");

static PyObject *
tx_direct(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "tx_direct takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    int fd;
    long start;
    if (get_fd(args[0], &fd) < 0 || get_long(args[3], "start", 0, PY_SSIZE_T_MAX / 2, &start) < 0)
        return NULL;
    PyObject *seq = args[2], *hseq = args[4];
    if (!PyList_Check(seq) && !PyTuple_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "packets must be a list or tuple, not %.100s", Py_TYPE(seq)->tp_name);
        return NULL;
    }
    if (hseq == Py_None)
        hseq = NULL;
    else if (!PyList_Check(hseq) && !PyTuple_Check(hseq)) {
        PyErr_Format(PyExc_TypeError, "headers must be a list, a tuple or None, not %.100s",
                     Py_TYPE(hseq)->tp_name);
        return NULL;
    }
    Py_buffer hb;
    if (get_readable(args[1], "hdr", VNET_HDR_SIZE, &hb) < 0)
        return NULL;

    Py_ssize_t index = start;
    int status = 0, failed = 0;
    PyObject *held[CHUNK], *held_hdr[CHUNK];
    Py_buffer bufs[CHUNK];
    char has_buf[CHUNK];
    struct iovec iov[2];
    iov[0].iov_len = VNET_HDR_SIZE;

    /* The lists may change between chunks (the GIL is released while writing), so their lengths are
     * read again each time; within a chunk the items, their buffers and headers are held. */
    while (status == 0 && !failed) {
        Py_ssize_t total = PySequence_Fast_GET_SIZE(seq);
        if (index >= total)
            break;
        Py_ssize_t htotal = hseq ? PySequence_Fast_GET_SIZE(hseq) : 0;
        int n = 0, odd = 0;
        while (n < CHUNK && index + n < total) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, index + n);
            PyObject *h = NULL;
            if (hseq) {
                if (index + n >= htotal) {
                    odd = 1;
                    break;
                }
                h = PySequence_Fast_GET_ITEM(hseq, index + n);
                if (!PyBytes_CheckExact(h) || PyBytes_GET_SIZE(h) != VNET_HDR_SIZE) {
                    odd = 1;
                    break;
                }
            }
            Py_buffer *b = &bufs[n];
            if (PyBytes_CheckExact(item)) {
                b->buf = PyBytes_AS_STRING(item);
                b->len = PyBytes_GET_SIZE(item);
                has_buf[n] = 0;
            }
            else if (PyByteArray_CheckExact(item) ||
                     (PyMemoryView_Check(item) && PyMemoryView_GET_BUFFER(item)->ndim == 1 &&
                      PyMemoryView_GET_BUFFER(item)->itemsize == 1)) {
                if (PyObject_GetBuffer(item, b, PyBUF_SIMPLE) < 0) {
                    PyErr_Clear(); /* e.g. a released view: the Python path raises its own error */
                    odd = 1;
                    break;
                }
                has_buf[n] = 1;
            }
            else {
                odd = 1;
                break;
            }
            if (b->len < 1 || b->len > (Py_ssize_t)MAX_PACKET_SIZE) {
                if (has_buf[n])
                    PyBuffer_Release(b);
                odd = 1;
                break;
            }
            Py_INCREF(item);
            held[n] = item;
            Py_XINCREF(h);
            held_hdr[n] = h;
            n++;
        }
        int written = 0;
        if (n) {
            PyThreadState *ts = PyEval_SaveThread();
            for (; written < n; written++) {
                iov[0].iov_base = held_hdr[written] ? PyBytes_AS_STRING(held_hdr[written]) : hb.buf;
                iov[1].iov_base = bufs[written].buf;
                iov[1].iov_len = (size_t)bufs[written].len;
                Py_ssize_t w = writev_nogil(fd, iov, &ts);
                if (w < 0) {
                    if (w == -2)
                        failed = 1;
                    else
                        status = errno;
                    break;
                }
            }
            PyEval_RestoreThread(ts);
        }
        for (int i = 0; i < n; i++) {
            if (has_buf[i])
                PyBuffer_Release(&bufs[i]);
            Py_DECREF(held[i]);
            Py_XDECREF(held_hdr[i]);
        }
        index += written;
        if (!status && !failed && odd)
            status = ST_NOT_SIMPLE;
    }
    PyBuffer_Release(&hb);
    if (failed)
        return NULL;
    return Py_BuildValue("(ni)", index, status);
}

/* ------------------------------------------------------------------------------------------------ */
/* SessionCore: one session's per-packet state, both rings (wiretun.linux.engine has the Python twin)  */

/* Wintun's (Win32) error codes, as wiretun.linux.engine.Status and wiretun.errors have them. */
#define STATUS_INVALID_DATA 13
#define STATUS_HANDLE_EOF 38
#define STATUS_INVALID_PARAMETER 87
#define STATUS_BUFFER_OVERFLOW 111
#define STATUS_NO_MORE_ITEMS 259
#define RELEASE_BIT 0x80000000u
#define COMPACT_AT 64
/* Where an emptied ring starts again. Not 0: the 6 bytes before the first record's Size word are then
 * ring memory nobody uses, so a read lands the virtio-net header there and the packet in place, and a
 * write takes header and packet from there in one piece (a read() or write() of one buffer costs the
 * kernel less than a readv() or writev() of two). See core_fill and core_flush. */
#define REWIND_OFFSET 8u

/* The exception class for a status, from wiretun.errors (looked up once, on first use). */
static PyObject *
error_class(int status)
{
    static PyObject *classes[5];
    static const struct {
        int status;
        const char *name;
    } names[5] = {{STATUS_INVALID_DATA, "InvalidData"},         {STATUS_HANDLE_EOF, "EndOfFile"},
                  {STATUS_INVALID_PARAMETER, "InvalidParameter"}, {STATUS_BUFFER_OVERFLOW, "BufferOverflow"},
                  {STATUS_NO_MORE_ITEMS, "NoMoreItems"}};
    for (int i = 0; i < 5; i++) {
        if (names[i].status != status)
            continue;
        if (classes[i] == NULL) {
            PyObject *errors = PyImport_ImportModule("wiretun.errors");
            if (errors == NULL)
                return NULL;
            classes[i] = PyObject_GetAttrString(errors, names[i].name); /* kept for the process' life */
            Py_DECREF(errors);
        }
        return classes[i];
    }
    PyErr_Format(PyExc_SystemError, "no exception for status %d", status);
    return NULL;
}

static PyObject *
raise_status(int status, const char *format, ...)
{
    PyObject *cls = error_class(status);
    if (cls == NULL)
        return NULL;
    va_list va;
    va_start(va, format);
    PyObject *msg = PyUnicode_FromFormatV(format, va);
    va_end(va);
    if (msg != NULL) {
        PyErr_SetObject(cls, msg);
        Py_DECREF(msg);
    }
    return NULL;
}

/* Packets handed out and not yet taken back, in ring order (view NULL: taken back out of order). */
typedef struct {
    PyObject *view; /* owned */
    uint32_t offset; /* data offset (record + 4) */
} Entry;

typedef struct {
    Entry *a;
    Py_ssize_t first, n, size;
} Tracked;

static int
tracked_push(Tracked *t, PyObject *view, uint32_t offset)
{
    if (t->n == t->size) {
        Py_ssize_t size = t->size ? t->size * 2 : 256;
        Entry *a = PyMem_Realloc(t->a, (size_t)size * sizeof(Entry));
        if (a == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        t->a = a;
        t->size = size;
    }
    Py_INCREF(view);
    t->a[t->n].view = view;
    t->a[t->n].offset = offset;
    t->n++;
    return 0;
}

/* The index of ``obj`` (identity): the front, else a binary search on the offset its address gives. */
static Py_ssize_t
tracked_find(Tracked *t, PyObject *obj, const unsigned char *data, uint32_t mask)
{
    Py_ssize_t first = t->first, n = t->n;
    if (first >= n)
        return -1;
    if (t->a[first].view == obj)
        return first;
    if (!PyMemoryView_Check(obj))
        return -1;
    uint32_t offset = (uint32_t)((const unsigned char *)PyMemoryView_GET_BUFFER(obj)->buf - data);
    uint32_t base = t->a[first].offset, key = (offset - base) & mask;
    Py_ssize_t lo = first, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (((t->a[mid].offset - base) & mask) < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && t->a[lo].view == obj ? lo : -1;
}

/* Pass the front entry and every taken-back entry after it. The caller keeps the front's reference. */
static void
tracked_drop_front(Tracked *t)
{
    Py_ssize_t first = t->first + 1, n = t->n;
    while (first < n && t->a[first].view == NULL)
        first++;
    if (first >= n) {
        t->n = 0;
        first = 0;
    }
    else if (first > COMPACT_AT && first * 2 > n) {
        memmove(t->a, t->a + first, (size_t)(n - first) * sizeof(Entry));
        t->n = n - first;
        first = 0;
    }
    t->first = first;
}

static void
tracked_clear(Tracked *t)
{
    /* Views are dropped only after the entries are gone: a view's deallocation cannot run code that
     * reaches this list, but keep the list consistent at every step anyway. */
    Py_ssize_t first = t->first, n = t->n;
    Entry *a = t->a;
    t->a = NULL;
    t->first = t->n = t->size = 0;
    for (Py_ssize_t i = first; i < n; i++)
        Py_XDECREF(a[i].view);
    PyMem_Free(a);
}

static Py_ssize_t
tracked_live(Tracked *t)
{
    Py_ssize_t live = 0;
    for (Py_ssize_t i = t->first; i < t->n; i++)
        live += t->a[i].view != NULL;
    return live;
}

typedef struct {
    uint32_t record;
    unsigned char hdr[VNET_HDR_SIZE];
    unsigned char drop; /* sent with a bad header: never written, counted as dropped */
} TxHeader;

typedef struct {
    PyObject_HEAD
    int fd;
    int state; /* 0 live, 1 queue lost (no I/O; bookkeeping goes on), 2 ended (nothing) */
    int stalled;
    Ring rx, tx;
    PyObject *rx_data, *tx_data; /* the rings' Data memoryviews: packet views are windows of them */
    /* Plain mutexes: CPython's own locks read the clock on every acquire, even a non-blocking one. */
    pthread_mutex_t rx_lock, tx_lock;
    int locks_made;
    Tracked rx_out, tx_out;
    uint32_t tx_alloc, tx_release;
    Py_ssize_t tx_unsent;
    TxHeader *hdrs;
    Py_ssize_t n_hdrs, size_hdrs;
    unsigned char rx_hdr[VNET_HDR_SIZE];
    unsigned char *scratch;
    Py_ssize_t receive_dropped, send_dropped;
    /* Read ahead: packets read into the receive ring (Tail is past them) and not handed out yet, from the
     * record at rx_next on, as Wintun's driver fills its ring ahead of the caller. ready_fd (an eventfd,
     * or -1) is set while some wait, so the session's read-wait handle stays readable. */
    Py_ssize_t rx_pending;
    uint32_t rx_next;
    int rx_empty; /* the last fill stopped because the queue was empty */
    int ready_fd, ready_set;
    PyObject *rx_error; /* raised by the next receive: packets were handed out before it happened */
    PyObject *io_error, *rejected, *convert;
} CoreObject;

static PyObject *memoryview_release; /* the method descriptor memoryview.release */

/* Take a ring's lock with the GIL held: at once if free, else waiting with the GIL released (the holder
 * may need the GIL to finish). */
static void
lock(pthread_mutex_t *l)
{
    if (pthread_mutex_trylock(l) == 0)
        return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(l);
    Py_END_ALLOW_THREADS
}

static inline void
unlock(pthread_mutex_t *l)
{
    pthread_mutex_unlock(l);
}

/* view.release(); a view the caller exported (to numpy, say) keeps the memory alive: BufferError is
 * ignored, as the Python session does. */
static void
release_view(PyObject *view)
{
    PyObject *r = PyMemoryView_Check(view) ? PyObject_Vectorcall(memoryview_release, &view, 1, NULL)
                                           : PyObject_CallMethod(view, "release", NULL);
    if (r == NULL)
        PyErr_Clear();
    Py_XDECREF(r);
}

static int
is_gone(int code)
{
    return code == EBADFD || code == EBADF || code == ENODEV || code == ENXIO;
}

/* The exception the io_error callback gives for a failed read, or for a write or read whose queue is
 * gone (then there is no more I/O). New reference, or NULL with an error set. */
static PyObject *
core_io_exception(CoreObject *self, int code)
{
    if (is_gone(code) && self->state == 0)
        self->state = 1;
    PyObject *exc = PyObject_CallFunction(self->io_error, "i", code);
    if (exc != NULL && !PyExceptionInstance_Check(exc)) {
        PyErr_Format(PyExc_TypeError, "the io_error callback returned %.100s, not an exception",
                     Py_TYPE(exc)->tp_name);
        Py_CLEAR(exc);
    }
    return exc;
}

/* Raise what core_io_exception gives. Returns NULL. */
static PyObject *
core_lost(CoreObject *self, int code)
{
    PyObject *exc = core_io_exception(self, code);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static int
is_retry(int code)
{
    return code == EAGAIN || code == EWOULDBLOCK || code == ENOBUFS || code == ENOMEM;
}

/* Write every packet between the send ring's Head and Tail to the queue (tx lock held, GIL held on entry
 * and exit). 0, or -1 with an exception set. */
static int check_ring_index(Ring *ring, const char *which, const char *what, uint32_t value);

static int
core_flush(CoreObject *self)
{
    Ring *ring = &self->tx;
    uint32_t head = load_word(ring, HEAD_WORD), tail = load_word(ring, TAIL_WORD);
    if (check_ring_index(ring, "send", "Head", head) < 0 || check_ring_index(ring, "send", "Tail", tail) < 0)
        return -1; /* scribbled on by another party: read nothing there */
    static const unsigned char zero[VNET_HDR_SIZE];
    int rc = 0;
    while (head != tail) {
        int status = 0, failed = 0;
        uint32_t size = 0;
        struct iovec iov[2];
        iov[0].iov_base = (void *)zero;
        iov[0].iov_len = VNET_HDR_SIZE;
        if (self->n_hdrs == 0) {
            /* The usual case: a run of writes with the GIL released. */
            PyThreadState *ts = PyEval_SaveThread();
            while (head != tail) {
                size = load_size(ring, head);
                if (size > MAX_PACKET_SIZE || ((size + 7) & ~3u) > ((tail - head) & ring->mask)) {
                    status = -1;
                    break;
                }
                Py_ssize_t w;
                if (head >= REWIND_OFFSET && ((head - self->tx_alloc) & ring->mask) >= 8) {
                    /* The 6 bytes before the Size word are free ring space (written packets, no
                     * allocation: the tx lock is held), the Size word is ours: the zero header goes
                     * there for one write() of header and packet, and the 10 bytes are put back. */
                    unsigned char *p = ring->data + head + 4 - VNET_HDR_SIZE, saved[VNET_HDR_SIZE];
                    memcpy(saved, p, VNET_HDR_SIZE);
                    memset(p, 0, VNET_HDR_SIZE);
                    w = write_nogil(self->fd, p, VNET_HDR_SIZE + (size_t)size, &ts);
                    int err = errno;
                    memcpy(p, saved, VNET_HDR_SIZE);
                    errno = err;
                }
                else {
                    iov[1].iov_base = ring->data + head + 4;
                    iov[1].iov_len = size;
                    w = writev_nogil(self->fd, iov, &ts);
                }
                if (w < 0) {
                    if (w == -2)
                        failed = 1;
                    else
                        status = errno;
                    break;
                }
                head = (head + ((size + 7) & ~3u)) & ring->mask;
            }
            PyEval_RestoreThread(ts);
        }
        else {
            /* Some queued packet has a header of its own (or must be dropped): one at a time. */
            size = load_size(ring, head);
            if (size > MAX_PACKET_SIZE || ((size + 7) & ~3u) > ((tail - head) & ring->mask))
                status = -1;
            else {
                Py_ssize_t h = -1;
                for (Py_ssize_t i = 0; i < self->n_hdrs; i++)
                    if (self->hdrs[i].record == head) {
                        h = i;
                        break;
                    }
                if (h >= 0 && self->hdrs[h].drop) {
                    self->send_dropped++;
                    self->hdrs[h] = self->hdrs[--self->n_hdrs];
                    head = (head + ((size + 7) & ~3u)) & ring->mask;
                    continue;
                }
                unsigned char hdr[VNET_HDR_SIZE];
                memcpy(hdr, h >= 0 ? self->hdrs[h].hdr : zero, VNET_HDR_SIZE);
                iov[0].iov_base = hdr;
                iov[1].iov_base = ring->data + head + 4;
                iov[1].iov_len = size;
                PyThreadState *ts = PyEval_SaveThread();
                Py_ssize_t w = writev_nogil(self->fd, iov, &ts);
                int err = errno;
                PyEval_RestoreThread(ts);
                if (w == -2)
                    failed = 1;
                else if (w < 0)
                    status = err;
                else if (h >= 0)
                    self->hdrs[h] = self->hdrs[--self->n_hdrs];
                if (w >= 0) {
                    head = (head + ((size + 7) & ~3u)) & ring->mask;
                    continue;
                }
                if (!failed && h >= 0 && !is_retry(status))
                    self->hdrs[h] = self->hdrs[--self->n_hdrs]; /* the packet goes (dropped): so does its header */
            }
        }
        if (failed) {
            rc = -1;
            break;
        }
        if (status == 0)
            continue; /* head == tail, or on to the next packet */
        if (status < 0) {
            raise_status(STATUS_INVALID_DATA, "send ring packet at 0x%x claims 0x%x bytes", (unsigned)head,
                         (unsigned)size);
            rc = -1;
            break;
        }
        if (is_retry(status)) {
            self->stalled = 1; /* stays in the ring; the next send or receive retries */
            store_word(ring, HEAD_WORD, head);
            return 0;
        }
        if (is_gone(status)) {
            core_lost(self, status);
            rc = -1;
            break;
        }
        self->send_dropped++;
        PyObject *r = PyObject_CallFunction(self->rejected, "iI", status, (unsigned)size);
        if (r == NULL) {
            rc = -1;
            head = (head + ((size + 7) & ~3u)) & ring->mask;
            break;
        }
        Py_DECREF(r);
        head = (head + ((size + 7) & ~3u)) & ring->mask;
    }
    store_word(ring, HEAD_WORD, head);
    if (rc == 0)
        self->stalled = 0;
    return rc;
}

/* Retry a stalled send from the receive side: only if the send lock is free (else its holder flushes). */
static int
core_retry_send(CoreObject *self)
{
    if (pthread_mutex_trylock(&self->tx_lock) != 0)
        return 0;
    int rc = self->state == 0 ? core_flush(self) : 0;
    unlock(&self->tx_lock);
    return rc;
}

static int
check_ring_index(Ring *ring, const char *which, const char *what, uint32_t value)
{
    if (value >= ring->cap || (value & 3)) {
        raise_status(STATUS_INVALID_DATA, "%s ring %s 0x%x is not a 4-aligned offset below capacity 0x%x", which,
                     what, (unsigned)value, (unsigned)ring->cap);
        return -1;
    }
    return 0;
}

/* Take the raised exception out and keep it for the receive after the packets that came before it. */
static void
core_keep_error(CoreObject *self)
{
    PyObject *type, *exc, *tb;
    PyErr_Fetch(&type, &exc, &tb);
    PyErr_NormalizeException(&type, &exc, &tb);
    if (exc != NULL && tb != NULL)
        PyException_SetTraceback(exc, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    Py_XSETREF(self->rx_error, exc);
}

static void
raise_short_read(void)
{
    raise_status(STATUS_INVALID_DATA, "the TUN queue returned a read shorter than the %d-byte virtio-net header",
                 VNET_HDR_SIZE);
}

/* One packet through the scratch buffer when the ring lacks room for a read straight into it (rx lock
 * held): 1 with *out its new view, 0 for none (the queue is empty, or the packet did not fit: dropped, as
 * Wintun's driver drops when its ring is full), -1 with an exception set. */
static int
core_read_scratch(CoreObject *self, PyObject **out)
{
    Ring *ring = &self->rx;
    uint32_t r = load_word(ring, TAIL_WORD), head = load_word(ring, HEAD_WORD);
    if (check_ring_index(ring, "receive", "Tail", r) < 0 || check_ring_index(ring, "receive", "Head", head) < 0)
        return -1;
    uint32_t free_bytes = (head - r - 4) & ring->mask;
    PyThreadState *ts = PyEval_SaveThread();
    Py_ssize_t n = read_packet(self->fd, self->rx_hdr, self->scratch, 0, &ts);
    int err = errno;
    PyEval_RestoreThread(ts);
    if (n == -2)
        return -1;
    if (n < 0) {
        if (err == EAGAIN || err == EWOULDBLOCK)
            return 0;
        core_lost(self, err);
        return -1;
    }
    n -= VNET_HDR_SIZE;
    if (n < 0) {
        raise_short_read();
        return -1;
    }
    uint32_t rec = (uint32_t)((n + 7) & ~3);
    if (rec > free_bytes) {
        self->receive_dropped++;
        return 0;
    }
    memcpy(ring->data + r + 4, self->scratch, (size_t)n);
    store_size(ring, r, (uint32_t)n);
    PyObject *view = make_view(self->rx_data, (Py_ssize_t)r + 4, n);
    if (view == NULL)
        return -1;
    if (tracked_push(&self->rx_out, view, r + 4) < 0) {
        Py_DECREF(view);
        return -1;
    }
    store_word(ring, TAIL_WORD, (r + rec) & ring->mask);
    *out = view;
    return 1;
}

/* Set or clear ready_fd to say whether read-ahead packets wait (GIL released or held: no Python). */
static void
core_signal_ready(CoreObject *self, int ready)
{
    if (self->ready_fd < 0 || ready == self->ready_set || self->state == 2)
        return; /* after the end the session may have closed the eventfd */
    uint64_t v = 1;
    ssize_t rc = ready ? write(self->ready_fd, &v, sizeof v) : read(self->ready_fd, &v, sizeof v);
    (void)rc; /* an eventfd: a write of 1 or a read of a set counter cannot fail but for EAGAIN (cleared) */
    self->ready_set = ready;
}

#define FILL_NO_ROOM (-3)

/* Read up to ``want`` packets from the queue into the receive ring from Tail on, with the GIL released
 * once for all of them (rx lock held, nothing read ahead): how many (they wait from rx_next on), 0 for
 * none (the queue is empty), -1 with an exception set, or FILL_NO_ROOM when the ring lacks room for a
 * read straight into it (then core_read_scratch reads through the scratch buffer). An error after some
 * packets is kept for the receive after them. ``keep`` of those are handed out at once: ready_fd is set
 * if more wait. */
static Py_ssize_t
core_fill(CoreObject *self, Py_ssize_t want, Py_ssize_t keep)
{
    Ring *ring = &self->rx;
    uint32_t r = load_word(ring, TAIL_WORD), head = load_word(ring, HEAD_WORD);
    if (check_ring_index(ring, "receive", "Tail", r) < 0 || check_ring_index(ring, "receive", "Head", head) < 0)
        return -1;
    if (((head - r - 4) & ring->mask) < MAX_RECORD_SIZE)
        return FILL_NO_ROOM;
    uint32_t first = r;
    Py_ssize_t count = 0;
    int err = 0, failed = 0, short_read = 0;
    PyThreadState *ts = PyEval_SaveThread();
    while (count < want) {
        uint32_t free_bytes = (head - r - 4) & ring->mask;
        if (free_bytes < MAX_RECORD_SIZE)
            break; /* no room for another straight read: the rest waits in the queue */
        /* In place (the header in the 6 bytes before the Size word, put back after) when those bytes are
         * free (nothing held) or belong to the packet this call read just before (no view of it yet);
         * else in one read() with the packet moved down over the header; else readv(header, packet). */
        int in_place = r >= REWIND_OFFSET && (count > 0 || r == head);
        int whole = !in_place && free_bytes >= MAX_RECORD_SIZE + 12 &&
                    r + 4 + VNET_HDR_SIZE + READ_SPAN <= ring->cap + TRAILING_SIZE;
        unsigned char *dst = ring->data + r + 4;
        Py_ssize_t n = whole ? read_nogil(self->fd, dst, VNET_HDR_SIZE + READ_SPAN, &ts)
                             : read_packet(self->fd, self->rx_hdr, dst, in_place, &ts);
        if (n == -2) {
            failed = 1;
            break;
        }
        if (n < 0) {
            err = errno;
            break;
        }
        if (n < VNET_HDR_SIZE) {
            short_read = 1;
            break;
        }
        if (whole) {
            memcpy(self->rx_hdr, dst, VNET_HDR_SIZE);
            memmove(dst, dst + VNET_HDR_SIZE, (size_t)n - VNET_HDR_SIZE);
        }
        n -= VNET_HDR_SIZE;
        store_size(ring, r, (uint32_t)n);
        r = (r + (uint32_t)((n + 7) & ~3)) & ring->mask;
        count++;
    }
    core_signal_ready(self, count > keep);
    PyEval_RestoreThread(ts);
    self->rx_empty = err == EAGAIN || err == EWOULDBLOCK;
    if (count) {
        store_word(ring, TAIL_WORD, r);
        self->rx_pending = count;
        self->rx_next = first;
    }
    if (failed || short_read || (err && err != EAGAIN && err != EWOULDBLOCK)) {
        if (short_read)
            raise_short_read();
        else if (!failed)
            core_lost(self, err);
        if (count == 0)
            return -1;
        core_keep_error(self);
    }
    return count;
}

/* Hand out the next read-ahead packet (rx lock held, rx_pending > 0): 1 with *out its view, -1 with an
 * exception set. */
static int
core_take(CoreObject *self, PyObject **out)
{
    Ring *ring = &self->rx;
    uint32_t record = self->rx_next, size = load_size(ring, record);
    if (size > MAX_PACKET_SIZE) { /* scribbled on: what was read ahead is lost */
        self->rx_pending = 0;
        core_signal_ready(self, 0);
        raise_status(STATUS_INVALID_DATA, "receive ring packet at 0x%x claims 0x%x bytes", (unsigned)record,
                     (unsigned)size);
        return -1;
    }
    PyObject *view = make_view(self->rx_data, (Py_ssize_t)record + 4, size);
    if (view == NULL)
        return -1;
    if (tracked_push(&self->rx_out, view, record + 4) < 0) {
        Py_DECREF(view);
        return -1;
    }
    self->rx_next = (record + ((size + 7) & ~3u)) & ring->mask;
    if (--self->rx_pending == 0)
        core_signal_ready(self, 0); /* set exactly while packets wait read ahead */
    *out = view;
    return 1;
}

/* Before a receive (rx lock held): raise the error a batch stopped on after handing out packets. */
static int
core_pending_error(CoreObject *self)
{
    PyObject *exc = self->rx_error;
    if (exc == NULL)
        return 0;
    self->rx_error = NULL;
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return -1;
}

/* The next packet (rx lock held): one read ahead (even when the queue was lost after reading it), else
 * HandleEof after the end, else the error kept for after them, else up to ``want`` read from the queue at
 * once (one handed out now). 1 with *out, 0 for none (the queue is empty, or a packet was dropped for lack
 * of room: see receive_dropped), -1 with an exception set. */
static int
core_next(CoreObject *self, PyObject **out, Py_ssize_t want, Py_ssize_t keep)
{
    if (self->rx_pending)
        return core_take(self, out);
    if (self->state) {
        raise_status(STATUS_HANDLE_EOF, "the session has ended");
        return -1;
    }
    if (self->rx_error != NULL)
        return core_pending_error(self);
    if (self->stalled && core_retry_send(self) < 0)
        return -1;
    Py_ssize_t got = core_fill(self, want, keep);
    if (got == FILL_NO_ROOM)
        return core_read_scratch(self, out);
    if (got <= 0)
        return (int)got;
    return core_take(self, out);
}

static PyObject *
core_receive_packet(CoreObject *self, PyObject *unused)
{
    lock(&self->rx_lock);
    PyObject *view = NULL;
    int got = core_next(self, &view, CHUNK, 1);
    unlock(&self->rx_lock);
    if (got < 0)
        return NULL;
    if (got > 0)
        return view;
    Py_RETURN_NONE;
}

static PyObject *
core_receive_packets(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    long max_count;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "receive_packets(max_count, headers=None)");
        return NULL;
    }
    PyObject *arg = args[0], *headers = nargs > 1 ? args[1] : Py_None;
    if (!PyLong_Check(arg) || PyBool_Check(arg) || (max_count = PyLong_AsLong(arg)) < 1) {
        PyErr_Clear();
        return raise_status(STATUS_INVALID_PARAMETER, "max_count %R must be an int >= 1", arg);
    }
    if (headers != Py_None && !PyList_Check(headers))
        return raise_status(STATUS_INVALID_PARAMETER, "headers must be a list to append to, not %s",
                            Py_TYPE(headers)->tp_name);
    PyObject *views = PyList_New(0);
    if (views == NULL)
        return NULL;
    lock(&self->rx_lock);
    PyObject *result = NULL;
    if (self->state && !self->rx_pending) {
        raise_status(STATUS_HANDLE_EOF, "the session has ended");
        goto done;
    }
    self->rx_empty = 0;
    /* What was read ahead first, then reads of as many as are still wanted (a dropped packet counts
     * toward max_count); an error after some packets is raised by the next receive, those packets
     * handed out first. */
    for (long i = 0; i < max_count; i++) {
        PyObject *view = NULL;
        Py_ssize_t dropped = self->receive_dropped;
        Py_ssize_t want = max_count - i < CHUNK ? max_count - i : CHUNK;
        if (i > 0 && !self->rx_pending && self->rx_empty)
            break; /* the queue was empty a moment ago: no read to find it so again */
        int rc = core_next(self, &view, want, want);
        if (rc > 0) {
            int failed = PyList_Append(views, view);
            Py_DECREF(view);
            if (failed < 0)
                goto done;
            continue;
        }
        if (rc == 0) {
            if (self->receive_dropped != dropped)
                continue; /* dropped for lack of room: the queue may hold more */
            break;
        }
        if (PyList_GET_SIZE(views) == 0 || !PyErr_ExceptionMatches(PyExc_Exception))
            goto done;
        core_keep_error(self);
        break;
    }
    if (headers != Py_None) {
        static PyObject *zero_header;
        if (zero_header == NULL && (zero_header = PyBytes_FromStringAndSize("\0\0\0\0\0\0\0\0\0\0", 10)) == NULL)
            goto done;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(views); i++)
            if (PyList_Append(headers, zero_header) < 0)
                goto done;
    }
    result = views;
    views = NULL;
done:
    core_signal_ready(self, self->rx_pending > 0); /* a loop cut short leaves some waiting: say so */
    unlock(&self->rx_lock);
    Py_XDECREF(views);
    return result;
}

/* Take back a received packet (rx lock held): 1 done, 0 not one of ours. */
static int
core_release_locked(CoreObject *self, PyObject *packet)
{
    Tracked *t = &self->rx_out;
    Ring *ring = &self->rx;
    Py_ssize_t i = tracked_find(t, packet, ring->data, ring->mask);
    if (i < 0)
        return 0;
    PyObject *view = t->a[i].view;
    if (i == t->first) {
        tracked_drop_front(t);
        if (t->n == 0 && self->rx_pending)
            store_word(ring, HEAD_WORD, self->rx_next); /* up to what was read ahead */
        else if (t->n == 0) { /* everything released: rewind so the ring keeps reusing cached memory */
            store_word(ring, TAIL_WORD, REWIND_OFFSET);
            store_word(ring, HEAD_WORD, REWIND_OFFSET);
        }
        else
            store_word(ring, HEAD_WORD, t->a[t->first].offset - 4);
    }
    else {
        t->a[i].view = NULL;
        uint32_t record = t->a[i].offset - 4;
        store_size(ring, record, load_size(ring, record) | RELEASE_BIT); /* Wintun's out-of-order mark */
    }
    Py_DECREF(view);
    return 1;
}

static PyObject *
not_received(PyObject *packet)
{
    return raise_status(STATUS_INVALID_PARAMETER,
                        "%s at %p is not a received, unreleased packet of this session (released twice, never "
                        "received, or from another session?)",
                        Py_TYPE(packet)->tp_name, (void *)packet);
}

static PyObject *
core_release_receive_packet(CoreObject *self, PyObject *packet)
{
    lock(&self->rx_lock);
    if (self->state == 2) {
        unlock(&self->rx_lock);
        Py_RETURN_NONE;
    }
    int ok = core_release_locked(self, packet);
    unlock(&self->rx_lock);
    if (!ok)
        return not_received(packet);
    release_view(packet);
    Py_RETURN_NONE;
}

static PyObject *
core_release_receive_packets(CoreObject *self, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "not iterable");
    if (seq == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_TypeError))
            return NULL;
        PyErr_Clear();
        return raise_status(STATUS_INVALID_PARAMETER, "packets must be a list of received packets, not %s",
                            Py_TYPE(arg)->tp_name);
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    lock(&self->rx_lock);
    if (self->state == 2) {
        unlock(&self->rx_lock);
        Py_DECREF(seq);
        Py_RETURN_NONE;
    }
    Tracked *t = &self->rx_out;
    Ring *ring = &self->rx;
    /* All or nothing: every packet must be ours and listed once. The usual case, the oldest packets in
     * order, is checked in one pass. */
    int in_order = t->first + n <= t->n;
    for (Py_ssize_t i = 0; in_order && i < n; i++)
        in_order = t->a[t->first + i].view == items[i];
    if (!in_order) {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t k = tracked_find(t, items[i], ring->data, ring->mask);
            int repeated = 0;
            for (Py_ssize_t j = 0; k >= 0 && j < i; j++)
                repeated |= items[j] == items[i];
            if (k < 0 || repeated) {
                unlock(&self->rx_lock);
                not_received(items[i]);
                Py_DECREF(seq);
                return NULL;
            }
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        core_release_locked(self, items[i]);
    unlock(&self->rx_lock);
    for (Py_ssize_t i = 0; i < n; i++)
        release_view(items[i]);
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *
core_holds(CoreObject *self, PyObject *packet)
{
    lock(&self->rx_lock);
    int held = self->state != 2 && tracked_find(&self->rx_out, packet, self->rx.data, self->rx.mask) >= 0;
    unlock(&self->rx_lock);
    return PyBool_FromLong(held);
}

/* A record for ``size`` bytes (tx lock held): its record offset, -1 when the ring is full, -2 with an
 * exception set. */
static int64_t
core_allocate_locked(CoreObject *self, uint32_t size)
{
    Ring *ring = &self->tx;
    if (!self->tx_unsent && !self->stalled && self->tx_release == self->tx_alloc &&
        self->tx_alloc != REWIND_OFFSET && load_word(ring, HEAD_WORD) == self->tx_release) {
        store_word(ring, HEAD_WORD, REWIND_OFFSET); /* all written: rewind to the start, still in cache */
        store_word(ring, TAIL_WORD, REWIND_OFFSET);
        self->tx_alloc = self->tx_release = REWIND_OFFSET;
    }
    uint32_t head = load_word(ring, HEAD_WORD);
    if (check_ring_index(ring, "send", "Head", head) < 0)
        return -2;
    uint32_t tail = self->tx_alloc, rec = (size + 7) & ~3u;
    if (rec > ((head - tail - 4) & ring->mask))
        return -1;
    store_size(ring, tail, size | RELEASE_BIT);
    self->tx_alloc = (tail + rec) & ring->mask;
    self->tx_unsent++;
    return tail;
}

static PyObject *
core_allocate_send_packet(CoreObject *self, PyObject *arg)
{
    long size;
    if (!PyLong_Check(arg) || PyBool_Check(arg))
        return raise_status(STATUS_INVALID_PARAMETER, "packet size must be an int, not %s (%R)",
                            Py_TYPE(arg)->tp_name, arg);
    size = PyLong_AsLong(arg);
    if (size < 1 || size > (long)MAX_PACKET_SIZE) {
        PyErr_Clear();
        return raise_status(STATUS_INVALID_PARAMETER, "packet size %R is out of range: must be 1..%d (0xFFFF)", arg,
                            (int)MAX_PACKET_SIZE);
    }
    lock(&self->tx_lock);
    PyObject *view = NULL;
    if (self->state) {
        raise_status(STATUS_HANDLE_EOF, "the session has ended");
        goto done;
    }
    int64_t record = core_allocate_locked(self, (uint32_t)size);
    if (record == -2)
        goto done;
    if (record < 0) {
        uint32_t free_bytes = (load_word(&self->tx, HEAD_WORD) - self->tx_alloc - 4) & self->tx.mask;
        raise_status(STATUS_BUFFER_OVERFLOW, "send ring full: a %ld-byte packet needs %ld bytes, %u free", size,
                     (size + 7) & ~3L, (unsigned)free_bytes);
        goto done;
    }
    view = make_view(self->tx_data, (Py_ssize_t)record + 4, size);
    if (view != NULL && tracked_push(&self->tx_out, view, (uint32_t)record + 4) < 0)
        Py_CLEAR(view);
    if (view == NULL) { /* take the allocation back */
        self->tx_alloc = (uint32_t)record;
        self->tx_unsent--;
    }
done:
    unlock(&self->tx_lock);
    return view;
}

/* Clear a record's release bit and move Tail over the sent run at the front (tx lock held). */
static void
core_mark_sent(CoreObject *self, uint32_t record)
{
    Ring *ring = &self->tx;
    store_size(ring, record, load_size(ring, record) & ~RELEASE_BIT);
    if (record != self->tx_release)
        return; /* an earlier allocation is still unsent: this one waits for it */
    uint32_t tr = record;
    if (self->tx_unsent == 1) {
        self->tx_unsent = 0;
        tr = self->tx_alloc;
    }
    else {
        while (self->tx_unsent) {
            uint32_t size = load_size(ring, tr);
            if (size & RELEASE_BIT)
                break;
            tr = (tr + ((size + 7) & ~3u)) & ring->mask;
            self->tx_unsent--;
        }
    }
    self->tx_release = tr;
    store_word(ring, TAIL_WORD, tr);
}

static int
add_header(CoreObject *self, uint32_t record, const unsigned char *hdr, int drop)
{
    if (self->n_hdrs == self->size_hdrs) {
        Py_ssize_t size = self->size_hdrs ? self->size_hdrs * 2 : 16;
        TxHeader *h = PyMem_Realloc(self->hdrs, (size_t)size * sizeof(TxHeader));
        if (h == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->hdrs = h;
        self->size_hdrs = size;
    }
    TxHeader *h = &self->hdrs[self->n_hdrs++];
    h->record = record;
    h->drop = (unsigned char)drop;
    memset(h->hdr, 0, VNET_HDR_SIZE);
    if (hdr)
        memcpy(h->hdr, hdr, VNET_HDR_SIZE);
    return 0;
}

/* A header argument as 10 bytes: 1 a nonzero header in hdr, 0 none (None or all zero), -1 bad (the
 * InvalidParameter is left set), -2 another error. */
static int
get_header(CoreObject *self, PyObject *header, unsigned char *hdr)
{
    if (header == Py_None)
        return 0;
    PyObject *conv = NULL;
    Py_buffer b;
    if (!PyObject_CheckBuffer(header)) {
        conv = PyObject_CallOneArg(self->convert, header);
        if (conv == NULL) {
            PyObject *cls = error_class(STATUS_INVALID_PARAMETER);
            return cls != NULL && PyErr_ExceptionMatches(cls) ? -1 : -2;
        }
        header = conv;
    }
    if (PyObject_GetBuffer(header, &b, PyBUF_SIMPLE) < 0) {
        Py_XDECREF(conv);
        PyErr_Clear();
        raise_status(STATUS_INVALID_PARAMETER, "header must be a VirtioNetHeader or 10 bytes");
        return -1;
    }
    int rc = 0;
    if (b.len != VNET_HDR_SIZE) {
        raise_status(STATUS_INVALID_PARAMETER, "header is %zd bytes; a virtio-net header is %d bytes", b.len,
                     VNET_HDR_SIZE);
        rc = -1;
    }
    else {
        memcpy(hdr, b.buf, VNET_HDR_SIZE);
        static const unsigned char zero[VNET_HDR_SIZE];
        rc = memcmp(hdr, zero, VNET_HDR_SIZE) != 0;
    }
    PyBuffer_Release(&b);
    Py_XDECREF(conv);
    return rc;
}

static PyObject *
core_send_packet(CoreObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *packet, *header = Py_None;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    if (nargs < 1 || nargs > 2 || nargs + nkw > 2 ||
        (nkw == 1 && (nargs != 1 || PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "header")))) {
        PyErr_SetString(PyExc_TypeError, "send_packet(packet, header=None)");
        return NULL;
    }
    packet = args[0];
    if (nargs + nkw == 2)
        header = args[1];
    unsigned char hdr[VNET_HDR_SIZE];
    PyObject *bad_type = NULL, *bad_value = NULL, *bad_tb = NULL;
    int has_hdr = get_header(self, header, hdr);
    if (has_hdr == -2)
        return NULL;
    if (has_hdr == -1)
        PyErr_Fetch(&bad_type, &bad_value, &bad_tb);
    lock(&self->tx_lock);
    if (self->state) {
        unlock(&self->tx_lock);
        Py_XDECREF(bad_type);
        Py_XDECREF(bad_value);
        Py_XDECREF(bad_tb);
        Py_RETURN_NONE;
    }
    Tracked *t = &self->tx_out;
    Py_ssize_t i = tracked_find(t, packet, self->tx.data, self->tx.mask);
    if (i < 0) {
        unlock(&self->tx_lock);
        Py_XDECREF(bad_type);
        Py_XDECREF(bad_value);
        Py_XDECREF(bad_tb);
        return raise_status(STATUS_INVALID_PARAMETER,
                            "%s at %p is not a packet allocated by this session and not yet sent (sent twice, or "
                            "from another session?)",
                            Py_TYPE(packet)->tp_name, (void *)packet);
    }
    PyObject *view = t->a[i].view;
    uint32_t record = t->a[i].offset - 4;
    if (i == t->first)
        tracked_drop_front(t);
    else
        t->a[i].view = NULL;
    Py_DECREF(view);
    int rc = 0;
    if (has_hdr != 0)
        rc = add_header(self, record, has_hdr > 0 ? hdr : NULL, has_hdr < 0);
    core_mark_sent(self, record);
    if (rc == 0)
        rc = core_flush(self);
    unlock(&self->tx_lock);
    if (rc < 0) {
        Py_XDECREF(bad_type);
        Py_XDECREF(bad_value);
        Py_XDECREF(bad_tb);
        return NULL;
    }
    release_view(packet);
    if (bad_type != NULL) {
        PyObject *msg = bad_value ? PyObject_Str(bad_value) : NULL;
        Py_XDECREF(bad_value);
        Py_XDECREF(bad_tb);
        Py_DECREF(bad_type);
        if (msg == NULL)
            return NULL;
        raise_status(STATUS_INVALID_PARAMETER, "%U (the packet was dropped)", msg);
        Py_DECREF(msg);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Packet i of a batch (PySequence_Fast seq, hseq or NULL): its buffer (released by the caller) and its
 * header (NULL: zero), checked as the Python twin does (buffer, header, size). -1 with InvalidParameter. */
static int
batch_item(PyObject *seq, PyObject *hseq, Py_ssize_t i, Py_buffer *b, const unsigned char **h)
{
    static const unsigned char zero[VNET_HDR_SIZE];
    *h = NULL;
    if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, i), b, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        raise_status(STATUS_INVALID_PARAMETER, "packet %zd is not a contiguous bytes-like object", i);
        return -1;
    }
    if (hseq) {
        PyObject *ho = PySequence_Fast_GET_ITEM(hseq, i);
        if (!PyBytes_CheckExact(ho) || PyBytes_GET_SIZE(ho) != VNET_HDR_SIZE) {
            PyBuffer_Release(b);
            raise_status(STATUS_INVALID_PARAMETER, "header %zd must be %d bytes", i, VNET_HDR_SIZE);
            return -1;
        }
        *h = (const unsigned char *)PyBytes_AS_STRING(ho);
        if (memcmp(*h, zero, VNET_HDR_SIZE) == 0)
            *h = NULL;
    }
    if (b->len < 1 || b->len > (Py_ssize_t)MAX_PACKET_SIZE) {
        raise_status(STATUS_INVALID_PARAMETER, "packet %zd is %zd bytes; a packet must be 1..%d bytes", i, b->len,
                     (int)MAX_PACKET_SIZE);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

static PyObject *
core_send_packets(CoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "send_packets(packets, headers=None)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "packets must be a sequence of bytes-like objects");
    if (seq == NULL)
        return NULL;
    PyObject *hseq = NULL;
    if (nargs > 1 && args[1] != Py_None) {
        hseq = PySequence_Fast(args[1], "headers must be a sequence");
        if (hseq == NULL) {
            Py_DECREF(seq);
            return NULL;
        }
        if (PySequence_Fast_GET_SIZE(hseq) != PySequence_Fast_GET_SIZE(seq)) {
            raise_status(STATUS_INVALID_PARAMETER, "headers holds %zd item(s) for %zd packet(s)",
                         PySequence_Fast_GET_SIZE(hseq), PySequence_Fast_GET_SIZE(seq));
            Py_DECREF(seq);
            Py_DECREF(hseq);
            return NULL;
        }
    }
    lock(&self->tx_lock);
    Py_ssize_t count = 0, n = PySequence_Fast_GET_SIZE(seq);
    int rc = 0;
    if (self->state) { /* as send_packet after the end: discarded (WintunSendPacket returns nothing) */
        unlock(&self->tx_lock);
        Py_DECREF(seq);
        Py_XDECREF(hseq);
        return PyLong_FromSsize_t(n);
    }
    if (self->stalled)
        rc = core_flush(self);
    Py_ssize_t i = 0;
    if (rc == 0 && !self->stalled && self->tx_unsent == 0 &&
        load_word(&self->tx, HEAD_WORD) == load_word(&self->tx, TAIL_WORD)) {
        /* Nothing queued ahead: write straight from the caller's buffers (copying them into the ring
         * would only be undone at once), until the kernel refuses one for now. */
        static const unsigned char zero[VNET_HDR_SIZE];
        for (; i < n; i++) {
            Py_buffer b;
            const unsigned char *h;
            if (batch_item(seq, hseq, i, &b, &h) < 0) {
                rc = -1;
                break;
            }
            struct iovec iov[2];
            iov[0].iov_base = (void *)(h ? h : zero);
            iov[0].iov_len = VNET_HDR_SIZE;
            iov[1].iov_base = b.buf;
            iov[1].iov_len = (size_t)b.len;
            PyThreadState *ts = PyEval_SaveThread();
            Py_ssize_t w = writev_nogil(self->fd, iov, &ts);
            int err = errno;
            PyEval_RestoreThread(ts);
            Py_ssize_t size = b.len;
            PyBuffer_Release(&b);
            if (w == -2) {
                rc = -1;
                break;
            }
            if (w < 0) {
                if (is_retry(err)) {
                    self->stalled = 1; /* this one and the rest go through the ring */
                    break;
                }
                if (is_gone(err)) {
                    core_lost(self, err);
                    rc = -1;
                    break;
                }
                self->send_dropped++;
                PyObject *r = PyObject_CallFunction(self->rejected, "in", err, size);
                if (r == NULL) {
                    rc = -1;
                    break;
                }
                Py_DECREF(r);
            }
            count++;
        }
    }
    for (; rc == 0 && i < n; i++) {
        Py_buffer b;
        const unsigned char *h;
        if (batch_item(seq, hseq, i, &b, &h) < 0) {
            rc = -1;
            break;
        }
        int64_t record = core_allocate_locked(self, (uint32_t)b.len);
        if (record == -1) {
            rc = core_flush(self); /* make room: everything queued so far goes first */
            if (rc == 0)
                record = core_allocate_locked(self, (uint32_t)b.len);
        }
        if (rc < 0 || record < 0) {
            PyBuffer_Release(&b);
            if (record == -2)
                rc = -1;
            break;
        }
        memcpy(self->tx.data + record + 4, b.buf, (size_t)b.len);
        PyBuffer_Release(&b);
        if (h != NULL && add_header(self, (uint32_t)record, h, 0) < 0) {
            core_mark_sent(self, (uint32_t)record);
            rc = -1;
            break;
        }
        core_mark_sent(self, (uint32_t)record);
        count++;
    }
    if (self->state == 0) {
        if (rc < 0) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            if (core_flush(self) < 0)
                PyErr_Clear();
            PyErr_Restore(type, value, tb);
        }
        else
            rc = core_flush(self);
    }
    unlock(&self->tx_lock);
    Py_DECREF(seq);
    Py_XDECREF(hseq);
    if (rc < 0)
        return NULL;
    return PyLong_FromSsize_t(count);
}

static PyObject *
core_flush_method(CoreObject *self, PyObject *unused)
{
    lock(&self->tx_lock);
    int rc = self->state == 0 ? core_flush(self) : 0;
    unlock(&self->tx_lock);
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
core_end(CoreObject *self, PyObject *unused)
{
    lock(&self->rx_lock);
    lock(&self->tx_lock);
    int was = self->state;
    self->state = 2;
    Tracked rx = self->rx_out, tx = self->tx_out;
    memset(&self->rx_out, 0, sizeof(Tracked));
    memset(&self->tx_out, 0, sizeof(Tracked));
    self->n_hdrs = 0;
    self->rx_pending = 0; /* what was read ahead goes with the session */
    Py_CLEAR(self->rx_error);
    if (was != 2) {
        release_ring(&self->rx);
        release_ring(&self->tx);
    }
    unlock(&self->tx_lock);
    unlock(&self->rx_lock);
    tracked_clear(&rx);
    tracked_clear(&tx);
    Py_RETURN_NONE;
}

static int
core_take_ring(PyObject *obj, const char *what, Ring *ring, PyObject **data)
{
    PyObject *words = PyObject_GetAttrString(obj, "words");
    if (words == NULL)
        return -1;
    PyObject *d = PyObject_GetAttrString(obj, "data");
    if (d == NULL) {
        Py_DECREF(words);
        return -1;
    }
    int rc = get_ring(words, d, ring);
    Py_DECREF(words);
    if (rc < 0) {
        Py_DECREF(d);
        return -1;
    }
    *data = d;
    return 0;
}

static int
core_init(CoreObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "rx", "tx", "io_error", "rejected", "convert_header", "ready_fd", NULL};
    int fd, ready_fd = -1;
    PyObject *rx, *tx, *io_error, *rejected, *convert;
    if (self->locks_made) {
        PyErr_SetString(PyExc_TypeError, "SessionCore is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOOOO|$i", kwlist, &fd, &rx, &tx, &io_error, &rejected, &convert,
                                     &ready_fd))
        return -1;
    if (core_take_ring(rx, "rx", &self->rx, &self->rx_data) < 0)
        return -1;
    if (core_take_ring(tx, "tx", &self->tx, &self->tx_data) < 0) {
        release_ring(&self->rx);
        Py_CLEAR(self->rx_data);
        return -1;
    }
    self->state = 0;
    if (self->rx.cap != self->tx.cap) {
        PyErr_SetString(PyExc_ValueError, "the two rings must have the same capacity");
        goto fail;
    }
    self->scratch = PyMem_Malloc(READ_SPAN);
    if (self->scratch == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    pthread_mutex_init(&self->rx_lock, NULL);
    pthread_mutex_init(&self->tx_lock, NULL);
    self->locks_made = 1;
    self->fd = fd;
    self->ready_fd = ready_fd;
    self->ready_set = 0;
    self->rx_pending = 0;
    self->tx_alloc = self->tx_release = load_word(&self->tx, TAIL_WORD) & self->tx.mask & ~3u;
    Py_INCREF(io_error);
    self->io_error = io_error;
    Py_INCREF(rejected);
    self->rejected = rejected;
    Py_INCREF(convert);
    self->convert = convert;
    return 0;
fail:
    self->state = 2;
    release_ring(&self->rx);
    release_ring(&self->tx);
    return -1;
}

static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    CoreObject *self = (CoreObject *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->state = 2; /* nothing held until __init__ */
    return (PyObject *)self;
}

static void
core_dealloc(CoreObject *self)
{
    if (self->state != 2) {
        release_ring(&self->rx);
        release_ring(&self->tx);
    }
    tracked_clear(&self->rx_out);
    tracked_clear(&self->tx_out);
    PyMem_Free(self->hdrs);
    PyMem_Free(self->scratch);
    if (self->locks_made) {
        pthread_mutex_destroy(&self->rx_lock);
        pthread_mutex_destroy(&self->tx_lock);
    }
    Py_XDECREF(self->rx_data);
    Py_XDECREF(self->tx_data);
    Py_XDECREF(self->io_error);
    Py_XDECREF(self->rx_error);
    Py_XDECREF(self->rejected);
    Py_XDECREF(self->convert);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
core_get_stalled(CoreObject *self, void *c)
{
    return PyBool_FromLong(self->stalled);
}

static PyObject *
core_get_ended(CoreObject *self, void *c)
{
    return PyBool_FromLong(self->state != 0);
}

static PyObject *
core_get_received(CoreObject *self, void *c)
{
    lock(&self->rx_lock);
    Py_ssize_t n = tracked_live(&self->rx_out);
    unlock(&self->rx_lock);
    return PyLong_FromSsize_t(n);
}

static PyObject *
core_get_allocated(CoreObject *self, void *c)
{
    lock(&self->tx_lock);
    Py_ssize_t n = tracked_live(&self->tx_out);
    unlock(&self->tx_lock);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef core_methods[] = {
    {"receive_packet", (PyCFunction)core_receive_packet, METH_NOARGS,
     "receive_packet() -> memoryview | None (WintunReceivePacket; None when none is waiting)"},
    {"receive_packets", (PyCFunction)(void (*)(void))core_receive_packets, METH_FASTCALL,
     "receive_packets(max_count, headers=None) -> list of memoryviews (up to max_count; empty when none\n"
     "waits); a list for headers gets a 10-byte zero virtio-net header per packet"},
    {"release_receive_packet", (PyCFunction)core_release_receive_packet, METH_O,
     "release_receive_packet(packet) (WintunReleaseReceivePacket; any order)"},
    {"release_receive_packets", (PyCFunction)core_release_receive_packets, METH_O,
     "release_receive_packets(packets) (all or nothing)"},
    {"holds", (PyCFunction)core_holds, METH_O, "holds(packet) -> whether it is received and not released"},
    {"allocate_send_packet", (PyCFunction)core_allocate_send_packet, METH_O,
     "allocate_send_packet(size) -> memoryview (WintunAllocateSendPacket)"},
    {"send_packet", (PyCFunction)(void (*)(void))core_send_packet, METH_FASTCALL | METH_KEYWORDS,
     "send_packet(packet, header=None) (WintunSendPacket)"},
    {"send_packets", (PyCFunction)(void (*)(void))core_send_packets, METH_FASTCALL,
     "send_packets(packets, headers=None) -> count taken (copied into the send ring and sent)"},
    {"flush", (PyCFunction)core_flush_method, METH_NOARGS, "flush(): write what waits in the send ring"},
    {"end", (PyCFunction)core_end, METH_NOARGS, "end(): forget every packet handed out; no more I/O"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef core_members[] = {
    {"receive_dropped", T_PYSSIZET, offsetof(CoreObject, receive_dropped), 0,
     "packets read and dropped for lack of room in the receive ring"},
    {"send_dropped", T_PYSSIZET, offsetof(CoreObject, send_dropped), 0,
     "packets the kernel rejected (or sent with a bad header), dropped"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef core_getset[] = {
    {"stalled", (getter)core_get_stalled, NULL, "the kernel refused a write for now: packets wait", NULL},
    {"ended", (getter)core_get_ended, NULL, "the session ended or its queue was lost", NULL},
    {"received", (getter)core_get_received, NULL, "packets received and not yet released", NULL},
    {"allocated", (getter)core_get_allocated, NULL, "packets allocated and not yet sent", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "wiretun._speedups.SessionCore",
    .tp_basicsize = sizeof(CoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SessionCore(fd, rx, tx, io_error, rejected, convert_header): a session's per-packet state "
              "(see wiretun.linux.engine)",
    .tp_new = core_new,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_getset = core_getset,
};

/* ------------------------------------------------------------------------------------------------ */
/* fence: a full memory barrier (wiretun.ring.fence), for the ring's cross-process wake-up handshake. */

PyDoc_STRVAR(fence_doc, "fence()\n\nA full (sequentially consistent) memory barrier: __atomic_thread_fence.");

static PyObject *
fence(PyObject *self, PyObject *Py_UNUSED(ignored))
{
    (void)self;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rx_pull", (PyCFunction)(void (*)(void))rx_pull, METH_FASTCALL, rx_pull_doc},
    {"rx_frames", (PyCFunction)(void (*)(void))rx_frames, METH_FASTCALL, rx_frames_doc},
    {"rx_one", (PyCFunction)(void (*)(void))rx_one, METH_FASTCALL, rx_one_doc},
    {"tx_flush", (PyCFunction)(void (*)(void))tx_flush, METH_FASTCALL, tx_flush_doc},
    {"tx_direct", (PyCFunction)(void (*)(void))tx_direct, METH_FASTCALL, tx_direct_doc},
    {"fence", fence, METH_NOARGS, fence_doc},
    {NULL, NULL, 0, NULL},
};

static int
exec_module(PyObject *module)
{
    if (PyModule_AddIntConstant(module, "CHUNK", CHUNK) < 0 ||
        PyModule_AddIntConstant(module, "FAST_VIEWS", FAST_VIEWS) < 0 ||
        PyModule_AddIntConstant(module, "FRAME_SPAN", FRAME_SPAN) < 0 ||
        PyModule_AddIntConstant(module, "SHORT_READ", ST_SHORT_READ) < 0 ||
        PyModule_AddIntConstant(module, "BAD_RECORD", ST_BAD_RECORD) < 0 ||
        PyModule_AddIntConstant(module, "NOT_SIMPLE", ST_NOT_SIMPLE) < 0 ||
        PyModule_AddIntConstant(module, "STATUS_INVALID_DATA", STATUS_INVALID_DATA) < 0 ||
        PyModule_AddIntConstant(module, "STATUS_HANDLE_EOF", STATUS_HANDLE_EOF) < 0 ||
        PyModule_AddIntConstant(module, "STATUS_INVALID_PARAMETER", STATUS_INVALID_PARAMETER) < 0 ||
        PyModule_AddIntConstant(module, "STATUS_BUFFER_OVERFLOW", STATUS_BUFFER_OVERFLOW) < 0 ||
        PyModule_AddIntConstant(module, "STATUS_NO_MORE_ITEMS", STATUS_NO_MORE_ITEMS) < 0)
        return -1;
    if (memoryview_release == NULL &&
        (memoryview_release = PyObject_GetAttrString((PyObject *)&PyMemoryView_Type, "release")) == NULL)
        return -1;
    if (PyType_Ready(&CoreType) < 0)
        return -1;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(module, "SessionCore", (PyObject *)&CoreType) < 0) {
        Py_DECREF(&CoreType);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "wiretun._speedups",
    .m_doc = "C versions of wiretun.session's per-packet loops (optional; see the module source).",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&moduledef);
}
