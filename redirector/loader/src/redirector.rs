//! Install, adopt, enroll, unenroll, uninstall.
//!
//! Everything lives under one bpffs directory (`pin_dir`):
//!
//! ```text
//! <pin_dir>/maps/<map>          maps shared by all programs (pinned by name)
//! <pin_dir>/links/<program>     the cgroup root attachments
//! <pin_dir>/pods/<netns cookie> one sk_lookup attachment per enrolled pod
//! ```
//!
//! The kernel state is the source of truth: a restarted node proxy calls
//! [`Redirector::install`] again, finds the links and maps in place, and
//! [`Redirector::enrolled`] lists the pods from the map alone.

use crate::kernel::{self, feature_of_program};
use crate::maps::{self, ListenerKey, NetnsInfo, SkipKey};
use crate::objects::{self, CGROUP_PROGRAMS};
use crate::{Error, Netns, PROXY_SOCKET_MARK, SkipPorts, bpffs, cgroup, link};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, SockHash};
use aya::programs::{CgroupSockAddr, CgroupSockopt, Program, SkLookup, SockOps};
use aya::{Ebpf, EbpfLoader};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Where the node proxy pins its objects on a node.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/weft";

#[derive(Debug, Clone)]
pub struct RedirectorConfig {
    /// A directory on bpffs (its parent is mounted as bpffs if it is not).
    pub pin_dir: PathBuf,
    /// The cgroup v2 root; found in /proc/self/mountinfo when `None`.
    pub cgroup_root: Option<PathBuf>,
}

impl Default for RedirectorConfig {
    fn default() -> Self {
        Self {
            pin_dir: DEFAULT_PIN_DIR.into(),
            cgroup_root: None,
        }
    }
}

/// A pod to put under capture.
#[derive(Debug)]
pub struct PodEnrollment<'a> {
    pub netns: &'a Netns,
    pub pod_uid: String,
    pub annotations: HashMap<String, String>,
}

/// An enrolled pod as the kernel maps record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    pub pod_uid: String,
    pub netns_cookie: u64,
}

/// Kernel ids of everything installed, for operators (`bpftool`) and tests.
#[derive(Debug, Clone, Default)]
pub struct InstalledObjects {
    /// (pin path, link id, program id)
    pub links: Vec<(PathBuf, u32, u32)>,
    /// (map name, map id)
    pub maps: Vec<(String, u32)>,
}

/// Shared by the node proxy's tasks (`Arc<Redirector>`): every method takes
/// `&self`; map updates are serialised inside.
pub struct Redirector {
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
    maps: Mutex<Maps>,
}

struct Maps {
    netns: BpfHashMap<MapData, u64, NetnsInfo>,
    skip: BpfHashMap<MapData, SkipKey, u8>,
    inbound: SockHash<MapData, ListenerKey>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("pin_dir", &self.pin_dir)
            .field("cgroup_root", &self.cgroup_root)
            .finish_non_exhaustive()
    }
}

impl Redirector {
    /// Loads and attaches the cgroup programs at the cgroup v2 root, or
    /// adopts them if a previous run left them pinned under `pin_dir`.
    pub fn install(config: RedirectorConfig) -> Result<Self, Error> {
        kernel::check_kernel()?;
        // Probe what the release number cannot promise (backports, configs).
        if let Err(e) = Netns::current().and_then(|ns| ns.cookie()) {
            return Err(kernel::missing(
                &kernel::SO_NETNS_COOKIE,
                &kernel::running_release(),
                e.to_string(),
            ));
        }
        let cgroup_root = match config.cgroup_root {
            Some(root) => root,
            None => cgroup::find_cgroup2_root()?,
        };
        let pin_dir = config.pin_dir;
        bpffs::ensure_pin_dir(&pin_dir)?;
        let fresh = !pin_dir.join("maps").join(maps::NETNS).exists();
        let installed = Self::install_in(pin_dir.clone(), cgroup_root);
        if installed.is_err() {
            // Leave nothing half-attached behind: all of it if this call
            // created it, else only the cgroup links (the maps hold the
            // enrolled pods of the running installation).
            if fresh {
                let _ = uninstall_at(&pin_dir);
            } else {
                for p in CGROUP_PROGRAMS {
                    let _ = link::remove_pinned(&link_pin(&pin_dir, p.name));
                }
            }
        }
        installed
    }

