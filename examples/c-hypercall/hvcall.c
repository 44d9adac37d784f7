/* hvcall.c: hypercalls through the pviommu hypercall page, with libc only (frames: docs/transports.md).
 * usage: PVIOMMU_TOKEN=<partition token> hvcall SOCKET [DOMAIN_ID]
 * Prints GetIommuCapabilities' status and iommu_cap, then FlushDeviceDomain(S1 DOMAIN_ID)'s status. */
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define U64(p, off) (*(volatile uint64_t *)((p) + (off)))
#define U32(p, off) (*(volatile uint32_t *)((p) + (off)))

/* One call: input page, length, input value, then seq_request; ring if the hypervisor sleeps. */
static uint64_t hvcall(char *page, int bell, uint64_t value, const void *in, uint32_t len) {
    uint64_t seq = U64(page, 16) + 1, one = 1;
    memcpy(page + 4096, in, len);
    U32(page, 48) = len;
    U64(page, 32) = value;
    __atomic_store_n((uint64_t *)(page + 16), seq, __ATOMIC_SEQ_CST);
    if (U32(page, 64) == 1 && write(bell, &one, sizeof one) != sizeof one) return ~0ull;
    while (U64(page, 24) != seq) {
        if (U32(page, 64) == 2) return ~0ull; /* closed (partition reset or destroyed) */
        sched_yield();
    }
    return U64(page, 40); /* result value: status bits 0-15, reps completed 32-43 */
}

int main(int argc, char **argv) {
    const char *token = getenv("PVIOMMU_TOKEN");
    if (argc < 2 || !token) { fprintf(stderr, "usage: PVIOMMU_TOKEN=... %s SOCKET [DOMAIN_ID]\n", argv[0]); return 2; }
    int s = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa)) { perror("connect"); return 1; }
    char req[1024], reply[4096] = {0}, cbuf[CMSG_SPACE(3 * sizeof(int))];
    int n = snprintf(req, sizeof req, "{\"token\": \"%s\", \"kind\": \"hypercall_page\"}\n", token);
    if (write(s, req, n) != n) return 1;
    struct iovec iov = {reply, sizeof reply - 1};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    if (recvmsg(s, &msg, 0) <= 0 || !strstr(reply, "\"ok\": true") || !CMSG_FIRSTHDR(&msg)) {
        fprintf(stderr, "refused: %s", reply);
        return 1;
    }
    int *fds = (int *)CMSG_DATA(CMSG_FIRSTHDR(&msg)); /* the page, its request and completion doorbells */
    char *page = mmap(NULL, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
    if (page == MAP_FAILED || U64(page, 0) != 0x4547415043485650ull) { fprintf(stderr, "no hypercall page\n"); return 1; }
    uint64_t caps_in[2] = {~0ull, 0}; /* HV_PARTITION_ID_SELF, reserved */
    uint64_t r = hvcall(page, fds[1], 0x0125, caps_in, sizeof caps_in);
    printf("GetIommuCapabilities status=0x%04x iommu_cap=0x%llx\n", (unsigned)(r & 0xffff),
           (unsigned long long)U64(page, 8192 + 8));
    if (argc > 2) { /* hv_input_device_domain {SELF, vtl 0, type S1 | id << 32}, u32 flags, u32 reserved */
        uint64_t flush_in[4] = {~0ull, 0, 1 | strtoull(argv[2], NULL, 0) << 32, 0};
        r = hvcall(page, fds[1], 0x00D0, flush_in, sizeof flush_in);
        printf("FlushDeviceDomain status=0x%04x\n", (unsigned)(r & 0xffff));
    }
    close(s); /* ends the session */
    return 0;
}
