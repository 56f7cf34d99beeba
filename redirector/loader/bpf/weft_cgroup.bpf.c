// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Programs attached once, at the cgroup v2 root: they run for every socket
 * on the node and must be no-ops (a map miss) for anything that is not an
 * enrolled pod's TCP socket.
 *
 *   weft_connect4/6   rewrite an enrolled pod's TCP connect to the proxy's
 *                     outbound listener (127.0.0.1 / ::1 : 15001) and remember
 *                     the original destination on the socket (sk_storage).
 *   weft_sockops      once the client's local port exists (TCP_CONNECT_CB),
 *                     index the original destination by that local address,
 *                     which is what the proxy's accepted socket sees as peer.
 *   weft_getsockopt   answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST on the
 *                     proxy's accepted socket from that index.
 *   weft_getpeer4/6   make getpeername() on the client show the original
 *                     destination.
 */
#include "weft_common.h"

/* Set by the loader (PROXY_SOCKET_MARK in the Rust crate): sockets with this
 * mark belong to the node proxy and are never redirected. */
const volatile __u32 WEFT_PROXY_MARK = 0;

#define SO_ORIGINAL_DST 80       /* SOL_IP, linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80  /* SOL_IPV6, linux/netfilter_ipv6/ip6_tables.h */
#ifndef SOL_IP
#define SOL_IP 0
#endif
#ifndef SOL_IPV6
#define SOL_IPV6 41
#endif

/* The original destination of a redirected client socket; freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct weft_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_sk_orig SEC(".maps");

/* Original destination by client local address. Entries are deleted when the
 * client socket closes (sockops state callback); LRU only as a safety net. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct weft_conn_key);
	__type(value, struct weft_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_orig_dst SEC(".maps");

#define MAPPED_PREFIX bpf_htonl(0x0000ffff)

static __always_inline int is_stream_tcp(struct bpf_sock_addr *ctx)
{
	return ctx->type == SOCK_STREAM && ctx->protocol == IPPROTO_TCP;
}

/* Common checks: enrolled netns, not the proxy's socket, port not skipped. */
static __always_inline int should_redirect(struct bpf_sock_addr *ctx, __u64 cookie, __u16 dport)
{
	if (!bpf_map_lookup_elem(&weft_netns, &cookie))
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	if (WEFT_PROXY_MARK && sk->mark == WEFT_PROXY_MARK)
		return 0;
	if (weft_port_skipped(cookie, dport, WEFT_DIR_OUTBOUND))
		return 0;
	return 1;
}

/* Records the original destination; 0 when storage failed (the caller then
 * refuses the connect: an unrecorded redirect would be unusable, a direct
 * connect would be plaintext). */
static __always_inline int record(struct bpf_sock_addr *ctx, __u32 ip[4], __u16 port, __u16 family)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	struct weft_orig_dst *o =
		bpf_sk_storage_get(&weft_sk_orig, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o)
		return 0;
	o->ip[0] = ip[0];
	o->ip[1] = ip[1];
	o->ip[2] = ip[2];
	o->ip[3] = ip[3];
	o->port = port;
	o->family = family;
	return 1;
}

static __always_inline int is_v4_local(__u32 ip4_be)
{
	__u32 h = bpf_ntohl(ip4_be);
	return (h >> 24) == 127 || h == 0;
}

SEC("cgroup/connect4")
int weft_connect4(struct bpf_sock_addr *ctx)
{
	if (!is_stream_tcp(ctx))
		return 1;
#ifdef WEFT_PREVIOUS_VERSION
	/* Tests only: an "older version" with other instructions and the same
	 * behaviour (a redundant check), to upgrade from in place. */
	if (ctx->user_family != AF_INET)
		return 1;
#endif
	__u32 dst = ctx->user_ip4;
	if (is_v4_local(dst))
		return 1;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	__u16 dport = bpf_ntohs(ctx->user_port);
	if (!should_redirect(ctx, cookie, dport))
		return 1;
	__u32 ip[4] = {0, 0, MAPPED_PREFIX, dst};
	if (!record(ctx, ip, (__u16)ctx->user_port, AF_INET))
		return 0; /* EPERM: fail closed */
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(WEFT_OUTBOUND_PORT);
	return 1;
}

