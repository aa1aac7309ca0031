/*
 * Fan-out load client for bench/suite.py, in C: N receiving devices in one room.
 *
 * The same contract as bench/fanout_client.py, at a fraction of its CPU cost, so
 * that the load generator is not what a benchmark measures (issue #7). One
 * process, one epoll loop, non-blocking sockets, no threads; the suite runs a
 * few of these (at most ~9,000 connections each) pinned away from the server.
 *
 *   fanout_client --url ws://127.0.0.1:PORT/ws --count N [--first I] [--tokens FILE]
 *                 [--concurrency C] [--attempts A] [--source 127.0.0.K] [--tick-us T] [--prefix P]
 *
 * --tokens FILE: one JWT per line, line k for device k of this process; with it
 * the client talks to the gateway: "Authorization: Bearer <jwt>", subprotocol
 * chat.v1.proto, and a device counts as connected at its first binary frame
 * (the gateway's `connected`). Without it (the bare reference) a device is
 * connected at the HTTP 101. The C client does not mint JWTs: the suite mints
 * them (chatgateway.auth.mint_token) and writes the file.
 *
 * --source: the local address to connect from. Every client process of the suite
 * gets its own (127.0.0.2, .3, ...): with 19,000 connections from one address the
 * kernel's search for a free ephemeral port made connect() cost several times
 * the rest of the handshake.
 *
 * Opening: at most C handshakes in flight; a handshake that fails (refused,
 * not 101, closed before `connected`, 120 s timeout) is retried up to A
 * attempts in all. Per device it records the time from the start of its TCP
 * connect to the HTTP 101, and to `connected`.
 *
 * Receiving: server frames are unmasked; the client walks frame headers, counts
 * binary frames, answers pings with masked pongs (zero mask) and samples the
 * delivery latency of every binary frame from the publisher's send time, which
 * the publisher writes as the ServerEvent id (protobuf field 1, the first bytes
 * of the frame: 0x0A <len> "<unix seconds>.<micros>"), to the kernel's arrival
 * time of the data (SO_TIMESTAMPNS). Once connected, the loop reads in rounds of
 * --tick-us (1 ms): waking for each frame cost several times the read itself.
 * Latencies go into a histogram of 10 us bins (percentiles without sorting).
 *
 * stdin/stdout, one line each:
 *   -> READY <connected> <seconds to the last connected> {json: handshake figures}
 *   <- RESET -> RESET             (zero the message counters and the histogram)
 *   <- STATS -> STATS {"messages", "samples", "p50_ms", "p99_ms", "max_ms", "closed", ...}
 *   <- QUIT                       (every connection reset, exit 0; EOF on stdin too)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BIN_US 10                    /* histogram resolution */
#define NBINS (2000000)              /* 10 us x 2,000,000 = 20 s; later ones land in the last bin */
#define READ_CHUNK (256 * 1024)
#define HANDSHAKE_TIMEOUT 120.0
#define STDIN_TAG UINT32_MAX
#define MAX_EVENTS 4096

enum { ST_IDLE, ST_CONNECTING, ST_UPGRADING, ST_HELLO, ST_OPEN, ST_WAIT_RETRY, ST_DEAD };

typedef struct {
    int fd;
    int state;
    int attempts;
    double t_start;     /* monotonic, start of the current attempt */
    double t_retry;     /* monotonic, when to retry */
    unsigned char *in;  /* unparsed received bytes */
    uint32_t in_len, in_cap;
    unsigned char *out; /* unsent bytes */
    uint32_t out_len, out_off;
} conn_t;

static conn_t *conns;
static int count, first_index, concurrency = 24, max_attempts = 3;
static int tick_us = 1000; /* after READY: pause between epoll rounds, so reads batch (see main) */
static char **tokens;
static int gateway_mode;
static char host[256], path[2048], hostport[300];
static struct sockaddr_in addr, source; /* source: a loopback address of this process's own (--source) */
static int have_source;
static int ep;

