// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Inbound capture, attached to one enrolled pod's network namespace.
 *
 * sk_lookup programs cannot call bpf_get_netns_cookie, so the loader loads
 * one instance per pod with that pod's cookie in WEFT_NETNS_COOKIE; the maps
 * are shared (pinned by name) with the cgroup programs.
 */
#include "weft_common.h"

const volatile __u64 WEFT_NETNS_COOKIE = 0;

#define LOOPBACK_IFINDEX 1

SEC("sk_lookup")
int weft_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	/* Connections made inside the pod go where they were addressed: the
	 * app talking to itself, and above all the proxy delivering an inbound
	 * connection to the app at podIP:port (else it would loop back to
	 * 15006). Such packets arrive over lo, but for a pod's own address the
	 * kernel reports the address's device as ingress, so also recognise
	 * them by source == destination (a packet from outside with our own
	 * address as source is a martian the kernel drops before lookup) and
	 * by a loopback source. All fields are loaded up front: clang would
	 * otherwise merge the v4/v6 loads into one computed ctx offset, which
	 * the verifier rejects. */
	__u32 family = ctx->family;
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 r4 = ctx->remote_ip4, l4 = ctx->local_ip4;
	__u32 r6a = ctx->remote_ip6[0], r6b = ctx->remote_ip6[1], r6c = ctx->remote_ip6[2], r6d = ctx->remote_ip6[3];
	__u32 l6a = ctx->local_ip6[0], l6b = ctx->local_ip6[1], l6c = ctx->local_ip6[2], l6d = ctx->local_ip6[3];
	if (ifindex == LOOPBACK_IFINDEX)
		return SK_PASS;
	if (family == AF_INET) {
		if (r4 == l4 || (bpf_ntohl(r4) >> 24) == 127)
			return SK_PASS;
	} else {
		if (r6a == l6a && r6b == l6b && r6c == l6c && r6d == l6d)
			return SK_PASS;
		if (r6a == 0 && r6b == 0 && r6c == 0 && r6d == bpf_htonl(1))
			return SK_PASS;
	}
	__u32 port = ctx->local_port;
	if (port == WEFT_HBONE_PORT || port == WEFT_INBOUND_PORT)
		return SK_PASS;
	if (weft_port_skipped(WEFT_NETNS_COOKIE, (__u16)port, WEFT_DIR_INBOUND))
		return SK_PASS;
	struct weft_listener_key key = {
		.netns_cookie = WEFT_NETNS_COOKIE,
		.family = family,
	};
	struct bpf_sock *sk = bpf_map_lookup_elem(&weft_inbound, &key);
	if (!sk)
		/* Fail closed: no proxy listener, no plaintext path to the app.
		 * The kernel answers a dropped lookup with a RST: refused. */
		return SK_DROP;
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

char _license[] SEC("license") = "Dual BSD/GPL";
