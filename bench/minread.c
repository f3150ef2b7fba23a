/*
 * minread - the smallest AoE reader there can be, as a yardstick for bench/run.py.
 *
 * One AF_PACKET socket; WINDOW READ SECTORS EXT requests of SPF sectors in flight,
 * the next one sent as each answer arrives (one send and one recv per frame);
 * data is looked at for errors and thrown away.  No retransmission: a lost frame
 * ends the run (exit 1), which on a veth pair does not happen.  Prints MB/s.
 *
 *   cc -O2 -o minread bench/minread.c
 *   minread IFACE TARGET_MAC SHELF SLOT SECTORS SPF WINDOW
 */
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ETH_P_AOE 0x88A2

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Ask for the sectors from *next on (at most spf); the tag is the frame's index, bit 31 set. */
static int send_read(int fd, uint8_t *req, uint64_t *next, uint64_t total, unsigned spf)
{
    uint32_t tag = 0x80000000u | (uint32_t)(*next / spf & 0x7FFFFFFF);
    uint64_t n = total - *next < spf ? total - *next : spf;
    req[20] = (uint8_t)(tag >> 24), req[21] = (uint8_t)(tag >> 16), req[22] = (uint8_t)(tag >> 8);
    req[23] = (uint8_t)tag, req[26] = (uint8_t)n;
    for (int i = 0; i < 6; i++)
        req[28 + i] = (uint8_t)(*next >> (8 * i));
    if (send(fd, req, 60, 0) < 0) {
        perror("minread: send");
        return -1;
    }
    *next += n;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: minread IFACE TARGET_MAC SHELF SLOT SECTORS SPF WINDOW\n");
        return 2;
    }
    unsigned mac[6];
    if (sscanf(argv[2], "%x:%x:%x:%x:%x:%x", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) != 6) {
        fprintf(stderr, "minread: bad MAC %s\n", argv[2]);
        return 2;
    }
    unsigned shelf = (unsigned)atoi(argv[3]), slot = (unsigned)atoi(argv[4]);
    uint64_t total = strtoull(argv[5], NULL, 0);
    unsigned spf = (unsigned)atoi(argv[6]), window = (unsigned)atoi(argv[7]);

    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_AOE));
    struct sockaddr_ll sll = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_AOE),
                               .sll_ifindex = (int)if_nametoindex(argv[1]) };
    struct ifreq ifr = { 0 };
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", argv[1]);
    int bytes = 4 << 20;
    struct timeval tv = { 2, 0 };
    if (fd < 0 || bind(fd, (struct sockaddr *)&sll, sizeof(sll)) < 0 || ioctl(fd, SIOCGIFHWADDR, &ifr) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes)) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0) {
        perror("minread: socket");
        return 1;
    }

    uint8_t req[60] = { 0 }, buf[16384];
    for (int i = 0; i < 6; i++)
        req[i] = (uint8_t)mac[i];
    memcpy(req + 6, ifr.ifr_hwaddr.sa_data, 6);
    req[12] = ETH_P_AOE >> 8, req[13] = ETH_P_AOE & 0xFF, req[14] = 0x10;
    req[16] = (uint8_t)(shelf >> 8), req[17] = (uint8_t)shelf, req[18] = (uint8_t)slot;
    req[24] = 0x40, req[27] = 0x24;         /* LBA48, READ SECTORS EXT */

    uint64_t next = 0, answered = 0, frames = (total + spf - 1) / spf;
    double start = now();
    for (unsigned w = 0; w < window && next < total; w++)
        if (send_read(fd, req, &next, total, spf) < 0)
            return 1;
    while (answered < frames) {
        ssize_t got = recv(fd, buf, sizeof(buf), 0);
        if (got < 0) {
            fprintf(stderr, "minread: no answer after %llu of %llu frames\n", (unsigned long long)answered,
                    (unsigned long long)frames);
            return 1;
        }
        if (got < 36 || buf[12] != req[12] || buf[13] != req[13] || !(buf[14] & 0x08) ||
            (buf[16] << 8 | buf[17]) != (int)shelf || buf[18] != slot || !(buf[20] & 0x80))
            continue;
        if (buf[14] & 0x04 || buf[27] & 0x01) {
            fprintf(stderr, "minread: the target reported an error\n");
            return 1;
        }
        answered++;
        if (next < total && send_read(fd, req, &next, total, spf) < 0)
            return 1;
    }
    double secs = now() - start;
    printf("read %llu sectors in %.2f s (%.1f MB/s, minimal C reader)\n", (unsigned long long)total, secs,
           (double)total * 512 / secs / 1e6);
    return 0;
}
