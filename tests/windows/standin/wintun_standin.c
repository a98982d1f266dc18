/* A Linux stand-in for wintun.dll 0.14, built by the tests (tests/windows/standin.py) and loaded by
 * wiretun's very own wintun.dll binding through its platform shim.
 *
 * It exports Wintun's 14 functions with the same fixed-width signatures (uint16_t strings, uint32_t
 * DWORDs, int32_t BOOLs, pointer-sized handles, a 16-byte GUID, a 64-bit LUID) and their semantics, plus
 * GetLastError(), the thread-local last-error slot that kernel32 keeps on Windows:
 *
 *   adapter   a multi-queue Linux TUN device (/dev/net/tun) in the caller's network namespace; the
 *             creating handle keeps one detached queue as its anchor, so closing it removes the device.
 *             LUID = ifindex. A name must also be a kernel name (1..15 bytes): a limit of this stand-in.
 *             As Wintun reports media connected only while a session runs, the device is set up when a
 *             session starts and down when it ends.
 *   session   the two rings of Wintun's README (seed 002): TUN_RING {Head, Tail, Alertable, Data[capacity
 *             + 0x10000]}, TUN_PACKET {Size, Data} 4-aligned, in anonymous memory; one attached queue.
 *             Two threads play the driver: one reads the queue into the Send ring (kernel -> client;
 *             dropping what does not fit), one writes the Receive ring's packets to the queue (client ->
 *             kernel, waiting on its TailMoved event when Alertable). The client side (Receive/Release,
 *             Allocate/Send) follows Wintun's session.c: the release bit (bit 31 of Size) for release in
 *             any order and for "allocated, not yet sent", Head/Tail moved over the unbroken run.
 *   events    eventfds stand in for the auto-reset event HANDLEs; the read-wait event is the Send ring's
 *             TailMoved, set when the driver moves Tail while the client is Alertable, and on the end.
 *   errors    Win32 codes in the last-error slot: ERROR_NO_MORE_ITEMS, ERROR_HANDLE_EOF, ERROR_INVALID_DATA,
 *             ERROR_BUFFER_OVERFLOW, ERROR_INVALID_PARAMETER, ERROR_ALREADY_EXISTS, ERROR_NOT_FOUND,
 *             ERROR_ACCESS_DENIED, ERROR_ALREADY_INITIALIZED (a second session on an adapter).
 * When the device goes away under a session (ip link del), the driver threads terminate both rings
 * (Send Tail = Receive Head = 0xFFFFFFFF) and set the read-wait event: the client gets ERROR_HANDLE_EOF.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <linux/ethtool.h>
#include <linux/if_tun.h>
#include <linux/sockios.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef uint32_t DWORD;
typedef int32_t BOOL;
typedef uint16_t WCHAR;
typedef uint8_t BYTE;
typedef struct { uint32_t Data1; uint16_t Data2, Data3; uint8_t Data4[8]; } GUID;
typedef void (*WINTUN_LOGGER_CALLBACK)(int32_t Level, uint64_t Timestamp, const WCHAR *Message);

_Static_assert(sizeof(GUID) == 16, "GUID is 16 bytes");

enum { LOG_INFO, LOG_WARN, LOG_ERR };

#define ERROR_SUCCESS 0
#define ERROR_FILE_NOT_FOUND 2
#define ERROR_ACCESS_DENIED 5
#define ERROR_NOT_ENOUGH_MEMORY 8
#define ERROR_INVALID_DATA 13
#define ERROR_GEN_FAILURE 31
#define ERROR_HANDLE_EOF 38
#define ERROR_INVALID_PARAMETER 87
#define ERROR_BUFFER_OVERFLOW 111
#define ERROR_INVALID_NAME 123
#define ERROR_ALREADY_EXISTS 183
#define ERROR_NO_MORE_ITEMS 259
#define ERROR_NOT_FOUND 1168
#define ERROR_ALREADY_INITIALIZED 1247

#define MIN_RING_CAPACITY 0x20000u
#define MAX_RING_CAPACITY 0x4000000u
#define MAX_IP_PACKET_SIZE 0xFFFFu
#define TRAILING 0x10000u
#define RELEASE_BIT 0x80000000u
#define TERMINATED 0xFFFFFFFFu
#define MAX_NAME_UNITS 127 /* MAX_ADAPTER_NAME - 1 */
#define ALIGN4(n) (((n) + 3u) & ~3u)
#define RECORD(size) ALIGN4(4u + (size))

