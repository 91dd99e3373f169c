// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* weft's datapath programs.
 *
 * On each pod's host-side veth:
 *  - from_container (veth ingress, packets leaving the pod) translates a
 *    connection to a service frontend to one of its backends, the same one
 *    for every packet of the connection;
 *  - to_container (veth egress, packets entering the pod) translates
 *    replies back, so the pod sees the frontend it dialled.
 * On each of the node's external devices:
 *  - from_netdev (ingress) serves NodePort, ExternalIP, LoadBalancer and
 *    HostPort frontends to traffic from outside, SNATing it when the backend
 *    is on another node so the reply comes back here, and undoes SNAT on
 *    replies;
 *  - to_netdev (egress) translates replies of local backends to outside
 *    clients, and masquerades pod traffic leaving the cluster.
 * from_container and from_netdev answer a packet for a Service with no
 * endpoints there and then, with a TCP reset or an ICMP port unreachable
 * (see reject.h).
 * On the cgroup socket hooks, for the node's own processes:
 *  - sock_connect4 / sock_sendmsg4 rewrite a service address to a backend
 *    at connect()/sendmsg() time; sock_recvmsg4 / sock_getpeername4 show
 *    the frontend again.
 *
 * The tc programs return TC_ACT_UNSPEC for what they do not own, so other
 * programs in the same TCX chain still see it.
 */
#include "lib/common.h"
#include "lib/metrics.h"
#include "lib/lb.h"
#include "lib/conntrack.h"
#include "lib/nat.h"
#include "lib/sock.h"
#include "lib/policy.h"
#include "lib/flows.h"
#include "lib/reject.h"

#define NODE_ADDRS_MAP_SIZE 256

/* The node's IPv4 address on each external device, by ifindex: the source
 * for SNAT and masquerading. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, __be32);
	__uint(max_entries, NODE_ADDRS_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_node_addrs SEC(".maps");

enum {
	NOT_OURS = -2,
};

/* A new packet for a frontend that has no backend to give it. kube-proxy
 * rejects traffic to a Service without endpoints, so that clients fail at
 * once, but drops what a Local traffic policy keeps from a node without
 * the endpoints the Service has elsewhere (SVC_FLAG2_ENDPOINTS_ELSEWHERE):
 * a client behind a load balancer retries, and is sent to another node.
 * Either way the flow is reported dropped, for want of a backend.
 * Returns a tc verdict. */
static __always_inline int lb4_no_backend(struct __sk_buff *skb, const struct tuple4 *t,
					  const struct lb4_service *s, int external)
{
	struct flow_event ev = {};

	flow_fill(&ev, t, FLOW_DROPPED, REASON_NO_BACKEND);
	ev.ep_id = external ? 0 : skb->ifindex;
	flow_emit(&ev);
	count(skb, REASON_NO_BACKEND);
	if (s->flags2 & SVC_FLAG2_ENDPOINTS_ELSEWHERE)
		return WEFT_DROP;
	return reject4(skb, t, !external);
}

/* Translates a packet to a service frontend. `external`: it arrived from
 * outside the node, so only external frontends apply, and a backend on
 * another node needs SNAT (and a redirect, since the new source is ours).
 * A client in the cluster's pod network counts as internal even there, as
 * kube-proxy's cluster-CIDR local detection counts it: the Local external
 * traffic policy is not for it (see lb.h's scopes).
 * Returns NOT_OURS or a tc verdict. */
