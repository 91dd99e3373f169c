/* Rejecting a packet for a Service with no endpoints, as kube-proxy's
 * REJECT rule does: a TCP segment is answered with a reset, a UDP datagram
 * with an ICMP port unreachable, so the client fails at once (connect()
 * and a connected socket's recv() return ECONNREFUSED) instead of
 * retransmitting into silence until it times out.
 *
 * The reply is built in the packet itself, as bpf_skb_change_tail() is
 * meant to be used for replies with control messages: the headers are read
 * to the stack, rebuilt with the addresses, ports and MACs swapped (the
 * reply comes from the frontend the client dialled), and stored back over
 * a packet cut or grown to the reply's length. Every helper here may move
 * the packet, so nothing holds a packet pointer, and the checksums are
 * computed whole, not patched.
 */
#ifndef WEFT_REJECT_H
#define WEFT_REJECT_H

#include "common.h"

/* From linux/icmp.h, which pulls in libc headers a BPF target lacks. */
#define ICMP_DEST_UNREACH 3
#define ICMP_PORT_UNREACH 3

struct reject_icmp4 {
	__u8 type;
	__u8 code;
	__be16 checksum;
	__be32 unused;
};

/* An ICMP error quotes the datagram's IP header, options and all, and the
 * first 8 bytes after it (RFC 792), here the UDP header. */
#define REJECT_IP_MAX 60
#define REJECT_QUOTE_L4 8

#define REJECT_TTL 64

/* The TCP pseudo-header the checksum covers. */
struct reject_pseudo4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
};

