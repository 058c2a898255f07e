/*
 * smtpload: a small smtp-source-like SMTP load generator that can also authenticate
 * (AUTH CRAM-MD5) and that reports the latency of every whole session.
 *
 * Why it exists: smtp-source (Debian's postfix package) cannot AUTH, and mox accepts mail
 * for remote recipients (the outgoing queue) only on its submission listener, after AUTH.
 * smtpload drives both mox and Postfix through the same code path so that the ratio is
 * fair, and it measures "one connection, one message, the whole session" latencies.
 *
 * Session, like smtp-source without pipelining (one command, wait for its reply):
 *   connect, 220, HELO (or EHLO with -e or -a), [AUTH CRAM-MD5, 334, response, 235],
 *   MAIL FROM, RCPT TO, DATA, 354, message, ".", 250, QUIT, 221, close.
 * The message is "From/To/Date/Message-Id/Subject" headers plus -l bytes of body in lines
 * of 78 'X' + CRLF (smtp-source uses lines of 79 'X').
 *
 * usage: smtpload [-e] [-a user:password] [-s sessions] [-m messages] [-l body_length]
 *                 [-f from] [-t to] [-M helo_name] [-T timeout_s] [-D max_seconds] host:port
 * Output: one JSON object on stdout.
 *
 * Build: gcc -O2 -pthread -o smtpload smtpload.c -lcrypto   (Debian: gcc, libssl-dev)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static int sessions = 1, messages = 1, body_len = 2048, use_ehlo = 0, timeout_s = 30;
static double max_seconds = 0;
static const char *from = "sender@src.bench.test", *to = "rcpt@bench.test", *helo = "client.bench.test";
static const char *auth_user = NULL, *auth_pass = NULL;
static struct sockaddr_in addr;
static char *body;
static size_t body_size;
static atomic_int next_msg = 0, ok_count = 0, err_count = 0;
static double *latencies;
static double t_start;
static char first_error[512];
static pthread_mutex_t err_lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

typedef struct {
    int fd;
    char buf[8192];
    size_t len, pos;
} conn_t;

static int read_line(conn_t *c, char *line, size_t cap) {
    size_t n = 0;
    for (;;) {
        if (c->pos == c->len) {
            ssize_t r = recv(c->fd, c->buf, sizeof c->buf, 0);
            if (r <= 0) return -1;
            c->len = (size_t)r;
            c->pos = 0;
        }
        char ch = c->buf[c->pos++];
        if (n + 1 < cap) line[n++] = ch;
        if (ch == '\n') break;
    }
    line[n] = 0;
    return (int)n;
}

/* Read a (multi-line) reply; return its code, the last line in last (if given). */
static int read_reply(conn_t *c, char *last, size_t cap) {
    char line[1024];
    for (;;) {
        if (read_line(c, line, sizeof line) < 0) return -1;
        if (strlen(line) < 3) return -1;
        if (line[3] != '-') {
            if (last) snprintf(last, cap, "%s", line);
            return atoi(line);
        }
    }
}

static int send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void note_error(const char *what, const char *detail) {
    atomic_fetch_add(&err_count, 1);
    pthread_mutex_lock(&err_lock);
    if (!first_error[0]) snprintf(first_error, sizeof first_error, "%s: %.400s", what, detail);
    pthread_mutex_unlock(&err_lock);
}

static int cmd(conn_t *c, const char *line, int want, const char *what, char *last, size_t cap) {
    char reply[1024];
    if (line && send_all(c->fd, line, strlen(line)) < 0) {
        note_error(what, strerror(errno));
        return -1;
    }
    int code = read_reply(c, reply, sizeof reply);
    if (code != want) {
        for (char *p = reply; *p; p++)
            if (*p == '\r' || *p == '\n' || *p == '"' || *p == '\\') *p = ' ';
        note_error(what, code < 0 ? "connection closed" : reply);
        return -1;
    }
    if (last) snprintf(last, cap, "%s", reply);
    return 0;
}