/* ------------------------------------------------------------------------------------ last error, log */

static __thread DWORD last_error;

EXPORT DWORD GetLastError(void) { return last_error; }

static void *fail(DWORD code) { last_error = code; return NULL; }

static WINTUN_LOGGER_CALLBACK logger;
static pthread_mutex_t logger_lock = PTHREAD_MUTEX_INITIALIZER;

EXPORT void WintunSetLogger(WINTUN_LOGGER_CALLBACK new_logger)
{
    pthread_mutex_lock(&logger_lock);
    __atomic_store_n(&logger, new_logger, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&logger_lock);
}

static void say(int level, const char *fmt, ...)
{
    WINTUN_LOGGER_CALLBACK cb = __atomic_load_n(&logger, __ATOMIC_ACQUIRE);
    if (!cb)
        return;
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    WCHAR wide[512];
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)text; *p && n < 511; ++p)
        wide[n++] = *p < 0x80 ? *p : '?'; /* our messages are ASCII but for names: good enough */
    wide[n] = 0;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t filetime = (uint64_t)ts.tv_sec * 10000000u + (uint64_t)ts.tv_nsec / 100u + 116444736000000000ull;
    cb(level, filetime, wide);
}

static int utf16_to_utf8(const WCHAR *in, char *out, size_t out_size)
{
    /* Returns the number of UTF-16 units read, or -1 for a bad string (unpaired surrogate, too long). */
    size_t o = 0;
    int units = 0;
    for (const WCHAR *p = in; *p; ++p, ++units) {
        uint32_t c = *p;
        if (units >= MAX_NAME_UNITS)
            return -1;
        if (c >= 0xD800 && c < 0xDC00) {
            if (p[1] < 0xDC00 || p[1] >= 0xE000)
                return -1;
            c = 0x10000 + ((c - 0xD800) << 10) + (p[1] - 0xDC00);
            ++p, ++units;
        } else if (c >= 0xDC00 && c < 0xE000) {
            return -1;
        }
        char buf[4];
        size_t n;
        if (c < 0x80) { buf[0] = (char)c; n = 1; }
        else if (c < 0x800) { buf[0] = (char)(0xC0 | (c >> 6)); buf[1] = (char)(0x80 | (c & 0x3F)); n = 2; }
        else if (c < 0x10000) {
            buf[0] = (char)(0xE0 | (c >> 12)); buf[1] = (char)(0x80 | ((c >> 6) & 0x3F));
            buf[2] = (char)(0x80 | (c & 0x3F)); n = 3;
        } else {
            buf[0] = (char)(0xF0 | (c >> 18)); buf[1] = (char)(0x80 | ((c >> 12) & 0x3F));
            buf[2] = (char)(0x80 | ((c >> 6) & 0x3F)); buf[3] = (char)(0x80 | (c & 0x3F)); n = 4;
        }
        if (o + n + 1 > out_size)
            return -1;
        memcpy(out + o, buf, n);
        o += n;
    }
    out[o] = 0;
    return units;
}

static DWORD errno_to_win32(int e)
{
    switch (e) {
    case EPERM: case EACCES: return ERROR_ACCESS_DENIED;
    case EBUSY: case EEXIST: return ERROR_ALREADY_EXISTS;
    case ENOENT: case ENODEV: case ENXIO: return ERROR_FILE_NOT_FOUND;
    case EINVAL: return ERROR_INVALID_PARAMETER;
    case ENOMEM: return ERROR_NOT_ENOUGH_MEMORY;
    default: return ERROR_GEN_FAILURE;
    }
}

/* ------------------------------------------------------------------------------------------- adapters */

typedef struct {
    char name[IFNAMSIZ];
    int ifindex;
    int anchor; /* the creating handle's detached queue; -1 for a handle from WintunOpenAdapter */
} ADAPTER;

