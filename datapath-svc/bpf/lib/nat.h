/* Address and port rewrites with incremental checksum updates, and sending
 * a rewritten packet on without the kernel's input routing.
 *
 * Each rewrite updates the L4 checksum (the address is part of the
 * pseudo-header, hence BPF_F_PSEUDO_HDR), stores the new port and address,
 * and fixes the IP header checksum. UDP checksums of zero mean "none" and
 * must stay zero, which BPF_F_MARK_MANGLED_0 takes care of. The helpers may
 * move the packet, so callers re-derive packet pointers afterwards.
 */
#ifndef WEFT_NAT_H
#define WEFT_NAT_H

#include "common.h"

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

#ifndef AF_INET
#define AF_INET 2
#endif

static __always_inline int l4_csum_off(__u32 l4_off, __u8 proto, __u64 *flags)
{
	if (proto == IPPROTO_TCP) {
		*flags = 0;
		return l4_off + offsetof(struct tcphdr, check);
	}
	*flags = BPF_F_MARK_MANGLED_0;
	return l4_off + offsetof(struct udphdr, check);
}

/* Rewrites one endpoint of the packet: the destination when `dst` is set,
 * else the source. Ports sit at the same offsets in TCP and UDP. */
static __always_inline int nat_rewrite(struct __sk_buff *skb, __u32 l4_off, __u8 proto, int dst,
				       __be32 old_addr, __be32 new_addr, __be16 old_port,
				       __be16 new_port)
{
	__u64 flags;
	int csum_off = l4_csum_off(l4_off, proto, &flags);
	__u32 port_off = l4_off + (dst ? offsetof(struct udphdr, dest) : offsetof(struct udphdr, source));
	__u32 addr_off = dst ? IP_DST_OFF : IP_SRC_OFF;

	if (old_port != new_port) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, flags | sizeof(new_port)))
			return -1;
		if (bpf_skb_store_bytes(skb, port_off, &new_port, sizeof(new_port), 0))
			return -1;
	}
	if (old_addr != new_addr) {
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
					flags | BPF_F_PSEUDO_HDR | sizeof(new_addr)))
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)))
			return -1;
		if (bpf_skb_store_bytes(skb, addr_off, &new_addr, sizeof(new_addr), 0))
			return -1;
	}
	return 0;
}

/* Sends a packet whose source became one of the node's own addresses out
 * by the route to its destination. The kernel's input path would drop it as
 * a martian (a packet from outside claiming a local source), so it must not
 * take that path. Returns a tc verdict. */
static __always_inline int redirect_by_route(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.ipv4_src = saddr,
		.ipv4_dst = daddr,
		.ifindex = skb->ingress_ifindex,
	};
	int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);

	if (rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(fib.ifindex, NULL, 0, 0);
	return -1;
}

#endif
