/* Packet counters by outcome, one slot per reason, per CPU. */
#ifndef WEFT_METRICS_H
#define WEFT_METRICS_H

#include "common.h"

/* Keep in sync with `maps::Reason` in datapath-svc/src/maps.rs. */
enum weft_reason {
	REASON_PASSED = 0,         /* not ours: handed on untouched */
	REASON_LB_TRANSLATED = 1,  /* a service frontend rewritten to a backend */
	REASON_LB_REVERSED = 2,    /* a reply rewritten back to the frontend */
	REASON_NO_BACKEND = 3,     /* dropped: the service has no backend */
	REASON_MALFORMED = 4,      /* headers truncated or invalid */
	REASON_CSUM_ERROR = 5,     /* dropped: a rewrite helper failed */
	REASON_MASQUERADED = 6,    /* pod traffic leaving the cluster, SNATed */
	REASON_NAT_EXHAUSTED = 7,  /* dropped: no free SNAT port */
	REASON_FIB_FAILED = 8,     /* dropped: no route for a redirected packet */
		REASON_SOCK_TRANSLATED = 9, /* a node socket's service address rewritten */
	REASON_POLICY_DENIED = 10, /* dropped: no network policy allows it */
	REASON_POLICY_ALLOWED = 11, /* a new connection allowed by policy */
	REASON_MAX = 16,
};

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};

#ifndef WEFT_LAYOUT_PROBE
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, REASON_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_metrics SEC(".maps");

static __always_inline void count_len(__u32 len, __u32 reason)
{
	struct metrics_value *v = bpf_map_lookup_elem(&weft_metrics, &reason);

	if (v) {
		v->packets++;
		v->bytes += len;
	}
}

static __always_inline void count(struct __sk_buff *skb, __u32 reason)
{
	count_len(skb->len, reason);
}
#endif

#endif
