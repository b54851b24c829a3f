/*
 * A simulated GPIO character device for the tests, loaded with LD_PRELOAD into the release
 * daemon, so that the shipped gpiocdev driver runs below its real system calls.
 *
 * No gpiochip exists on the development and CI machines (no GPIO hardware, no kernel modules,
 * no gpio-sim or gpio-mockup). This library stands in for the kernel's gpiolib-cdev at the
 * system-call boundary gpiocdev uses, for the chips listed in FAKE_GPIOCHIP_CHIPS:
 *
 * - finding and opening a chip: realpath() of /dev/gpiochipN, stat()/statx() (a character
 *   device, major 254), the sysfs file /sys/bus/gpio/devices/gpiochipN/dev that gpiocdev
 *   compares with st_rdev, the /dev listing (opendir/readdir, for lookups by line name), open();
 * - GPIO_GET_CHIPINFO_IOCTL, GPIO_V2_GET_LINEINFO_IOCTL, GPIO_V2_GET_LINE_IOCTL (flags, bias,
 *   edge detection, debounce, output values and active-low, checked as the kernel checks them);
 * - on the line request's fd: read() of struct gpio_v2_line_event with CLOCK_MONOTONIC
 *   timestamps and sequence numbers (the fd is a pipe, so poll/epoll work as on the kernel's),
 *   GPIO_V2_LINE_GET_VALUES_IOCTL, GPIO_V2_LINE_SET_VALUES_IOCTL; close() releases the lines;
 * - a chip that goes away: reads fail with ENODEV, ioctls with ENODEV, open/realpath with ENOENT.
 *
 * The lines themselves live in the simulated chip (`menshen sim serve`, src/hw/sim.rs), a
 * separate process, as the hardware is: every line request is one connection to it, so when
 * the daemon is SIGKILLed its kernel closes the connection and the chip releases the lines as
 * the kernel does (an output reverts to an input and rests at its pull). The chip also plays the
 * world: Wiegand frames with real timing, bouncing contacts, the kernel's debounce timer.
 *
 * Environment:
 *   FAKE_GPIOCHIP_SOCKET  the simulated chip's socket
 *   FAKE_GPIOCHIP_CHIPS   "label:lines[,label:lines...]" for gpiochip0, gpiochip1, ...; line o
 *                         of chip c is the simulated chip's line c*64+o; chip 0's lines are named
 *                         GPIO<o>, chip c's X<c>_<o>
 *
 * Test support only: never built into the daemon. It uses raw pointers because it implements
 * the C ABI the kernel would.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/gpio.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_CHIPS 4
#define MAX_FDS 4096
#define GPIO_MAJOR 254

struct chip { char label[GPIO_MAX_NAME_SIZE]; unsigned lines; };
static struct chip chips[MAX_CHIPS];
static int nchips = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

/* One line request: its connection to the simulated chip and its lines. */
struct req {
    int chip, sock, pipe_w, nlines, dead;
    unsigned offsets[GPIO_V2_LINES_MAX];
    uint64_t flags[GPIO_V2_LINES_MAX];
    unsigned line_seq[GPIO_V2_LINES_MAX];
    unsigned seq;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    char *reply; /* the pending reply line, handed over by the reader thread */
};

enum kind { NONE, CHIP_FD, LINE_FD };
static struct { enum kind kind; int chip; struct req *req; } fds[MAX_FDS];

#define REAL(ret, name, ...) \
    static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

static void load_chips(void) {
    if (nchips >= 0) return;
    nchips = 0;
    const char *spec = getenv("FAKE_GPIOCHIP_CHIPS");
    if (!spec) return;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", spec);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok && nchips < MAX_CHIPS;
         tok = strtok_r(NULL, ",", &save)) {
        char *colon = strrchr(tok, ':');
        if (!colon) continue;
        *colon = 0;
        snprintf(chips[nchips].label, GPIO_MAX_NAME_SIZE, "%s", tok);
        chips[nchips].lines = (unsigned)atoi(colon + 1);
        if (chips[nchips].lines > 64) chips[nchips].lines = 64;
        nchips++;
    }
}

