//! The objects in effect, one small store per kind (as ztunnel keeps one store per kind
//! of state): a file's objects of that kind are inserted or removed together, since a
//! file is the unit of change. Each store sits behind its own `Arc`, replaced only when
//! an edit touches that kind, so the stages of `super::stages` tell what changed by
//! pointer: an edit of a VirtualService leaves the WorkloadEntry store, and every stage
//! that reads only it, as it was.

use crate::config::credentials::Credential;
use crate::config::envoy_filter::EnvoyFilterSpec;
use crate::config::model::{
    DestinationRuleSpec, MeshConfigSpec, ServiceEntrySpec, VirtualServiceSpec, WorkloadEntrySpec,
};
use crate::config::peer_authentication::PeerAuthenticationSpec;
use crate::config::request_authentication::RequestAuthenticationSpec;
use crate::config::security::AuthorizationPolicySpec;
use crate::config::store::FileKey;
use crate::config::{ClusterMeta, ConfigObject, Object};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// The objects of one kind, by the file they came from (in [`FileKey`] order, then
/// document order: the order in which duplicates and conflicts are decided).
#[derive(Debug)]
pub struct KindStore<T> {
    files: BTreeMap<FileKey, Vec<Arc<Object<T>>>>,
    len: usize,
}

impl<T> Default for KindStore<T> {
    fn default() -> Self {
        Self {
            files: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<T> Clone for KindStore<T> {
    fn clone(&self) -> Self {
        Self {
            files: self.files.clone(),
            len: self.len,
        }
    }
}

impl<T> KindStore<T> {
    /// This kind's objects of `file`.
    pub fn file(&self, file: &FileKey) -> &[Arc<Object<T>>] {
        self.files.get(file).map(Vec::as_slice).unwrap_or_default()
    }

    /// Replaces this kind's objects of `file` (none: the file has no such object).
    pub fn insert_file(&mut self, file: &FileKey, objects: Vec<Arc<Object<T>>>) {
        if objects.is_empty() {
            self.remove_file(file);
            return;
        }
        self.len += objects.len();
        if let Some(old) = self.files.insert(file.clone(), objects) {
            self.len -= old.len();
        }
    }

    pub fn remove_file(&mut self, file: &FileKey) {
        if let Some(old) = self.files.remove(file) {
            self.len -= old.len();
        }
    }

    /// Every object with its file, in file then document order.
    pub fn iter(&self) -> impl Iterator<Item = (&FileKey, &Arc<Object<T>>)> {
        self.files
            .iter()
            .flat_map(|(k, objs)| objs.iter().map(move |o| (k, o)))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

macro_rules! kinds {
    ($($variant:ident => $field:ident: $spec:ty),* $(,)?) => {
        /// Everything the mesh is built from.
        #[derive(Debug, Clone, Default)]
        pub struct Inputs {
            $(pub $field: Arc<KindStore<$spec>>,)*
            /// Member clusters with a registry, and where they run.
            pub clusters: Arc<BTreeMap<String, ClusterMeta>>,
            /// Credential folders by name (`credentialName`).
            pub credentials: Arc<BTreeMap<String, Arc<Credential>>>,
        }

        /// One file's objects, split by kind.
        #[derive(Default)]
        struct ByKind {
            $($field: Vec<Arc<Object<$spec>>>,)*
        }

        impl ByKind {
            fn of(objects: &[ConfigObject]) -> ByKind {
                let mut out = ByKind::default();
                for o in objects {
                    match o {
                        $(ConfigObject::$variant(x) => out.$field.push(Arc::new(x.clone())),)*
                    }
                }
                out
            }
        }

        impl Inputs {
            /// Puts `objects` in effect as `file`'s (`None`: the file is gone). Only the
            /// stores of kinds whose objects in this file actually changed are replaced.
            pub fn set_file(&mut self, file: &FileKey, objects: Option<&[ConfigObject]>) {
                let next = ByKind::of(objects.unwrap_or_default());
                $(
                    if self.$field.file(file) != next.$field.as_slice() {
                        Arc::make_mut(&mut self.$field).insert_file(file, next.$field);
                    }
                )*
            }

            /// Object counts per kind, for the admin API.
            pub fn counts(&self) -> BTreeMap<&'static str, usize> {
                let mut out = BTreeMap::new();
                $(
                    if !self.$field.is_empty() {
                        out.insert(stringify!($variant), self.$field.len());
                    }
                )*
                out
            }
        }
    };
}

kinds! {
    MeshConfig => mesh_config: MeshConfigSpec,
    ServiceEntry => service_entries: ServiceEntrySpec,
    WorkloadEntry => workload_entries: WorkloadEntrySpec,
    VirtualService => virtual_services: VirtualServiceSpec,
    DestinationRule => destination_rules: DestinationRuleSpec,
    PeerAuthentication => peer_authentications: PeerAuthenticationSpec,
    AuthorizationPolicy => authorization_policies: AuthorizationPolicySpec,
    RequestAuthentication => request_authentications: RequestAuthenticationSpec,
    EnvoyFilter => envoy_filters: EnvoyFilterSpec,
}

impl Inputs {
    /// Inputs of loose objects (not from a store): each object counts as coming from the
    /// config folder file its source names.
    pub fn of_objects<'a>(objects: impl IntoIterator<Item = &'a ConfigObject>) -> Inputs {
        let mut files: BTreeMap<FileKey, Vec<ConfigObject>> = BTreeMap::new();
        for o in objects {
            let key = FileKey::Dir(PathBuf::from(&*o.source().file));
            files.entry(key).or_default().push(o.clone());
        }
        let mut inputs = Inputs::default();
        for (k, objs) in &files {
            inputs.set_file(k, Some(objs));
        }
        inputs
    }
}