static int open_queue(const char *name, int create, DWORD *err)
{
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        *err = errno == ENOENT ? ERROR_FILE_NOT_FOUND : errno_to_win32(errno);
        return -1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, name, strnlen(name, IFNAMSIZ - 1));
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE | (create ? IFF_TUN_EXCL : 0);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        *err = errno_to_win32(errno);
        if (!create && errno == EBUSY)
            *err = ERROR_ALREADY_INITIALIZED;
        close(fd);
        return -1;
    }
    return fd;
}

static int is_tun(const char *name)
{
    /* The driver's name through ethtool, asked in the calling thread's network namespace (sysfs shows
     * the namespace it was mounted in, which need not be the caller's). */
    struct ethtool_drvinfo info = { .cmd = ETHTOOL_GDRVINFO };
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, name, strnlen(name, IFNAMSIZ - 1));
    ifr.ifr_data = (void *)&info;
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return 0;
    int ok = ioctl(sock, SIOCETHTOOL, &ifr) == 0 && strcmp(info.driver, "tun") == 0;
    close(sock);
    return ok;
}

/* Wintun reports its adapter's media connected while a session runs, disconnected otherwise: the
 * stand-in sets the TUN device up and down with the session (in the calling thread's namespace). */
static void set_link_up(const char *name, int up)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    memcpy(ifr.ifr_name, name, strnlen(name, IFNAMSIZ - 1));
    int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        return;
    if (ioctl(sock, SIOCGIFFLAGS, &ifr) == 0) {
        ifr.ifr_flags = up ? (ifr.ifr_flags | IFF_UP) : (ifr.ifr_flags & ~IFF_UP);
        ioctl(sock, SIOCSIFFLAGS, &ifr);
    }
    close(sock);
}

static int check_name(const WCHAR *wide, char *name, DWORD *err)
{
    char utf8[4 * MAX_NAME_UNITS + 1];
    if (!wide || !wide[0] || utf16_to_utf8(wide, utf8, sizeof(utf8)) < 0) {
        *err = ERROR_INVALID_PARAMETER;
        return -1;
    }
    size_t n = strlen(utf8);
    if (n >= IFNAMSIZ || strchr(utf8, '/') || strchr(utf8, ' ') || strchr(utf8, ':') || strchr(utf8, '%')) {
        *err = ERROR_INVALID_NAME; /* the stand-in's limit: the name is the kernel name */
        return -1;
    }
    memcpy(name, utf8, n + 1);
    return 0;
}