static __always_inline int lb4_forward(struct __sk_buff *skb, struct tuple4 *t, int external)
{
	struct lb4_key front = { .address = t->daddr, .dport = t->dport, .proto = t->proto };
	struct lb4_service *svc, s;
	struct lb4_backend *be, b;
	struct ct4_entry *e, entry = {}, rentry = {};
	struct ct4_key key = {}, rkey = {};
	__be32 nat_addr = 0, *dev_addr;
	__be16 nat_port = 0;
	__u32 backend_id = 0, ifindex;
	__u64 now;
	int snat = 0, port, created = 0;
	__u8 scope = external && !in_cluster(t->saddr) ? LB_SCOPE_EXTERNAL : LB_SCOPE_INTERNAL;

	svc = lb4_lookup_service(&front, scope);
	if (!svc)
		return NOT_OURS;
	if (external && !(svc->flags & SVC_FLAGS_EXTERNAL))
		return NOT_OURS;
	s = *svc;
	now = bpf_ktime_get_ns();

	be = NULL;
	e = ct_lookup(&weft_ct4_services, t, &now);
	if (e) {
		/* An existing connection keeps its backend, even one that is
		 * terminating, for as long as the backend exists. */
		backend_id = e->backend_id;
		snat = e->flags & CT_FLAG_SNAT;
		nat_addr = e->nat_addr;
		nat_port = e->nat_port;
		be = bpf_map_lookup_elem(&weft_lb4_backends, &backend_id);
	}
	if (!be) {
		__u32 hash = hash3(t->saddr, t->daddr ^ CFG_HASH_SEED,
				   (((__u32)t->sport) << 16 | t->dport) ^ t->proto);

		backend_id = lb4_select(&front, &s, t->saddr, hash, now);
		be = lb4_usable_backend(s.flags, backend_id);
		if (!be)
			return lb4_no_backend(skb, t, &s, external);
		b = *be;
		entry.last_seen = now;
		entry.backend_id = backend_id;
		entry.rev_nat_index = s.rev_nat_index;
		entry.flags = closes(t) ? CT_FLAG_CLOSING : 0;
		snat = external && !(b.flags & BACKEND_FLAG_LOCAL);
		if (snat) {
			ifindex = skb->ingress_ifindex;
			dev_addr = bpf_map_lookup_elem(&weft_node_addrs, &ifindex);
			nat_addr = dev_addr ? *dev_addr : t->daddr;
			rkey.saddr = b.address;
			rkey.daddr = nat_addr;
			rkey.sport = b.port;
			rkey.proto = t->proto;
			rentry.last_seen = now;
			rentry.address = t->daddr;
			rentry.port = t->dport;
			rentry.rev_nat_index = s.rev_nat_index;
			rentry.flags = CT_FLAG_SNAT;
			rentry.nat_addr = t->saddr;
			rentry.nat_port = t->sport;
			port = snat_claim_port(&rkey, &rentry, now);
			if (port < 0) {
				count(skb, REASON_NAT_EXHAUSTED);
				return WEFT_DROP;
			}
			nat_port = bpf_htons(port);
			entry.flags |= CT_FLAG_SNAT;
			entry.nat_addr = nat_addr;
			entry.nat_port = nat_port;
		}
				ct_key_of(&key, t);
		bpf_map_update_elem(&weft_ct4_services, &key, &entry, BPF_ANY);
		created = 1;
	} else {
		b = *be;
	}

	/* The reply's tuple, for the reverse translation. */
	rkey.saddr = b.address;
	rkey.sport = b.port;
	rkey.proto = t->proto;
	rkey.daddr = snat ? nat_addr : t->saddr;
	rkey.dport = snat ? nat_port : t->sport;
		/* A new connection owns the reply tuple, even if an older flow from
	 * the same client port to the same backend (through another frontend)
	 * left an entry there. */
	e = created ? NULL : bpf_map_lookup_elem(&weft_ct4_reverse, &rkey);
	if (e) {
		e->last_seen = now;
		if (closes(t))
			e->flags |= CT_FLAG_CLOSING;
	} else if (!(created && snat)) {
		rentry.last_seen = now;
		rentry.address = t->daddr;
		rentry.port = t->dport;
		rentry.rev_nat_index = s.rev_nat_index;
		rentry.flags = (closes(t) ? CT_FLAG_CLOSING : 0) | (snat ? CT_FLAG_SNAT : 0);
		rentry.nat_addr = snat ? t->saddr : 0;
		rentry.nat_port = snat ? t->sport : 0;
		bpf_map_update_elem(&weft_ct4_reverse, &rkey, &rentry, BPF_ANY);
	}

	if (nat_rewrite(skb, t->l4_off, t->proto, 1, t->daddr, b.address, t->dport, b.port) ||
	    (snat && nat_rewrite(skb, t->l4_off, t->proto, 0, t->saddr, nat_addr, t->sport, nat_port))) {
		count(skb, REASON_CSUM_ERROR);
		return WEFT_DROP;
	}
			count(skb, REASON_LB_TRANSLATED);
	if (created) {
		struct flow_event ev = {};

		flow_fill(&ev, t, FLOW_TRANSLATED, REASON_LB_TRANSLATED);
		ev.daddr = b.address;
		ev.dport = b.port;
		ev.orig_daddr = t->daddr;
		ev.orig_dport = t->dport;
		if (snat) {
			ev.saddr = nat_addr;
			ev.sport = nat_port;
		}
		ev.ep_id = external ? 0 : skb->ifindex;
		flow_emit(&ev);
	}
	/* Later decisions (policy) see the packet as it now is. */
	if (snat) {
		t->saddr = nat_addr;
		t->sport = nat_port;
	}
	t->daddr = b.address;
	t->dport = b.port;
	if (snat) {
		int rc = redirect_by_route(skb, nat_addr, b.address);

		if (rc < 0) {
			count(skb, REASON_FIB_FAILED);
			return WEFT_DROP;
		}
		return rc;
	}
	return WEFT_PASS;
}