/* opening */
static int next_slot, in_flight, ready_count, failed_count, retries, ready_sent;
static double started, last_101, last_connected;
static double *ms_101, *ms_connected;
static int n_101, n_connected;

/* receiving */
static uint64_t messages, samples, bytes_in;
static uint32_t *hist;
static double max_latency;
static int closed_count;
static int unparsed_ids;
static uint64_t reads, timestamped;

static unsigned char rbuf[READ_CHUNK];

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static double wall(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void die(const char *what) {
    fprintf(stderr, "fanout_client: %s\n", what);
    exit(2);
}

static void say(const char *line) {
    size_t len = strlen(line), off = 0;
    while (off < len) {
        ssize_t n = write(1, line + off, len - off);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            exit(3);
        }
        off += n;
    }
}

/* ------------------------------------------------------------------ output */

static void conn_write(uint32_t slot, const unsigned char *data, size_t len);

/* Edge-triggered: level-triggered epoll polls every ready socket once more on the next round, which
 * cost this client about a fifth of its time; each read empties the socket (a short read is the end). */
static void set_events(uint32_t slot, uint32_t events) {
    struct epoll_event ev = {.events = events | EPOLLET, .data.u32 = slot};
    epoll_ctl(ep, EPOLL_CTL_MOD, conns[slot].fd, &ev);
}

static void conn_write(uint32_t slot, const unsigned char *data, size_t len) {
    conn_t *c = &conns[slot];
    if (c->out_len == c->out_off) {
        c->out_len = c->out_off = 0;
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n == (ssize_t)len) return;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return; /* the read side sees the error */
            n = 0;
        }
        data += n;
        len -= n;
    }
    c->out = realloc(c->out, c->out_len + len);
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    set_events(slot, EPOLLIN | EPOLLOUT);
}

static void conn_flush(uint32_t slot) {
    conn_t *c = &conns[slot];
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) return;
            break;
        }
        c->out_off += n;
    }
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_off = 0;
    set_events(slot, EPOLLIN);
}

/* ------------------------------------------------------------------ opening */

static void start_attempt(uint32_t slot);

static void release(conn_t *c) {
    if (c->fd >= 0) {
        struct linger lg = {1, 0}; /* reset, no TIME_WAIT left behind */
        setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        close(c->fd);
        c->fd = -1;
    }
    free(c->in);
    free(c->out);
    c->in = c->out = NULL;
    c->in_len = c->in_cap = c->out_len = c->out_off = 0;
}

static void opened(uint32_t slot) {
    conn_t *c = &conns[slot];
    double now = mono();
    c->state = ST_OPEN;
    ms_connected[n_connected++] = (now - c->t_start) * 1000;
    last_connected = now;
    ready_count++;
    in_flight--;
}

static void handshake_failed(uint32_t slot, const char *why) {
    conn_t *c = &conns[slot];
    release(c);
    if (c->attempts < max_attempts) {
        retries++;
        c->state = ST_WAIT_RETRY;
        c->t_retry = mono() + 0.2 * c->attempts;
    } else {
        fprintf(stderr, "fanout_client: device %d failed: %s\n", first_index + (int)slot, why);
        c->state = ST_DEAD;
        failed_count++;
        in_flight--;
    }
}

static void launch_more(void) {
    while (in_flight < concurrency && next_slot < count) {
        in_flight++;
        start_attempt(next_slot++);
    }
}

static void start_attempt(uint32_t slot) {
    conn_t *c = &conns[slot];
    c->attempts++;
    c->t_start = mono();
    c->state = ST_CONNECTING;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        handshake_failed(slot, strerror(errno));
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(c->fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof one); /* arrival times of the data */
    if (have_source) {
        /* the port is chosen at connect (per 4-tuple), in this address's own ephemeral range */
        setsockopt(c->fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(c->fd, (struct sockaddr *)&source, sizeof source) < 0) {
            handshake_failed(slot, strerror(errno));
            return;
        }
    }
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        handshake_failed(slot, strerror(errno));
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLET, .data.u32 = slot};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) handshake_failed(slot, strerror(errno));
}

