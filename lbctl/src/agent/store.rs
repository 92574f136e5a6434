//! The agent's copy of the objects it reads, whatever the source, and which
//! Services a change touches. One EndpointSlice update makes one Service
//! dirty; only dirty Services are translated and reconciled again, so the
//! work of a change is proportional to the change, not to the cluster.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Endpoints;
use smallvec::SmallVec;

use super::{
    model::{
        NodeInfo, ObjKey, ObjectError, Objects, ServicePortKey, ServicePortState, slice_service,
        translate_service,
    },
    slice::Slice,
    svc::Svc,
};

#[derive(Debug, Default)]
pub struct Store {
    objects: Objects,
    /// Service -> the EndpointSlices labelled with its name, sorted.
    /// Nearly always one, held inline: a set per Service cost a B-tree
    /// node (about 550 bytes) for one key.
    slice_index: BTreeMap<ObjKey, SmallVec<[ObjKey; 1]>>,
    /// Services to translate again.
    dirty: BTreeSet<ObjKey>,
}

/// Generic over the three object kinds the store holds.
fn replace_kind<T: PartialEq>(
    cur: &mut BTreeMap<ObjKey, Arc<T>>,
    next: BTreeMap<ObjKey, Arc<T>>,
    mut changed: impl FnMut(&ObjKey, Option<&Arc<T>>, Option<&Arc<T>>),
) {
    for (k, old) in cur.iter() {
        if !next.contains_key(k) {
            changed(k, Some(old), None);
        }
    }
    for (k, new) in &next {
        match cur.get(k) {
            // Same object (pointer) or equal content: nothing to do.
            Some(old) if Arc::ptr_eq(old, new) || old == new => {}
            old => changed(k, old, Some(new)),
        }
    }
    *cur = next;
}

impl Store {
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Adds, replaces (`Some`) or deletes (`None`) one Service.
    pub fn service(&mut self, key: ObjKey, svc: Option<Arc<Svc>>) {
        match svc {
            Some(s) => {
                if self.objects.services.get(&key).is_some_and(|old| *old == s) {
                    return;
                }
                self.objects.services.insert(key.clone(), s);
            }
            None => {
                if self.objects.services.remove(&key).is_none() {
                    return;
                }
            }
        }
        self.dirty.insert(key);
    }

    /// Adds, replaces or deletes one EndpointSlice. Both the Service it
    /// belonged to and the one it belongs to now are dirty.
    pub fn slice(&mut self, key: ObjKey, slice: Option<Arc<Slice>>) {
        let old = match slice {
            Some(s) => {
                if self.objects.slices.get(&key).is_some_and(|old| *old == s) {
                    return;
                }
                self.index_slice(&key, &s, true);
                self.objects.slices.insert(key.clone(), s)
            }
            None => self.objects.slices.remove(&key),
        };
        if let Some(old) = old {
            self.unindex_old(&key, &old);
        }
    }

    fn index_slice(&mut self, key: &ObjKey, s: &Slice, add: bool) {
        if let Some(svc) = slice_service(key, s) {
            if add {
                let list = self.slice_index.entry(svc.clone()).or_default();
                if let Err(i) = list.binary_search(key) {
                    list.insert(i, key.clone());
                }
            } else if let Some(list) = self.slice_index.get_mut(&svc) {
                if let Ok(i) = list.binary_search(key) {
                    list.remove(i);
                }
                if list.is_empty() {
                    self.slice_index.remove(&svc);
                }
            }
            self.dirty.insert(svc);
        }
    }

    /// Drops the index entry of a slice's previous version, unless the new
    /// version still names the same Service.
    fn unindex_old(&mut self, key: &ObjKey, old: &Slice) {
        let now = self
            .objects
            .slices
            .get(key)
            .and_then(|s| slice_service(key, s));
        match (slice_service(key, old), now) {
            (Some(was), Some(is)) if was == is => {}
            _ => self.index_slice(key, old, false),
        }
    }

    /// Adds, replaces or deletes one Endpoints object.
    pub fn endpoints(&mut self, key: ObjKey, eps: Option<Arc<Endpoints>>) {
        match eps {
            Some(e) => {
                if self
                    .objects
                    .endpoints
                    .get(&key)
                    .is_some_and(|old| *old == e)
                {
                    return;
                }
                self.objects.endpoints.insert(key.clone(), e);
            }
            None => {
                if self.objects.endpoints.remove(&key).is_none() {
                    return;
                }
            }
        }
        self.dirty.insert(key);
    }

    /// A full list of Services (a re-list, or a folder's snapshot): what it
    /// lacks is deleted.
    pub fn replace_services(&mut self, next: BTreeMap<ObjKey, Arc<Svc>>) {
        let dirty = &mut self.dirty;
        replace_kind(&mut self.objects.services, next, |k, _, _| {
            dirty.insert(k.clone());
        });
    }

    pub fn replace_slices(&mut self, next: BTreeMap<ObjKey, Arc<Slice>>) {
        let mut changes = Vec::new();
        replace_kind(&mut self.objects.slices, next, |k, old, new| {
            changes.push((k.clone(), old.cloned(), new.cloned()));
        });
        for (k, old, new) in changes {
            if let Some(new) = &new {
                self.index_slice(&k, new, true);
            }
            if let Some(old) = old {
                self.unindex_old(&k, &old);
            }
        }
    }

    pub fn replace_endpoints(&mut self, next: BTreeMap<ObjKey, Arc<Endpoints>>) {
        let dirty = &mut self.dirty;
        replace_kind(&mut self.objects.endpoints, next, |k, _, _| {
            dirty.insert(k.clone());
        });
    }

    /// Translates `key` again at the next pass (a port refused for a full
    /// map, once others have left room).
    pub fn mark_dirty(&mut self, key: ObjKey) {
        if self.objects.services.contains_key(&key) {
            self.dirty.insert(key);
        }
    }

    /// Every Service must be translated again (the node changed).
    pub fn all_dirty(&mut self) {
        self.dirty.extend(self.objects.services.keys().cloned());
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Translates the dirty Services, one as each is asked for: for each,
    /// its ports now (empty when it is gone or gets no entries) or the
    /// reason it was skipped. Lazy, so a caller that hands each on before
    /// the next holds one translation at a time: all of a 10,000-Service
    /// start at once (a B-tree node per Service's ports) were a third of
    /// the agent's peak heap.
    pub fn take_changes<'a>(
        &'a mut self,
        node: &'a NodeInfo,
    ) -> impl Iterator<Item = ServiceChange> + 'a {
        let dirty = std::mem::take(&mut self.dirty);
        let this = &*self;
        dirty.into_iter().map(move |key| {
            let ports = match this.objects.services.get(&key) {
                None => Ok(BTreeMap::new()),
                Some(svc) => {
                    let slices: Vec<&Slice> = this
                        .slice_index
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter_map(|k| this.objects.slices.get(k).map(|s| &**s))
                        .collect();
                    let eps = this.objects.endpoints.get(&key).map(|e| &**e);
                    translate_service(&key, svc, &slices, eps, node)
                }
            };
            ServiceChange {
                service: key,
                ports,
            }
        })
    }
}

/// One Service translated again.
#[derive(Debug)]
pub struct ServiceChange {
    pub service: ObjKey,
    pub ports: Result<BTreeMap<ServicePortKey, ServicePortState>, ObjectError>,
}