EXPORT void *WintunCreateAdapter(const WCHAR *Name, const WCHAR *TunnelType, const GUID *RequestedGUID)
{
    (void)RequestedGUID;
    DWORD err = 0;
    char name[IFNAMSIZ], type[4 * MAX_NAME_UNITS + 1];
    if (check_name(Name, name, &err) < 0)
        return fail(err);
    if (!TunnelType || !TunnelType[0] || utf16_to_utf8(TunnelType, type, sizeof(type)) < 0)
        return fail(ERROR_INVALID_PARAMETER);
    if (if_nametoindex(name))
        return fail(ERROR_ALREADY_EXISTS);
    ADAPTER *a = calloc(1, sizeof(*a));
    if (!a)
        return fail(ERROR_NOT_ENOUGH_MEMORY);
    a->anchor = open_queue(name, 1, &err);
    if (a->anchor < 0) {
        free(a);
        return fail(err);
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_flags = IFF_DETACH_QUEUE; /* an anchor: keeps the device, receives nothing */
    if (ioctl(a->anchor, TUNSETQUEUE, &ifr) < 0 || !(a->ifindex = (int)if_nametoindex(name))) {
        err = errno_to_win32(errno);
        close(a->anchor);
        free(a);
        return fail(err);
    }
    strcpy(a->name, name);
    say(LOG_INFO, "Created adapter %s (tunnel type %s, index %d)", name, type, a->ifindex);
    last_error = ERROR_SUCCESS;
    return a;
}

EXPORT void *WintunOpenAdapter(const WCHAR *Name)
{
    DWORD err = 0;
    char name[IFNAMSIZ];
    if (check_name(Name, name, &err) < 0)
        return fail(err);
    int index = (int)if_nametoindex(name);
    if (!index || !is_tun(name))
        return fail(ERROR_NOT_FOUND);
    ADAPTER *a = calloc(1, sizeof(*a));
    if (!a)
        return fail(ERROR_NOT_ENOUGH_MEMORY);
    strcpy(a->name, name);
    a->ifindex = index;
    a->anchor = -1;
    return a;
}

EXPORT void WintunCloseAdapter(void *Adapter)
{
    ADAPTER *a = Adapter;
    if (!a)
        return;
    if (a->anchor >= 0) {
        close(a->anchor); /* the kernel removes the device with its last queue */
        say(LOG_INFO, "Removed adapter %s", a->name);
    }
    free(a);
}

EXPORT BOOL WintunDeleteDriver(void)
{
    last_error = ERROR_SUCCESS;
    return 1; /* nothing to remove: the TUN driver is the kernel's */
}

EXPORT void WintunGetAdapterLUID(void *Adapter, uint64_t *Luid)
{
    *Luid = (uint64_t)((ADAPTER *)Adapter)->ifindex;
}

EXPORT DWORD WintunGetRunningDriverVersion(void)
{
    if (access("/dev/net/tun", F_OK) != 0) {
        last_error = ERROR_FILE_NOT_FOUND;
        return 0;
    }
    return (0u << 16) | 14u; /* 0.14 */
}

/* ------------------------------------------------------------------------------------------- sessions */

typedef struct {
    volatile uint32_t Head;
    volatile uint32_t Tail;
    volatile int32_t Alertable;
    uint8_t Data[];
} TUN_RING;

typedef struct {
    uint32_t capacity, mask;
    size_t ring_size;
    TUN_RING *send_ring; /* driver -> client */
    TUN_RING *recv_ring; /* client -> driver */
    int fd;
    int send_tail_moved; /* the read-wait event */
    int recv_tail_moved;
    int stop;
    pthread_t reader, writer;
    pthread_mutex_t send_lock, recv_lock;
    uint32_t send_head, send_head_release, send_to_release;
    uint32_t recv_tail, recv_tail_release, recv_to_release;
    int ifindex;
    char name[IFNAMSIZ];
} SESSION;

static pthread_mutex_t sessions_lock = PTHREAD_MUTEX_INITIALIZER;
static int session_ifindex[256];

static uint32_t load_acq(volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void store_rel(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static void set_event(int fd) { uint64_t one = 1; ssize_t r = write(fd, &one, 8); (void)r; }
static void clear_event(int fd) { uint64_t v; ssize_t r = read(fd, &v, 8); (void)r; }

static void terminate_rings(SESSION *s)
{
    store_rel(&s->send_ring->Tail, TERMINATED);
    store_rel(&s->recv_ring->Head, TERMINATED);
    set_event(s->send_tail_moved);
}

static int gone(int e) { return e == EBADFD || e == EBADF || e == ENODEV || e == ENXIO; }

/* The driver's side of the Send ring: the kernel's packets into the ring at Tail. */
static void *reader_main(void *arg)
{
    SESSION *s = arg;
    static __thread uint8_t packet[MAX_IP_PACKET_SIZE + 1];
    uint32_t tail = 0;
    struct pollfd p[2] = { { s->fd, POLLIN, 0 }, { s->stop, POLLIN, 0 } };
    for (;;) {
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (p[1].revents)
            return NULL;
        ssize_t n = read(s->fd, packet, sizeof(packet));
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            if (gone(errno) || (p[0].revents & (POLLERR | POLLHUP | POLLNVAL))) {
                say(LOG_WARN, "Adapter %s is gone; ending the session", s->name);
                terminate_rings(s);
                return NULL;
            }
            continue;
        }
        if (n == 0 || (size_t)n > MAX_IP_PACKET_SIZE)
            continue;
        uint32_t head = load_acq(&s->send_ring->Head);
        if (head >= s->capacity)
            return NULL; /* the client ended */
        uint32_t space = (head - tail - 4u) & s->mask;
        uint32_t rec = RECORD((uint32_t)n);
        if (rec > space)
            continue; /* full: dropped, as Wintun's driver drops */
        memcpy(s->send_ring->Data + tail + 4, packet, (size_t)n);
        *(volatile uint32_t *)(s->send_ring->Data + tail) = (uint32_t)n;
        tail = (tail + rec) & s->mask;
        store_rel(&s->send_ring->Tail, tail);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&s->send_ring->Alertable, __ATOMIC_SEQ_CST))
            set_event(s->send_tail_moved);
    }
    return NULL;
}

