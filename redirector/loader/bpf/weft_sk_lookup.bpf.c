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
	/* Connections made inside the pod (over lo: app to itself, the proxy to
	 * the app) go where they were addressed. */
	if (ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return SK_PASS;
	__u32 port = ctx->local_port;
	if (port == WEFT_HBONE_PORT || port == WEFT_INBOUND_PORT)
		return SK_PASS;
	if (weft_port_skipped(WEFT_NETNS_COOKIE, (__u16)port, WEFT_DIR_INBOUND))
		return SK_PASS;
	struct weft_listener_key key = {
		.netns_cookie = WEFT_NETNS_COOKIE,
		.family = ctx->family,
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
