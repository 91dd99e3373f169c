/* Service load-balancing maps: frontends, backends and reverse NAT.
 *
 * A service frontend (address, port, protocol) owns one master entry at
 * backend_slot 0, whose `count` says how many slots follow, and one entry per
 * slot 1..=count naming a backend id. Userspace writes new slots before the
 * master and removes stale ones after, so a reader never sees a slot that is
 * not yet written. Backends are shared by id; a frontend's rev_nat_index
 * names the address replies must appear to come from.
 */
#ifndef WEFT_LB_H
#define WEFT_LB_H

#include "common.h"

#define LB_SVC_MAP_SIZE 65536
#define LB_BACKEND_MAP_SIZE 65536
#define LB_REVNAT_MAP_SIZE 65536

/* lb4_service.flags */
#define SVC_FLAG_CLUSTER_IP (1 << 0)
#define SVC_FLAG_NODE_PORT (1 << 1)
#define SVC_FLAG_EXTERNAL_IP (1 << 2)
#define SVC_FLAG_LOAD_BALANCER (1 << 3)
#define SVC_FLAG_HOST_PORT (1 << 4)

/* lb4_backend.flags */
#define BACKEND_FLAG_TERMINATING (1 << 0)

struct lb4_key {
	__be32 address;     /* frontend IPv4, network order */
	__be16 dport;       /* frontend port, network order */
	__u16 backend_slot; /* 0: the master entry; 1..=count: backends */
	__u8 proto;         /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 scope;         /* reserved for traffic-policy scopes; 0 */
	__u8 pad[2];
};

struct lb4_service {
	__u32 backend_id;   /* slot entries: the backend; master: 0 */
	__u16 count;        /* master: number of slots to choose from */
	__u16 rev_nat_index;
	__u8 flags;         /* SVC_FLAG_* */
	__u8 algorithm;     /* 0: random */
	__u16 pad;
};

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;         /* BACKEND_FLAG_* */
};

struct lb4_reverse_nat {
	__be32 address;
	__be16 port;
	__u16 pad;
};

#ifndef WEFT_LAYOUT_PROBE
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, LB_SVC_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb4_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, LB_REVNAT_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb4_reverse_nat SEC(".maps");

static __always_inline struct lb4_service *lb4_lookup_service(__be32 addr, __be16 port, __u8 proto)
{
	struct lb4_key key = {
		.address = addr,
		.dport = port,
		.backend_slot = 0,
		.proto = proto,
	};

	return bpf_map_lookup_elem(&weft_lb4_services, &key);
}

/* Picks a backend slot at random; returns the backend id, or 0 when the
 * service has none. */
static __always_inline __u32 lb4_select_backend(__be32 addr, __be16 port, __u8 proto,
						const struct lb4_service *svc)
{
	struct lb4_key key = {
		.address = addr,
		.dport = port,
		.proto = proto,
	};
	struct lb4_service *slot;

	if (svc->count == 0)
		return 0;
	key.backend_slot = (bpf_get_prandom_u32() % svc->count) + 1;
	slot = bpf_map_lookup_elem(&weft_lb4_services, &key);
	return slot ? slot->backend_id : 0;
}
#endif

#endif