/* Undoes a translation on a reply. `snat` selects which entries apply:
 * replies to SNATed connections (arriving at the node's own address) or
 * replies to translated connections of local clients and backends.
 * Returns NOT_OURS or a tc verdict. */
static __always_inline int lb4_reverse(struct __sk_buff *skb, const struct tuple4 *t, int snat)
{
	struct ct4_entry *e;
	__be32 front_addr, client_addr;
	__be16 front_port, client_port;
	__u64 now = 0;
	int rc;

	e = ct_lookup(&weft_ct4_reverse, t, &now);
	if (!e || !!(e->flags & CT_FLAG_SNAT) != !!snat)
		return NOT_OURS;
	front_addr = e->address;
	front_port = e->port;
	client_addr = e->nat_addr;
	client_port = e->nat_port;

	if (snat && nat_rewrite(skb, t->l4_off, t->proto, 1, t->daddr, client_addr, t->dport, client_port))
		goto csum;
	if (front_addr && nat_rewrite(skb, t->l4_off, t->proto, 0, t->saddr, front_addr, t->sport, front_port))
		goto csum;
	count(skb, REASON_LB_REVERSED);
	if (snat && front_addr) {
		/* A reply from a backend on another node: its source is now
		 * this node's frontend, which the input path would refuse. */
		rc = redirect_by_route(skb, front_addr, client_addr);
		if (rc < 0) {
			count(skb, REASON_FIB_FAILED);
			return WEFT_DROP;
		}
		return rc;
	}
	return WEFT_PASS;
csum:
	count(skb, REASON_CSUM_ERROR);
	return WEFT_DROP;
}

/* Masquerades a pod's connection leaving the cluster to the device's
 * address, with a source port of its own. */
