/* The C reference forwarder of the wiretun benchmark.
 *
 *   forward [--offload] NS_A DEV_A NS_B DEV_B
 *
 * Creates TUN device DEV_A in network namespace NS_A and DEV_B in NS_B (named namespaces under
 * /var/run/netns), prints "ready <offloads>" on stdout, then copies every packet read from one device
 * to the other, one thread per direction, blocking reads and writes, one system call per packet.
 *
 * Plain: IFF_TUN | IFF_NO_PI, one IP packet (at most the MTU) per read.
 * --offload: IFF_VNET_HDR and TUNSETOFFLOAD(CSUM | TSO4 | TSO6 [| USO4 | USO6]) on both devices.
 *   A read then gives a 10-byte virtio-net header and up to 64 KiB of packet; since both devices
 *   accept the same offloads, the header and packet are written to the other device unchanged.
 *
 * The process exits when its standard input reaches end of file (the benchmark holds the pipe), on
 * SIGTERM/SIGINT, or when its parent dies; the kernel then removes both devices. On exit it prints
 * "stats <a_to_b_packets> <a_to_b_bytes> <b_to_a_packets> <b_to_a_bytes>" on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <unistd.h>

#ifndef TUN_F_USO4
#define TUN_F_USO4 0x20
#define TUN_F_USO6 0x40
#endif

#define BUF_SIZE (10 + 65536 + 64)

struct direction {
    int from, to;
    atomic_ulong packets, bytes;
};

static void die(const char *what, const char *arg) {
    fprintf(stderr, "forward: %s %s: %s\n", what, arg ? arg : "", strerror(errno));
    exit(1);
}

static void enter_netns(const char *name) {
    char path[256];
    snprintf(path, sizeof path, "/var/run/netns/%s", name);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("cannot open namespace", path);
    if (setns(fd, CLONE_NEWNET) < 0) die("cannot enter namespace", name);
    close(fd);
}

static int open_tun(const char *name, int offload, unsigned *offloads_out) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) die("cannot open", "/dev/net/tun");
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL | (offload ? IFF_VNET_HDR : 0);
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) die("cannot create TUN device", name);
    unsigned offloads = 0;
    if (offload) {
        offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6;
        if (ioctl(fd, TUNSETOFFLOAD, offloads) < 0) {
            if (errno != EINVAL) die("TUNSETOFFLOAD failed on", name);
            offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6; /* kernel before 6.2: no USO */
            if (ioctl(fd, TUNSETOFFLOAD, offloads) < 0) die("TUNSETOFFLOAD failed on", name);
        }
    }
    *offloads_out = offloads;
    return fd;
}

static void *pump(void *arg) {
    struct direction *d = arg;
    unsigned char *buf = aligned_alloc(64, BUF_SIZE);
    if (!buf) return NULL;
    for (;;) {
        ssize_t n = read(d->from, buf, BUF_SIZE);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            break; /* the device went away */
        }
        /* A failed write (device down, no route, queue full) drops the packet, like a real link. */
        if (write(d->to, buf, (size_t)n) == n) {
            atomic_fetch_add_explicit(&d->packets, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&d->bytes, (unsigned long)n, memory_order_relaxed);
        }
    }
    free(buf);
    return NULL;
}

static struct direction ab, ba;
static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    int offload = 0, i = 1;
    if (argc > 1 && strcmp(argv[1], "--offload") == 0) { offload = 1; i = 2; }
    if (argc - i != 4) {
        fprintf(stderr, "usage: forward [--offload] NS_A DEV_A NS_B DEV_B\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    int home = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
    if (home < 0) die("cannot open", "/proc/self/ns/net");
    unsigned offloads_a, offloads_b;
    enter_netns(argv[i]);
    int a = open_tun(argv[i + 1], offload, &offloads_a);
    enter_netns(argv[i + 2]);
    int b = open_tun(argv[i + 3], offload, &offloads_b);
    if (setns(home, CLONE_NEWNET) < 0) die("cannot return to the original namespace", NULL);
    close(home);

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: the read on stdin below returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    ab.from = a; ab.to = b;
    ba.from = b; ba.to = a;
    pthread_t t1, t2;
    if (pthread_create(&t1, NULL, pump, &ab) || pthread_create(&t2, NULL, pump, &ba)) {
        fprintf(stderr, "forward: cannot start threads\n");
        return 1;
    }
    printf("ready %#x\n", offloads_a & offloads_b);
    fflush(stdout);

    char c[64];
    while (!stop) {
        ssize_t n = read(0, c, sizeof c);
        if (n == 0 || (n < 0 && errno != EINTR)) break;
    }
    printf("stats %lu %lu %lu %lu\n", atomic_load(&ab.packets), atomic_load(&ab.bytes),
           atomic_load(&ba.packets), atomic_load(&ba.bytes));
    fflush(stdout);
    _exit(0); /* closing the queues removes the devices */
}