/* The chip index of "/dev/gpiochipN" (or "/sys/bus/gpio/devices/gpiochipN/dev" with sysfs). */
static int chip_of(const char *path, int sysfs) {
    load_chips();
    if (!path) return -1;
    const char *prefix = sysfs ? "/sys/bus/gpio/devices/gpiochip" : "/dev/gpiochip";
    size_t n = strlen(prefix);
    if (strncmp(path, prefix, n) != 0) return -1;
    char *end;
    long c = strtol(path + n, &end, 10);
    if (end == path + n || c < 0 || c >= nchips) return -1;
    if (sysfs ? strcmp(end, "/dev") != 0 : *end != 0) return -1;
    return (int)c;
}

static int connect_chip(void) {
    const char *path = getenv("FAKE_GPIOCHIP_SOCKET");
    if (!path) return -1;
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0) return -1;
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        close(s);
        return -1;
    }
    return s;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* A socket read buffer: lines are read in blocks, not a byte a system call. */
struct rbuf { char data[4096]; size_t start, end; };

/* Read one line from a socket into a malloc'd string (NULL at EOF). */
static char *read_line_buf(int fd, struct rbuf *b) {
    size_t cap = 256, len = 0;
    char *out = malloc(cap);
    for (;;) {
        if (b->start == b->end) {
            ssize_t r = recv(fd, b->data, sizeof b->data, 0);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) { free(out); return NULL; }
            b->start = 0;
            b->end = (size_t)r;
        }
        char c = b->data[b->start++];
        if (c == '\n') { out[len] = 0; return out; }
        if (len + 1 >= cap) out = realloc(out, cap *= 2);
        out[len++] = c;
    }
}

static char *read_line(int fd) {
    struct rbuf b = {.start = 0, .end = 0};
    return read_line_buf(fd, &b);
}

/* One request/reply on a fresh connection (chip presence, line info). */
static char *oneshot(const char *msg) {
    int s = connect_chip();
    if (s < 0) return NULL;
    char *r = write_all(s, msg, strlen(msg)) == 0 ? read_line(s) : NULL;
    close(s);
    return r;
}

static int json_true(const char *j, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":true", key);
    return j && strstr(j, pat) != NULL;
}

static long long json_int(const char *j, const char *key, long long dflt) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = j ? strstr(j, pat) : NULL;
    if (!p) return dflt;
    p += strlen(pat);
    if (*p == 'n') return dflt; /* null */
    return strtoll(p, NULL, 10);
}

