/* Shared definitions for weft's datapath programs.
 *
 * Every map key and value layout lives in the header of its concern
 * (lb.h, conntrack.h, metrics.h) and is mirrored by a #[repr(C)] struct in
 * datapath-svc/src/maps.rs; a test compares their sizes and offsets, so the
 * two sides cannot drift apart. Keep every struct free of implicit padding.
 */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <linux/bpf.h>
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

#endif
