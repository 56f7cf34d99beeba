//! Values derived from one destination view (compiled routes), kept until
//! the view changes: compiled at most once per view and key, and dropped
//! whole with a new view (epoch or version), so nothing stale is served.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use weft_destination_api::View;

pub(crate) struct PerView<K, V> {
    inner: Mutex<Entries<K, V>>,
}

struct Entries<K, V> {
    epoch: String,
    version: u64,
    values: HashMap<K, V>,
}

impl<K, V> Default for PerView<K, V> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Entries {
                epoch: String::new(),
                version: 0,
                values: HashMap::new(),
            }),
        }
    }
}

impl<K: Hash + Eq, V: Clone> PerView<K, V> {
    /// The value for `key` in `view`, computed by `make` the first time.
    pub(crate) fn get(&self, view: &View, key: K, make: impl FnOnce() -> V) -> V {
        let mut entries = self.inner.lock().expect("per-view cache lock");
        if entries.epoch != view.epoch || entries.version != view.version {
            *entries = Entries {
                epoch: view.epoch.clone(),
                version: view.version,
                values: HashMap::new(),
            };
        }
        entries.values.entry(key).or_insert_with(make).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_destination_api::WatchResponse;

    fn view(version: u64) -> View {
        let mut v = View::default();
        v.apply(WatchResponse {
            epoch: "e".into(),
            version,
            snapshot: true,
            ..Default::default()
        })
        .unwrap();
        v
    }

    #[test]
    fn computed_once_per_view_and_again_for_a_new_one() {
        let cache = PerView::<&str, u32>::default();
        let mut made = 0;
        let v1 = view(1);
        assert_eq!(
            cache.get(&v1, "k", || {
                made += 1;
                made
            }),
            1
        );
        assert_eq!(
            cache.get(&v1, "k", || {
                made += 1;
                made
            }),
            1
        );
        let v2 = view(2);
        assert_eq!(
            cache.get(&v2, "k", || {
                made += 1;
                made
            }),
            2
        );
        assert_eq!(made, 2);
    }
}