static int chip_present(void) {
    char *r = oneshot("{\"op\":\"chip\"}\n");
    int ok = json_true(r, "present");
    free(r);
    return ok;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* ---- finding a chip -------------------------------------------------------------------- */

char *realpath(const char *path, char *resolved) {
    REAL(char *, realpath, const char *, char *);
    int c = chip_of(path, 0);
    if (c < 0) return real_realpath(path, resolved);
    if (!chip_present()) { errno = ENOENT; return NULL; }
    if (!resolved) return strdup(path);
    snprintf(resolved, PATH_MAX, "%s", path);
    return resolved;
}

static void fill_stat(struct stat *st, int c) {
    memset(st, 0, sizeof *st);
    st->st_mode = S_IFCHR | 0660;
    st->st_rdev = makedev(GPIO_MAJOR, (unsigned)c);
    st->st_nlink = 1;
    st->st_blksize = 4096;
}

int stat(const char *path, struct stat *st) {
    REAL(int, stat, const char *, struct stat *);
    int c = chip_of(path, 0);
    if (c < 0) return real_stat(path, st);
    if (!chip_present()) { errno = ENOENT; return -1; }
    fill_stat(st, c);
    return 0;
}

int stat64(const char *path, struct stat64 *st) {
    REAL(int, stat64, const char *, struct stat64 *);
    int c = chip_of(path, 0);
    if (c < 0) return real_stat64(path, st);
    if (!chip_present()) { errno = ENOENT; return -1; }
    fill_stat((struct stat *)st, c);
    return 0;
}

int statx(int dirfd, const char *path, int flags, unsigned mask, struct statx *stx) {
    REAL(int, statx, int, const char *, int, unsigned, struct statx *);
    int c = chip_of(path, 0);
    if (c < 0) return real_statx(dirfd, path, flags, mask, stx);
    if (!chip_present()) { errno = ENOENT; return -1; }
    memset(stx, 0, sizeof *stx);
    stx->stx_mask = STATX_BASIC_STATS;
    stx->stx_mode = S_IFCHR | 0660;
    stx->stx_nlink = 1;
    stx->stx_blksize = 4096;
    stx->stx_rdev_major = GPIO_MAJOR;
    stx->stx_rdev_minor = (unsigned)c;
    return 0;
}

/* The /dev listing: the real entries, then the chips that are present. */
static DIR *dev_dir;
static int dev_next;
static struct dirent64 dev_ent;

DIR *opendir(const char *path) {
    REAL(DIR *, opendir, const char *);
    DIR *d = real_opendir(path);
    if (d && (strcmp(path, "/dev") == 0 || strcmp(path, "/dev/") == 0)) {
        pthread_mutex_lock(&lock);
        dev_dir = d;
        dev_next = 0;
        pthread_mutex_unlock(&lock);
    }
    return d;
}

static struct dirent64 *next_chip_entry(DIR *d) {
    struct dirent64 *e = NULL;
    pthread_mutex_lock(&lock);
    if (d == dev_dir && dev_next < nchips) {
        memset(&dev_ent, 0, sizeof dev_ent);
        snprintf(dev_ent.d_name, sizeof dev_ent.d_name, "gpiochip%d", dev_next);
        dev_ent.d_type = DT_CHR;
        dev_ent.d_reclen = sizeof dev_ent;
        dev_next++;
        e = &dev_ent;
    }
    pthread_mutex_unlock(&lock);
    return e;
}

struct dirent64 *readdir64(DIR *d) {
    REAL(struct dirent64 *, readdir64, DIR *);
    struct dirent64 *e = real_readdir64(d);
    if (e || d != dev_dir) return e;
    load_chips();
    if (!chip_present()) return NULL;
    return next_chip_entry(d);
}

struct dirent *readdir(DIR *d) {
    REAL(struct dirent *, readdir, DIR *);
    struct dirent *e = real_readdir(d);
    if (e || d != dev_dir) return e;
    load_chips();
    if (!chip_present()) return NULL;
    return (struct dirent *)next_chip_entry(d);
}

int closedir(DIR *d) {
    REAL(int, closedir, DIR *);
    pthread_mutex_lock(&lock);
    if (d == dev_dir) dev_dir = NULL;
    pthread_mutex_unlock(&lock);
    return real_closedir(d);
}

/* ---- opening ------------------------------------------------------------------------------ */

static int fake_open(const char *path, int *handled) {
    *handled = 0;
    int c = chip_of(path, 0);
    if (c >= 0) {
        *handled = 1;
        if (!chip_present()) { errno = ENOENT; return -1; }
        int fd = memfd_create("fake-gpiochip", MFD_CLOEXEC);
        if (fd < 0 || fd >= MAX_FDS) { errno = EMFILE; return -1; }
        pthread_mutex_lock(&lock);
        fds[fd].kind = CHIP_FD;
        fds[fd].chip = c;
        pthread_mutex_unlock(&lock);
        return fd;
    }
    c = chip_of(path, 1);
    if (c >= 0) {
        *handled = 1;
        if (!chip_present()) { errno = ENOENT; return -1; }
        int fd = memfd_create("fake-gpiochip-sysfs", MFD_CLOEXEC);
        if (fd < 0) return -1;
        char dev[32];
        int n = snprintf(dev, sizeof dev, "%d:%d\n", GPIO_MAJOR, c);
        if (write_all(fd, dev, (size_t)n) < 0) { close(fd); return -1; }
        lseek(fd, 0, SEEK_SET);
        return fd;
    }
    return -1;
}

#define OPEN_WRAPPER(name, ...)                                                       \
    int name(__VA_ARGS__) {                                                           \
        va_list ap;                                                                   \
        va_start(ap, flags);                                                          \
        mode_t mode = (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, mode_t) : 0;       \
        va_end(ap);

OPEN_WRAPPER(open, const char *path, int flags, ...)
    int handled, fd = fake_open(path, &handled);
    if (handled) return fd;
    REAL(int, open, const char *, int, ...);
    return real_open(path, flags, mode);
}

OPEN_WRAPPER(open64, const char *path, int flags, ...)
    int handled, fd = fake_open(path, &handled);
    if (handled) return fd;
    REAL(int, open64, const char *, int, ...);
    return real_open64(path, flags, mode);
}