static void send_request(uint32_t slot) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char key[25];
    for (int i = 0; i < 21; i++) key[i] = b64[rand() & 63];
    key[21] = b64[rand() & 48]; /* 16 bytes: the last sextet carries 2 bits */
    key[22] = key[23] = '=';
    key[24] = 0;
    char request[8192];
    int n;
    if (gateway_mode)
        n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat.v1.proto\r\n"
                     "Authorization: Bearer %s\r\n\r\n",
                     path, hostport, key, tokens[slot]);
    else
        n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, hostport, key);
    conns[slot].state = ST_UPGRADING;
    set_events(slot, EPOLLIN);
    conn_write(slot, (unsigned char *)request, n);
}

/* ------------------------------------------------------------------ frames */

static void sample(const unsigned char *p, uint64_t len, double now) {
    /* ServerEvent field 1 (id): tag 0x0A, a one-byte length, "<seconds>.<micros>" */
    if (len < 3 || p[0] != 0x0A || p[1] >= 0x80 || p[1] > 40 || 2 + (uint64_t)p[1] > len) {
        unparsed_ids++;
        return;
    }
    /* "<digits>.<digits>" by hand (strtod was a visible share of this client's time) */
    const unsigned char *d = p + 2, *e = p + 2 + p[1];
    uint64_t whole = 0, frac = 0, scale = 1;
    while (d < e && *d >= '0' && *d <= '9') whole = whole * 10 + (*d++ - '0');
    if (d < e && *d == '.')
        for (d++; d < e && *d >= '0' && *d <= '9'; d++)
            if (scale < 1000000000ULL) {
                frac = frac * 10 + (*d - '0');
                scale *= 10;
            }
    double sent = whole + (double)frac / scale;
    double latency = now - sent;
    if (d != e || d == p + 2 || latency > 3600 || latency < -1) {
        unparsed_ids++; /* not a publisher's event (e.g. the gateway's notice of missed events) */
        return;
    }
    if (latency < 0) latency = 0;
    uint64_t bin = (uint64_t)(latency * 1e6 / BIN_US);
    if (bin >= NBINS) bin = NBINS - 1;
    hist[bin]++;
    samples++;
    if (latency > max_latency) max_latency = latency;
}

/* Walks the complete frames of buf; returns the bytes consumed. -1: the connection must go. */
static long parse_frames(uint32_t slot, const unsigned char *buf, size_t n, double now) {
    conn_t *c = &conns[slot];
    size_t i = 0;
    while (n - i >= 2) {
        unsigned opcode = buf[i] & 0x0F;
        uint64_t length = buf[i + 1] & 0x7F;
        size_t head = 2;
        if (length == 126) {
            if (n - i < 4) break;
            length = ((uint64_t)buf[i + 2] << 8) | buf[i + 3];
            head = 4;
        } else if (length == 127) {
            if (n - i < 10) break;
            length = 0;
            for (int k = 0; k < 8; k++) length = (length << 8) | buf[i + 2 + k];
            head = 10;
        }
        if (buf[i + 1] & 0x80) head += 4; /* a masked server frame: not expected, skipped */
        if ((uint64_t)(n - i) < head + length) break;
        const unsigned char *payload = buf + i + head;
        if (opcode == 2) {
            if (c->state == ST_HELLO) {
                opened(slot); /* the gateway's `connected` */
            } else {
                messages++;
                sample(payload, length, now);
            }
        } else if (opcode == 9 && length <= 125) {
            unsigned char pong[2 + 4 + 125];
            pong[0] = 0x8A;
            pong[1] = 0x80 | (unsigned char)length;
            memset(pong + 2, 0, 4);
            memcpy(pong + 6, payload, length);
            conn_write(slot, pong, 6 + length);
        } else if (opcode == 8) {
            return -1;
        }
        i += head + length;
    }
    return (long)i;
}

