/* Flow events: one per connection decision (translated, forwarded by
 * policy) and one per dropped packet, sent to datapath-svc through a ring
 * buffer. */
#ifndef WEFT_FLOWS_H
#define WEFT_FLOWS_H

#include "common.h"

/* 4,096 events of 64 bytes: at 100 ms between drains (and an early wake at
 * a quarter full) that holds bursts of tens of thousands of connections a
 * second, while the ring, mapped twice into datapath-svc, stays 0.5 MiB of
 * its resident memory. */
#define FLOWS_RING_SIZE (1 << 18)

/* flow_event.verdict */
#define FLOW_FORWARDED 1
#define FLOW_DROPPED 2
#define FLOW_TRANSLATED 3

struct flow_event {
	__u64 timestamp;    /* bpf_ktime_get_ns() */
	__be32 saddr;
	__be32 daddr;       /* after translation */
	__be32 orig_daddr;  /* the frontend, for translations; else 0 */
	__u32 ep_id;        /* the local endpoint (host veth ifindex), or 0 */
	__u32 src_identity; /* 0 when not looked up */
	__u32 dst_identity;
	__be16 sport;
	__be16 dport;
	__be16 orig_dport;
	__u8 proto;
	__u8 verdict;       /* FLOW_* */
	__u8 reason;        /* enum weft_reason */
	__u8 direction;     /* DIR_INGRESS, DIR_EGRESS, or 0 */
	__u8 pad[6];
};

#ifndef WEFT_LAYOUT_PROBE
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, FLOWS_RING_SIZE);
} weft_flows SEC(".maps");

/* Waking the reader for every event would cost a context switch per new
 * connection; datapath-svc drains the ring on a short timer instead and is
 * woken early only once a quarter of the ring is waiting. */
#define FLOWS_WAKEUP_BYTES (FLOWS_RING_SIZE / 4)

static __always_inline void flow_emit(const struct flow_event *ev)
{
	__u64 flags = bpf_ringbuf_query(&weft_flows, BPF_RB_AVAIL_DATA) > FLOWS_WAKEUP_BYTES
			      ? BPF_RB_FORCE_WAKEUP
			      : BPF_RB_NO_WAKEUP;

	/* A full ring drops the event, never the packet. */
	bpf_ringbuf_output(&weft_flows, (void *)ev, sizeof(*ev), flags);
}

static __always_inline void flow_fill(struct flow_event *ev, const struct tuple4 *t, __u8 verdict, __u8 reason)
{
	ev->timestamp = bpf_ktime_get_ns();
	ev->saddr = t->saddr;
	ev->daddr = t->daddr;
	ev->sport = t->sport;
	ev->dport = t->dport;
	ev->proto = t->proto;
	ev->verdict = verdict;
	ev->reason = reason;
}
#endif

#endif