OPEN_WRAPPER(openat, int dirfd, const char *path, int flags, ...)
    int handled, fd = fake_open(path, &handled);
    if (handled) return fd;
    REAL(int, openat, int, const char *, int, ...);
    return real_openat(dirfd, path, flags, mode);
}

OPEN_WRAPPER(openat64, int dirfd, const char *path, int flags, ...)
    int handled, fd = fake_open(path, &handled);
    if (handled) return fd;
    REAL(int, openat64, int, const char *, int, ...);
    return real_openat64(dirfd, path, flags, mode);
}

/* ---- line requests ----------------------------------------------------------------------- */

static unsigned pin_of(int chip, unsigned offset) { return (unsigned)chip * 64 + offset; }

/* The reader thread: edges go into the pipe as kernel events, replies to the waiting ioctl. */
static void *req_thread(void *arg) {
    struct req *r = arg;
    char *line;
    struct rbuf *buf = calloc(1, sizeof *buf);
    while ((line = read_line_buf(r->sock, buf)) != NULL) {
        if (strncmp(line, "{\"edge\"", 7) == 0) {
            long long pin = json_int(line, "pin", -1);
            long long t = json_int(line, "t_ns", 0);
            int high = json_true(line, "high");
            for (int i = 0; i < r->nlines; i++) {
                if (pin_of(r->chip, r->offsets[i]) != (unsigned long long)pin) continue;
                uint64_t f = r->flags[i];
                int active = high ^ !!(f & GPIO_V2_LINE_FLAG_ACTIVE_LOW);
                uint64_t want = active ? GPIO_V2_LINE_FLAG_EDGE_RISING : GPIO_V2_LINE_FLAG_EDGE_FALLING;
                if (!(f & want)) break;
                struct gpio_v2_line_event ev = {0};
                ev.timestamp_ns = (uint64_t)t;
                ev.id = active ? GPIO_V2_LINE_EVENT_RISING_EDGE : GPIO_V2_LINE_EVENT_FALLING_EDGE;
                ev.offset = r->offsets[i];
                pthread_mutex_lock(&r->mu);
                ev.seqno = ++r->seq;
                ev.line_seqno = ++r->line_seq[i];
                pthread_mutex_unlock(&r->mu);
                (void)write_all(r->pipe_w, (const char *)&ev, sizeof ev);
                break;
            }
            free(line);
            continue;
        }
        pthread_mutex_lock(&r->mu);
        free(r->reply);
        r->reply = line;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
    }
    /* The chip closed the connection (it went away) or the request was released. */
    free(buf);
    pthread_mutex_lock(&r->mu);
    r->dead = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    REAL(int, close, int);
    real_close(r->pipe_w);
    real_close(r->sock);
    return NULL;
}