static void connection_lost(uint32_t slot, const char *why) {
    conn_t *c = &conns[slot];
    if (c->state == ST_OPEN) {
        closed_count++;
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        release(c);
        c->state = ST_DEAD;
    } else if (c->state != ST_DEAD && c->state != ST_WAIT_RETRY) {
        handshake_failed(slot, why);
    }
}

/* Bytes after the upgrade (or after a read): frames, keeping an incomplete tail. */
static void consume(uint32_t slot, const unsigned char *data, size_t len, double now) {
    conn_t *c = &conns[slot];
    const unsigned char *buf = data;
    size_t n = len;
    if (c->in_len) {
        if (c->in_len + len > c->in_cap) {
            c->in_cap = (c->in_len + len) * 2;
            c->in = realloc(c->in, c->in_cap);
        }
        memcpy(c->in + c->in_len, data, len);
        c->in_len += len;
        buf = c->in;
        n = c->in_len;
    }
    long used = parse_frames(slot, buf, n, now);
    if (used < 0) {
        connection_lost(slot, "closed by the server");
        return;
    }
    size_t rest = n - used;
    if (rest == 0) {
        c->in_len = 0;
        if (c->in_cap > 65536) {
            free(c->in);
            c->in = NULL;
            c->in_cap = 0;
        }
    } else if (buf == c->in) {
        memmove(c->in, c->in + used, rest);
        c->in_len = rest;
    } else {
        if (rest > c->in_cap) {
            c->in_cap = rest < 4096 ? 4096 : rest;
            c->in = realloc(c->in, c->in_cap);
        }
        memcpy(c->in, buf + used, rest);
        c->in_len = rest;
    }
}

static void upgrade_bytes(uint32_t slot, const unsigned char *data, size_t len, double now) {
    conn_t *c = &conns[slot];
    if (c->in_len + len + 1 > c->in_cap) {
        c->in_cap = c->in_len + len + 4096;
        c->in = realloc(c->in, c->in_cap);
    }
    memcpy(c->in + c->in_len, data, len);
    c->in_len += len;
    c->in[c->in_len] = 0;
    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!end) {
        if (c->in_len > 16384) handshake_failed(slot, "oversized HTTP response");
        return;
    }
    char *eol = memmem(c->in, c->in_len, "\r\n", 2);
    *eol = 0;
    if (!strstr((char *)c->in, " 101 ")) {
        char why[200];
        snprintf(why, sizeof why, "%.190s", (char *)c->in);
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        handshake_failed(slot, why);
        return;
    }
    double t = mono();
    if (ms_101[slot] == 0) n_101++;
    ms_101[slot] = (t - c->t_start) * 1000; /* per device: a retried one keeps its last attempt's */
    last_101 = t;
    size_t header = (unsigned char *)end + 4 - c->in;
    size_t rest = c->in_len - header;
    unsigned char *tail = rest ? malloc(rest) : NULL;
    if (rest) memcpy(tail, c->in + header, rest);
    c->in_len = 0;
    if (gateway_mode) {
        c->state = ST_HELLO;
    } else {
        opened(slot);
    }
    if (rest) consume(slot, tail, rest, now);
    free(tail);
}

/* The kernel's arrival time of what recvmsg read (SO_TIMESTAMPNS: of its last segment), else now. */
static double arrival(struct msghdr *msg) {
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(cm), sizeof ts);
            double t = ts.tv_sec + ts.tv_nsec * 1e-9, now = wall();
            if (t <= now && t > now - 30) { /* a realtime stamp (not another clock base) */
                timestamped++;
                return t;
            }
            return now;
        }
    }
    return wall();
}