static __always_inline int masquerade(struct __sk_buff *skb, const struct tuple4 *t)
{
	struct ct4_entry *e, entry = {}, rentry = {};
	struct ct4_key key = {}, rkey = {};
	__be32 *dev_addr, nat_addr;
	__be16 nat_port;
	__u32 ifindex = skb->ifindex;
	__u64 now;
	int port;

		if (!CFG_MASQUERADE || !in_cluster(t->saddr) || in_cluster(t->daddr))
		return NOT_OURS;
	
	dev_addr = bpf_map_lookup_elem(&weft_node_addrs, &ifindex);
	if (!dev_addr)
		return NOT_OURS;
	nat_addr = *dev_addr;
	now = bpf_ktime_get_ns();

	e = ct_lookup(&weft_masq4, t, &now);
	if (!e) {
		ct_key_of(&key, t);
		if (bpf_map_lookup_elem(&weft_ct4_inbound, &key))
			return NOT_OURS; /* a reply to a connection from outside */
	}
	if (e) {
		nat_port = e->nat_port;
		rkey.saddr = t->daddr;
		rkey.daddr = nat_addr;
		rkey.sport = t->dport;
		rkey.dport = nat_port;
		rkey.proto = t->proto;
		e = bpf_map_lookup_elem(&weft_ct4_reverse, &rkey);
		if (e) {
			e->last_seen = now;
			if (closes(t))
				e->flags |= CT_FLAG_CLOSING;
		}
	} else {
		rkey.saddr = t->daddr;
		rkey.daddr = nat_addr;
		rkey.sport = t->dport;
		rkey.proto = t->proto;
		rentry.last_seen = now;
		rentry.flags = CT_FLAG_SNAT;
		rentry.nat_addr = t->saddr;
		rentry.nat_port = t->sport;
		port = snat_claim_port(&rkey, &rentry, now);
		if (port < 0) {
			count(skb, REASON_NAT_EXHAUSTED);
			return WEFT_DROP;
		}
		nat_port = bpf_htons(port);
		entry.last_seen = now;
		entry.flags = CT_FLAG_SNAT;
		entry.nat_addr = nat_addr;
		entry.nat_port = nat_port;
		ct_key_of(&key, t);
		bpf_map_update_elem(&weft_masq4, &key, &entry, BPF_ANY);
	}
	if (nat_rewrite(skb, t->l4_off, t->proto, 0, t->saddr, nat_addr, t->sport, nat_port)) {
		count(skb, REASON_CSUM_ERROR);
		return WEFT_DROP;
	}
	count(skb, REASON_MASQUERADED);
	return WEFT_PASS;
}

/* A packet going straight to a pod (not to a frontend) starts or continues
 * a flow nobody translated. If an older translated flow left a reverse entry
 * on the same reply tuple (the client reused its port), that entry would
 * rewrite this flow's replies: the direct flow owns the tuple now. TCP
 * flows are checked on their SYN, UDP on every datagram. */
static __always_inline void forget_stale_reverse(const struct tuple4 *t)
{
	struct ct4_key rkey = {
		.saddr = t->daddr,
		.daddr = t->saddr,
		.sport = t->dport,
		.dport = t->sport,
		.proto = t->proto,
	};
	struct ct4_entry *e;

	if (t->proto == IPPROTO_TCP && !opens(t))
		return;
	e = bpf_map_lookup_elem(&weft_ct4_reverse, &rkey);
	if (e && !(e->flags & CT_FLAG_SNAT))
		bpf_map_delete_elem(&weft_ct4_reverse, &rkey);
}

/* Runs `step` and returns its verdict unless it said NOT_OURS. */
#define TRY(step)                         \
	do {                              \
		int __rc = (step);        \
		if (__rc != NOT_OURS)     \
			return __rc;      \
	} while (0)

#define PARSE_OR_PASS(skb, t)                            \
	do {                                             \
		int __r = parse_tuple(skb, t);           \
		if (__r == PARSE_MALFORMED) {            \
			count(skb, REASON_MALFORMED);    \
			return WEFT_PASS;                \
		}                                        \
		if (__r == PARSE_NOT_OURS)               \
			goto pass;                       \
	} while (0)

/* The policy verdict for a packet at a local endpoint (`ep_id`, the pod's
 * host veth), in `direction` as the pod sees it: a known connection passes,
 * a new one is checked against the endpoint's policy if that direction is
 * isolated, and remembered when allowed. Host traffic into a pod (kubelet's
 * probes) is always allowed. Returns WEFT_PASS or WEFT_DROP. */