static __always_inline __u16 csum_fold32(__s64 sum)
{
	__u32 csum = (__u32)sum;

	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

static __always_inline __s64 csum_add_mem(const void *mem, __u32 size, __s64 seed)
{
	return bpf_csum_diff(NULL, 0, (__be32 *)mem, size, (__u32)seed);
}

/* The reply's IP header: from the frontend back to the client. */
static __always_inline void reject4_ip(struct iphdr *ip, const struct tuple4 *t, __u8 proto, __u16 len)
{
	ip->version = 4;
	ip->ihl = sizeof(*ip) / 4;
	ip->tot_len = bpf_htons(len);
	ip->ttl = REJECT_TTL;
	ip->protocol = proto;
	ip->saddr = t->daddr;
	ip->daddr = t->saddr;
	ip->check = 0;
	ip->check = csum_fold32(csum_add_mem(ip, sizeof(*ip), 0));
}

/* A reset for a TCP segment (RFC 9293, 3.10.7.1): one that acknowledged
 * something gets a reset with that sequence number; any other (a SYN,
 * nearly always) a RST|ACK acknowledging everything it occupied. A reset
 * is never answered. Returns 0 when the packet is the reply. */
static __always_inline int reject4_tcp(struct __sk_buff *skb, const struct tuple4 *t, const struct iphdr *in_ip)
{
	struct tcphdr in, out = {};
	struct iphdr ip = {};
	struct reject_pseudo4 ph = {};
	__u32 seg_len, hdrs;

	if (bpf_skb_load_bytes(skb, t->l4_off, &in, sizeof(in)) || in.rst)
		return -1;
	hdrs = in_ip->ihl * 4 + in.doff * 4;
	seg_len = bpf_ntohs(in_ip->tot_len);
	seg_len = (seg_len > hdrs ? seg_len - hdrs : 0) + in.syn + in.fin;

	out.source = in.dest;
	out.dest = in.source;
	out.doff = sizeof(out) / 4;
	out.rst = 1;
	if (in.ack) {
		out.seq = in.ack_seq;
	} else {
		out.ack = 1;
		out.ack_seq = bpf_htonl(bpf_ntohl(in.seq) + seg_len);
	}
	reject4_ip(&ip, t, IPPROTO_TCP, sizeof(ip) + sizeof(out));
	ph.saddr = ip.saddr;
	ph.daddr = ip.daddr;
	ph.proto = IPPROTO_TCP;
	ph.len = bpf_htons(sizeof(out));
	out.check = csum_fold32(csum_add_mem(&out, sizeof(out), csum_add_mem(&ph, sizeof(ph), 0)));

	if (bpf_skb_change_tail(skb, ETH_HLEN + sizeof(ip) + sizeof(out), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &out, sizeof(out), 0))
		return -1;
	return 0;
}

/* An ICMP port unreachable for a UDP datagram, quoting its IP header and
 * UDP header. Returns 0 when the packet is the reply. */
static __always_inline int reject4_udp(struct __sk_buff *skb, const struct tuple4 *t, const struct iphdr *in_ip)
{
	struct reject_icmp4 icmp = {
		.type = ICMP_DEST_UNREACH,
		.code = ICMP_PORT_UNREACH,
	};
	/* Zeroed: the unused tail of the header buffer adds nothing to the
	 * checksum, which can then always sum the whole buffer. */
	__u32 quote_ip[REJECT_IP_MAX / 4] = {};
	__u32 quote_l4[REJECT_QUOTE_L4 / 4];
	struct iphdr ip = {};
	__u32 hlen = in_ip->ihl * 4;
	__u32 opts = hlen - sizeof(*in_ip);
	__u32 len, off;
	__s64 csum;

	if (opts > REJECT_IP_MAX - sizeof(*in_ip))
		return -1;
	__builtin_memcpy(quote_ip, in_ip, sizeof(*in_ip));
	if (opts && bpf_skb_load_bytes(skb, ETH_HLEN + sizeof(*in_ip), (__u8 *)quote_ip + sizeof(*in_ip), opts))
		return -1;
	if (bpf_skb_load_bytes(skb, t->l4_off, quote_l4, sizeof(quote_l4)))
		return -1;

	len = sizeof(ip) + sizeof(icmp) + hlen + sizeof(quote_l4);
	reject4_ip(&ip, t, IPPROTO_ICMP, len);
	csum = csum_add_mem(&icmp, sizeof(icmp), 0);
	csum = csum_add_mem(quote_ip, sizeof(quote_ip), csum);
	csum = csum_add_mem(quote_l4, sizeof(quote_l4), csum);
	icmp.checksum = csum_fold32(csum);

	off = ETH_HLEN + sizeof(ip) + sizeof(icmp);
	if (bpf_skb_change_tail(skb, ETH_HLEN + len, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN + sizeof(ip), &icmp, sizeof(icmp), 0) ||
	    bpf_skb_store_bytes(skb, off, quote_ip, sizeof(*in_ip), 0))
		return -1;
	if (opts && bpf_skb_store_bytes(skb, off + sizeof(*in_ip), (__u8 *)quote_ip + sizeof(*in_ip), opts, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, off + hlen, quote_l4, sizeof(quote_l4), 0))
		return -1;
	return 0;
}

/* Turns the packet into its own rejection and sends that back the way the
 * packet came. `from_pod`: it came up a pod's veth, and goes straight back
 * into the pod's namespace (bpf_redirect_peer from the host side's
 * ingress), past the host side's egress program, whose ingress policy is
 * for traffic to the pod, not for the answer to its own packet. Otherwise
 * it leaves by the external device it arrived on. Returns a tc verdict:
 * WEFT_DROP when there is nothing to send (a reset) or the reply could not
 * be built. */
static __always_inline int reject4(struct __sk_buff *skb, const struct tuple4 *t, int from_pod)
{
	struct ethhdr eth;
	struct iphdr ip;
	int rc;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) || bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
		return WEFT_DROP;
	rc = t->proto == IPPROTO_TCP ? reject4_tcp(skb, t, &ip) : reject4_udp(skb, t, &ip);
	if (rc || bpf_skb_store_bytes(skb, 0, eth.h_source, ETH_ALEN, 0) ||
	    bpf_skb_store_bytes(skb, ETH_ALEN, eth.h_dest, ETH_ALEN, 0))
		return WEFT_DROP;
	return from_pod ? bpf_redirect_peer(skb->ifindex, 0) : bpf_redirect(skb->ifindex, 0);
}

#endif