    fn install_in(pin_dir: PathBuf, cgroup_root: PathBuf) -> Result<Self, Error> {
        let complete = CGROUP_PROGRAMS
            .iter()
            .all(|p| link_pin(&pin_dir, p.name).exists());
        if complete {
            tracing::info!(pin_dir = %pin_dir.display(), "adopting pinned redirector programs");
        } else {
            // A partial install (crash half-way): start over on these links,
            // keeping the maps and therefore the enrolled pods.
            for p in CGROUP_PROGRAMS {
                link::remove_pinned(&link_pin(&pin_dir, p.name))?;
            }
            attach_cgroup_programs(&pin_dir, &cgroup_root)?;
            tracing::info!(pin_dir = %pin_dir.display(), cgroup = %cgroup_root.display(), "redirector programs attached");
        }
        Self::open_maps(pin_dir, cgroup_root)
    }

    /// Opens an existing installation without loading or attaching anything
    /// (status tools); fails with [`Error::NotInstalled`] if it is absent.
    pub fn open(config: RedirectorConfig) -> Result<Self, Error> {
        if let Some(p) = CGROUP_PROGRAMS
            .iter()
            .find(|p| !link_pin(&config.pin_dir, p.name).exists())
        {
            return Err(Error::NotInstalled {
                pin_dir: config.pin_dir.clone(),
                missing: format!("links/{}", p.name),
            });
        }
        let cgroup_root = match config.cgroup_root {
            Some(root) => root,
            None => cgroup::find_cgroup2_root()?,
        };
        Self::open_maps(config.pin_dir, cgroup_root)
    }

