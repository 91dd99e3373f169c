/* Service load-balancing maps: frontends, backends, reverse NAT, Maglev
 * tables and ClientIP affinity.
 *
 * A service frontend (address, port, protocol) owns one master entry at
 * backend_slot 0, whose `count` says how many slots follow, and one entry per
 * slot 1..=count naming a backend id. Userspace writes new slots before the
 * master and removes stale ones after, so a reader never sees a slot that is
 * not yet written. Backends are shared by id; a frontend's rev_nat_index
 * names it in the reverse-NAT, Maglev and affinity maps.
 *
 * A frontend may have a second entry, at scope LB_SCOPE_INTERNAL, with its
 * own rev_nat_index, slots and Maglev table: the backends for clients inside
 * the cluster where they differ from those for traffic from outside (an
 * externalTrafficPolicy: Local Service with endpoints on other nodes, which
 * kube-proxy, since 1.24, sends internal traffic to as if the policy were
 * Cluster). Every lookup starts at scope LB_SCOPE_EXTERNAL; its master entry
 * says with SVC_FLAG2_TWO_SCOPES that internal clients look further.
 */
#ifndef WEFT_LB_H
#define WEFT_LB_H

#include "common.h"

#define LB_SVC_MAP_SIZE 65536
#define LB_BACKEND_MAP_SIZE 65536
#define LB_REVNAT_MAP_SIZE 65536
#define LB_MAGLEV_MAP_SIZE 65536
#define LB_AFFINITY_MAP_SIZE 65536

/* lb4_service.flags */
#define SVC_FLAG_CLUSTER_IP (1 << 0)
#define SVC_FLAG_NODE_PORT (1 << 1)
#define SVC_FLAG_EXTERNAL_IP (1 << 2)
#define SVC_FLAG_LOAD_BALANCER (1 << 3)
#define SVC_FLAG_HOST_PORT (1 << 4)
#define SVC_FLAG_AFFINITY (1 << 5) /* sessionAffinity: ClientIP */
/* No backend is ready: the slots hold the serving terminating ones, which
 * then take new connections (kube-proxy's fallback, KEP-1669). */
#define SVC_FLAG_TERMINATING_ONLY (1 << 6)

/* lb4_service.flags2 (flags has no bit left) */
/* Internal clients have their own entry at LB_SCOPE_INTERNAL. */
#define SVC_FLAG2_TWO_SCOPES (1 << 0)
/* A Local traffic policy leaves this entry no backend while the Service
 * has endpoints on other nodes: a packet is dropped, as kube-proxy drops
 * it ("has no local endpoints"), not rejected as for a Service with no
 * endpoints at all. */
#define SVC_FLAG2_ENDPOINTS_ELSEWHERE (1 << 1)

/* lb4_key.scope */
#define LB_SCOPE_EXTERNAL 0 /* every frontend's entry; the only one for outside traffic */
#define LB_SCOPE_INTERNAL 1 /* with SVC_FLAG2_TWO_SCOPES: clients inside the cluster */
/* Frontends that take traffic arriving from outside the node. */
#define SVC_FLAGS_EXTERNAL (SVC_FLAG_NODE_PORT | SVC_FLAG_EXTERNAL_IP | SVC_FLAG_LOAD_BALANCER | SVC_FLAG_HOST_PORT)

/* lb4_service.algorithm */
#define LB_ALG_RANDOM 0
#define LB_ALG_MAGLEV 1

/* lb4_backend.flags */
#define BACKEND_FLAG_TERMINATING (1 << 0)
#define BACKEND_FLAG_LOCAL (1 << 1) /* the backend runs on this node */

#define MAGLEV_BLOCK 32

struct lb4_key {
	__be32 address;     /* frontend IPv4, network order */
	__be16 dport;       /* frontend port, network order */
	__u16 backend_slot; /* 0: the master entry; 1..=count: backends */
	__u8 proto;         /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 scope;         /* LB_SCOPE_* */
	__u8 pad[2];
};

