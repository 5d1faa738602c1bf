/*
 * loadgen.c - closed-loop load generator for the "callback registry" cycle.
 * N students in ONE epoll thread (pin it with taskset), each listening on
 * 127.0.0.1:(base+i) (-m M: 127.0.0.(2 + i % M), M sources). A cycle: connect
 * from there, send "ITS_IP:PORT" (+ -x SUFFIX), accept the registry's callback
 * and read it to EOF (-E: echo its nonce), read the reply to EOF (must start with "OK"); the next starts at once.
 * Prints one JSON object: cycles/s, latency percentiles, errors, own CPU, the
 * server's CPU and RSS (/proc, every thread of every -s PID, summed), per-core
 * busy and steal %. Traffic to 127.0.0.0/8 only; bounded in time.
 *
 * usage: loadgen -p REGPORT -c CONC [-b LISTEN_BASE] [-w WARMUP_S] [-d DUR_S]
 *                [-t CYCLE_TIMEOUT_MS] [-s PID[,PID...]] [-l LABEL] [-x SUFFIX] [-E] [-m M] */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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
#include <time.h>
#include <unistd.h>

#define MAXCONC 4096
#define KIND_LISTEN 0
#define KIND_CLIENT 1
#define KIND_CB 2

struct student {
    int idx;
    int lfd, cfd, afd;
    uint16_t port; uint32_t src;  /* the student's address, network order */
    int sent, reply_done, cb_done, reply_ok;  /* sent: the request went out on cfd */
    char req[96];
    int reqlen;
    char cbuf[256];    /* first bytes of the callback (echo mode) */
    int cblen, echoed;
    char rbuf[256];
    int rlen;
    uint64_t t0;       /* cycle start, ns */
};

static struct student st[MAXCONC];
static int epfd;
static struct sockaddr_in regaddr;
static uint64_t cycle_timeout_ns = 5000000000ULL;
static const char *req_suffix = "";   /* -x: appended to "127.0.0.1:PORT" (e.g. " verify=no\n") */
static int echo_mode = 0, nsrc = 0;    /* -E: echo "nonce=N\n" back on the callback */
static uint64_t n_echo = 0;

/* stats */
static int measuring = 0;
static uint64_t n_cycles, n_err_connect, n_err_reply, n_timeouts, n_stray_cb, n_err_other, n_cycles_total;
static char last_reply[160];
static uint32_t *lat_us;     /* latencies of cycles completed in window */
static size_t lat_cap = 16u * 1024 * 1024, lat_n = 0;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void die(const char *m) { perror(m); exit(2); }
static uint64_t mkdata(int idx, int kind) { return ((uint64_t)idx << 2) | (uint64_t)kind; }

static void ep_add(int fd, uint32_t ev, uint64_t data) {
    struct epoll_event e = {.events = ev, .data.u64 = data};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e) < 0) die("epoll_ctl add");
}

/* close removes the descriptor from epoll */
static void close_cfd(struct student *s) { if (s->cfd >= 0) close(s->cfd), s->cfd = -1; }
static void close_afd(struct student *s) { if (s->afd >= 0) close(s->afd), s->afd = -1; }

static void start_cycle(struct student *s);

static void fail_cycle(struct student *s, uint64_t *counter) {
    if (measuring) (*counter)++;
    close_cfd(s), close_afd(s), start_cycle(s);
}

/* cfd is registered once, edge-triggered, for IN|OUT|RDHUP: no epoll_ctl MOD
 * per cycle.  Returns 1 if the request went out, 0 if the socket is not
 * writable yet (wait for EPOLLOUT), -1 on a hard error (caller handles it;
 * never recurses into start_cycle from here). */
static int try_send(struct student *s) {
    ssize_t r = send(s->cfd, s->req, s->reqlen, MSG_NOSIGNAL);
    if (r == s->reqlen) { s->sent = 1; return 1; }
    if (r < 0 && (errno == EAGAIN || errno == ENOTCONN)) return 0;
    return -1;
}

/* a failed connect: close and retry ~10 ms later from the timeout sweep,
 * instead of spinning (e.g. registry down, EADDRNOTAVAIL) */
