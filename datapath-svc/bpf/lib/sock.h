/* Socket-level load-balancing for the node's own processes.
 *
 * Programs on the cgroup connect/sendmsg hooks rewrite a service address to
 * a backend before the packet exists, so the node's processes reach every
 * Service without any per-packet work. Replies to unconnected UDP sockets
 * (recvmsg) and getpeername() are rewritten back using weft_sock4_revnat,
 * keyed by the socket and the backend it was sent to.
 */
#ifndef WEFT_SOCK_H
#define WEFT_SOCK_H

#include "common.h"

#define SOCK_REVNAT_MAP_SIZE 65536

struct sock4_revnat_key {
	__u64 cookie;    /* bpf_get_socket_cookie() */
	__be32 address;  /* the backend */
	__be16 port;
	__u16 pad;
};

struct sock4_revnat {
	__be32 address;  /* the frontend the socket asked for */
	__be16 port;
	__u16 rev_nat_index;
};

#ifndef WEFT_LAYOUT_PROBE
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock4_revnat_key);
	__type(value, struct sock4_revnat);
	__uint(max_entries, SOCK_REVNAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sock4_revnat SEC(".maps");
#endif

#endif