/* The driver's side of the Receive ring: the client's packets from Head to the kernel (seed 002's loop). */
static void *writer_main(void *arg)
{
    SESSION *s = arg;
    TUN_RING *ring = s->recv_ring;
    uint32_t head = 0;
    struct pollfd p[2] = { { s->recv_tail_moved, POLLIN, 0 }, { s->stop, POLLIN, 0 } };
    for (;;) {
        uint32_t tail = load_acq(&ring->Tail);
        if (tail >= s->capacity)
            return NULL; /* the client ended */
        if (head == tail) {
            __atomic_store_n(&ring->Alertable, 1, __ATOMIC_SEQ_CST);
            tail = __atomic_load_n(&ring->Tail, __ATOMIC_SEQ_CST);
            if (head == tail) {
                while (poll(p, 2, -1) < 0 && errno == EINTR)
                    ;
                __atomic_store_n(&ring->Alertable, 0, __ATOMIC_SEQ_CST);
                if (p[1].revents)
                    return NULL;
                clear_event(s->recv_tail_moved);
                continue;
            }
            __atomic_store_n(&ring->Alertable, 0, __ATOMIC_SEQ_CST);
            clear_event(s->recv_tail_moved);
            if (tail >= s->capacity)
                return NULL;
        }
        uint32_t content = (tail - head) & s->mask;
        uint32_t size = content >= 4 ? *(volatile uint32_t *)(ring->Data + head) : 0;
        if (content < 4 || size > MAX_IP_PACKET_SIZE || RECORD(size) > content || (tail & 3)) {
            say(LOG_ERR, "Receive ring is corrupt (Head %#x, Tail %#x, Size %#x); stopping", head, tail, size);
            store_rel(&ring->Head, TERMINATED);
            return NULL;
        }
        for (;;) {
            if (write(s->fd, ring->Data + head + 4, size) >= 0)
                break;
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == ENOBUFS) {
                struct pollfd out[2] = { { s->fd, POLLOUT, 0 }, { s->stop, POLLIN, 0 } };
                poll(out, 2, 100);
                if (out[1].revents)
                    return NULL;
                continue;
            }
            if (gone(errno)) {
                say(LOG_WARN, "Adapter %s is gone; ending the session", s->name);
                terminate_rings(s);
                return NULL;
            }
            break; /* EINVAL (not IP), EIO (down): dropped, as Wintun drops what NDIS refuses */
        }
        head = (head + RECORD(size)) & s->mask;
        store_rel(&ring->Head, head);
    }
}

static int claim_adapter(int ifindex)
{
    pthread_mutex_lock(&sessions_lock);
    int free_slot = -1;
    for (int i = 0; i < 256; ++i) {
        if (session_ifindex[i] == ifindex) {
            pthread_mutex_unlock(&sessions_lock);
            return -1;
        }
        if (!session_ifindex[i] && free_slot < 0)
            free_slot = i;
    }
    if (free_slot >= 0)
        session_ifindex[free_slot] = ifindex;
    pthread_mutex_unlock(&sessions_lock);
    return free_slot < 0 ? -2 : 0;
}

static void unclaim_adapter(int ifindex)
{
    pthread_mutex_lock(&sessions_lock);
    for (int i = 0; i < 256; ++i)
        if (session_ifindex[i] == ifindex)
            session_ifindex[i] = 0;
    pthread_mutex_unlock(&sessions_lock);
}

static void free_session(SESSION *s)
{
    if (s->fd >= 0) close(s->fd);
    if (s->send_tail_moved >= 0) close(s->send_tail_moved);
    if (s->recv_tail_moved >= 0) close(s->recv_tail_moved);
    if (s->stop >= 0) close(s->stop);
    if (s->send_ring) munmap(s->send_ring, s->ring_size);
    if (s->recv_ring) munmap(s->recv_ring, s->ring_size);
    pthread_mutex_destroy(&s->send_lock);
    pthread_mutex_destroy(&s->recv_lock);
    free(s);
}

