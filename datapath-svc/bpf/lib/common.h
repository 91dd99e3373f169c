/* Shared definitions for weft's datapath programs.
 *
 * Every map key and value layout lives in the header of its concern
 * (lb.h, conntrack.h, nat.h, metrics.h, sock.h) and is mirrored by a
 * #[repr(C)] struct in datapath-svc/src/maps.rs; a test compares their sizes
 * and offsets, so the two sides cannot drift apart. Keep every struct free of
 * implicit padding.
 */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/types.h>

#ifndef WEFT_LAYOUT_PROBE
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#endif

/* tc verdicts. TC_ACT_UNSPEC lets later programs in a TCX chain run;
 * TC_ACT_OK would end the chain. */
#define WEFT_PASS TC_ACT_UNSPEC
#define WEFT_DROP TC_ACT_SHOT

#ifndef WEFT_LAYOUT_PROBE
/* Set by datapath-svc at load time (see bpf.rs); read-only to the programs,
 * so the verifier folds them as constants. */
volatile const __u64 CFG_NETNS_COOKIE = 0;  /* the node's network namespace */
volatile const __be32 CFG_CLUSTER_NET = 0;  /* the cluster pod CIDR ... */
volatile const __be32 CFG_CLUSTER_MASK = 0; /* ... and its mask, network order */
volatile const __u32 CFG_MAGLEV_M = 16381;  /* Maglev table size, a prime */
volatile const __u32 CFG_MASQUERADE = 0;    /* SNAT pod traffic leaving the cluster */
volatile const __u32 CFG_HASH_SEED = 0;     /* same on every node */

/* Source ports for SNAT: above Linux's default ephemeral range, so they
 * never clash with the node's own connections. */
#define SNAT_PORT_MIN 61000
#define SNAT_PORT_MAX 65535

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
	__u16 pad;
	__u32 l4_off;
};

enum parse_result {
	PARSE_MALFORMED = -1,
	PARSE_NOT_OURS = 0, /* not IPv4 TCP/UDP, or a non-first fragment */
	PARSE_OK = 1,
};

/* The bytes of a TCP header up to and including the flags. */
#define TCP_FLAGS_OFF 13

/* Checks an IPv4 header and takes the addresses and protocol from it. */
static __always_inline int parse_ip(const struct iphdr *ip, struct tuple4 *t)
{
	if (ip->ihl < 5 || ip->version != 4)
		return PARSE_MALFORMED;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return PARSE_NOT_OURS;
	/* Later fragments carry no ports; they cannot be matched. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return PARSE_NOT_OURS;
	t->saddr = ip->saddr;
	t->daddr = ip->daddr;
	t->proto = ip->protocol;
	t->l4_off = ETH_HLEN + ip->ihl * 4;
	return PARSE_OK;
}

/* Reads the IPv4 5-tuple. Headers without options that sit in the linear
 * part of the packet (nearly all) are read in place; anything else through
 * bpf_skb_load_bytes, which also works on non-linear packets and spares the
 * verifier variable-offset pointers. */
static __always_inline int parse_tuple(struct __sk_buff *skb, struct tuple4 *t)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *iph = data + ETH_HLEN;
	__u8 *l4 = (void *)(iph + 1);
	struct iphdr ip;
	__be16 ports[2];
	int rc;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return PARSE_NOT_OURS;
	if ((void *)(l4 + TCP_FLAGS_OFF + 1) <= data_end && iph->ihl == 5) {
		rc = parse_ip(iph, t);
		if (rc != PARSE_OK)
			return rc;
		t->sport = *(__be16 *)l4;
		t->dport = *(__be16 *)(l4 + 2);
		t->tcp_flags = t->proto == IPPROTO_TCP ? l4[TCP_FLAGS_OFF] : 0;
		return PARSE_OK;
	}

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)))
		return PARSE_MALFORMED;
	rc = parse_ip(&ip, t);
	if (rc != PARSE_OK)
		return rc;
	if (bpf_skb_load_bytes(skb, t->l4_off, ports, sizeof(ports)))
		return PARSE_MALFORMED;
	t->sport = ports[0];
	t->dport = ports[1];
	t->tcp_flags = 0;
	if (ip.protocol == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, t->l4_off + TCP_FLAGS_OFF, &t->tcp_flags, 1))
		return PARSE_MALFORMED;
	return PARSE_OK;
}

static __always_inline int closes(const struct tuple4 *t)
{
	return t->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST);
}

/* A pure SYN opens a new connection. */
static __always_inline int opens(const struct tuple4 *t)
{
	return (t->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline int in_cluster(__be32 addr)
{
	return CFG_CLUSTER_MASK && (addr & CFG_CLUSTER_MASK) == CFG_CLUSTER_NET;
}

/* Jenkins' final mix of three words: a cheap, well-spread hash for picking
 * a Maglev slot. The same on every node, so every node picks the same. */
#define ROL32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))
static __always_inline __u32 hash3(__u32 a, __u32 b, __u32 c)
{
	c ^= b; c -= ROL32(b, 14);
	a ^= c; a -= ROL32(c, 11);
	b ^= a; b -= ROL32(a, 25);
	c ^= b; c -= ROL32(b, 16);
	a ^= c; a -= ROL32(c, 4);
	b ^= a; b -= ROL32(a, 14);
	c ^= b; c -= ROL32(b, 24);
	return c;
}
#endif

#endif