static void on_readable(uint32_t slot) {
    conn_t *c = &conns[slot];
    for (;;) {
        char cbuf[CMSG_SPACE(sizeof(struct timespec)) * 2];
        struct iovec iov = {.iov_base = rbuf, .iov_len = sizeof rbuf};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
        ssize_t n = recvmsg(c->fd, &msg, 0);
        if (n > 0) {
            bytes_in += n;
            reads++;
            double now = arrival(&msg);
            if (c->state == ST_UPGRADING)
                upgrade_bytes(slot, rbuf, n, now);
            else
                consume(slot, rbuf, n, now);
            if (c->fd < 0 || c->state == ST_DEAD || c->state == ST_WAIT_RETRY) return;
            if ((size_t)n < sizeof rbuf) return;
            continue;
        }
        if (n == 0) {
            if (c->state != ST_OPEN) epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            connection_lost(slot, "connection closed");
            return;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        if (errno == EINTR) continue;
        if (c->state != ST_OPEN) epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        connection_lost(slot, strerror(errno));
        return;
    }
}

static void on_event(uint32_t slot, uint32_t events) {
    conn_t *c = &conns[slot];
    if (c->fd < 0) return;
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err || (events & (EPOLLERR | EPOLLHUP))) {
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            handshake_failed(slot, err ? strerror(err) : "connect failed");
            return;
        }
        if (events & EPOLLOUT) send_request(slot);
        return;
    }
    if (events & EPOLLOUT) conn_flush(slot);
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(slot);
}

/* ------------------------------------------------------------------ control */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void summary(char *out, size_t size, const char *name, double *v, int n) {
    if (!n) {
        snprintf(out, size, "\"%s\": null", name);
        return;
    }
    qsort(v, n, sizeof *v, cmp_double);
    double sum = 0;
    for (int i = 0; i < n; i++) sum += v[i];
    int p99 = (int)(0.99 * n);
    if (p99 >= n) p99 = n - 1;
    snprintf(out, size, "\"%s\": {\"mean\": %.2f, \"p50\": %.2f, \"p99\": %.2f, \"max\": %.2f}", name, sum / n,
             v[n / 2], v[p99], v[n - 1]);
}

static void send_ready(void) {
    char line[2048], a[400], b[400];
    double t101 = n_101 ? last_101 - started : 0, tconn = n_connected ? last_connected - started : 0;
    int k = 0;
    for (int i = 0; i < count; i++)
        if (ms_101[i] > 0) ms_101[k++] = ms_101[i];
    summary(a, sizeof a, "ms_to_101", ms_101, k);
    summary(b, sizeof b, "ms_to_connected", ms_connected, n_connected);
    snprintf(line, sizeof line,
             "READY %d %.3f {\"connected\": %d, \"failed\": %d, \"retries\": %d, \"concurrency\": %d, "
             "\"seconds_to_101\": %.3f, \"seconds_to_connected\": %.3f, %s, %s}\n",
             ready_count, tconn, ready_count, failed_count, retries, concurrency, t101, tconn, a, b);
    say(line);
    ready_sent = 1;
}

static double percentile(double p) {
    /* the sample of rank floor(p * n) (as the Python client), at the middle of its bin */
    uint64_t rank = (uint64_t)(p * samples), seen = 0;
    if (rank >= samples) rank = samples - 1;
    for (uint64_t b = 0; b < NBINS; b++) {
        seen += hist[b];
        if (seen > rank) {
            double ms = (b + 0.5) * BIN_US / 1000.0;
            return ms > max_latency * 1000 ? max_latency * 1000 : ms;
        }
    }
    return max_latency * 1000;
}