/* Send one request on the line request's connection and wait for its reply (NULL: gone). */
static char *req_call(struct req *r, const char *msg) {
    pthread_mutex_lock(&r->mu);
    if (r->dead) { pthread_mutex_unlock(&r->mu); return NULL; }
    free(r->reply);
    r->reply = NULL;
    if (write_all(r->sock, msg, strlen(msg)) < 0) { pthread_mutex_unlock(&r->mu); return NULL; }
    while (!r->reply && !r->dead) pthread_cond_wait(&r->cv, &r->mu);
    char *rep = r->reply;
    r->reply = NULL;
    pthread_mutex_unlock(&r->mu);
    return rep;
}

/* The flags, output value and debounce the request's config gives line i (as the kernel). */
static void line_config(const struct gpio_v2_line_config *cfg, int i, uint64_t *flags, int *value, unsigned *debounce) {
    *flags = cfg->flags;
    *value = 0;
    *debounce = 0;
    for (unsigned a = 0; a < cfg->num_attrs && a < GPIO_V2_LINE_NUM_ATTRS_MAX; a++) {
        const struct gpio_v2_line_config_attribute *ca = &cfg->attrs[a];
        if (!(ca->mask & (1ull << i))) continue;
        switch (ca->attr.id) {
        case GPIO_V2_LINE_ATTR_ID_FLAGS: *flags = ca->attr.flags; break;
        case GPIO_V2_LINE_ATTR_ID_OUTPUT_VALUES: *value = !!(ca->attr.values & (1ull << i)); break;
        case GPIO_V2_LINE_ATTR_ID_DEBOUNCE: *debounce = ca->attr.debounce_period_us; break;
        }
    }
}

/* gpiolib-cdev's gpio_v2_line_flags_validate. */
static int flags_valid(uint64_t f) {
    uint64_t known = GPIO_V2_LINE_FLAG_ACTIVE_LOW | GPIO_V2_LINE_FLAG_INPUT | GPIO_V2_LINE_FLAG_OUTPUT |
                     GPIO_V2_LINE_FLAG_EDGE_RISING | GPIO_V2_LINE_FLAG_EDGE_FALLING | GPIO_V2_LINE_FLAG_OPEN_DRAIN |
                     GPIO_V2_LINE_FLAG_OPEN_SOURCE | GPIO_V2_LINE_FLAG_BIAS_PULL_UP | GPIO_V2_LINE_FLAG_BIAS_PULL_DOWN |
                     GPIO_V2_LINE_FLAG_BIAS_DISABLED;
    if (f & ~known) return 0;
    int in = !!(f & GPIO_V2_LINE_FLAG_INPUT), out = !!(f & GPIO_V2_LINE_FLAG_OUTPUT);
    if (in && out) return 0;
    uint64_t edges = GPIO_V2_LINE_FLAG_EDGE_RISING | GPIO_V2_LINE_FLAG_EDGE_FALLING;
    if ((f & edges) && !in) return 0;
    uint64_t drive = GPIO_V2_LINE_FLAG_OPEN_DRAIN | GPIO_V2_LINE_FLAG_OPEN_SOURCE;
    if ((f & drive) == drive || ((f & drive) && !out)) return 0;
    uint64_t bias = GPIO_V2_LINE_FLAG_BIAS_PULL_UP | GPIO_V2_LINE_FLAG_BIAS_PULL_DOWN | GPIO_V2_LINE_FLAG_BIAS_DISABLED;
    if (__builtin_popcountll(f & bias) > 1 || ((f & bias) && !in && !out)) return 0;
    return 1;
}

static const char *bias_word(uint64_t f) {
    if (f & GPIO_V2_LINE_FLAG_BIAS_PULL_UP) return "\"pull-up\"";
    if (f & GPIO_V2_LINE_FLAG_BIAS_PULL_DOWN) return "\"pull-down\"";
    return "null";
}