SEC("cgroup/connect6")
int weft_connect6(struct bpf_sock_addr *ctx)
{
	if (!is_stream_tcp(ctx))
		return 1;
	__u32 ip[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
	int mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_PREFIX;
	if (mapped) {
		if (is_v4_local(ip[3]))
			return 1;
	} else if (ip[0] == 0 && ip[1] == 0 && ip[2] == 0 &&
		   (ip[3] == 0 || ip[3] == bpf_htonl(1))) {
		return 1; /* :: or ::1 */
	}
	__u64 cookie = bpf_get_netns_cookie(ctx);
	__u16 dport = bpf_ntohs(ctx->user_port);
	if (!should_redirect(ctx, cookie, dport))
		return 1;
	if (!record(ctx, ip, (__u16)ctx->user_port, mapped ? AF_INET : AF_INET6))
		return 0;
	if (mapped) {
		/* Stay IPv4 (::ffff:127.0.0.1): the socket may be dual-stack in a pod without IPv6. */
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = MAPPED_PREFIX;
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(WEFT_OUTBOUND_PORT);
	return 1;
}

SEC("cgroup/getpeername4")
int weft_getpeer4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct weft_orig_dst *o = bpf_sk_storage_get(&weft_sk_orig, sk, 0, 0);
	if (!o || o->family != AF_INET)
		return 1;
	ctx->user_ip4 = o->ip[3];
	ctx->user_port = o->port;
	return 1;
}

SEC("cgroup/getpeername6")
int weft_getpeer6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct weft_orig_dst *o = bpf_sk_storage_get(&weft_sk_orig, sk, 0, 0);
	if (!o)
		return 1;
	/* An AF_INET6 socket sees IPv4 destinations in mapped form, which is how they are stored. */
	ctx->user_ip6[0] = o->ip[0];
	ctx->user_ip6[1] = o->ip[1];
	ctx->user_ip6[2] = o->ip[2];
	ctx->user_ip6[3] = o->ip[3];
	ctx->user_port = o->port;
	return 1;
}

/* Every context field is loaded unconditionally, then selected: if the loads
 * sit in the two branches, clang merges them into one load from a computed
 * ctx offset, which the verifier rejects. */
static __always_inline void conn_key_from_ops(struct bpf_sock_ops *ctx, struct weft_conn_key *key)
{
	__u32 family = ctx->family;
	__u32 ip4 = ctx->local_ip4;
	__u32 a = ctx->local_ip6[0], b = ctx->local_ip6[1], c = ctx->local_ip6[2], d = ctx->local_ip6[3];
	key->netns_cookie = bpf_get_netns_cookie(ctx);
	if (family == AF_INET) {
		key->ip[2] = MAPPED_PREFIX;
		key->ip[3] = ip4;
	} else {
		key->ip[0] = a;
		key->ip[1] = b;
		key->ip[2] = c;
		key->ip[3] = d;
	}
	key->port = (__u16)ctx->local_port;
}

SEC("sockops")
int weft_sockops(struct bpf_sock_ops *ctx)
{
	__u32 op = ctx->op;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct weft_orig_dst *o = bpf_sk_storage_get(&weft_sk_orig, sk, 0, 0);
	if (!o)
		return 1;
	struct weft_conn_key key = {};
	conn_key_from_ops(ctx, &key);
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		/* The local port exists now and the SYN is not sent yet, so the
		 * entry is there before the proxy can accept the connection. */
		bpf_map_update_elem(&weft_orig_dst, &key, o, BPF_ANY);
		bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	} else if (ctx->args[1] == BPF_TCP_CLOSE) {
		bpf_map_delete_elem(&weft_orig_dst, &key);
	}
	return 1;
}

SEC("cgroup/getsockopt")
int weft_getsockopt(struct bpf_sockopt *ctx)
{
	/* Runs after every getsockopt on the node: leave as early as possible,
	 * touching neither optlen nor retval, so the kernel's answer stands. */
	if (ctx->optname != SO_ORIGINAL_DST)
		return 1;
	int level = ctx->level;
	if (level != SOL_IP && level != SOL_IPV6)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;
	struct weft_conn_key key = {};
	key.netns_cookie = bpf_get_netns_cookie(ctx);
	/* Loaded unconditionally for the same reason as in conn_key_from_ops. */
	__u32 family = sk->family;
	__u32 ip4 = sk->dst_ip4;
	__u32 a = sk->dst_ip6[0], b = sk->dst_ip6[1], c = sk->dst_ip6[2], d = sk->dst_ip6[3];
	if (family == AF_INET) {
		key.ip[2] = MAPPED_PREFIX;
		key.ip[3] = ip4;
	} else {
		key.ip[0] = a;
		key.ip[1] = b;
		key.ip[2] = c;
		key.ip[3] = d;
	}
	key.port = bpf_ntohs(sk->dst_port);
	struct weft_orig_dst *o = bpf_map_lookup_elem(&weft_orig_dst, &key);
	if (!o)
		return 1;
	if (level == SOL_IP) {
		if (o->family != AF_INET)
			return 1;
		struct sockaddr_in *sin = ctx->optval;
		/* A buffer too small for the answer keeps the kernel's error. */
		if ((void *)(sin + 1) > ctx->optval_end)
			return 1;
		sin->sin_family = AF_INET;
		sin->sin_port = o->port;
		sin->sin_addr.s_addr = o->ip[3];
		__builtin_memset(sin->__pad, 0, sizeof(sin->__pad));
		ctx->optlen = sizeof(*sin);
	} else {
		if (o->family != AF_INET6)
			return 1;
		struct weft_sockaddr_in6 {
			__u16 family;
			__u16 port;
			__u32 flowinfo;
			__u32 addr[4];
			__u32 scope_id;
		} *sin6 = ctx->optval;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		sin6->family = AF_INET6;
		sin6->port = o->port;
		sin6->flowinfo = 0;
		sin6->addr[0] = o->ip[0];
		sin6->addr[1] = o->ip[1];
		sin6->addr[2] = o->ip[2];
		sin6->addr[3] = o->ip[3];
		sin6->scope_id = 0;
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