static void connect_failed(struct student *s) {
    if (measuring) n_err_connect++;
    close_cfd(s), close_afd(s);
    s->t0 = now_ns() - cycle_timeout_ns + 10000000ULL;
}

static void start_cycle(struct student *s) {
    s->sent = s->reply_done = s->cb_done = s->reply_ok = s->rlen = s->cblen = s->echoed = 0;
    s->t0 = now_ns();
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    s->cfd = fd;
    struct sockaddr_in from = {.sin_family = AF_INET, .sin_addr.s_addr = s->src};
    if (nsrc && bind(fd, (struct sockaddr *)&from, sizeof from) < 0) die("bind source");
    int r = connect(fd, (struct sockaddr *)&regaddr, sizeof regaddr);
    if (r == 0 || errno == EINPROGRESS) {
        ep_add(fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, mkdata(s->idx, KIND_CLIENT));
        /* on loopback the handshake has usually completed by now */
        if (try_send(s) < 0) connect_failed(s);
    } else {
        connect_failed(s);
    }
}

static void maybe_complete(struct student *s) {
    if (!(s->reply_done && s->cb_done)) return;
    uint64_t lat = now_ns() - s->t0;
    n_cycles_total++;
    if (measuring) {
        if (s->reply_ok) {
            n_cycles++;
            if (lat_n < lat_cap) lat_us[lat_n++] = (uint32_t)(lat / 1000);
        } else {
            n_err_reply++;
        }
    }
    start_cycle(s);
}

static void on_client(struct student *s, uint32_t ev) {
    if (s->cfd < 0) return;
    if (!s->sent) {
        if (ev & (EPOLLERR | EPOLLHUP)) { connect_failed(s); return; }
        if (ev & EPOLLOUT) {
            int r = try_send(s);
            if (r < 0) { connect_failed(s); return; }
            if (r == 0) return;
        } else {
            return;
        }
    }
    /* edge-triggered: read until EAGAIN or EOF */
    for (;;) {
        char buf[256];
        ssize_t r = recv(s->cfd, buf, sizeof buf, 0);
        if (r > 0) {
            int room = (int)sizeof(s->rbuf) - 1 - s->rlen;
            if (r > room) r = room;
            memcpy(s->rbuf + s->rlen, buf, r);
            s->rlen += r;
            continue;
        }
        if (r == 0) {  /* EOF: registry closed after its reply */
            s->rbuf[s->rlen] = 0;
            s->reply_ok = (s->rlen >= 2 && s->rbuf[0] == 'O' && s->rbuf[1] == 'K');
            if (measuring && (!s->reply_ok || !last_reply[0])) {
                int k = 0;
                for (int q = 0; q < s->rlen && k < 150; q++) {
                    char ch = s->rbuf[q];
                    last_reply[k++] = (ch >= 32 && ch < 127 && ch != '"' && ch != '\\') ? ch : '_';
                }
                last_reply[k] = 0;
            }
            close_cfd(s);
            s->reply_done = 1;
            maybe_complete(s);
            return;
        }
        if (errno == EAGAIN) return;
        if (errno == EINTR) continue;
        fail_cycle(s, &n_err_reply);  /* ECONNRESET etc. */
        return;
    }
}

static int drain_cb(struct student *s);

static void on_listen(struct student *s) {
    for (int i = 0; i < 4; i++) {
        int fd = accept4(s->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) return;
        if (s->afd >= 0 || s->cb_done) {  /* a callback we are not waiting for */
            if (measuring) n_stray_cb++;
            close(fd);
            continue;
        }
        s->afd = fd;
        /* the greeting (and often the FIN) is usually there already */
        int r = drain_cb(s);
        if (r == 0) ep_add(fd, EPOLLIN | EPOLLRDHUP | EPOLLET, mkdata(s->idx, KIND_CB));
        if (r != 0) return;  /* completed (maybe a new cycle started) or failed */
    }
}

