/* Socket-level load-balancing for the node's own processes and its pods.
 *
 * Programs on the cgroup connect/sendmsg hooks rewrite a service address to
 * a backend before the packet exists, so a connection is translated once,
 * at connect(), instead of on every packet. A connected socket remembers
 * its frontend in weft_sock4_xlate, storage that lives and dies with the
 * socket, for getpeername() and recvmsg(); replies to unconnected UDP
 * sockets (recvmsg) are rewritten back using weft_sock4_revnat, keyed by
 * the socket and the backend it sent to.
 *
 * The hooks act in the node's network namespace and in those of the pods in
 * weft_sock4_pods (in the lab every node's programs share one cgroup, so
 * each must leave the others' pods alone). A pod the map does not know yet
 * still reaches every Service through the per-packet programs on its veth.
 */
#ifndef WEFT_SOCK_H
#define WEFT_SOCK_H

#include "common.h"

#define SOCK_REVNAT_MAP_SIZE 65536
#define SOCK_PODS_MAP_SIZE 65536
#define SOCK_FLOWS_MAP_SIZE 65536

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

/* What a connected socket was translated from. */
struct sock4_xlate {
	__be32 address;  /* the frontend the socket asked for */
	__be16 port;
	__u16 rev_nat_index;
	__be32 backend;  /* the backend it was given */
	__be16 backend_port;
	__u16 pad;
};

/* A pod of this node, by the cookie of its network namespace. */
struct sock4_pod {
	__be32 address; /* the pod's IPv4 address: the client for affinity and hashing */
	__u32 ep_id;    /* its host veth's ifindex, for flow events */
};

/* The backend an unconnected UDP socket's datagrams to a frontend go to, so
 * a flow stays on one backend as it would through connection tracking. */
struct sock4_flow_key {
	__u64 cookie;   /* bpf_get_socket_cookie() */
	__be32 address; /* the frontend */
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct sock4_flow {
	__u64 last_seen; /* bpf_ktime_get_ns() */
	__u32 backend_id;
	__u32 pad;
};

#ifndef WEFT_LAYOUT_PROBE
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__type(key, int);
	__type(value, struct sock4_xlate);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sock4_xlate SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u64);
	__type(value, struct sock4_pod);
	__uint(max_entries, SOCK_PODS_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sock4_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock4_flow_key);
	__type(value, struct sock4_flow);
	__uint(max_entries, SOCK_FLOWS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sock4_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct sock4_revnat_key);
	__type(value, struct sock4_revnat);
	__uint(max_entries, SOCK_REVNAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sock4_revnat SEC(".maps");
#endif

#endif