struct lb4_service {
	__u32 backend_id;   /* slot entries: the backend; master: 0 */
	__u16 count;        /* master: number of slots to choose from */
	__u16 rev_nat_index;
	__u8 flags;         /* SVC_FLAG_* */
	__u8 algorithm;     /* LB_ALG_* */
	__u8 flags2;        /* SVC_FLAG2_* */
	__u8 pad;
	__u32 affinity_timeout; /* seconds, with SVC_FLAG_AFFINITY */
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

/* A Maglev lookup table is CFG_MAGLEV_M backend ids, stored in blocks of
 * MAGLEV_BLOCK so one hash entry serves many slots. */
struct lb4_maglev_key {
	__u16 rev_nat_index;
	__u16 pad;
	__u32 block;
};

struct lb4_maglev_block {
	__u32 backend_ids[MAGLEV_BLOCK];
};

struct lb4_affinity_key {
	__be32 client;
	__u16 rev_nat_index;
	__u16 pad;
};

struct lb4_affinity {
	__u64 last_used; /* bpf_ktime_get_ns() */
	__u32 backend_id;
	__u32 pad;
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_maglev_key);
	__type(value, struct lb4_maglev_block);
	__uint(max_entries, LB_MAGLEV_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb4_maglev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb4_affinity);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_lb4_affinity SEC(".maps");

/* The master entry of the frontend `key` names (address, port, protocol)
 * for a client of `scope`. On return key->scope is the scope of the entry
 * found, which its slots share. An internal entry missing while the
 * external one says there is one (a moment of an update) leaves the
 * external one in charge. */
static __always_inline struct lb4_service *lb4_lookup_service(struct lb4_key *key, __u8 scope)
{
	struct lb4_service *svc, *internal;

	key->backend_slot = 0;
	key->scope = LB_SCOPE_EXTERNAL;
	svc = bpf_map_lookup_elem(&weft_lb4_services, key);
	if (!svc || scope != LB_SCOPE_INTERNAL || !(svc->flags2 & SVC_FLAG2_TWO_SCOPES))
		return svc;
	key->scope = LB_SCOPE_INTERNAL;
	internal = bpf_map_lookup_elem(&weft_lb4_services, key);
	if (internal)
		return internal;
	key->scope = LB_SCOPE_EXTERNAL;
	return svc;
}

/* A backend that may take a new connection of a frontend with `svc_flags`:
 * a terminating one only while the frontend has nothing else. */
static __always_inline struct lb4_backend *lb4_usable_backend(__u8 svc_flags, __u32 id)
{
	struct lb4_backend *be;

	if (!id)
		return NULL;
	be = bpf_map_lookup_elem(&weft_lb4_backends, &id);
	if (!be)
		return NULL;
	if ((be->flags & BACKEND_FLAG_TERMINATING) && !(svc_flags & SVC_FLAG_TERMINATING_ONLY))
		return NULL;
	return be;
}

static __always_inline __u32 lb4_select_random(const struct lb4_key *front, __u16 count)
{
	struct lb4_key key = *front;
	struct lb4_service *slot;

	if (count == 0)
		return 0;
	key.backend_slot = (bpf_get_prandom_u32() % count) + 1;
	slot = bpf_map_lookup_elem(&weft_lb4_services, &key);
	return slot ? slot->backend_id : 0;
}

/* The Maglev table's choice for a flow hash. */
static __always_inline __u32 lb4_select_maglev(__u16 rev_nat_index, __u32 hash)
{
	struct lb4_maglev_key key = { .rev_nat_index = rev_nat_index };
	struct lb4_maglev_block *block;
	__u32 index;

	if (CFG_MAGLEV_M == 0)
		return 0;
	index = hash % CFG_MAGLEV_M;
	key.block = index / MAGLEV_BLOCK;
	block = bpf_map_lookup_elem(&weft_lb4_maglev, &key);
	if (!block)
		return 0;
	return block->backend_ids[index & (MAGLEV_BLOCK - 1)];
}

/* Chooses the backend for a new connection of `svc` (found at `front` by
 * lb4_lookup_service) from `client`: the client's affine backend while it
 * is valid, else by the frontend's algorithm. Returns 0 when there is none. */
static __always_inline __u32 lb4_select(const struct lb4_key *front, const struct lb4_service *svc,
					__be32 client, __u32 flow_hash, __u64 now)
{
	struct lb4_affinity_key akey = { .client = client, .rev_nat_index = svc->rev_nat_index };
	struct lb4_affinity *aff, new_aff = {};
	__u32 id = 0;

	if (svc->flags & SVC_FLAG_AFFINITY) {
		aff = bpf_map_lookup_elem(&weft_lb4_affinity, &akey);
		if (aff && now - aff->last_used <= (__u64)svc->affinity_timeout * 1000000000ULL &&
		    lb4_usable_backend(svc->flags, aff->backend_id)) {
			aff->last_used = now;
			return aff->backend_id;
		}
	}
	if (svc->algorithm == LB_ALG_MAGLEV)
		id = lb4_select_maglev(svc->rev_nat_index, flow_hash);
	if (!lb4_usable_backend(svc->flags, id))
		id = lb4_select_random(front, svc->count);
	if (id && (svc->flags & SVC_FLAG_AFFINITY)) {
		new_aff.last_used = now;
		new_aff.backend_id = id;
		bpf_map_update_elem(&weft_lb4_affinity, &akey, &new_aff, BPF_ANY);
	}
	return id;
}
#endif

#endif