static __always_inline int policy_check(struct __sk_buff *skb, const struct tuple4 *t, __u8 direction)
{
	__u32 ep_id = skb->ifindex;
	struct endpoint_policy *ep = bpf_map_lookup_elem(&weft_endpoints, &ep_id);
	struct flow_event ev = {};
	__u32 flags, own, peer;
	__be32 peer_addr = direction == DIR_EGRESS ? t->daddr : t->saddr;
	__u64 now;
	int enforced;

	if (!ep) {
		/* No policy: report each new TCP connection the pod opens. */
		if (direction == DIR_EGRESS && t->proto == IPPROTO_TCP && opens(t)) {
			flow_fill(&ev, t, FLOW_FORWARDED, REASON_PASSED);
			ev.ep_id = ep_id;
			ev.direction = direction;
			flow_emit(&ev);
		}
		return WEFT_PASS;
	}
	flags = ep->flags;
	own = ep->identity;
	now = bpf_ktime_get_ns();
	if (policy_ct_known(t, ep_id, now))
		return WEFT_PASS;
	peer = ipcache_identity(peer_addr);
	enforced = direction == DIR_EGRESS ? flags & EP_EGRESS_ENFORCED : flags & EP_INGRESS_ENFORCED;
	flow_fill(&ev, t, FLOW_FORWARDED, enforced ? REASON_POLICY_ALLOWED : REASON_PASSED);
	ev.ep_id = ep_id;
	ev.direction = direction;
	ev.src_identity = direction == DIR_EGRESS ? own : peer;
	ev.dst_identity = direction == DIR_EGRESS ? peer : own;
	if (enforced && !(direction == DIR_INGRESS && peer == IDENTITY_HOST) &&
	    !policy_allows(ep_id, direction, peer, t->proto, t->dport) &&
	    !policy_allows_cidr(ep_id, direction, peer_addr, t->proto, t->dport)) {
		ev.verdict = FLOW_DROPPED;
		ev.reason = REASON_POLICY_DENIED;
		flow_emit(&ev);
		count(skb, REASON_POLICY_DENIED);
		return WEFT_DROP;
	}
	policy_ct_allow(t, ep_id, now);
	flow_emit(&ev);
	if (enforced)
		count(skb, REASON_POLICY_ALLOWED);
	return WEFT_PASS;
}

SEC("classifier/from_container")
int from_container(struct __sk_buff *skb)
{
	struct tuple4 t = {};
	int rc;

	PARSE_OR_PASS(skb, &t);
	/* Translate first: egress policy applies to the backend reached. */
	rc = lb4_forward(skb, &t, 0);
	if (rc == NOT_OURS) {
		forget_stale_reverse(&t);
		count(skb, REASON_PASSED);
	} else if (rc != WEFT_PASS) {
		return rc; /* dropped, or rejected back into the pod */
	}
	return policy_check(skb, &t, DIR_EGRESS);
pass:
	count(skb, REASON_PASSED);
	return WEFT_PASS;
}

/* Remembers a connection from outside the cluster to this pod, so its
 * replies leave unmasqueraded. */
static __always_inline void track_inbound(const struct tuple4 *t)
{
	struct ct4_key key = {
		.saddr = t->daddr,
		.daddr = t->saddr,
		.sport = t->dport,
		.dport = t->sport,
		.proto = t->proto,
	};
	__u64 now;

	if (!CFG_MASQUERADE || in_cluster(t->saddr))
		return;
	/* A TCP connection from outside starts with a SYN; anything else
	 * arriving is part of a connection the pod started. */
	if (t->proto == IPPROTO_TCP && !opens(t))
		return;
	/* A UDP reply to the pod's own (masqueraded) flow. */
	if (bpf_map_lookup_elem(&weft_masq4, &key))
		return;
	now = bpf_ktime_get_ns();
	bpf_map_update_elem(&weft_ct4_inbound, &key, &now, BPF_ANY);
}