static int get_line(int chip, struct gpio_v2_line_request *lr) {
    if (lr->num_lines == 0 || lr->num_lines > GPIO_V2_LINES_MAX) { errno = EINVAL; return -1; }
    struct req *r = calloc(1, sizeof *r);
    r->chip = chip;
    r->nlines = (int)lr->num_lines;
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    for (int i = 0; i < r->nlines; i++) {
        uint64_t f;
        int v;
        unsigned deb;
        line_config(&lr->config, i, &f, &v, &deb);
        if (lr->offsets[i] >= chips[chip].lines || !flags_valid(f)) { free(r); errno = EINVAL; return -1; }
        r->offsets[i] = lr->offsets[i];
        r->flags[i] = f;
    }
    r->sock = connect_chip();
    if (r->sock < 0) { free(r); errno = ENODEV; return -1; }
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) { close(r->sock); free(r); return -1; }
    r->pipe_w = p[1];
    pthread_t th;
    pthread_create(&th, NULL, req_thread, r);
    pthread_detach(th);
    for (int i = 0; i < r->nlines; i++) {
        uint64_t f;
        int v;
        unsigned deb;
        line_config(&lr->config, i, &f, &v, &deb);
        char msg[256];
        unsigned pin = pin_of(chip, r->offsets[i]);
        if (f & GPIO_V2_LINE_FLAG_OUTPUT) {
            int high = v ^ !!(f & GPIO_V2_LINE_FLAG_ACTIVE_LOW);
            snprintf(msg, sizeof msg,
                     "{\"op\":\"claim_output\",\"pin\":%u,\"high\":%s,\"kernel\":true,\"bias\":%s,\"t_ns\":%llu}\n", pin,
                     high ? "true" : "false", bias_word(f), (unsigned long long)now_ns());
        } else {
            snprintf(msg, sizeof msg,
                     "{\"op\":\"claim_input\",\"pin\":%u,\"kernel\":true,\"bias\":%s,\"debounce_us\":%u}\n", pin,
                     bias_word(f), deb);
        }
        char *rep = req_call(r, msg);
        int ok = json_true(rep, "ok");
        int busy = rep && strstr(rep, "claimed") != NULL;
        free(rep);
        if (!ok) {
            /* The thread frees nothing but its fds; the request is abandoned. */
            shutdown(r->sock, SHUT_RDWR);
            close(p[0]);
            errno = busy ? EBUSY : ENODEV;
            return -1;
        }
    }
    pthread_mutex_lock(&lock);
    if (p[0] >= MAX_FDS) { pthread_mutex_unlock(&lock); errno = EMFILE; return -1; }
    fds[p[0]].kind = LINE_FD;
    fds[p[0]].req = r;
    pthread_mutex_unlock(&lock);
    lr->fd = p[0];
    return 0;
}

static int line_info(int chip, struct gpio_v2_line_info *li) {
    if (li->offset >= chips[chip].lines) { errno = EINVAL; return -1; }
    unsigned off = li->offset;
    memset(li, 0, sizeof *li);
    li->offset = off;
    if (chip == 0) snprintf(li->name, sizeof li->name, "GPIO%u", off);
    else snprintf(li->name, sizeof li->name, "X%d_%u", chip, off);
    char msg[96];
    snprintf(msg, sizeof msg, "{\"op\":\"line_info\",\"pin\":%u}\n", pin_of(chip, off));
    char *rep = oneshot(msg);
    if (!rep) { errno = ENODEV; return -1; }
    li->flags = json_true(rep, "output") ? GPIO_V2_LINE_FLAG_OUTPUT : GPIO_V2_LINE_FLAG_INPUT;
    if (json_true(rep, "used")) {
        li->flags |= GPIO_V2_LINE_FLAG_USED;
        snprintf(li->consumer, sizeof li->consumer, "%s", "menshen");
    }
    if (strstr(rep, "\"pull-up\"")) li->flags |= GPIO_V2_LINE_FLAG_BIAS_PULL_UP;
    if (strstr(rep, "\"pull-down\"")) li->flags |= GPIO_V2_LINE_FLAG_BIAS_PULL_DOWN;
    long long deb = json_int(rep, "debounce_us", 0);
    if (deb > 0) {
        li->num_attrs = 1;
        li->attrs[0].id = GPIO_V2_LINE_ATTR_ID_DEBOUNCE;
        li->attrs[0].debounce_period_us = (unsigned)deb;
    }
    free(rep);
    return 0;
}