    fn open_maps(pin_dir: PathBuf, cgroup_root: PathBuf) -> Result<Self, Error> {
        let maps = Maps {
            netns: open_map(&pin_dir, maps::NETNS)?,
            skip: open_map(&pin_dir, maps::SKIP_PORTS)?,
            inbound: open_map(&pin_dir, maps::INBOUND)?,
        };
        Ok(Self {
            pin_dir,
            cgroup_root,
            maps: Mutex::new(maps),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

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
            attach_sk_lookup(&self.pin_dir, cookie, pod.netns, &pin)?;
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
    /// skip ports and listener entries.
    pub fn unenroll(&self, pod_uid: &str) -> Result<(), Error> {
        let cookie = self
            .enrolled()?
            .into_iter()
            .find(|e| e.pod_uid == pod_uid)
            .map(|e| e.netns_cookie)
            .ok_or_else(|| Error::NotEnrolled {
                uid: pod_uid.to_string(),
            })?;
        self.unenroll_cookie(cookie)
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

    /// The kernel ids of our links, programs and maps.
    pub fn installed_objects(&self) -> Result<InstalledObjects, Error> {
        installed_objects(&self.pin_dir)
    }

    /// Removes every program, link, pin and map of this installation.
    pub fn uninstall(self) -> Result<(), Error> {
        let pin_dir = self.pin_dir.clone();
        // Our map fds would keep the maps alive: close them first.
        drop(self);
        uninstall_at(&pin_dir)
    }

    fn pod_pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir.join("pods").join(cookie.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the kernel maps
        // half-updated in a way the next caller must not see.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Removes every link, pin and map under `pin_dir` (no loaded instance
/// needed: an operator's uninstall, or cleaning up after a crash).
pub fn uninstall_at(pin_dir: &Path) -> Result<(), Error> {
    if !pin_dir.exists() {
        return Ok(());
    }
    // Connect hooks first (stop creating redirects), maps last.
    for p in CGROUP_PROGRAMS.iter().rev() {
        let pin = link_pin(pin_dir, p.name);
        link::remove_pinned(&pin).map_err(|source| Error::Pin { path: pin, source })?;
    }
    for sub in ["pods", "links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            link::remove_pinned(&path).map_err(|source| Error::Pin { path, source })?;
        }
        remove_dir(&dir)?;
    }
    remove_dir(pin_dir)
}

impl Redirector {
    /// See [`uninstall_at`].
    pub fn uninstall_at(pin_dir: &Path) -> Result<(), Error> {
        uninstall_at(pin_dir)
    }
}

fn remove_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Pin {
            path: dir.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn installed_objects(pin_dir: &Path) -> Result<InstalledObjects, Error> {
    let mut out = InstalledObjects::default();
    for sub in ["links", "pods"] {
        let Ok(entries) = std::fs::read_dir(pin_dir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            let info = link::pinned_info(&path).map_err(|source| Error::Pin {
                path: path.clone(),
                source,
            })?;
            out.links.push((path, info.link_id, info.prog_id));
        }
    }
    for name in maps::ALL {
        let path = pin_dir.join("maps").join(name);
        if let Ok(data) = MapData::from_pin(&path) {
            let info = data.info().map_err(|e| map_error(name, e))?;
            out.maps.push((name.to_string(), info.id()));
        }
    }
    Ok(out)
}

fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join("links").join(program)
}

fn listener_key(netns_cookie: u64, family: u32) -> ListenerKey {
    ListenerKey {
        netns_cookie,
        family,
        pad: 0,
    }
}

fn load_error(program: &str, e: impl std::fmt::Display) -> Error {
    let feature = feature_of_program(program);
    let detail = e.to_string();
    if kernel::has(&feature) {
        Error::Load {
            program: program.to_string(),
            detail,
        }
    } else {
        kernel::missing(&feature, &kernel::running_release(), detail)
    }
}

fn map_error(map: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Map {
        map,
        detail: e.to_string(),
    }
}

fn loader(pin_dir: &Path) -> EbpfLoader<'static> {
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pin_dir.join("maps"));
    loader
}

fn attach_cgroup_programs(pin_dir: &Path, cgroup_root: &Path) -> Result<(), Error> {
    let mut ebpf: Ebpf = loader(pin_dir)
        .override_global(objects::PROXY_MARK_GLOBAL, &PROXY_SOCKET_MARK, true)
        .load(objects::CGROUP_OBJECT)
        .map_err(|e| load_error("weft_cgroup", e))?;
    let cgroup = File::open(cgroup_root).map_err(|source| Error::Attach {
        program: "cgroup programs".into(),
        target: cgroup_root.into(),
        source,
    })?;
    for p in CGROUP_PROGRAMS {
        let program = ebpf.program_mut(p.name).ok_or_else(|| Error::Load {
            program: p.name.into(),
            detail: "not in the compiled object".into(),
        })?;
        load_program(program).map_err(|e| load_error(p.name, e))?;
        let prog_fd = program.fd().map_err(|e| load_error(p.name, e))?;
        let pin = link_pin(pin_dir, p.name);
        link::create_pinned(prog_fd.as_fd(), cgroup.as_fd(), p.attach_type, &pin).map_err(
            |source| Error::Attach {
                program: p.name.into(),
                target: cgroup_root.into(),
                source,
            },
        )?;
    }
    // Dropping `ebpf` closes our program fds; the pinned links keep the
    // programs (and, through them, the pinned maps) alive.
    Ok(())
}

fn load_program(program: &mut Program) -> Result<(), aya::programs::ProgramError> {
    match program {
        Program::CgroupSockAddr(p) => CgroupSockAddr::load(p),
        Program::CgroupSockopt(p) => CgroupSockopt::load(p),
        Program::SockOps(p) => SockOps::load(p),
        Program::SkLookup(p) => SkLookup::load(p),
        _ => Err(aya::programs::ProgramError::UnexpectedProgramType),
    }
}

/// One sk_lookup instance per pod: the program cannot ask which namespace it
/// runs in, so it is loaded with the pod's cookie as a constant.
fn attach_sk_lookup(pin_dir: &Path, cookie: u64, netns: &Netns, pin: &Path) -> Result<(), Error> {
    let mut ebpf = loader(pin_dir)
        .override_global(objects::NETNS_COOKIE_GLOBAL, &cookie, true)
        .load(objects::SK_LOOKUP_OBJECT)
        .map_err(|e| load_error(objects::SK_LOOKUP_PROGRAM, e))?;
    let program = ebpf
        .program_mut(objects::SK_LOOKUP_PROGRAM)
        .ok_or_else(|| Error::Load {
            program: objects::SK_LOOKUP_PROGRAM.into(),
            detail: "not in the compiled object".into(),
        })?;
    load_program(program).map_err(|e| load_error(objects::SK_LOOKUP_PROGRAM, e))?;
    let prog_fd = program
        .fd()
        .map_err(|e| load_error(objects::SK_LOOKUP_PROGRAM, e))?;
    link::create_pinned(prog_fd.as_fd(), netns.as_fd(), link::BPF_SK_LOOKUP, pin).map_err(
        |source| Error::Attach {
            program: objects::SK_LOOKUP_PROGRAM.into(),
            target: netns.path().into(),
            source,
        },
    )?;
    Ok(())
}

fn open_map<M>(pin_dir: &Path, name: &'static str) -> Result<M, Error>
where
    M: TryFrom<Map>,
    M::Error: std::fmt::Display,
{
    let path = pin_dir.join("maps").join(name);
    let data = MapData::from_pin(&path).map_err(|_| Error::NotInstalled {
        pin_dir: pin_dir.into(),
        missing: format!("maps/{name}"),
    })?;
    let map = Map::from_map_data(data).map_err(|e| map_error(name, e))?;
    M::try_from(map).map_err(|e| map_error(name, e))
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
