/* Connection tracking for translated service connections.
 *
 * Two LRU maps, so the kernel evicts the oldest entries when full and no
 * sweeper is needed:
 *  - weft_ct4_services, keyed by the client's view (client -> frontend),
 *    remembers the backend a connection was given, so every packet of the
 *    connection goes to the same backend;
 *  - weft_ct4_reverse, keyed by the reply's tuple (backend -> client),
 *    remembers the frontend the reply must appear to come from.
 * Entries carry a last-seen time; an entry idle past its lifetime counts as
 * gone, which is how UDP flows and closed TCP connections expire.
 */
#ifndef WEFT_CONNTRACK_H
#define WEFT_CONNTRACK_H

#include "common.h"

#define CT_MAP_SIZE 262144

/* ct4_entry.flags */
#define CT_FLAG_CLOSING (1 << 0) /* FIN or RST seen */

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
	__u32 backend_id;    /* forward entries: the chosen backend */
	__be32 address;      /* reverse entries: the frontend address */
	__be16 port;         /* reverse entries: the frontend port */
	__u16 rev_nat_index;
	__u8 flags;          /* CT_FLAG_* */
	__u8 pad[3];
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
#endif

#endif
