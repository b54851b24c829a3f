/*
 * A simulated V4L2 capture device for the tests, loaded with LD_PRELOAD into the daemon.
 *
 * No video device exists on the development and CI machines (no camera, no kernel modules, no
 * vivid, no CUSE), so the V4L2 source would otherwise never run. This library stands in for the
 * kernel at the system-call boundary the `v4l` crate uses: open/close on one device path,
 * ioctl (through syscall(SYS_ioctl), as v4l calls it, and ioctl itself), mmap/munmap of the
 * capture buffers and poll. Every other call passes through to libc untouched.
 *
 * What it does, as a single-format-list USB webcam driver would:
 * - VIDIOC_QUERYCAP, G_FMT, S_FMT (offers FAKE_V4L2_FORMATS at FAKE_V4L2_SIZE only: asked for
 *   anything else, it silently chooses its own, as drivers do), REQBUFS (MMAP only), QUERYBUF,
 *   QBUF, DQBUF (non-blocking: EAGAIN until the next frame is due), STREAMON, STREAMOFF;
 * - frames at FAKE_V4L2_FPS from the files of FAKE_V4L2_DIR (`*.jpg` for MJPG, `*.yuyv` raw for
 *   YUYV), in name order, looping; the list is read again at STREAMON and at each loop;
 * - the control file FAKE_V4L2_CTL, read on every call, holds one word:
 *     ok       frames flow;
 *     stall    no frame is ever ready (poll times out);
 *     corrupt  every frame is cut to a third (a damaged MJPEG);
 *     unplug   the device is gone: poll reports POLLERR, every ioctl on an open handle fails
 *              with ENODEV, and opening the path fails with ENOENT, until the word changes.
 *
 * Test support only: never built into the daemon. It uses raw pointers because it implements
 * the C ABI the kernel would; it holds a mutex around its state.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/videodev2.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_BUFS 8
#define MAX_FRAMES 64
#define BUF_STRIDE (4u << 20) /* offset between buffers in the mmap space */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int fake_fd = -1;
static int width = 640, height = 480;
static unsigned pixfmt = V4L2_PIX_FMT_MJPEG;
static int streaming;
static unsigned nbufs;
static unsigned buf_len;
static void *bufs[MAX_BUFS];
static int queued[MAX_BUFS];
static unsigned sequence;
static double next_due;
static char *frame_paths[MAX_FRAMES];
static int nframes, frame_at;
/* Counters the test reads back (FAKE_V4L2_STATS, written at each dequeue and open). */
static unsigned long n_opens, n_frames;

static const char *env(const char *k, const char *dflt) {
    const char *v = getenv(k);
    return v && *v ? v : dflt;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

/* The control word (first word of the control file), "ok" if there is none. */
static void control(char *out, size_t n) {
    snprintf(out, n, "ok");
    const char *path = getenv("FAKE_V4L2_CTL");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    char w[32] = {0};
    if (fscanf(f, "%31s", w) == 1) snprintf(out, n, "%s", w);
    fclose(f);
}

static int is(const char *word) {
    char c[32];
    control(c, sizeof c);
    return strcmp(c, word) == 0;
}

static void write_stats(void) {
    const char *path = getenv("FAKE_V4L2_STATS");
    if (!path) return;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "opens %lu\nframes %lu\nwidth %d\nheight %d\nformat %.4s\n", n_opens, n_frames, width, height,
            (const char *)&pixfmt);
    fclose(f);
    rename(tmp, path);
}

static unsigned offered_format(unsigned want) {
    const char *list = env("FAKE_V4L2_FORMATS", "MJPG,YUYV");
    unsigned first = 0;
    for (const char *p = list; strlen(p) >= 4; p += (p[4] == ',' ? 5 : 4)) {
        unsigned f = v4l2_fourcc(p[0], p[1], p[2], p[3]);
        if (!first) first = f;
        if (f == want) return f;
        if (p[4] != ',') break;
    }
    return first ? first : V4L2_PIX_FMT_MJPEG;
}