/* returns 0: need more, 1: EOF reached (cycle may complete), -1: failed */
static int drain_cb(struct student *s) {
    for (;;) {
        char buf[256];
        ssize_t r = recv(s->afd, buf, sizeof buf, 0);
        if (r > 0) {   /* greeting bytes */
            if (echo_mode && !s->echoed) {
                int room = (int)sizeof(s->cbuf) - 1 - s->cblen;
                int k = r < room ? (int)r : room;
                memcpy(s->cbuf + s->cblen, buf, k);
                s->cblen += k;
                s->cbuf[s->cblen] = 0;
                char *nl = strchr(s->cbuf, '\n');
                char *nn = strstr(s->cbuf, "nonce=");
                if (nn && (nl || s->cblen >= (int)sizeof(s->cbuf) - 1)) {
                    char out[96];
                    int j = 0;
                    while (nn[j] && nn[j] != ' ' && nn[j] != '\n' && nn[j] != '\r' && j < 80) j++;
                    int ol = snprintf(out, sizeof out, "%.*s\n", j, nn);
                    send(s->afd, out, ol, MSG_NOSIGNAL);
                    s->echoed = 1;
                    if (measuring) n_echo++;
                }
            }
            continue;
        }
        if (r == 0) {
            close_afd(s);
            s->cb_done = 1;
            maybe_complete(s);
            return 1;
        }
        if (errno == EAGAIN) return 0;
        if (errno == EINTR) continue;
        close_afd(s);   /* reset on callback: treat as error */
        fail_cycle(s, &n_err_other);
        return -1;
    }
}

static void on_cb(struct student *s, uint32_t ev) {
    (void)ev;
    if (s->afd < 0) return;
    drain_cb(s);
}

/* ---- /proc helpers ---- */
static int read_proc_cpu(int pid, uint64_t *ticks) {
    char path[64], buf[4096];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p) return -1;
    /* fields after ')' : state(3) ppid(4) ... utime(14) stime(15) */
    unsigned long long ut = 0, stt = 0;
    int field = 2;
    char *tok = strtok(p + 1, " ");
    while (tok) {
        field++;
        if (field == 14) ut = strtoull(tok, NULL, 10);
        if (field == 15) { stt = strtoull(tok, NULL, 10); break; }
        tok = strtok(NULL, " ");
    }
    *ticks = ut + stt;
    return 0;
}

static long read_status_kb(int pid, const char *key) {
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    long v = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, kl) == 0 && line[kl] == ':') { v = atol(line + kl + 1); break; }
    }
    fclose(f);
    return v;
}

#define MAXCPU 8
struct cpustat { unsigned long long busy[MAXCPU], total[MAXCPU], steal[MAXCPU]; int n; };
static void read_cpustat(struct cpustat *c) {
    FILE *f = fopen("/proc/stat", "r");
    char line[512];
    c->n = 0;
    if (!f) return;
    while (fgets(line, sizeof line, f)) {
        int id;
        unsigned long long u, ni, sy, idle, io, irq, sirq, steal;
        if (sscanf(line, "cpu%d %llu %llu %llu %llu %llu %llu %llu %llu", &id, &u, &ni, &sy, &idle,
                   &io, &irq, &sirq, &steal) == 9 && id < MAXCPU) {
            c->busy[id] = u + ni + sy + irq + sirq;
            c->steal[id] = steal;
            c->total[id] = u + ni + sy + idle + io + irq + sirq + steal;
            if (id + 1 > c->n) c->n = id + 1;
        }
    }
    fclose(f);
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}
static double pct(double p) {
    if (lat_n == 0) return -1;
    size_t i = (size_t)(p / 100.0 * (double)(lat_n - 1) + 0.5);
    if (i >= lat_n) i = lat_n - 1;
    return lat_us[i] / 1000.0;  /* ms */
}

#define MAXPIDS 64
static int server_pids[MAXPIDS];
static int n_server_pids = 0;

/* summed over every server process; -1 if one of them is gone */
static int read_servers_cpu(uint64_t *ticks) {
    uint64_t t;
    *ticks = 0;
    for (int i = 0; i < n_server_pids; i++) {
        if (read_proc_cpu(server_pids[i], &t) != 0) return -1;
        *ticks += t;
    }
    return 0;
}
static long read_servers_kb(const char *key) {
    long sum = 0, v;
    for (int i = 0; i < n_server_pids; i++)
        if ((v = read_status_kb(server_pids[i], key)) < 0) return -1; else sum += v;
    return sum;
}