static void send_stats(void) {
    char line[512];
    int open = 0;
    for (int i = 0; i < count; i++) open += conns[i].state == ST_OPEN;
    if (samples)
        snprintf(line, sizeof line,
                 "STATS {\"messages\": %llu, \"samples\": %llu, \"p50_ms\": %.2f, \"p99_ms\": %.2f, \"max_ms\": %.2f, "
                 "\"closed\": %d, \"open\": %d, \"bytes\": %llu, \"reads\": %llu, \"timestamped\": %llu, "
                 "\"unparsed\": %d}\n",
                 (unsigned long long)messages, (unsigned long long)samples, percentile(0.5), percentile(0.99),
                 max_latency * 1000, closed_count, open, (unsigned long long)bytes_in, (unsigned long long)reads,
                 (unsigned long long)timestamped, unparsed_ids);
    else
        snprintf(line, sizeof line,
                 "STATS {\"messages\": %llu, \"samples\": 0, \"p50_ms\": null, \"p99_ms\": null, \"max_ms\": null, "
                 "\"closed\": %d, \"open\": %d, \"bytes\": %llu, \"reads\": %llu, \"timestamped\": %llu, "
                 "\"unparsed\": %d}\n",
                 (unsigned long long)messages, closed_count, open, (unsigned long long)bytes_in,
                 (unsigned long long)reads, (unsigned long long)timestamped, unparsed_ids);
    say(line);
}

static void quit(void) {
    for (int i = 0; i < count; i++) release(&conns[i]);
    exit(0);
}

static char control[4096];
static size_t control_len;

static void on_stdin(void) {
    ssize_t n = read(0, control + control_len, sizeof control - 1 - control_len);
    if (n <= 0) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        quit(); /* the suite is gone */
    }
    control_len += n;
    char *start = control, *nl;
    while ((nl = memchr(start, '\n', control + control_len - start))) {
        *nl = 0;
        char *cmd = start;
        while (*cmd == ' ' || *cmd == '\r') cmd++;
        size_t l = strlen(cmd);
        while (l && (cmd[l - 1] == '\r' || cmd[l - 1] == ' ')) cmd[--l] = 0;
        if (!strcmp(cmd, "RESET")) {
            messages = samples = reads = timestamped = 0;
            unparsed_ids = 0;
            max_latency = 0;
            memset(hist, 0, NBINS * sizeof *hist);
            say("RESET\n");
        } else if (!strcmp(cmd, "STATS")) {
            send_stats();
        } else if (!strcmp(cmd, "QUIT")) {
            quit();
        }
        start = nl + 1;
    }
    control_len = control + control_len - start;
    memmove(control, start, control_len);
    if (control_len == sizeof control - 1) control_len = 0;
}

/* ------------------------------------------------------------------ setup */

static void parse_url(const char *url) {
    if (strncmp(url, "ws://", 5)) die("--url must be ws://host:port/path");
    const char *h = url + 5, *slash = strchr(h, '/');
    size_t hl = slash ? (size_t)(slash - h) : strlen(h);
    if (hl >= sizeof hostport) die("host too long");
    memcpy(hostport, h, hl);
    hostport[hl] = 0;
    snprintf(path, sizeof path, "%s", slash ? slash : "/");
    int port = 80;
    char *colon = strrchr(hostport, ':');
    snprintf(host, sizeof host, "%.*s", colon ? (int)(colon - hostport) : (int)hl, hostport);
    if (colon) port = atoi(colon + 1);
    struct addrinfo hints = {.ai_family = AF_INET, .ai_socktype = SOCK_STREAM}, *res;
    if (getaddrinfo(host, NULL, &hints, &res)) die("cannot resolve the host");
    addr = *(struct sockaddr_in *)res->ai_addr;
    addr.sin_port = htons(port);
    freeaddrinfo(res);
}

static void read_tokens(const char *file) {
    FILE *f = fopen(file, "r");
    if (!f) die("cannot open --tokens");
    tokens = calloc(count, sizeof *tokens);
    char *line = NULL;
    size_t cap = 0;
    for (int i = 0; i < count; i++) {
        ssize_t n = getline(&line, &cap, f);
        if (n <= 0) die("--tokens has fewer lines than --count");
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        tokens[i] = strdup(line);
    }
    free(line);
    fclose(f);
}

