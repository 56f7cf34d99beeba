//! Enrollment: which pod namespaces are captured, and their inbound listeners.

use super::attach::attach_sk_lookup;
use super::{Enrolled, PodEnrollment, Redirector, map_error};
use crate::maps::{self, ListenerKey, NetnsInfo, SkipKey};
use crate::{Error, Netns, SkipPorts, link};
use aya::maps::{HashMap as BpfHashMap, MapData};
use std::os::fd::AsRawFd;

impl Redirector {
    /// Puts a pod under capture: skip ports, the sk_lookup program on its
    /// namespace, then its cookie in the enrolled map (which turns outbound
    /// capture on, so it comes last). Enrolling an enrolled pod again
    /// refreshes its skip ports.
    ///
    /// From this point the pod's outbound TCP connects go to 127.0.0.1:15001
    /// (or [::1]:15001) in its namespace and fail with ECONNREFUSED until
    /// the proxy listens there; inbound connections are refused until a 15006
    /// listener is registered with [`Self::register_inbound_listener`].
    pub fn enroll(&self, pod: &PodEnrollment<'_>) -> Result<Enrolled, Error> {
        let skip = SkipPorts::from_annotations(&pod.annotations)?;
        let cookie = pod.netns.cookie()?;
        // The agent runs in the node's namespace (hostNetwork): enrolling its
        // own namespace would capture the node's traffic.
        if Netns::open("/proc/self/ns/net")?.cookie()? == cookie {
            return Err(Error::HostNetns {
                path: pod.netns.path().into(),
            });
        }
        let mut maps = self.lock();
        remove_skip_ports(&mut maps.skip, cookie)?;
        for (ports, direction) in [
            (&skip.outbound, maps::DIR_OUTBOUND),
            (&skip.inbound, maps::DIR_INBOUND),
        ] {
            for port in ports {
                maps.skip
                    .insert(SkipKey::new(cookie, *port, direction), 1, 0)
                    .map_err(|e| map_error(maps::SKIP_PORTS, e))?;
            }
        }
        let pin = self.pod_pin(cookie);
        if !pin.exists() {
            match attach_sk_lookup(&self.pin_dir, cookie, pod.netns, &pin) {
                Ok(()) => {}
                // Another node proxy (a rollout's other half) attached and
                // pinned it between our check and our pin: the pod has its
                // program (ours is detached as its fd closes).
                Err(Error::Attach { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists && pin.exists() => {}
                Err(e) => return Err(e),
            }
        }
        maps.netns
            .insert(cookie, NetnsInfo::new(&pod.pod_uid), 0)
            .map_err(|e| map_error(maps::NETNS, e))?;
        tracing::info!(pod_uid = %pod.pod_uid, netns = %pod.netns.path().display(), cookie, "pod enrolled");
        Ok(Enrolled {
            pod_uid: pod.pod_uid.clone(),
            netns_cookie: cookie,
        })
    }

    /// Releases a pod: outbound capture off first, then inbound, then its
    /// skip ports and listener entries. Only by a uid that names exactly
    /// one enrollment: an empty uid (a runtime that gave none) or one two
    /// enrollments share would release a neighbour; those are released by
    /// their namespace's cookie ([`Self::unenroll_cookie`]).
    pub fn unenroll(&self, pod_uid: &str) -> Result<(), Error> {
        let matching: Vec<u64> = self
            .enrolled()?
            .into_iter()
            .filter(|e| e.pod_uid == pod_uid)
            .map(|e| e.netns_cookie)
            .collect();
        match matching[..] {
            [cookie] if !pod_uid.is_empty() => self.unenroll_cookie(cookie),
            [] => Err(Error::NotEnrolled {
                uid: pod_uid.to_string(),
            }),
            _ => Err(Error::AmbiguousUid {
                uid: pod_uid.to_string(),
                count: matching.len(),
            }),
        }
    }

    /// Like [`Self::unenroll`], by namespace cookie (also cleans up after a
    /// pod whose namespace is already gone).
    pub fn unenroll_cookie(&self, cookie: u64) -> Result<(), Error> {
        let mut maps = self.lock();
        match maps.netns.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_error(maps::NETNS, e)),
        }
        link::remove_pinned(&self.pod_pin(cookie)).map_err(|source| Error::Pin {
            path: self.pod_pin(cookie),
            source,
        })?;
        remove_skip_ports(&mut maps.skip, cookie)?;
        for family in [libc::AF_INET as u32, libc::AF_INET6 as u32] {
            let _ = maps.inbound.remove(&listener_key(cookie, family));
        }
        tracing::info!(cookie, "pod unenrolled");
        Ok(())
    }

    /// Unenrolls pods whose network namespace no longer exists (a missed
    /// CNI DEL, a crash): the kernel already detached their sk_lookup link
    /// and reports its namespace as gone. Returns what was removed.
    pub fn remove_stale(&self) -> Result<Vec<Enrolled>, Error> {
        let mut removed = Vec::new();
        for pod in self.enrolled()? {
            let gone = match link::pinned_info(&self.pod_pin(pod.netns_cookie)) {
                Ok(info) => info.netns_ino == 0,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(source) => {
                    return Err(Error::Pin {
                        path: self.pod_pin(pod.netns_cookie),
                        source,
                    });
                }
            };
            if gone {
                self.unenroll_cookie(pod.netns_cookie)?;
                removed.push(pod);
            }
        }
        Ok(removed)
    }

    /// The enrolled pods, read from the kernel map.
    pub fn enrolled(&self) -> Result<Vec<Enrolled>, Error> {
        let maps = self.lock();
        maps.netns
            .iter()
            .map(|r| {
                r.map(|(cookie, info)| Enrolled {
                    pod_uid: info.uid(),
                    netns_cookie: cookie,
                })
                .map_err(|e| map_error(maps::NETNS, e))
            })
            .collect()
    }

    /// Makes `listener` (the proxy's 15006 listener, opened in `netns` with
    /// [`Netns::listen_tcp`]) the target of inbound steering for its address
    /// family in that namespace. The kernel drops the entry when the socket
    /// closes, so a crashed proxy leaves inbound failing closed.
    pub fn register_inbound_listener(
        &self,
        netns: &Netns,
        listener: &impl AsRawFd,
    ) -> Result<(), Error> {
        let cookie = netns.cookie()?;
        let family = socket_family(listener.as_raw_fd())?;
        let mut maps = self.lock();
        maps.inbound
            .insert(listener_key(cookie, family), listener.as_raw_fd(), 0)
            .map_err(|e| map_error(maps::INBOUND, e))
    }
}

fn listener_key(netns_cookie: u64, family: u32) -> ListenerKey {
    ListenerKey {
        netns_cookie,
        family,
        pad: 0,
    }
}

fn remove_skip_ports(
    skip: &mut BpfHashMap<MapData, SkipKey, u8>,
    cookie: u64,
) -> Result<(), Error> {
    let stale: Vec<SkipKey> = skip
        .keys()
        .filter_map(Result::ok)
        .filter(|k| k.netns_cookie == cookie)
        .collect();
    for key in stale {
        match skip.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_error(maps::SKIP_PORTS, e)),
        }
    }
    Ok(())
}

fn socket_family(fd: i32) -> Result<u32, Error> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getsockname writes at most `len` bytes into `addr`.
    let rc = unsafe {
        libc::getsockname(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(addr.ss_family as u32)
}
