/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Types and maps shared by the Weft redirector programs.
 *
 * Every map is pinned by name under the loader's bpffs directory
 * (LIBBPF_PIN_BY_NAME + the loader's map pin path): the cgroup object and
 * the per-pod sk_lookup objects then share one instance of each map, and a
 * restarted node proxy finds the same maps again.
 *
 * The layouts here are mirrored in the loader (src/maps.rs); change both.
 */
#ifndef WEFT_COMMON_H
#define WEFT_COMMON_H

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* Ports of the node proxy inside each enrolled pod (design.md). */
#define WEFT_OUTBOUND_PORT 15001
#define WEFT_INBOUND_PORT 15006
#define WEFT_HBONE_PORT 15008

#define WEFT_DIR_OUTBOUND 0
#define WEFT_DIR_INBOUND 1

/* Value of weft_netns: one entry per enrolled pod network namespace. */
struct weft_netns_info {
	__u32 flags;
	/* Pod uid (NUL-padded): lets a restarted proxy list its pods from the map alone. */
	__u8 pod_uid[60];
};

/* Key of weft_skip_ports: a port a pod's annotations exclude from capture. */
struct weft_skip_key {
	__u64 netns_cookie;
	__u16 port; /* host byte order */
	__u8 direction;
	__u8 pad[5];
};

/*
 * An original destination. Addresses are always 16 bytes: IPv4 is stored
 * IPv4-mapped (::ffff:a.b.c.d) so one layout serves both families.
 */
struct weft_orig_dst {
	__u32 ip[4]; /* network byte order */
	__u16 port;  /* network byte order */
	__u16 family; /* AF_INET or AF_INET6: which SO_ORIGINAL_DST answers */
};

/*
 * Key of weft_orig_dst: the redirected client socket's local address, which
 * is the peer address of the proxy's accepted socket, in the pod netns.
 */
struct weft_conn_key {
	__u64 netns_cookie;
	__u32 ip[4]; /* IPv4-mapped for IPv4 */
	__u16 port;  /* host byte order */
	__u16 pad;
	__u32 pad2;
};

/* Key of weft_inbound: which 15006 listener serves this netns and family. */
struct weft_listener_key {
	__u64 netns_cookie;
	__u32 family;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct weft_netns_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_netns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct weft_skip_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_skip_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 32768);
	__type(key, struct weft_listener_key);
	__type(value, __u32); /* a socket fd on update (aya's SockHash uses 4 bytes) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} weft_inbound SEC(".maps");

static __always_inline int weft_port_skipped(__u64 cookie, __u16 port, __u8 direction)
{
	struct weft_skip_key key = {
		.netns_cookie = cookie,
		.port = port,
		.direction = direction,
	};
	return bpf_map_lookup_elem(&weft_skip_ports, &key) != NULL;
}

#endif