static volatile sig_atomic_t stop_flag = 0;
static void on_sig(int sig) { (void)sig; stop_flag = 1; }

int main(int argc, char **argv) {
    int regport = 19000, conc = 1, base = 20000, server_pid = 0;
    double warmup = 1.0, dur = 5.0;
    const char *label = "";
    int opt;
    while ((opt = getopt(argc, argv, "p:c:b:w:d:t:s:l:x:Em:")) != -1) {
        switch (opt) {
        case 'p': regport = atoi(optarg); break;
        case 'c': conc = atoi(optarg); break;
        case 'b': base = atoi(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 'd': dur = atof(optarg); break;
        case 't': cycle_timeout_ns = (uint64_t)atoll(optarg) * 1000000ULL; break;
        case 's': {
            char *save = NULL;
            for (char *tok = strtok_r(optarg, ",", &save); tok && n_server_pids < MAXPIDS;
                 tok = strtok_r(NULL, ",", &save))
                server_pids[n_server_pids++] = atoi(tok);
            server_pid = n_server_pids > 0;
            break;
        }
        case 'l': label = optarg; break;
        case 'x': req_suffix = optarg; break;
        case 'E': echo_mode = 1; break; case 'm': nsrc = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: %s -p REGPORT -c CONC [-b BASE] [-w WARMUP] [-d DUR] "
                            "[-t TIMEOUT_MS] [-s SERVER_PID] [-l LABEL]\n", argv[0]);
            return 2;
        }
    }
    if (conc < 1 || conc > MAXCONC) { fprintf(stderr, "bad conc\n"); return 2; }
    if (dur > 60 || warmup > 30) { fprintf(stderr, "duration bounded to 60 s\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGINT, on_sig);
    signal(SIGTERM, on_sig);
    lat_us = malloc(lat_cap * sizeof *lat_us);
    if (!lat_us) die("malloc");

    memset(&regaddr, 0, sizeof regaddr);
    regaddr.sin_family = AF_INET;
    regaddr.sin_port = htons(regport);
    regaddr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");

    for (int i = 0; i < conc; i++) {
        struct student *s = &st[i];
        s->idx = i;
        s->cfd = s->afd = -1;
        s->port = (uint16_t)(base + i);
        s->src = htonl(nsrc > 0 ? 0x7f000002u + (uint32_t)(i % nsrc) : INADDR_LOOPBACK);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(s->port),
                                .sin_addr.s_addr = s->src};
        if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0) die("bind student");
        if (listen(fd, 128) < 0) die("listen");
        s->lfd = fd;
        ep_add(fd, EPOLLIN, mkdata(i, KIND_LISTEN));
        char ip[INET_ADDRSTRLEN]; inet_ntop(AF_INET, &s->src, ip, sizeof ip);
        s->reqlen = snprintf(s->req, sizeof s->req, "%s:%u%s", ip, s->port, req_suffix);
    }

    uint64_t t_start = now_ns();
    uint64_t t_meas = t_start + (uint64_t)(warmup * 1e9);
    uint64_t t_end = t_meas + (uint64_t)(dur * 1e9);
    uint64_t hard_end = t_end + 2000000000ULL;
    for (int i = 0; i < conc; i++) start_cycle(&st[i]);

    struct rusage ru0, ru1;
    struct cpustat cs0, cs1;
    struct epoll_event evs[512];
    uint64_t srv0 = 0, srv1 = 0, last_sweep = t_start;
    int srv_ok = 0, meas_started = 0;

    while (!stop_flag) {
        uint64_t now = now_ns();
        if (!measuring && now >= t_meas && now < t_end) {
            measuring = 1;
            meas_started = 1;
            getrusage(RUSAGE_SELF, &ru0);
            if (server_pid) srv_ok = read_servers_cpu(&srv0) == 0;
            read_cpustat(&cs0);
            t_meas = now;  /* actual window start */
        }
        if (now >= t_end) break;
        if (now > hard_end) break;
        if (now - last_sweep > 50000000ULL) {  /* timeout sweep every 50 ms */
            last_sweep = now;
            for (int i = 0; i < conc; i++) {
                struct student *s = &st[i];
                if (now - s->t0 > cycle_timeout_ns) {
                    if (s->cfd < 0 && s->afd < 0 && !s->reply_done && !s->cb_done) {
                        start_cycle(s);  /* backoff after a failed connect */
                    } else {
                        fail_cycle(s, &n_timeouts);
                    }
                }
            }
        }
        int n = epoll_wait(epfd, evs, 512, 10);
        for (int i = 0; i < n; i++) {
            uint64_t d = evs[i].data.u64;
            struct student *s = &st[d >> 2];
            switch (d & 3) {
            case KIND_LISTEN: on_listen(s); break;
            case KIND_CLIENT: on_client(s, evs[i].events); break;
            case KIND_CB: on_cb(s, evs[i].events); break;
            }
        }
    }
    uint64_t t_stop = now_ns();
    getrusage(RUSAGE_SELF, &ru1);
    if (server_pid && srv_ok) srv_ok = read_servers_cpu(&srv1) == 0;
    read_cpustat(&cs1);
    long rss = server_pid ? read_servers_kb("VmRSS") : -1;
    long hwm = server_pid ? read_servers_kb("VmHWM") : -1;
    long thr = server_pid ? read_servers_kb("Threads") : -1;
    measuring = 0;

    double win = meas_started ? (t_stop - t_meas) / 1e9 : 0;
    double self_cpu = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                      (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
    long hz = sysconf(_SC_CLK_TCK);
    double srv_cpu = srv_ok ? (double)(srv1 - srv0) / hz : -1;

    qsort(lat_us, lat_n, sizeof *lat_us, cmp_u32);
    size_t slow_1s = 0;  /* cycles slower than 1 s: typically a dropped SYN (full backlog) */
    for (size_t i = lat_n; i > 0 && lat_us[i - 1] >= 1000000u; i--) slow_1s++;
    printf("{\"label\":\"%s\",\"conc\":%d,\"window_s\":%.3f,\"cycles\":%llu,\"rate\":%.1f,"
           "\"p50_ms\":%.3f,\"p90_ms\":%.3f,\"p99_ms\":%.3f,\"p999_ms\":%.3f,\"max_ms\":%.3f,\"slow_1s\":%zu,"
           "\"err_connect\":%llu,\"err_reply\":%llu,\"err_other\":%llu,\"timeouts\":%llu,\"stray_cb\":%llu,"
           "\"loadgen_cpu_pct\":%.1f,\"server_cpu_pct\":%.1f,\"server_rss_kb\":%ld,\"server_hwm_kb\":%ld,"
           "\"server_threads\":%ld,\"echoes\":%llu,\"reply_sample\":\"%s\"",
           label, conc, win, (unsigned long long)n_cycles, win > 0 ? n_cycles / win : 0.0,
           pct(50), pct(90), pct(99), pct(99.9), lat_n ? lat_us[lat_n - 1] / 1000.0 : -1.0, slow_1s,
           (unsigned long long)n_err_connect, (unsigned long long)n_err_reply,
           (unsigned long long)n_err_other, (unsigned long long)n_timeouts,
           (unsigned long long)n_stray_cb, win > 0 ? 100.0 * self_cpu / win : 0.0,
           srv_cpu >= 0 && win > 0 ? 100.0 * srv_cpu / win : -1.0, rss, hwm, thr,
           (unsigned long long)n_echo, last_reply);
    for (int c = 0; c < cs1.n && c < cs0.n; c++) {
        double tot = (double)(cs1.total[c] - cs0.total[c]);
        printf(",\"cpu%d_busy_pct\":%.1f,\"cpu%d_steal_pct\":%.1f", c,
               tot > 0 ? 100.0 * (cs1.busy[c] - cs0.busy[c]) / tot : -1.0, c,
               tot > 0 ? 100.0 * (cs1.steal[c] - cs0.steal[c]) / tot : -1.0);
    }
    printf("}\n");
    fflush(stdout);
    for (int i = 0; i < conc; i++) close_cfd(&st[i]), close_afd(&st[i]), close(st[i].lfd);
    return 0;
}
