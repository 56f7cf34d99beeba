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

pub(crate) mod attach;
mod enroll;
mod uninstall;

pub use uninstall::uninstall_at;

use crate::kernel;
use crate::maps::{self, ListenerKey, NetnsInfo, SkipKey};
use crate::objects::CGROUP_PROGRAMS;
use crate::{Error, Netns, bpffs, cgroup, link};
use aya::maps::{HashMap as BpfHashMap, Map, MapData, SockHash};
use std::collections::HashMap;
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

pub(super) struct Maps {
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
            upgrade_in_place(&pin_dir);
        } else {
            // A partial install (crash half-way): start over on these links,
            // keeping the maps and therefore the enrolled pods.
            for p in CGROUP_PROGRAMS {
                link::remove_pinned(&link_pin(&pin_dir, p.name))?;
            }
            attach::attach_cgroup_programs(&pin_dir, &cgroup_root)?;
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

    /// The kernel ids of our links, programs and maps.
    pub fn installed_objects(&self) -> Result<InstalledObjects, Error> {
        uninstall::installed_objects(&self.pin_dir)
    }

    /// Removes every program, link, pin and map of this installation.
    pub fn uninstall(self) -> Result<(), Error> {
        let pin_dir = self.pin_dir.clone();
        // Our map fds would keep the maps alive: close them first.
        drop(self);
        uninstall_at(&pin_dir)
    }

    pub(super) fn pod_pin(&self, cookie: u64) -> PathBuf {
        self.pin_dir.join("pods").join(cookie.to_string())
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock cannot leave the kernel maps
        // half-updated in a way the next caller must not see.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A new version of the programs replaces the attached ones in place
/// (`BPF_LINK_UPDATE` on each pinned link whose program's tag differs):
/// the hooks are never detached, so no connection is missed and no pod
/// bypasses capture. A failure keeps the attached programs (logged): they
/// work, only they are older.
fn upgrade_in_place(pin_dir: &Path) {
    match attach::upgrade_cgroup_programs(pin_dir, crate::objects::CGROUP_OBJECT) {
        Ok(upgraded) if !upgraded.is_empty() => {
            tracing::info!(programs = ?upgraded, "redirector programs upgraded in place");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot upgrade the attached redirector programs; keeping them");
        }
    }
    let pods: Vec<_> = std::fs::read_dir(pin_dir.join("pods"))
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    if pods.is_empty() {
        return;
    }
    // One instance to learn the current tag; a pod's own instance is
    // loaded only when its link runs other code.
    let current = match attach::sk_lookup_tag(pin_dir) {
        Ok(tag) => tag,
        Err(e) => {
            tracing::warn!(error = %e, "cannot load the sk_lookup program to compare; keeping the attached ones");
            return;
        }
    };
    for pod in pods {
        let Some(cookie) = pod.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let attached = link::pinned_info(&pod.path()).and_then(|i| link::prog_tag_by_id(i.prog_id));
        if attached.is_ok_and(|t| t == current) {
            continue;
        }
        match attach::upgrade_sk_lookup(pin_dir, cookie, &pod.path()) {
            Ok(true) => tracing::info!(cookie, "sk_lookup program of a pod upgraded in place"),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(cookie, error = %e, "cannot upgrade a pod's sk_lookup program; keeping it");
            }
        }
    }
}

impl Redirector {
    /// See [`uninstall_at`].
    pub fn uninstall_at(pin_dir: &Path) -> Result<(), Error> {
        uninstall_at(pin_dir)
    }
}

pub(super) fn link_pin(pin_dir: &Path, program: &str) -> PathBuf {
    pin_dir.join("links").join(program)
}

pub(super) fn map_error(map: &'static str, e: impl std::fmt::Display) -> Error {
    Error::Map {
        map,
        detail: e.to_string(),
    }
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
