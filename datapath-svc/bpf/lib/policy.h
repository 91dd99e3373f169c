/* Identity-based network policy.
 *
 * weft_ipcache maps addresses to security identities: pod /32s and node
 * addresses; no match is `world`. weft_ipcache_cidr maps addresses to the
 * CIDR identities of ipBlock rules (longest prefix wins, so an `except` is
 * a more specific prefix whose identity the rule does not allow). A peer is
 * allowed by its identity or by its CIDR identity: an ipBlock covers every
 * address in it, pods' included, as Kubernetes defines it. weft_policy holds, per endpoint (the pod's host veth
 * ifindex) and direction, which peer identities may reach which protocol and
 * port: an LPM trie whose key ends with the port, so a port range is a
 * handful of prefixes, "any port" stops the prefix after the protocol and
 * "any protocol" after the direction. Identity 0 in an entry means any
 * peer. weft_endpoints says which directions of an endpoint are isolated
 * (selected by a policy); the others allow everything.
 *
 * weft_policy_ct remembers allowed connections by their tuple in the
 * direction they were opened, so their replies pass whatever the policy of
 * the other direction, and a policy change affects new connections only.
 */
#ifndef WEFT_POLICY_H
#define WEFT_POLICY_H

#include "common.h"

#define POLICY_MAP_SIZE 65536
#define IPCACHE_MAP_SIZE 65536
#define ENDPOINTS_MAP_SIZE 4096
#define POLICY_CT_MAP_SIZE 262144

#define DIR_INGRESS 1
#define DIR_EGRESS 2

/* endpoint_policy.flags */
#define EP_INGRESS_ENFORCED (1 << 0)
#define EP_EGRESS_ENFORCED (1 << 1)

#define IDENTITY_WORLD 2
#define IDENTITY_HOST 1

/* Prefix lengths of policy keys, in bits after prefixlen. */
#define POLICY_PREFIX_ANY_PROTO 72 /* ep_id, identity, direction */
#define POLICY_PREFIX_ANY_PORT 80  /* ... and proto */
#define POLICY_PREFIX_FULL 96      /* ... and dport */

struct policy_key {
	__u32 prefixlen;
	__u32 ep_id;     /* the endpoint's host veth ifindex */
	__u32 identity;  /* the peer; 0 for any */
	__u8 direction;  /* DIR_* */
	__u8 proto;
	__be16 dport;    /* network order, so a port prefix is a range */
};

struct policy_entry {
	__u32 flags; /* reserved; presence means allow */
};

struct ipcache_key {
	__u32 prefixlen;
	__be32 addr;
};

struct ipcache_entry {
	__u32 identity;
	__u32 flags;
};

/* weft_policy_ct key: a connection as opened, at one endpoint. */
struct policy_ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
	__u32 ep_id;
};

struct endpoint_policy {
	__u32 flags;      /* EP_*_ENFORCED */
	__u32 identity;   /* the endpoint's own identity, for flow events */
};

#ifndef WEFT_LAYOUT_PROBE
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_entry);
	__uint(max_entries, POLICY_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_entry);
	__uint(max_entries, IPCACHE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_entry);
	__uint(max_entries, IPCACHE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ipcache_cidr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct endpoint_policy);
	__uint(max_entries, ENDPOINTS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
		__type(key, struct policy_ct_key);
	__type(value, __u64);
	__uint(max_entries, POLICY_CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_policy_ct SEC(".maps");

/* The identity the longest prefix of `map` holding `addr` gives it, or
 * `none`. */
static __always_inline __u32 prefix_identity(void *map, __be32 addr, __u32 none)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };
	struct ipcache_entry *e = bpf_map_lookup_elem(map, &key);

	return e ? e->identity : none;
}

static __always_inline __u32 ipcache_identity(__be32 addr)
{
	return prefix_identity(&weft_ipcache, addr, IDENTITY_WORLD);
}

/* The CIDR identity of the most specific ipBlock prefix holding `addr`;
 * 0 when none does. */
static __always_inline __u32 ipcache_cidr_identity(__be32 addr)
{
	return prefix_identity(&weft_ipcache_cidr, addr, 0);
}

/* Whether the endpoint's policy lets `peer` reach `proto`/`dport` in
 * `direction`: by an entry for the peer, or one for any peer. */
static __always_inline int policy_allows(__u32 ep_id, __u8 direction, __u32 peer, __u8 proto, __be16 dport)
{
	struct policy_key key = {
		.prefixlen = POLICY_PREFIX_FULL,
		.ep_id = ep_id,
		.identity = peer,
		.direction = direction,
		.proto = proto,
		.dport = dport,
	};

	if (bpf_map_lookup_elem(&weft_policy, &key))
		return 1;
	key.identity = 0;
	return bpf_map_lookup_elem(&weft_policy, &key) != NULL;
}

/* Whether an ipBlock rule of the endpoint's policy covers `addr`. */
static __always_inline int policy_allows_cidr(__u32 ep_id, __u8 direction, __be32 addr, __u8 proto, __be16 dport)
{
	__u32 cidr = ipcache_cidr_identity(addr);

	return cidr && policy_allows(ep_id, direction, cidr, proto, dport);
}

/* Connection tracking for policy, per endpoint, in the direction the
 * connection was opened. Returns 1 when the packet belongs to a connection
 * this endpoint already allowed (either way). */
static __always_inline int policy_ct_known(const struct tuple4 *t, __u32 ep_id, __u64 now)
{
	struct policy_ct_key fwd = {
		.saddr = t->saddr, .daddr = t->daddr, .sport = t->sport, .dport = t->dport, .proto = t->proto,
		.ep_id = ep_id,
	};
	struct policy_ct_key rev = {
		.saddr = t->daddr, .daddr = t->saddr, .sport = t->dport, .dport = t->sport, .proto = t->proto,
		.ep_id = ep_id,
	};
	__u64 *seen = bpf_map_lookup_elem(&weft_policy_ct, &fwd);

	if (!seen)
		seen = bpf_map_lookup_elem(&weft_policy_ct, &rev);
	if (!seen)
		return 0;
	*seen = now;
	return 1;
}

static __always_inline void policy_ct_allow(const struct tuple4 *t, __u32 ep_id, __u64 now)
{
	struct policy_ct_key fwd = {
		.saddr = t->saddr, .daddr = t->daddr, .sport = t->sport, .dport = t->dport, .proto = t->proto,
		.ep_id = ep_id,
	};

	bpf_map_update_elem(&weft_policy_ct, &fwd, &now, BPF_ANY);
}
#endif

#endif
