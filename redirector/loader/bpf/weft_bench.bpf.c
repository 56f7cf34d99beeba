// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/*
 * Benchmark only (redirector-bench): programs that do nothing, to separate
 * the kernel's cost of having a cgroup hook at all from our programs' work.
 * Never loaded by the redirector itself.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("cgroup/getsockopt")
int weft_bench_noop_getsockopt(struct bpf_sockopt *ctx)
{
	return 1;
}

SEC("cgroup/connect4")
int weft_bench_noop_connect4(struct bpf_sock_addr *ctx)
{
	return 1;
}

char _license[] SEC("license") = "Dual BSD/GPL";