static int cram_md5(conn_t *c) {
    char reply[1024], line[1200];
    if (cmd(c, "AUTH CRAM-MD5\r\n", 334, "AUTH", reply, sizeof reply) < 0) return -1;
    char *b64 = reply + 4;
    size_t bl = strcspn(b64, "\r\n");
    b64[bl] = 0;
    unsigned char chal[1024];
    int cl = EVP_DecodeBlock(chal, (unsigned char *)b64, (int)bl);
    if (cl < 0) {
        note_error("AUTH", "bad base64 challenge");
        return -1;
    }
    while (bl > 0 && b64[bl - 1] == '=') { bl--; cl--; }  /* DecodeBlock counts padding */
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int ml = 0;
    HMAC(EVP_md5(), auth_pass, (int)strlen(auth_pass), chal, (size_t)cl, mac, &ml);
    char resp[600];
    int rl = snprintf(resp, sizeof resp, "%s ", auth_user);
    for (unsigned i = 0; i < ml; i++) rl += snprintf(resp + rl, sizeof resp - rl, "%02x", mac[i]);
    unsigned char enc[1200];
    int el = EVP_EncodeBlock(enc, (unsigned char *)resp, rl);
    snprintf(line, sizeof line, "%.*s\r\n", el, enc);
    return cmd(c, line, 235, "AUTH response", NULL, 0);
}