static int cmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void load_frames(void) {
    for (int i = 0; i < nframes; i++) free(frame_paths[i]);
    nframes = 0;
    const char *dir = getenv("FAKE_V4L2_DIR");
    if (!dir) return;
    const char *ext = pixfmt == V4L2_PIX_FMT_YUYV ? ".yuyv" : ".jpg";
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) && nframes < MAX_FRAMES) {
        size_t l = strlen(e->d_name), el = strlen(ext);
        if (l > el && strcmp(e->d_name + l - el, ext) == 0) {
            char *p = malloc(strlen(dir) + l + 2);
            sprintf(p, "%s/%s", dir, e->d_name);
            frame_paths[nframes++] = p;
        }
    }
    closedir(d);
    qsort(frame_paths, nframes, sizeof(char *), cmp);
}

static void fill_pix(struct v4l2_pix_format *p) {
    memset(p, 0, sizeof *p);
    p->width = width;
    p->height = height;
    p->pixelformat = pixfmt;
    p->field = V4L2_FIELD_NONE;
    p->bytesperline = pixfmt == V4L2_PIX_FMT_YUYV ? width * 2 : 0;
    p->sizeimage = pixfmt == V4L2_PIX_FMT_YUYV ? width * height * 2 : width * height * 2;
    p->colorspace = V4L2_COLORSPACE_SRGB;
}

static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_close)(int);
static long (*real_syscall)(long, ...);
static int (*real_ioctl)(int, unsigned long, ...);
static void *(*real_mmap)(void *, size_t, int, int, int, off_t);
static void *(*real_mmap64)(void *, size_t, int, int, int, off64_t);
static int (*real_munmap)(void *, size_t);
static int (*real_poll)(struct pollfd *, nfds_t, int);

static void resolve(void) {
    if (real_syscall) return;
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_close = dlsym(RTLD_NEXT, "close");
    real_ioctl = dlsym(RTLD_NEXT, "ioctl");
    real_mmap = dlsym(RTLD_NEXT, "mmap");
    real_mmap64 = dlsym(RTLD_NEXT, "mmap64");
    real_munmap = dlsym(RTLD_NEXT, "munmap");
    real_poll = dlsym(RTLD_NEXT, "poll");
    real_syscall = dlsym(RTLD_NEXT, "syscall");
}

static void free_buffers(void) {
    for (unsigned i = 0; i < nbufs; i++) {
        if (bufs[i]) real_munmap(bufs[i], buf_len);
        bufs[i] = NULL;
        queued[i] = 0;
    }
    nbufs = 0;
}

static int fail(int e) {
    errno = e;
    return -1;
}

/* Copy the next frame into buffer i; returns the bytes used. */
static unsigned produce(unsigned i) {
    if (nframes == 0 || frame_at >= nframes) {
        load_frames();
        frame_at = 0;
    }
    if (nframes == 0) return 0;
    FILE *f = fopen(frame_paths[frame_at++], "rb");
    if (!f) return 0;
    size_t n = fread(bufs[i], 1, buf_len, f);
    fclose(f);
    if (is("corrupt")) n /= 3;
    return (unsigned)n;
}