int main(int argc, char **argv) {
    const char *url = NULL, *token_file = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--url") && v) url = argv[++i];
        else if (!strcmp(a, "--count") && v) count = atoi(argv[++i]);
        else if (!strcmp(a, "--first") && v) first_index = atoi(argv[++i]);
        else if (!strcmp(a, "--tokens") && v) token_file = argv[++i];
        else if (!strcmp(a, "--concurrency") && v) concurrency = atoi(argv[++i]);
        else if (!strcmp(a, "--attempts") && v) max_attempts = atoi(argv[++i]);
        else if (!strcmp(a, "--tick-us") && v) tick_us = atoi(argv[++i]);
        else if (!strcmp(a, "--source") && v) {
            source.sin_family = AF_INET;
            if (inet_pton(AF_INET, argv[++i], &source.sin_addr) != 1) die("--source must be an IPv4 address");
            have_source = 1;
        }
        else if (!strcmp(a, "--prefix") && v) i++; /* profiles are named by the tokens */
        else if (!strcmp(a, "--secret")) die("the C client does not mint JWTs: pass --tokens FILE (one per line)");
        else {
            fprintf(stderr, "fanout_client: unknown argument %s\n", a);
            return 2;
        }
    }
    if (!url || count <= 0) die("usage: fanout_client --url ws://HOST:PORT/PATH --count N [--tokens FILE] ...");
    if (concurrency < 1) concurrency = 1;
    if (max_attempts < 1) max_attempts = 1;
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (!getrlimit(RLIMIT_NOFILE, &rl) && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    parse_url(url);
    gateway_mode = token_file != NULL;
    if (gateway_mode) read_tokens(token_file);
    srand((unsigned)(getpid() ^ (unsigned)(wall() * 1e6)));
    conns = calloc(count, sizeof *conns);
    for (int i = 0; i < count; i++) conns[i].fd = -1;
    ms_101 = calloc(count, sizeof *ms_101);
    ms_connected = calloc(count, sizeof *ms_connected);
    hist = calloc(NBINS, sizeof *hist);
    if (!conns || !ms_101 || !ms_connected || !hist) die("out of memory");

    ep = epoll_create1(EPOLL_CLOEXEC);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u32 = STDIN_TAG};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);

    started = mono();
    launch_more();
    static struct epoll_event events[MAX_EVENTS];
    double last_scan = started;
    for (;;) {
        int timeout = ready_sent ? -1 : 50;
        int n = epoll_wait(ep, events, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        for (int i = 0; i < n; i++) {
            if (events[i].data.u32 == STDIN_TAG)
                on_stdin();
            else
                on_event(events[i].data.u32, events[i].events);
        }
        if (ready_sent && tick_us > 0 && n < MAX_EVENTS) {
            /* Let deliveries pile up for a tick instead of waking for each one: a wakeup per frame
             * costs this client (and the server's send path, which must wake it) several times the
             * read itself, and a read of several frames costs one ACK. Latency is unaffected: it is
             * taken from the kernel's arrival time of the data (SO_TIMESTAMPNS), not from the read. */
            struct timespec pause = {0, tick_us * 1000L};
            nanosleep(&pause, NULL);
        }
        if (!ready_sent) {
            double now = mono();
            if (now - last_scan > 0.05) { /* retries due, handshakes timed out */
                last_scan = now;
                for (int s = 0; s < next_slot; s++) {
                    conn_t *c = &conns[s];
                    if (c->state == ST_WAIT_RETRY && now >= c->t_retry) {
                        start_attempt(s);
                    } else if ((c->state == ST_CONNECTING || c->state == ST_UPGRADING || c->state == ST_HELLO) &&
                               now - c->t_start > HANDSHAKE_TIMEOUT) {
                        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                        handshake_failed(s, "handshake timeout");
                    }
                }
            }
            launch_more();
            if (next_slot == count && in_flight == 0) send_ready();
        }
    }
}