SEC("classifier/to_container")
int to_container(struct __sk_buff *skb)
{
	struct tuple4 t = {};

	PARSE_OR_PASS(skb, &t);
	/* Policy first, on the tuple the connection was opened with (a
	 * reply from a backend still carries the backend's address). */
	if (policy_check(skb, &t, DIR_INGRESS) == WEFT_DROP)
		return WEFT_DROP;
	TRY(lb4_reverse(skb, &t, 0));
	track_inbound(&t);
pass:
	count(skb, REASON_PASSED);
	return WEFT_PASS;
}

SEC("classifier/from_netdev")
int from_netdev(struct __sk_buff *skb)
{
	struct tuple4 t = {};

	PARSE_OR_PASS(skb, &t);
		TRY(lb4_reverse(skb, &t, 1));
	TRY(lb4_forward(skb, &t, 1));
	forget_stale_reverse(&t);
pass:
	count(skb, REASON_PASSED);
	return WEFT_PASS;
}

SEC("classifier/to_netdev")
int to_netdev(struct __sk_buff *skb)
{
	struct tuple4 t = {};

	PARSE_OR_PASS(skb, &t);
	TRY(lb4_reverse(skb, &t, 0));
	TRY(masquerade(skb, &t));
pass:
	count(skb, REASON_PASSED);
	return WEFT_PASS;
}

/* Socket load-balancing, for the node's own processes and its pods (see
 * sock.h). Every node's programs sit on the same cgroup in the lab (one
 * kernel, many nodes), so each acts only in its own network namespace and
 * its own pods'. Returning 1 lets the call proceed; 0 fails it, with
 * ECONNREFUSED for a Service without a backend, as kube-proxy's REJECT
 * rule would. `sendmsg`: an unconnected UDP datagram, which keeps to the
 * backend its socket's flow already has. */
