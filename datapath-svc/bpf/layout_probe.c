/* Prints the size and field offsets of every map key and value, as Rust
 * source, so a test can check datapath-svc/src/maps.rs against the C side.
 * Built and run on the host by build.rs. */
#define WEFT_LAYOUT_PROBE
#include <stddef.h>
#include <stdio.h>

#include "lib/conntrack.h"
#include "lib/lb.h"
#include "lib/metrics.h"
#include "lib/sock.h"
#include "lib/conntrack.h"
#include "lib/policy.h"
#include "lib/flows.h"

#define STRUCT(s) printf("    (\"%s\", %zu, &[", #s, sizeof(struct s))
#define FIELD(s, f) printf("(\"%s\", %zu), ", #f, offsetof(struct s, f))
#define END() printf("]),\n")

int main(void)
{
	printf("/// (struct, size, [(field, offset)]) as the C compiler lays them out.\n");
	printf("pub(super) const C_LAYOUT: &[(&str, usize, &[(&str, usize)])] = &[\n");
	STRUCT(lb4_key);
	FIELD(lb4_key, address);
	FIELD(lb4_key, dport);
	FIELD(lb4_key, backend_slot);
	FIELD(lb4_key, proto);
	FIELD(lb4_key, scope);
	END();
	STRUCT(lb4_service);
	FIELD(lb4_service, backend_id);
	FIELD(lb4_service, count);
	FIELD(lb4_service, rev_nat_index);
	FIELD(lb4_service, flags);
	FIELD(lb4_service, algorithm);
	FIELD(lb4_service, flags2);
	FIELD(lb4_service, affinity_timeout);
	END();
	STRUCT(lb4_backend);
	FIELD(lb4_backend, address);
	FIELD(lb4_backend, port);
	FIELD(lb4_backend, proto);
	FIELD(lb4_backend, flags);
	END();
	STRUCT(lb4_reverse_nat);
	FIELD(lb4_reverse_nat, address);
	FIELD(lb4_reverse_nat, port);
	END();
	STRUCT(ct4_key);
	FIELD(ct4_key, saddr);
	FIELD(ct4_key, daddr);
	FIELD(ct4_key, sport);
	FIELD(ct4_key, dport);
	FIELD(ct4_key, proto);
	END();
	STRUCT(ct4_entry);
	FIELD(ct4_entry, last_seen);
	FIELD(ct4_entry, backend_id);
	FIELD(ct4_entry, address);
	FIELD(ct4_entry, port);
	FIELD(ct4_entry, rev_nat_index);
	FIELD(ct4_entry, flags);
	FIELD(ct4_entry, nat_addr);
	FIELD(ct4_entry, nat_port);
	END();
		STRUCT(snat4_port_key);
	FIELD(snat4_port_key, nat_addr);
	FIELD(snat4_port_key, nat_port);
	FIELD(snat4_port_key, proto);
	END();
	STRUCT(snat4_port);
	FIELD(snat4_port, remote_addr);
	FIELD(snat4_port, remote_port);
	END();
		STRUCT(policy_key);
	FIELD(policy_key, ep_id);
	FIELD(policy_key, identity);
	FIELD(policy_key, direction);
	FIELD(policy_key, proto);
	FIELD(policy_key, dport);
	END();
	STRUCT(policy_entry);
	FIELD(policy_entry, flags);
	END();
	STRUCT(ipcache_key);
	FIELD(ipcache_key, addr);
	END();
	STRUCT(ipcache_entry);
	FIELD(ipcache_entry, identity);
	FIELD(ipcache_entry, flags);
	END();
	STRUCT(endpoint_policy);
	FIELD(endpoint_policy, flags);
	FIELD(endpoint_policy, identity);
	END();
	STRUCT(policy_ct_key);
	FIELD(policy_ct_key, saddr);
	FIELD(policy_ct_key, daddr);
	FIELD(policy_ct_key, sport);
	FIELD(policy_ct_key, dport);
	FIELD(policy_ct_key, proto);
	FIELD(policy_ct_key, ep_id);
	END();
	STRUCT(flow_event);
	FIELD(flow_event, timestamp);
	FIELD(flow_event, saddr);
	FIELD(flow_event, daddr);
	FIELD(flow_event, orig_daddr);
	FIELD(flow_event, ep_id);
	FIELD(flow_event, src_identity);
	FIELD(flow_event, dst_identity);
	FIELD(flow_event, sport);
	FIELD(flow_event, dport);
	FIELD(flow_event, orig_dport);
	FIELD(flow_event, proto);
	FIELD(flow_event, verdict);
	FIELD(flow_event, reason);
	FIELD(flow_event, direction);
	END();
	STRUCT(lb4_maglev_key);
	FIELD(lb4_maglev_key, rev_nat_index);
	FIELD(lb4_maglev_key, block);
	END();
	STRUCT(lb4_maglev_block);
	FIELD(lb4_maglev_block, backend_ids);
	END();
	STRUCT(lb4_affinity_key);
	FIELD(lb4_affinity_key, client);
	FIELD(lb4_affinity_key, rev_nat_index);
	END();
	STRUCT(lb4_affinity);
	FIELD(lb4_affinity, last_used);
	FIELD(lb4_affinity, backend_id);
	END();
	STRUCT(sock4_revnat_key);
	FIELD(sock4_revnat_key, cookie);
	FIELD(sock4_revnat_key, address);
	FIELD(sock4_revnat_key, port);
	END();
	STRUCT(sock4_xlate);
	FIELD(sock4_xlate, address);
	FIELD(sock4_xlate, port);
	FIELD(sock4_xlate, rev_nat_index);
	FIELD(sock4_xlate, backend);
	FIELD(sock4_xlate, backend_port);
	END();
	STRUCT(sock4_pod);
	FIELD(sock4_pod, address);
	FIELD(sock4_pod, ep_id);
	END();
	STRUCT(sock4_flow_key);
	FIELD(sock4_flow_key, cookie);
	FIELD(sock4_flow_key, address);
	FIELD(sock4_flow_key, port);
	FIELD(sock4_flow_key, proto);
	END();
	STRUCT(sock4_flow);
	FIELD(sock4_flow, last_seen);
	FIELD(sock4_flow, backend_id);
	END();
	STRUCT(sock4_revnat);
	FIELD(sock4_revnat, address);
	FIELD(sock4_revnat, port);
	FIELD(sock4_revnat, rev_nat_index);
	END();
	STRUCT(metrics_value);
	FIELD(metrics_value, packets);
	FIELD(metrics_value, bytes);
	END();
	printf("];\n");
	return 0;
}