EXPORT void *WintunStartSession(void *Adapter, DWORD Capacity)
{
    ADAPTER *a = Adapter;
    if (!a || Capacity < MIN_RING_CAPACITY || Capacity > MAX_RING_CAPACITY || (Capacity & (Capacity - 1)))
        return fail(ERROR_INVALID_PARAMETER);
    if (if_nametoindex(a->name) != (unsigned)a->ifindex)
        return fail(ERROR_FILE_NOT_FOUND);
    int claimed = claim_adapter(a->ifindex);
    if (claimed < 0)
        return fail(claimed == -1 ? ERROR_ALREADY_INITIALIZED : ERROR_NOT_ENOUGH_MEMORY);
    SESSION *s = calloc(1, sizeof(*s));
    if (!s) {
        unclaim_adapter(a->ifindex);
        return fail(ERROR_NOT_ENOUGH_MEMORY);
    }
    s->fd = s->send_tail_moved = s->recv_tail_moved = s->stop = -1;
    pthread_mutex_init(&s->send_lock, NULL);
    pthread_mutex_init(&s->recv_lock, NULL);
    s->capacity = Capacity;
    s->mask = Capacity - 1;
    s->ifindex = a->ifindex;
    strcpy(s->name, a->name);
    s->ring_size = sizeof(TUN_RING) + Capacity + TRAILING;
    DWORD err = ERROR_NOT_ENOUGH_MEMORY;
    s->send_ring = mmap(NULL, s->ring_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    s->recv_ring = mmap(NULL, s->ring_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s->send_ring == MAP_FAILED || s->recv_ring == MAP_FAILED) {
        if (s->send_ring == MAP_FAILED) s->send_ring = NULL;
        if (s->recv_ring == MAP_FAILED) s->recv_ring = NULL;
        goto failed;
    }
    s->send_ring->Alertable = 1; /* nothing received yet: the client may go straight to waiting */
    s->send_tail_moved = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    s->recv_tail_moved = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    s->stop = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (s->send_tail_moved < 0 || s->recv_tail_moved < 0 || s->stop < 0) {
        err = errno_to_win32(errno);
        goto failed;
    }
    s->fd = open_queue(a->name, 0, &err);
    if (s->fd < 0)
        goto failed;
    /* The driver threads take no signals: the caller's signal handling stays the caller's. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int r1 = pthread_create(&s->reader, NULL, reader_main, s);
    int r2 = r1 ? -1 : pthread_create(&s->writer, NULL, writer_main, s);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r1 || r2) {
        if (!r1) {
            set_event(s->stop);
            pthread_join(s->reader, NULL);
        }
        err = ERROR_NOT_ENOUGH_MEMORY;
        goto failed;
    }
    set_link_up(a->name, 1);
    say(LOG_INFO, "Started a session on %s (capacity %#x)", a->name, Capacity);
    last_error = ERROR_SUCCESS;
    return s;
failed:
    unclaim_adapter(a->ifindex);
    free_session(s);
    return fail(err);
}

EXPORT void WintunEndSession(void *Session)
{
    SESSION *s = Session;
    if (!s)
        return;
    set_event(s->stop);
    pthread_join(s->reader, NULL);
    pthread_join(s->writer, NULL);
    terminate_rings(s); /* as the driver does when the handle closes: waiters wake and see the end */
    if (if_nametoindex(s->name) == (unsigned)s->ifindex)
        set_link_up(s->name, 0);
    unclaim_adapter(s->ifindex);
    free_session(s);
}

EXPORT void *WintunGetReadWaitEvent(void *Session)
{
    return (void *)(intptr_t)((SESSION *)Session)->send_tail_moved;
}

EXPORT BYTE *WintunReceivePacket(void *Session, DWORD *PacketSize)
{
    SESSION *s = Session;
    TUN_RING *ring = s->send_ring;
    DWORD err;
    pthread_mutex_lock(&s->send_lock);
    if (s->send_head >= s->capacity) {
        err = ERROR_HANDLE_EOF;
        goto cleanup;
    }
    uint32_t tail = load_acq(&ring->Tail);
    if (tail == s->send_head) {
        __atomic_store_n(&ring->Alertable, 1, __ATOMIC_SEQ_CST);
        tail = __atomic_load_n(&ring->Tail, __ATOMIC_SEQ_CST);
        if (tail == s->send_head) {
            err = ERROR_NO_MORE_ITEMS;
            goto cleanup;
        }
    }
    __atomic_store_n(&ring->Alertable, 0, __ATOMIC_RELAXED);
    if (tail >= s->capacity) {
        err = tail == TERMINATED ? ERROR_HANDLE_EOF : ERROR_INVALID_DATA;
        goto cleanup;
    }
    uint32_t content = (tail - s->send_head) & s->mask;
    if (content < 4) {
        err = ERROR_INVALID_DATA;
        goto cleanup;
    }
    uint8_t *record = ring->Data + s->send_head;
    uint32_t size = *(volatile uint32_t *)record;
    if (size > MAX_IP_PACKET_SIZE || RECORD(size) > content) {
        err = ERROR_INVALID_DATA;
        goto cleanup;
    }
    *PacketSize = size;
    s->send_head = (s->send_head + RECORD(size)) & s->mask;
    s->send_to_release++;
    pthread_mutex_unlock(&s->send_lock);
    return record + 4;
cleanup:
    pthread_mutex_unlock(&s->send_lock);
    return fail(err);
}

EXPORT void WintunReleaseReceivePacket(void *Session, const BYTE *Packet)
{
    SESSION *s = Session;
    TUN_RING *ring = s->send_ring;
    pthread_mutex_lock(&s->send_lock);
    volatile uint32_t *size = (volatile uint32_t *)(Packet - 4);
    *size |= RELEASE_BIT;
    while (s->send_to_release) {
        uint32_t stored = *(volatile uint32_t *)(ring->Data + s->send_head_release);
        if (!(stored & RELEASE_BIT))
            break;
        s->send_head_release = (s->send_head_release + RECORD(stored & ~RELEASE_BIT)) & s->mask;
        s->send_to_release--;
    }
    store_rel(&ring->Head, s->send_head_release);
    pthread_mutex_unlock(&s->send_lock);
}

EXPORT BYTE *WintunAllocateSendPacket(void *Session, DWORD PacketSize)
{
    SESSION *s = Session;
    TUN_RING *ring = s->recv_ring;
    DWORD err;
    if (PacketSize == 0 || PacketSize > MAX_IP_PACKET_SIZE)
        return fail(ERROR_INVALID_PARAMETER);
    pthread_mutex_lock(&s->recv_lock);
    if (s->recv_tail >= s->capacity) {
        err = ERROR_HANDLE_EOF;
        goto cleanup;
    }
    uint32_t head = load_acq(&ring->Head);
    if (head >= s->capacity) {
        err = ERROR_HANDLE_EOF;
        goto cleanup;
    }
    uint32_t space = (head - s->recv_tail - 4u) & s->mask;
    if (RECORD(PacketSize) > space) {
        err = ERROR_BUFFER_OVERFLOW;
        goto cleanup;
    }
    uint8_t *record = ring->Data + s->recv_tail;
    *(volatile uint32_t *)record = PacketSize | RELEASE_BIT;
    s->recv_tail = (s->recv_tail + RECORD(PacketSize)) & s->mask;
    s->recv_to_release++;
    pthread_mutex_unlock(&s->recv_lock);
    return record + 4;
cleanup:
    pthread_mutex_unlock(&s->recv_lock);
    return fail(err);
}

EXPORT void WintunSendPacket(void *Session, const BYTE *Packet)
{
    SESSION *s = Session;
    TUN_RING *ring = s->recv_ring;
    pthread_mutex_lock(&s->recv_lock);
    volatile uint32_t *size = (volatile uint32_t *)(Packet - 4);
    *size &= ~RELEASE_BIT;
    while (s->recv_to_release) {
        uint32_t stored = *(volatile uint32_t *)(ring->Data + s->recv_tail_release);
        if (stored & RELEASE_BIT)
            break;
        s->recv_tail_release = (s->recv_tail_release + RECORD(stored)) & s->mask;
        s->recv_to_release--;
    }
    store_rel(&ring->Tail, s->recv_tail_release);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&ring->Alertable, __ATOMIC_SEQ_CST))
        set_event(s->recv_tail_moved);
    pthread_mutex_unlock(&s->recv_lock);
}
