/* Connection tracking for translated connections.
 *
 * LRU maps, so the kernel evicts the oldest entries when full and no
 * sweeper is needed:
 *  - weft_ct4_services, keyed by the client's view (client -> frontend),
 *    remembers the backend a connection was given (and the SNAT source it
 *    was given, for external traffic to a backend on another node);
 *  - weft_masq4, keyed by a pod's view of a connection leaving the
 *    cluster, remembers the source port it was masqueraded to;
 *  - weft_ct4_reverse, keyed by the tuple replies carry, remembers how to
 *    undo the translation: the frontend the reply must come from, and for
 *    SNATed connections the client it must go back to.
 * Entries carry a last-seen time; an entry idle past its lifetime counts as
 * gone, which is how UDP flows and closed TCP connections expire.
 */
#ifndef WEFT_CONNTRACK_H
#define WEFT_CONNTRACK_H

#include "common.h"

#define CT_MAP_SIZE 262144

/* ct4_entry.flags */
#define CT_FLAG_CLOSING (1 << 0) /* FIN or RST seen */
#define CT_FLAG_SNAT (1 << 1)    /* the source was rewritten too */

#define CT_LIFETIME_TCP (6ULL * 3600 * 1000000000ULL)
#define CT_LIFETIME_TCP_CLOSING (10ULL * 1000000000ULL)
#define CT_LIFETIME_NONTCP (60ULL * 1000000000ULL)

struct ct4_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct4_entry {
	__u64 last_seen;     /* bpf_ktime_get_ns() of the last packet */
	__u32 backend_id;    /* forward: the chosen backend */
	__be32 address;      /* reverse: the frontend replies come from; 0 for none */
	__be16 port;         /* reverse: its port */
	__u16 rev_nat_index;
	__u8 flags;          /* CT_FLAG_* */
	__u8 pad[3];
	__be32 nat_addr;     /* forward: SNAT source; reverse: the original client */
	__be16 nat_port;     /* forward: SNAT source port; reverse: the client's port */
	__u16 pad2;
};

#ifndef WEFT_LAYOUT_PROBE
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct4_entry);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ct4_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct4_entry);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ct4_reverse SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, struct ct4_entry);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_masq4 SEC(".maps");

/* Connections from outside the cluster to a local pod, keyed by the tuple
 * of the pod's replies (value: last seen). Those replies are not the pod's
 * own traffic leaving the cluster and must not be masqueraded. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct4_key);
	__type(value, __u64);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_ct4_inbound SEC(".maps");

static __always_inline int ct_expired(const struct ct4_entry *e, __u8 proto, __u64 now)
{
	__u64 lifetime;

	if (proto != IPPROTO_TCP)
		lifetime = CT_LIFETIME_NONTCP;
	else if (e->flags & CT_FLAG_CLOSING)
		lifetime = CT_LIFETIME_TCP_CLOSING;
	else
		lifetime = CT_LIFETIME_TCP;
	return now - e->last_seen > lifetime;
}

static __always_inline void ct_key_of(struct ct4_key *k, const struct tuple4 *t)
{
	k->saddr = t->saddr;
	k->daddr = t->daddr;
	k->sport = t->sport;
	k->dport = t->dport;
	k->proto = t->proto;
}

/* Looks up a live entry for the packet's tuple and refreshes it. A pure
 * SYN on a closed connection's tuple counts as a new connection. */
static __always_inline struct ct4_entry *ct_lookup(void *map, const struct tuple4 *t, __u64 now)
{
	struct ct4_key key = {};
	struct ct4_entry *e;

	ct_key_of(&key, t);
	e = bpf_map_lookup_elem(map, &key);
	if (!e || ct_expired(e, t->proto, now))
		return NULL;
	if (opens(t) && (e->flags & CT_FLAG_CLOSING))
		return NULL;
	e->last_seen = now;
	if (closes(t))
		e->flags |= CT_FLAG_CLOSING;
	return e;
}

/* Claims a free SNAT source port for `rkey` (the reply tuple, whose dport
 * is the port being chosen) by inserting `rentry` with BPF_NOEXIST: an
 * atomic claim, so two CPUs never hand out the same port. */
static __always_inline int snat_claim_port(struct ct4_key *rkey, struct ct4_entry *rentry)
{
	__u32 span = SNAT_PORT_MAX - SNAT_PORT_MIN + 1;

	for (int i = 0; i < 8; i++) {
		__u16 port = SNAT_PORT_MIN + bpf_get_prandom_u32() % span;

		rkey->dport = bpf_htons(port);
		if (bpf_map_update_elem(&weft_ct4_reverse, rkey, rentry, BPF_NOEXIST) == 0)
			return port;
	}
	return -1;
}
#endif

#endif