static int session(int n) {
    conn_t c = {.fd = -1};
    char line[1024];
    int rc = -1;
    c.fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c.fd < 0) {
        note_error("socket", strerror(errno));
        return -1;
    }
    int one = 1;
    setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = timeout_s};
    setsockopt(c.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(c.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(c.fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        note_error("connect", strerror(errno));
        goto out;
    }
    if (cmd(&c, NULL, 220, "banner", NULL, 0) < 0) goto out;
    snprintf(line, sizeof line, "%s %s\r\n", (use_ehlo || auth_user) ? "EHLO" : "HELO", helo);
    if (cmd(&c, line, 250, "HELO", NULL, 0) < 0) goto out;
    if (auth_user && cram_md5(&c) < 0) goto out;
    snprintf(line, sizeof line, "MAIL FROM:<%s>\r\n", from);
    if (cmd(&c, line, 250, "MAIL", NULL, 0) < 0) goto out;
    snprintf(line, sizeof line, "RCPT TO:<%s>\r\n", to);
    if (cmd(&c, line, 250, "RCPT", NULL, 0) < 0) goto out;
    if (cmd(&c, "DATA\r\n", 354, "DATA", NULL, 0) < 0) goto out;
    /* headers + body + "." in one write, as one buffer (no Nagle/delayed-ACK stalls) */
    char *msg = malloc(body_size + 1200);
    int hl = snprintf(msg, 1024,
                      "From: <%s>\r\nTo: <%s>\r\nDate: Thu, 26 Nov 2026 11:19:44 +0000\r\n"
                      "Message-Id: <%d.%d.%ld@smtpload.bench.test>\r\nSubject: bench %d\r\n\r\n",
                      from, to, n, (int)getpid(), (long)t_start, n);
    memcpy(msg + hl, body, body_size);
    memcpy(msg + hl + body_size, ".\r\n", 3);
    int sent = send_all(c.fd, msg, (size_t)hl + body_size + 3);
    free(msg);
    if (sent < 0) {
        note_error("DATA send", strerror(errno));
        goto out;
    }
    if (cmd(&c, NULL, 250, "end of data", NULL, 0) < 0) goto out;
    if (cmd(&c, "QUIT\r\n", 221, "QUIT", NULL, 0) < 0) goto out;
    rc = 0;
out:
    if (c.fd >= 0) close(c.fd);
    return rc;
}

static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        if (max_seconds > 0 && now() - t_start > max_seconds) break;
        int n = atomic_fetch_add(&next_msg, 1);
        if (n >= messages) break;
        double t0 = now();
        if (session(n) == 0) {
            latencies[n] = now() - t0;
            atomic_fetch_add(&ok_count, 1);
        } else {
            latencies[n] = -1;
        }
    }
    return NULL;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int opt;
    while ((opt = getopt(argc, argv, "ea:s:m:l:f:t:M:T:D:")) != -1) {
        switch (opt) {
        case 'e': use_ehlo = 1; break;
        case 'a': {
            char *p = strdup(optarg), *colon = strchr(p, ':');
            if (!colon) { fprintf(stderr, "-a user:password\n"); return 2; }
            *colon = 0;
            auth_user = p;
            auth_pass = colon + 1;
            break;
        }
        case 's': sessions = atoi(optarg); break;
        case 'm': messages = atoi(optarg); break;
        case 'l': body_len = atoi(optarg); break;
        case 'f': from = optarg; break;
        case 't': to = optarg; break;
        case 'M': helo = optarg; break;
        case 'T': timeout_s = atoi(optarg); break;
        case 'D': max_seconds = atof(optarg); break;
        default:
            fprintf(stderr, "usage: smtpload [-e] [-a user:pass] [-s sessions] [-m messages] [-l length] "
                            "[-f from] [-t to] [-M helo] [-T timeout] [-D max_seconds] host:port\n");
            return 2;
        }
    }
    if (optind != argc - 1) { fprintf(stderr, "need host:port\n"); return 2; }
    char *hp = strdup(argv[optind]), *colon = strrchr(hp, ':');
    if (!colon) { fprintf(stderr, "need host:port\n"); return 2; }
    *colon = 0;
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(colon + 1));
    if (inet_pton(AF_INET, hp, &addr.sin_addr) != 1) { fprintf(stderr, "bad IPv4 address\n"); return 2; }
    if (!((ntohl(addr.sin_addr.s_addr) >> 24) == 127)) { fprintf(stderr, "loopback (127/8) only\n"); return 2; }

    /* body: lines of 78 'X' + CRLF, body_len bytes in all, ending in CRLF */
    body = malloc((size_t)body_len + 100);
    size_t pos = 0;
    while (pos < (size_t)body_len) {
        size_t line = 78;
        if ((size_t)body_len - pos < line + 2) line = (size_t)body_len - pos > 2 ? (size_t)body_len - pos - 2 : 0;
        memset(body + pos, 'X', line);
        pos += line;
        body[pos++] = '\r';
        body[pos++] = '\n';
    }
    body_size = pos;
    latencies = calloc((size_t)messages, sizeof(double));
    pthread_t *th = calloc((size_t)sessions, sizeof(pthread_t));
    t_start = now();
    for (int i = 0; i < sessions; i++) pthread_create(&th[i], NULL, worker, NULL);
    for (int i = 0; i < sessions; i++) pthread_join(th[i], NULL);
    double elapsed = now() - t_start;

    int ok = atomic_load(&ok_count), nl = 0;
    double *lat = malloc(sizeof(double) * (size_t)(ok > 0 ? ok : 1)), sum = 0;
    int attempted = atomic_load(&next_msg);
    if (attempted > messages) attempted = messages;
    for (int i = 0; i < attempted; i++)
        if (latencies[i] > 0) { lat[nl++] = latencies[i]; sum += latencies[i]; }
    qsort(lat, (size_t)nl, sizeof(double), cmp_double);
#define PCT(p) (nl ? lat[(int)((nl - 1) * (p))] * 1000 : 0)
    printf("{\"messages\": %d, \"errors\": %d, \"elapsed\": %.6f, \"rate\": %.2f, "
           "\"lat_ms\": {\"mean\": %.3f, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"max\": %.3f}, "
           "\"first_error\": \"%s\"}\n",
           ok, atomic_load(&err_count), elapsed, elapsed > 0 ? ok / elapsed : 0,
           nl ? sum / nl * 1000 : 0, PCT(0.5), PCT(0.9), PCT(0.99), PCT(1.0), first_error);
    return atomic_load(&err_count) ? 1 : 0;
}
