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

/* Random picks of a SNAT port before a flow is dropped as NAT_EXHAUSTED.
 * The pool is small (SNAT_PORT_MIN..SNAT_PORT_MAX, 4536 ports per node
 * address and protocol) and UDP flows hold their port for a minute, so at
 * 100 new UDP flows a second it is two-thirds full: 8 picks then failed
 * one new flow in 25; 32 fail fewer than one in 300,000. */
#define SNAT_PORT_RETRIES 32

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

/* Which flow holds a SNAT port of one of the node's addresses. */
struct snat4_port_key {
	__be32 nat_addr;
	__be16 nat_port;
	__u8 proto;
	__u8 pad;
};

struct snat4_port {
	__be32 remote_addr; /* the other end of the flow, as the reply comes from */
	__be16 remote_port;
	__u16 pad;
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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct snat4_port_key);
	__type(value, struct snat4_port);
	__uint(max_entries, CT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_snat4_ports SEC(".maps");

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

/* The time, read once and only when needed: reading the clock costs more
 * than a map lookup on some virtual machines, and most lookups miss. */
static __always_inline __u64 clock_of(__u64 *now)
{
	if (!*now)
		*now = bpf_ktime_get_ns();
	return *now;
}

/* Looks up a live entry for the packet's tuple and refreshes it. A pure
 * SYN on a closed connection's tuple counts as a new connection. `now` is
 * read from the clock on a hit if the caller has not yet. */
static __always_inline struct ct4_entry *ct_lookup(void *map, const struct tuple4 *t, __u64 *now)
{
	struct ct4_key key = {};
	struct ct4_entry *e;

	ct_key_of(&key, t);
	e = bpf_map_lookup_elem(map, &key);
	if (!e || ct_expired(e, t->proto, clock_of(now)))
		return NULL;
	if (opens(t) && (e->flags & CT_FLAG_CLOSING))
		return NULL;
	e->last_seen = *now;
	if (closes(t))
		e->flags |= CT_FLAG_CLOSING;
	return e;
}

/* Whether the flow holding a SNAT port is still alive: its reverse entry
 * exists and has not expired. */
static __always_inline int snat_port_in_use(const struct snat4_port_key *pkey, const struct snat4_port *owner,
					    __u64 now)
{
	struct ct4_key rkey = {
		.saddr = owner->remote_addr,
		.daddr = pkey->nat_addr,
		.sport = owner->remote_port,
		.dport = pkey->nat_port,
		.proto = pkey->proto,
	};
	struct ct4_entry *e = bpf_map_lookup_elem(&weft_ct4_reverse, &rkey);

	return e && !ct_expired(e, pkey->proto, now);
}

/* Claims a SNAT source port on the reply tuple `rkey` (whose daddr is the
 * SNAT address and whose dport is the port being chosen) and inserts
 * `rentry` there. A port is unique per address and protocol, whatever the
 * destination: a node that receives the flow may translate it to a backend
 * that another of our flows also reaches, and the two must not meet on the
 * same tuple there. Claims use BPF_NOEXIST, so two CPUs never take the same
 * free port; a port whose flow has died is taken over. */
static __always_inline int snat_claim_port(struct ct4_key *rkey, struct ct4_entry *rentry, __u64 now)
{
	__u32 span = SNAT_PORT_MAX - SNAT_PORT_MIN + 1;
	struct snat4_port_key pkey = { .nat_addr = rkey->daddr, .proto = rkey->proto };
	struct snat4_port owner = { .remote_addr = rkey->saddr, .remote_port = rkey->sport };
	struct snat4_port *held;

	for (int i = 0; i < SNAT_PORT_RETRIES; i++) {
		__u16 port = SNAT_PORT_MIN + bpf_get_prandom_u32() % span;

		pkey.nat_port = bpf_htons(port);
		if (bpf_map_update_elem(&weft_snat4_ports, &pkey, &owner, BPF_NOEXIST)) {
			held = bpf_map_lookup_elem(&weft_snat4_ports, &pkey);
			if (!held || snat_port_in_use(&pkey, held, now))
				continue;
			bpf_map_update_elem(&weft_snat4_ports, &pkey, &owner, BPF_ANY);
		}
		rkey->dport = pkey.nat_port;
		bpf_map_update_elem(&weft_ct4_reverse, rkey, rentry, BPF_ANY);
		return port;
	}
	return -1;
}
#endif

#endif