static __always_inline int sock4_translate(struct bpf_sock_addr *ctx, int sendmsg)
{
	struct lb4_service *svc, s;
	struct lb4_backend *be, b;
	struct sock4_revnat_key rkey = {};
	struct sock4_revnat rn = {};
	struct sock4_flow_key fkey = {};
	struct sock4_flow *flow, nflow = {};
	struct sock4_pod *pod;
	struct sock4_xlate *xlate;
	struct bpf_sock *sk;
	struct flow_event ev = {};
	struct tuple4 t = {};
	__be32 daddr = ctx->user_ip4;
	__be16 dport = (__be16)ctx->user_port;
	__be32 client = 0;
	__u8 proto = ctx->protocol;
	struct lb4_key front = { .address = daddr, .dport = dport, .proto = proto };
	__u64 netns, cookie, now;
	__u32 id = 0, ep_id = 0, hash;
	int is_new = 1;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	if (netns != CFG_NETNS_COOKIE) {
		pod = bpf_map_lookup_elem(&weft_sock4_pods, &netns);
		if (!pod)
			return 1;
		client = pod->address;
		ep_id = pod->ep_id;
	}
	/* Whoever a hook sees is inside the cluster. */
	svc = lb4_lookup_service(&front, LB_SCOPE_INTERNAL);
	if (!svc)
		return 1;
	s = *svc;
	cookie = bpf_get_socket_cookie(ctx);
	now = bpf_ktime_get_ns();
	t.saddr = client;
	t.daddr = daddr;
	t.dport = dport;
	t.proto = proto;
	sk = ctx->sk;
	if (sk)
		t.sport = bpf_htons((__u16)sk->src_port);

	if (sendmsg) {
		fkey.cookie = cookie;
		fkey.address = daddr;
		fkey.port = dport;
		fkey.proto = proto;
		flow = bpf_map_lookup_elem(&weft_sock4_flows, &fkey);
		/* A flow keeps its backend, even a terminating one, as long as
		 * the backend exists. */
		if (flow && now - flow->last_seen <= CT_LIFETIME_NONTCP &&
		    bpf_map_lookup_elem(&weft_lb4_backends, &flow->backend_id)) {
			id = flow->backend_id;
			flow->last_seen = now;
			is_new = 0;
		}
	}
	if (is_new) {
		/* A pod's socket bound to its port hashes as the same flow does
		 * on the per-packet path, so Maglev picks the same backend
		 * either way; otherwise the socket itself is the flow. */
		if (client && t.sport)
			hash = hash3(client, daddr ^ CFG_HASH_SEED, (((__u32)t.sport) << 16 | dport) ^ proto);
		else
			hash = hash3((__u32)cookie, (__u32)(cookie >> 32), daddr ^ CFG_HASH_SEED);
		id = lb4_select(&front, &s, client, hash, now);
		be = lb4_usable_backend(s.flags, id);
	} else {
		be = bpf_map_lookup_elem(&weft_lb4_backends, &id);
	}
	if (!be) {
		count_len(0, REASON_NO_BACKEND);
		if (ep_id) {
			flow_fill(&ev, &t, FLOW_DROPPED, REASON_NO_BACKEND);
			ev.ep_id = ep_id;
			flow_emit(&ev);
		}
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}
	b = *be;
	ctx->user_ip4 = b.address;
	ctx->user_port = b.port;
	if (sendmsg) {
		rkey.cookie = cookie;
		rkey.address = b.address;
		rkey.port = b.port;
		if (is_new || !bpf_map_lookup_elem(&weft_sock4_revnat, &rkey)) {
			rn.address = daddr;
			rn.port = dport;
			rn.rev_nat_index = s.rev_nat_index;
			bpf_map_update_elem(&weft_sock4_revnat, &rkey, &rn, BPF_ANY);
		}
	} else if (sk) {
		/* A connected socket: it remembers its frontend itself. */
		xlate = bpf_sk_storage_get(&weft_sock4_xlate, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (xlate) {
			xlate->address = daddr;
			xlate->port = dport;
			xlate->rev_nat_index = s.rev_nat_index;
			xlate->backend = b.address;
			xlate->backend_port = b.port;
		}
	}
	if (!is_new)
		return 1;
	if (sendmsg) {
		nflow.last_seen = now;
		nflow.backend_id = id;
		bpf_map_update_elem(&weft_sock4_flows, &fkey, &nflow, BPF_ANY);
	}
	count_len(0, REASON_SOCK_TRANSLATED);
	if (ep_id) {
		flow_fill(&ev, &t, FLOW_TRANSLATED, REASON_SOCK_TRANSLATED);
		ev.daddr = b.address;
		ev.dport = b.port;
		ev.orig_daddr = daddr;
		ev.orig_dport = dport;
		ev.ep_id = ep_id;
		flow_emit(&ev);
	}
	return 1;
}

/* Shows a translated socket its frontend again. Both ways of finding the
 * translation belong to this node's programs alone (the socket's own
 * storage in this node's map, or this node's map keyed by the socket's
 * cookie), so no namespace check is needed. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct sock4_revnat_key rkey = {};
	struct sock4_revnat *rn;
	struct sock4_xlate *xlate;
	struct bpf_sock *sk = ctx->sk;
	__be32 addr = ctx->user_ip4;
	__be16 port = (__be16)ctx->user_port;

	if (sk) {
		xlate = bpf_sk_storage_get(&weft_sock4_xlate, sk, 0, 0);
		if (xlate && xlate->backend == addr && xlate->backend_port == port) {
			ctx->user_ip4 = xlate->address;
			ctx->user_port = xlate->port;
			return 1;
		}
	}
	if (ctx->protocol != IPPROTO_UDP)
		return 1;
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.address = addr;
	rkey.port = port;
	rn = bpf_map_lookup_elem(&weft_sock4_revnat, &rkey);
	if (rn) {
		ctx->user_ip4 = rn->address;
		ctx->user_port = rn->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, 0);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, 1);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
