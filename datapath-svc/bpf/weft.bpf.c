// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* weft's per-packet programs for a pod's host-side veth.
 *
 * from_container runs on the veth's ingress (packets leaving the pod): a
 * packet to a service frontend is translated to one of the service's
 * backends, the same one for every packet of the connection.
 * to_container runs on the veth's egress (packets entering the pod): a reply
 * from a backend is translated back, so the pod sees the frontend it dialled.
 *
 * Both return TC_ACT_UNSPEC for what they do not own, so other programs in
 * the same TCX chain still see it; the kernel then routes the (possibly
 * rewritten) packet as usual.
 */
#include "lib/common.h"
#include "lib/metrics.h"
#include "lib/lb.h"
#include "lib/conntrack.h"
#include "lib/nat.h"

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

struct tuple4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 tcp_flags;
	__u32 l4_off;
};

enum parse_result {
	PARSE_MALFORMED = -1,
	PARSE_NOT_OURS = 0, /* not IPv4 TCP/UDP, or a non-first fragment */
	PARSE_OK = 1,
};

/* Reads the IPv4 5-tuple with bpf_skb_load_bytes, which also works on
 * non-linear packets and spares the verifier variable-offset pointers. */
static __always_inline int parse_tuple(struct __sk_buff *skb, struct tuple4 *t)
{
	struct iphdr ip;
	__be16 ports[2];

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return PARSE_NOT_OURS;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
		return PARSE_MALFORMED;
	if (ip.ihl < 5 || ip.version != 4)
		return PARSE_MALFORMED;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return PARSE_NOT_OURS;
	/* Later fragments carry no ports; they cannot be matched. */
	if (ip.frag_off & bpf_htons(0x1fff))
		return PARSE_NOT_OURS;

	t->saddr = ip.saddr;
	t->daddr = ip.daddr;
	t->proto = ip.protocol;
	t->l4_off = ETH_HLEN + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, t->l4_off, ports, sizeof(ports)))
		return PARSE_MALFORMED;
	t->sport = ports[0];
	t->dport = ports[1];
	t->tcp_flags = 0;
	if (ip.protocol == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, t->l4_off + 13, &t->tcp_flags, 1))
		return PARSE_MALFORMED;
	return PARSE_OK;
}

static __always_inline int closes(const struct tuple4 *t)
{
	return t->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST);
}

/* A pure SYN opens a new connection: if the tuple's entry belongs to a
 * connection that has closed, the new one may go to a new backend. */
static __always_inline int opens(const struct tuple4 *t)
{
	return (t->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

/* The backend an existing connection uses, if it is still valid. */
static __always_inline __u32 ct_backend(struct ct4_key *key, const struct tuple4 *t, __u64 now)
{
	struct ct4_entry *e = bpf_map_lookup_elem(&weft_ct4_services, key);

	if (!e || ct_expired(e, t->proto, now))
		return 0;
	if (opens(t) && (e->flags & CT_FLAG_CLOSING))
		return 0;
	e->last_seen = now;
	if (closes(t))
		e->flags |= CT_FLAG_CLOSING;
	return e->backend_id;
}

SEC("classifier/from_container")
int from_container(struct __sk_buff *skb)
{
	struct tuple4 t = {};
	struct lb4_service *svc;
	struct lb4_backend *be, backend;
	struct ct4_key key = {}, rkey = {};
	struct ct4_entry entry = {}, rentry = {};
	__u16 rev_nat_index;
	__u32 backend_id;
	__u64 now;
	int r;

	r = parse_tuple(skb, &t);
	if (r == PARSE_MALFORMED) {
		count(skb, REASON_MALFORMED);
		return WEFT_PASS;
	}
	if (r == PARSE_NOT_OURS)
		goto pass;

	svc = lb4_lookup_service(t.daddr, t.dport, t.proto);
	if (!svc)
		goto pass;
	rev_nat_index = svc->rev_nat_index;

	now = bpf_ktime_get_ns();
	key.saddr = t.saddr;
	key.daddr = t.daddr;
	key.sport = t.sport;
	key.dport = t.dport;
	key.proto = t.proto;

	be = NULL;
	backend_id = ct_backend(&key, &t, now);
	if (backend_id)
		be = bpf_map_lookup_elem(&weft_lb4_backends, &backend_id);
	if (!be) {
		/* New connection, or its backend is gone: choose again. */
		backend_id = lb4_select_backend(t.daddr, t.dport, t.proto, svc);
		if (backend_id)
			be = bpf_map_lookup_elem(&weft_lb4_backends, &backend_id);
		if (!be) {
			count(skb, REASON_NO_BACKEND);
			return WEFT_DROP;
		}
		entry.last_seen = now;
		entry.backend_id = backend_id;
		entry.rev_nat_index = rev_nat_index;
		entry.flags = closes(&t) ? CT_FLAG_CLOSING : 0;
		bpf_map_update_elem(&weft_ct4_services, &key, &entry, BPF_ANY);
	}
	backend = *be;

	rkey.saddr = backend.address;
	rkey.daddr = t.saddr;
	rkey.sport = backend.port;
	rkey.dport = t.sport;
	rkey.proto = t.proto;
	rentry.last_seen = now;
	rentry.address = t.daddr;
	rentry.port = t.dport;
	rentry.rev_nat_index = rev_nat_index;
	rentry.flags = closes(&t) ? CT_FLAG_CLOSING : 0;
	bpf_map_update_elem(&weft_ct4_reverse, &rkey, &rentry, BPF_ANY);

	if (nat_rewrite(skb, t.l4_off, t.proto, 1, t.daddr, backend.address, t.dport, backend.port)) {
		count(skb, REASON_CSUM_ERROR);
		return WEFT_DROP;
	}
	count(skb, REASON_LB_TRANSLATED);
	return WEFT_PASS;
pass:
	count(skb, REASON_PASSED);
	return WEFT_PASS;
}

SEC("classifier/to_container")
int to_container(struct __sk_buff *skb)
{
	struct tuple4 t = {};
	struct ct4_key rkey = {};
	struct ct4_entry *e;
	__be32 frontend_addr;
	__be16 frontend_port;
	__u64 now;
	int r;

	r = parse_tuple(skb, &t);
	if (r == PARSE_MALFORMED) {
		count(skb, REASON_MALFORMED);
		return WEFT_PASS;
	}
	if (r == PARSE_NOT_OURS)
		goto pass;

	rkey.saddr = t.saddr;
	rkey.daddr = t.daddr;
	rkey.sport = t.sport;
	rkey.dport = t.dport;
	rkey.proto = t.proto;
	e = bpf_map_lookup_elem(&weft_ct4_reverse, &rkey);
	if (!e)
		goto pass;
	now = bpf_ktime_get_ns();
	if (ct_expired(e, t.proto, now))
		goto pass;
	e->last_seen = now;
	if (closes(&t))
		e->flags |= CT_FLAG_CLOSING;
	frontend_addr = e->address;
	frontend_port = e->port;

	if (nat_rewrite(skb, t.l4_off, t.proto, 0, t.saddr, frontend_addr, t.sport, frontend_port)) {
		count(skb, REASON_CSUM_ERROR);
		return WEFT_DROP;
	}
	count(skb, REASON_LB_REVERSED);
	return WEFT_PASS;
pass:
	count(skb, REASON_PASSED);
	return WEFT_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
