//! Removing an installation, and listing what it consists of.

use super::{InstalledObjects, link_pin, map_error};
use crate::objects::CGROUP_PROGRAMS;
use crate::{Error, link, maps};
use aya::maps::MapData;
use std::path::Path;

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

fn remove_dir(dir: &Path) -> Result<(), Error> {
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Pin {
            path: dir.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

pub(super) fn installed_objects(pin_dir: &Path) -> Result<InstalledObjects, Error> {
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
