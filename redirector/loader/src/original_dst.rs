//! `SO_ORIGINAL_DST` from user space: what the node proxy calls on an
//! accepted 15001 connection. The same call works with iptables REDIRECT,
//! so the proxy does not care how the connection was redirected.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` (SOL_IP) and `IP6T_SO_ORIGINAL_DST` (SOL_IPV6) are both 80.
pub const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination the client asked for before it was redirected.
/// Uses the option matching the socket's family (SOL_IP for IPv4, SOL_IPV6
/// for IPv6).
pub fn original_dst(socket: &impl AsRawFd) -> io::Result<SocketAddr> {
    let fd = socket.as_raw_fd();
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `storage`.
    if unsafe {
        libc::getsockname(
            fd,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let level = match storage.ss_family as libc::c_int {
        libc::AF_INET => libc::SOL_IP,
        libc::AF_INET6 => libc::SOL_IPV6,
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("SO_ORIGINAL_DST on a socket of family {other}"),
            ));
        }
    };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `storage`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sockaddr_to_std(&storage, len)
}

fn sockaddr_to_std(
    storage: &libc::sockaddr_storage,
    len: libc::socklen_t,
) -> io::Result<SocketAddr> {
    let short = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST answer too short",
        )
    };
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            if (len as usize) < std::mem::size_of::<libc::sockaddr_in>() {
                return Err(short());
            }
            // SAFETY: the family says sockaddr_in and `len` covers it.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            if (len as usize) < std::mem::size_of::<libc::sockaddr_in6>() {
                return Err(short());
            }
            // SAFETY: the family says sockaddr_in6 and `len` covers it.
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("SO_ORIGINAL_DST answered family {other}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unredirected_socket_has_no_original_dst() {
        // No program installed for this socket: the kernel's own answer
        // (no conntrack entry / no such option) comes through untouched.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let err = original_dst(&client).unwrap_err();
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::ENOPROTOOPT) | Some(libc::ENOENT)
            ),
            "{err:?}"
        );
    }
}