static int line_values(struct req *r, struct gpio_v2_line_values *lv, int set) {
    for (int i = 0; i < r->nlines; i++) {
        if (!(lv->mask & (1ull << i))) continue;
        uint64_t f = r->flags[i];
        int al = !!(f & GPIO_V2_LINE_FLAG_ACTIVE_LOW);
        unsigned pin = pin_of(r->chip, r->offsets[i]);
        char msg[160];
        if (set) {
            if (!(f & GPIO_V2_LINE_FLAG_OUTPUT)) { errno = EPERM; return -1; }
            int high = !!(lv->bits & (1ull << i)) ^ al;
            snprintf(msg, sizeof msg, "{\"op\":\"set\",\"pin\":%u,\"high\":%s,\"t_ns\":%llu}\n", pin,
                     high ? "true" : "false", (unsigned long long)now_ns());
        } else {
            snprintf(msg, sizeof msg, "{\"op\":\"get\",\"pin\":%u}\n", pin);
        }
        char *rep = req_call(r, msg);
        if (!rep) { errno = ENODEV; return -1; }
        int ok = json_true(rep, "ok"), high = json_true(rep, "high");
        free(rep);
        if (!ok) { errno = EIO; return -1; }
        if (!set) {
            if (high ^ al) lv->bits |= 1ull << i;
            else lv->bits &= ~(1ull << i);
        }
    }
    return 0;
}

int ioctl(int fd, unsigned long request, ...) {
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    REAL(int, ioctl, int, unsigned long, ...);
    if (fd < 0 || fd >= MAX_FDS || fds[fd].kind == NONE) return real_ioctl(fd, request, arg);
    if (fds[fd].kind == CHIP_FD) {
        int c = fds[fd].chip;
        if (!chip_present()) { errno = ENODEV; return -1; }
        switch (request) {
        case GPIO_GET_CHIPINFO_IOCTL: {
            struct gpiochip_info *ci = arg;
            memset(ci, 0, sizeof *ci);
            snprintf(ci->name, sizeof ci->name, "gpiochip%d", c);
            snprintf(ci->label, sizeof ci->label, "%s", chips[c].label);
            ci->lines = chips[c].lines;
            return 0;
        }
        case GPIO_V2_GET_LINEINFO_IOCTL: return line_info(c, arg);
        case GPIO_V2_GET_LINE_IOCTL: return get_line(c, arg);
        default: errno = ENOTTY; return -1;
        }
    }
    struct req *r = fds[fd].req;
    if (r->dead) { errno = ENODEV; return -1; }
    switch (request) {
    case GPIO_V2_LINE_GET_VALUES_IOCTL: return line_values(r, arg, 0);
    case GPIO_V2_LINE_SET_VALUES_IOCTL: return line_values(r, arg, 1);
    default: errno = ENOTTY; return -1;
    }
}

ssize_t read(int fd, void *buf, size_t n) {
    REAL(ssize_t, read, int, void *, size_t);
    if (fd < 0 || fd >= MAX_FDS || fds[fd].kind != LINE_FD) return real_read(fd, buf, n);
    if (n < sizeof(struct gpio_v2_line_event)) { errno = EINVAL; return -1; }
    /* Whole events only, as the kernel hands them out. */
    n -= n % sizeof(struct gpio_v2_line_event);
    ssize_t got = real_read(fd, buf, n);
    if (got == 0) { errno = ENODEV; return -1; }
    return got;
}

int close(int fd) {
    REAL(int, close, int);
    if (fd >= 0 && fd < MAX_FDS && fds[fd].kind != NONE) {
        pthread_mutex_lock(&lock);
        if (fds[fd].kind == LINE_FD) {
            /* Releasing the request: the chip sees the connection end and frees the lines;
             * the reader thread then closes its ends. */
            shutdown(fds[fd].req->sock, SHUT_RDWR);
        }
        fds[fd].kind = NONE;
        fds[fd].req = NULL;
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}
