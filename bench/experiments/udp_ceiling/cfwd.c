/*
 * The udp_dns ceiling experiment: a minimal UDP forwarder in C with goma-pt's
 * shape (one listening socket, one socket connected to the target per client
 * address, level-triggered epoll), to see what any forwarder can reach here.
 *
 *   cfwd LISTEN_PORT TARGET_PORT MODE      (127.0.0.1 both sides)
 *
 * MODE bits: 0 = per datagram, like nginx: recvfrom on the listening socket,
 * send on the session's, recv on the session's, sendto from the listening one;
 * 1 = recvmmsg (up to 64) on the listening socket; 2 = the replies of one
 * epoll round gathered and sent with sendmmsg from the listening socket.
 * MODE 3 is the fully batched forwarder. Sessions never end (an experiment).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_SESSIONS 8192
#define HASH_SLOTS 16384
#define BATCH 64
#define DATAGRAM_MAX 65536

struct session {
    struct sockaddr_in client;
    int fd;
};

static struct session sessions[MAX_SESSIONS];
static int nsessions;
static int slots[HASH_SLOTS]; /* session index + 1, 0 = empty */
static int listener, epfd, mode;
static struct sockaddr_in target;
static volatile sig_atomic_t stopping;

static char buf[DATAGRAM_MAX];
static char inbufs[BATCH][DATAGRAM_MAX];
static struct mmsghdr inmsgs[BATCH];
static struct iovec iniov[BATCH];
static struct sockaddr_in inaddrs[BATCH];
static char outbufs[BATCH][DATAGRAM_MAX];
static struct mmsghdr outmsgs[BATCH];
static struct iovec outiov[BATCH];
static struct sockaddr_in outaddrs[BATCH];
static int nout;
static unsigned long long forwarded, replied;

static unsigned slot_of(const struct sockaddr_in *a)
{
    return (a->sin_addr.s_addr * 2654435761u ^ a->sin_port * 40503u) & (HASH_SLOTS - 1);
}

static int find_session(const struct sockaddr_in *a)
{
    for (unsigned h = slot_of(a);; h = (h + 1) & (HASH_SLOTS - 1)) {
        int i = slots[h] - 1;
        if (i < 0)
            return -1;
        if (sessions[i].client.sin_addr.s_addr == a->sin_addr.s_addr &&
            sessions[i].client.sin_port == a->sin_port)
            return i;
    }
}

static int new_session(const struct sockaddr_in *a)
{
    if (nsessions >= MAX_SESSIONS)
        return -1;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0) {
        close(fd);
        return -1;
    }
    int i = nsessions++;
    sessions[i].client = *a;
    sessions[i].fd = fd;
    unsigned h = slot_of(a);
    while (slots[h])
        h = (h + 1) & (HASH_SLOTS - 1);
    slots[h] = i + 1;
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = i + 1};
    epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &e);
    return i;
}

static void to_target(const struct sockaddr_in *client, const char *data, size_t n)
{
    int i = find_session(client);
    if (i < 0)
        i = new_session(client);
    if (i >= 0 && send(sessions[i].fd, data, n, 0) >= 0)
        forwarded++;
}

static void flush_replies(void)
{
    int off = 0;
    while (off < nout) {
        int r = sendmmsg(listener, outmsgs + off, nout - off, 0);
        if (r < 0 && errno == EINTR)
            continue;
        off += r > 0 ? r : 1; /* a failed datagram is dropped */
    }
    nout = 0;
}

static void listener_readable(void)
{
    if (mode & 1) {
        for (int k = 0; k < BATCH; k++)
            inmsgs[k].msg_hdr.msg_namelen = sizeof inaddrs[k];
        int r = recvmmsg(listener, inmsgs, BATCH, MSG_DONTWAIT, NULL);
        for (int k = 0; k < r; k++)
            to_target(&inaddrs[k], inbufs[k], inmsgs[k].msg_len);
        return;
    }
    for (int k = 0; k < BATCH; k++) {
        struct sockaddr_in a;
        socklen_t alen = sizeof a;
        ssize_t n = recvfrom(listener, buf, sizeof buf, 0, (struct sockaddr *)&a, &alen);
        if (n < 0)
            return;
        to_target(&a, buf, n);
    }
}

static void session_readable(struct session *s)
{
    for (int k = 0; k < BATCH; k++) {
        if (mode & 2) {
            if (nout == BATCH)
                flush_replies();
            ssize_t n = recv(s->fd, outbufs[nout], DATAGRAM_MAX, 0);
            if (n < 0) {
                if (errno == ECONNREFUSED)
                    continue;
                return;
            }
            outiov[nout].iov_len = n;
            outaddrs[nout++] = s->client;
        } else {
            ssize_t n = recv(s->fd, buf, sizeof buf, 0);
            if (n < 0) {
                if (errno == ECONNREFUSED)
                    continue;
                return;
            }
            sendto(listener, buf, n, 0, (struct sockaddr *)&s->client, sizeof s->client);
        }
        replied++;
    }
}

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: cfwd LISTEN_PORT TARGET_PORT MODE\n");
        return 2;
    }
    mode = atoi(argv[3]);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    struct sockaddr_in here = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &here.sin_addr);
    target = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, "127.0.0.1", &target.sin_addr);
    listener = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (bind(listener, (struct sockaddr *)&here, sizeof here) < 0) {
        perror("bind");
        return 1;
    }
    for (int k = 0; k < BATCH; k++) {
        iniov[k] = (struct iovec){inbufs[k], DATAGRAM_MAX};
        inmsgs[k].msg_hdr = (struct msghdr){
            .msg_name = &inaddrs[k], .msg_namelen = sizeof inaddrs[k],
            .msg_iov = &iniov[k], .msg_iovlen = 1};
        outiov[k] = (struct iovec){outbufs[k], 0};
        outmsgs[k].msg_hdr = (struct msghdr){
            .msg_name = &outaddrs[k], .msg_namelen = sizeof outaddrs[k],
            .msg_iov = &outiov[k], .msg_iovlen = 1};
    }
    epfd = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.u32 = 0};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &e);
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(epfd, events, 256, 1000);
        if (n < 0 && errno != EINTR)
            break;
        for (int j = 0; j < n; j++) {
            if (events[j].data.u32 == 0)
                listener_readable();
            else
                session_readable(&sessions[events[j].data.u32 - 1]);
        }
        if (nout)
            flush_replies();
    }
    fprintf(stderr, "cfwd mode %d: %llu forwarded, %llu replies, %d sessions\n", mode,
            forwarded, replied, nsessions);
    return 0;
}