static int fake_ioctl(unsigned long req, void *arg) {
    if (is("unplug")) return fail(ENODEV);
    switch (req) {
    case VIDIOC_QUERYCAP: {
        struct v4l2_capability *c = arg;
        memset(c, 0, sizeof *c);
        snprintf((char *)c->driver, sizeof c->driver, "fake_v4l2");
        snprintf((char *)c->card, sizeof c->card, "Menshen test camera");
        snprintf((char *)c->bus_info, sizeof c->bus_info, "usb-test-1");
        c->version = 0x060100;
        c->device_caps = V4L2_CAP_VIDEO_CAPTURE | V4L2_CAP_STREAMING;
        c->capabilities = c->device_caps | V4L2_CAP_DEVICE_CAPS;
        return 0;
    }
    case VIDIOC_G_FMT: {
        struct v4l2_format *f = arg;
        if (f->type != V4L2_BUF_TYPE_VIDEO_CAPTURE) return fail(EINVAL);
        fill_pix(&f->fmt.pix);
        return 0;
    }
    case VIDIOC_S_FMT: {
        struct v4l2_format *f = arg;
        if (f->type != V4L2_BUF_TYPE_VIDEO_CAPTURE) return fail(EINVAL);
        if (streaming || nbufs) return fail(EBUSY);
        pixfmt = offered_format(f->fmt.pix.pixelformat);
        if (sscanf(env("FAKE_V4L2_SIZE", "640x480"), "%dx%d", &width, &height) != 2) width = 640, height = 480;
        fill_pix(&f->fmt.pix);
        return 0;
    }
    case VIDIOC_REQBUFS: {
        struct v4l2_requestbuffers *r = arg;
        if (r->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || r->memory != V4L2_MEMORY_MMAP) return fail(EINVAL);
        if (streaming) return fail(EBUSY);
        free_buffers();
        if (r->count == 0) return 0;
        unsigned n = r->count > MAX_BUFS ? MAX_BUFS : r->count;
        buf_len = (unsigned)(width * height * 2 + 4095) & ~4095u;
        for (unsigned i = 0; i < n; i++) {
            bufs[i] = real_mmap(NULL, buf_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
            if (bufs[i] == MAP_FAILED) {
                bufs[i] = NULL;
                nbufs = i;
                free_buffers();
                return fail(ENOMEM);
            }
        }
        nbufs = n;
        r->count = n;
        return 0;
    }
    case VIDIOC_QUERYBUF:
    case VIDIOC_QBUF: {
        struct v4l2_buffer *b = arg;
        if (b->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || b->memory != V4L2_MEMORY_MMAP || b->index >= nbufs)
            return fail(EINVAL);
        if (req == VIDIOC_QBUF) {
            if (queued[b->index]) return fail(EINVAL);
            queued[b->index] = 1;
        }
        b->length = buf_len;
        b->m.offset = b->index * BUF_STRIDE;
        b->flags = queued[b->index] ? V4L2_BUF_FLAG_QUEUED : 0;
        return 0;
    }
    case VIDIOC_DQBUF: {
        struct v4l2_buffer *b = arg;
        if (b->type != V4L2_BUF_TYPE_VIDEO_CAPTURE || !streaming) return fail(EINVAL);
        if (is("stall") || now() < next_due) return fail(EAGAIN);
        for (unsigned i = 0; i < nbufs; i++) {
            if (!queued[i]) continue;
            queued[i] = 0;
            unsigned used = produce(i);
            double fps = atof(env("FAKE_V4L2_FPS", "10"));
            next_due = now() + 1.0 / (fps > 0 ? fps : 10);
            b->index = i;
            b->bytesused = used;
            b->length = buf_len;
            b->m.offset = i * BUF_STRIDE;
            b->flags = V4L2_BUF_FLAG_DONE | V4L2_BUF_FLAG_TIMESTAMP_MONOTONIC;
            b->field = V4L2_FIELD_NONE;
            b->sequence = sequence++;
            struct timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            b->timestamp.tv_sec = t.tv_sec;
            b->timestamp.tv_usec = t.tv_nsec / 1000;
            n_frames++;
            write_stats();
            return 0;
        }
        return fail(EAGAIN);
    }
    case VIDIOC_STREAMON:
        if (nbufs == 0) return fail(EINVAL);
        streaming = 1;
        sequence = 0;
        next_due = now();
        load_frames();
        frame_at = 0;
        return 0;
    case VIDIOC_STREAMOFF:
        streaming = 0;
        for (unsigned i = 0; i < nbufs; i++) queued[i] = 0;
        return 0;
    default:
        return fail(ENOTTY);
    }
}

static int is_device(const char *path) {
    const char *dev = getenv("FAKE_V4L2_PATH");
    return dev && path && strcmp(path, dev) == 0;
}

static int open_device(void) {
    if (is("unplug")) return fail(ENOENT);
    if (fake_fd >= 0) return fail(EBUSY); /* one open handle, as the tests need */
    int fd = real_open("/dev/null", O_RDWR | O_CLOEXEC);
    if (fd < 0) return fd;
    fake_fd = fd;
    streaming = 0;
    free_buffers();
    n_opens++;
    write_stats();
    return fd;
}

/* open and open64 differ only in the libc function they fall through to. */
static int open_common(int (*real)(const char *, int, ...), const char *path, int flags, mode_t mode) {
    if (is_device(path)) {
        pthread_mutex_lock(&lock);
        int r = open_device();
        pthread_mutex_unlock(&lock);
        return r;
    }
    return real(path, flags, mode);
}

#define OPEN_MODE(flags, mode)                                                \
    do {                                                                      \
        if (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE) {      \
            va_list ap;                                                       \
            va_start(ap, flags);                                              \
            mode = va_arg(ap, mode_t);                                        \
            va_end(ap);                                                       \
        }                                                                     \
    } while (0)

int open(const char *path, int flags, ...) {
    resolve();
    mode_t mode = 0;
    OPEN_MODE(flags, mode);
    return open_common(real_open, path, flags, mode);
}

int open64(const char *path, int flags, ...) {
    resolve();
    mode_t mode = 0;
    OPEN_MODE(flags, mode);
    return open_common(real_open64, path, flags, mode);
}

int close(int fd) {
    resolve();
    pthread_mutex_lock(&lock);
    if (fd >= 0 && fd == fake_fd) {
        fake_fd = -1;
        streaming = 0;
        free_buffers();
    }
    pthread_mutex_unlock(&lock);
    return real_close(fd);
}

long syscall(long n, ...) {
    resolve();
    va_list ap;
    va_start(ap, n);
    long a[6];
    for (int i = 0; i < 6; i++) a[i] = va_arg(ap, long);
    va_end(ap);
    if (n == SYS_ioctl && fake_fd >= 0 && (int)a[0] == fake_fd) {
        pthread_mutex_lock(&lock);
        int r = fake_ioctl((unsigned long)a[1], (void *)a[2]);
        int e = errno;
        pthread_mutex_unlock(&lock);
        errno = e;
        return r;
    }
    return real_syscall(n, a[0], a[1], a[2], a[3], a[4], a[5]);
}

int ioctl(int fd, unsigned long req, ...) {
    resolve();
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (fake_fd >= 0 && fd == fake_fd) {
        pthread_mutex_lock(&lock);
        int r = fake_ioctl(req, arg);
        int e = errno;
        pthread_mutex_unlock(&lock);
        errno = e;
        return r;
    }
    return real_ioctl(fd, req, arg);
}

static void *map_buffer(size_t len, int fd, off_t off) {
    pthread_mutex_lock(&lock);
    void *r = MAP_FAILED;
    unsigned i = (unsigned)(off / BUF_STRIDE);
    if (fd == fake_fd && off % BUF_STRIDE == 0 && i < nbufs && bufs[i] && len <= buf_len && !is("unplug")) r = bufs[i];
    else errno = EINVAL;
    pthread_mutex_unlock(&lock);
    return r;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    resolve();
    if (fake_fd >= 0 && fd == fake_fd) return map_buffer(len, fd, off);
    return real_mmap(addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off) {
    resolve();
    if (fake_fd >= 0 && fd == fake_fd) return map_buffer(len, fd, (off_t)off);
    return real_mmap64(addr, len, prot, flags, fd, off);
}

int munmap(void *addr, size_t len) {
    resolve();
    pthread_mutex_lock(&lock);
    for (unsigned i = 0; i < nbufs; i++) {
        if (bufs[i] == addr) {
            /* The process lets go of its mapping; the buffer stays the driver's until REQBUFS 0
               or close, as in the kernel. */
            pthread_mutex_unlock(&lock);
            return 0;
        }
    }
    pthread_mutex_unlock(&lock);
    return real_munmap(addr, len);
}

int poll(struct pollfd *fds, nfds_t n, int timeout) {
    resolve();
    if (!(n == 1 && fake_fd >= 0 && fds[0].fd == fake_fd)) return real_poll(fds, n, timeout);
    double until = timeout < 0 ? 1e300 : now() + timeout / 1000.0;
    for (;;) {
        pthread_mutex_lock(&lock);
        short ev = 0;
        if (is("unplug") || !streaming) ev = POLLERR;
        else if (!is("stall") && now() >= next_due) {
            for (unsigned i = 0; i < nbufs; i++)
                if (queued[i]) ev = POLLIN | POLLRDNORM;
            if (!ev) ev = POLLERR; /* streaming with nothing queued, as the kernel reports */
        }
        pthread_mutex_unlock(&lock);
        if (ev) {
            fds[0].revents = ev & (fds[0].events | POLLERR | POLLHUP);
            if (!fds[0].revents) fds[0].revents = ev;
            return 1;
        }
        if (now() >= until) {
            fds[0].revents = 0;
            return 0;
        }
        struct timespec t = {0, 5 * 1000 * 1000};
        nanosleep(&t, NULL);
    }
}
