//! Cascading deletion over the resource tree.
//!
//! Each kind's [`CascadeParticipant`] declares its parent kinds and how to find its children.
//! Deleting a resource walks the tree below it, then:
//! 1. check — unless forced, every resource in the tree may refuse (a running VM, an offering in
//!    use); the first refusal aborts the whole deletion with a clear `in_use` error and nothing
//!    is deleted;
//! 2. delete (or force-delete) — deepest first, the resource itself last; before each resource
//!    goes, children it has gained since the walk (what deleting its other children left, or
//!    what was made meanwhile) are deleted first;
//! 3. cleanup — deepest first, after everything is gone.

use crate::error::{Error, ErrorCode};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use stratus_store::{Db, Query};
use uuid::Uuid;

#[async_trait]
pub trait CascadeParticipant: Send + Sync + 'static {
    /// The kind this participant deletes.
    fn kind(&self) -> &'static str;
    /// Kinds whose deletion reaches this kind.
    fn parents(&self) -> &'static [&'static str];
    /// Children of this kind under the given parent.
    async fn children(&self, parent_kind: &str, parent: Uuid) -> Result<Vec<Uuid>, Error>;
    /// Refuse deletion (without force) with an error saying why.
    async fn check(&self, _uuid: Uuid) -> Result<(), Error> {
        Ok(())
    }
    async fn delete(&self, uuid: Uuid) -> Result<(), Error>;
    async fn force_delete(&self, uuid: Uuid) -> Result<(), Error> {
        self.delete(uuid).await
    }
    async fn cleanup(&self, _uuid: Uuid) -> Result<(), Error> {
        Ok(())
    }
}

/// Children of `kind` whose field `field` names the parent (the usual case).
pub async fn children_by_field(
    db: &Db,
    kind: &str,
    field: &str,
    parent: Uuid,
) -> Result<Vec<Uuid>, Error> {
    Ok(db.uuids(&Query::new(kind).eq(field, parent)).await?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteMode {
    /// Refuse when any resource in the tree refuses.
    Check,
    /// Delete everything, refusals notwithstanding; errors are collected, not fatal.
    Force,
}

/// What a deletion did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CascadeReport {
    /// (kind, uuid) in deletion order.
    pub deleted: Vec<(&'static str, Uuid)>,
    /// Errors met while force-deleting.
    pub errors: Vec<Error>,
}

/// The cascade framework over the registered participants.
#[derive(Clone, Default)]
pub struct Cascade {
    by_kind: HashMap<&'static str, Arc<dyn CascadeParticipant>>,
}

impl Cascade {
    pub fn new(participants: &[Arc<dyn CascadeParticipant>]) -> Self {
        Cascade {
            by_kind: participants.iter().map(|p| (p.kind(), p.clone())).collect(),
        }
    }

    fn participant(&self, kind: &str) -> Result<&Arc<dyn CascadeParticipant>, Error> {
        self.by_kind.get(kind).ok_or_else(|| {
            Error::invalid(format!("{kind} cannot be deleted (no cascade participant)"))
        })
    }

    /// The resources below (kind, uuid), with their depth; the root at depth 0.
    pub async fn tree(
        &self,
        kind: &'static str,
        uuid: Uuid,
    ) -> Result<Vec<(usize, &'static str, Uuid)>, Error> {
        self.participant(kind)?;
        let mut depth: BTreeMap<(&'static str, Uuid), usize> = BTreeMap::new();
        let mut order: Vec<(&'static str, Uuid)> = vec![(kind, uuid)];
        depth.insert((kind, uuid), 0);
        let mut i = 0;
        while i < order.len() {
            let (k, u) = order[i];
            let d = depth[&(k, u)];
            let mut kinds: Vec<_> = self
                .by_kind
                .values()
                .filter(|p| p.parents().contains(&k))
                .collect();
            kinds.sort_by_key(|p| p.kind());
            for p in kinds {
                for child in p.children(k, u).await? {
                    let key = (p.kind(), child);
                    match depth.get(&key) {
                        // Reached again deeper (a VM under a host and under an L3): keep the
                        // deepest, so it goes before both parents.
                        Some(old) if *old > d => {}
                        Some(_) => {
                            depth.insert(key, d + 1);
                        }
                        None => {
                            depth.insert(key, d + 1);
                            order.push(key);
                        }
                    }
                }
            }
            i += 1;
        }
        let mut out: Vec<_> = order
            .into_iter()
            .map(|(k, u)| (depth[&(k, u)], k, u))
            .collect();
        // Deepest first; stable by discovery order within a depth.
        out.sort_by_key(|x| std::cmp::Reverse(x.0));
        Ok(out)
    }

    /// Children of (kind, uuid) now that this deletion has not tried yet.
    async fn late_children(
        &self,
        kind: &'static str,
        uuid: Uuid,
        tried: &BTreeSet<(&'static str, Uuid)>,
    ) -> Result<Vec<(&'static str, Uuid)>, Error> {
        let mut out = Vec::new();
        for p in self
            .by_kind
            .values()
            .filter(|p| p.parents().contains(&kind))
        {
            for c in p.children(kind, uuid).await? {
                if !tried.contains(&(p.kind(), c)) {
                    out.push((p.kind(), c));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Delete one resource: a failure ends the deletion, or, forced, is noted and passed over.
    async fn delete_one(
        &self,
        k: &'static str,
        u: Uuid,
        mode: DeleteMode,
        report: &mut CascadeReport,
    ) -> Result<(), Error> {
        let p = self.participant(k)?;
        let r = match mode {
            DeleteMode::Check => p.delete(u).await,
            DeleteMode::Force => p.force_delete(u).await,
        };
        match r {
            Ok(()) => report.deleted.push((k, u)),
            Err(e) if mode == DeleteMode::Force => {
                report.errors.push(e.context(format!("{k} {u}")))
            }
            Err(e) => return Err(e.context(format!("deleting {k} {u}"))),
        }
        Ok(())
    }

    /// Delete (kind, uuid) and everything below it.
    pub async fn delete(
        &self,
        kind: &'static str,
        uuid: Uuid,
        mode: DeleteMode,
    ) -> Result<CascadeReport, Error> {
        let tree = self.tree(kind, uuid).await?;
        if mode == DeleteMode::Check {
            for (_, k, u) in &tree {
                if let Err(e) = self.participant(k)?.check(*u).await {
                    let what = if (*k, *u) == (kind, uuid) {
                        String::new()
                    } else {
                        format!(" because of {k} {u}")
                    };
                    return Err(Error::new(
                        if e.code == ErrorCode::Internal {
                            ErrorCode::Internal
                        } else {
                            ErrorCode::InUse
                        },
                        format!(
                            "cannot delete {kind} {uuid}{what}: {}; delete with force to override",
                            e.message
                        ),
                    ));
                }
            }
        }
        let mut report = CascadeReport::default();
        let mut tried: BTreeSet<(&'static str, Uuid)> = BTreeSet::new();
        for &(_, k, u) in &tree {
            // Children that appeared after the walk go first: deleting a VM detaches its data
            // volumes, a host reconnecting meanwhile makes its storage share again (both found
            // by the model sweep, outliving their host).
            for (ck, cu) in self.late_children(k, u, &tried).await? {
                for (_, k2, u2) in self.tree(ck, cu).await? {
                    if tried.insert((k2, u2)) {
                        self.delete_one(k2, u2, mode, &mut report).await?;
                    }
                }
            }
            tried.insert((k, u));
            self.delete_one(k, u, mode, &mut report).await?;
        }
        for (k, u) in &report.deleted {
            if let Err(e) = self.participant(k)?.cleanup(*u).await {
                report.errors.push(e.context(format!("cleanup of {k} {u}")));
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    type Log = Arc<Mutex<Vec<String>>>;

    type Edges = Arc<Mutex<Vec<(u128, u128)>>>;

    /// A toy tree: zone → cluster → host → vm, with VMs that refuse while "running".
    struct Toy {
        kind: &'static str,
        parents: &'static [&'static str],
        edges: Edges,
        running: Vec<u128>,
        log: Log,
        /// Deleting one of these adds an edge to another kind's edges (a VM detaching a disk).
        leaves: Option<(Edges, (u128, u128))>,
    }

    #[async_trait]
    impl CascadeParticipant for Toy {
        fn kind(&self) -> &'static str {
            self.kind
        }
        fn parents(&self) -> &'static [&'static str] {
            self.parents
        }
        async fn children(&self, _pk: &str, parent: Uuid) -> Result<Vec<Uuid>, Error> {
            Ok(self
                .edges
                .lock()
                .unwrap()
                .iter()
                .filter(|(p, _)| Uuid::from_u128(*p) == parent)
                .map(|(_, c)| Uuid::from_u128(*c))
                .collect())
        }
        async fn check(&self, uuid: Uuid) -> Result<(), Error> {
            if self.running.contains(&uuid.as_u128()) {
                return Err(Error::new(ErrorCode::InvalidState, "it is Running"));
            }
            Ok(())
        }
        async fn delete(&self, uuid: Uuid) -> Result<(), Error> {
            if let Some((edges, edge)) = &self.leaves {
                edges.lock().unwrap().push(*edge);
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("delete {} {}", self.kind, uuid.as_u128()));
            Ok(())
        }
        async fn force_delete(&self, uuid: Uuid) -> Result<(), Error> {
            self.log
                .lock()
                .unwrap()
                .push(format!("force {} {}", self.kind, uuid.as_u128()));
            Ok(())
        }
        async fn cleanup(&self, uuid: Uuid) -> Result<(), Error> {
            self.log
                .lock()
                .unwrap()
                .push(format!("cleanup {} {}", self.kind, uuid.as_u128()));
            Ok(())
        }
    }

    fn toy(running: Vec<u128>, log: &Log) -> Cascade {
        let p = |kind, parents, edges: Vec<(u128, u128)>, running: Vec<u128>| {
            Arc::new(Toy {
                kind,
                parents,
                edges: Arc::new(Mutex::new(edges)),
                running,
                log: log.clone(),
                leaves: None,
            }) as Arc<dyn CascadeParticipant>
        };
        Cascade::new(&[
            p("zone", &[], vec![], vec![]),
            p("cluster", &["zone"], vec![(1, 10)], vec![]),
            p("host", &["cluster"], vec![(10, 100), (10, 101)], vec![]),
            p("vm", &["host"], vec![(100, 1000)], running),
        ])
    }

    #[tokio::test]
    async fn deletes_children_first_then_cleans_up() {
        let log = Log::default();
        let c = toy(vec![], &log);
        let r = c
            .delete("zone", Uuid::from_u128(1), DeleteMode::Check)
            .await
            .unwrap();
        assert_eq!(r.deleted.len(), 5);
        let l = log.lock().unwrap().clone();
        assert_eq!(
            l,
            vec![
                "delete vm 1000",
                "delete host 100",
                "delete host 101",
                "delete cluster 10",
                "delete zone 1",
                "cleanup vm 1000",
                "cleanup host 100",
                "cleanup host 101",
                "cleanup cluster 10",
                "cleanup zone 1",
            ]
        );
    }

    #[tokio::test]
    async fn a_refusing_child_stops_everything_unless_forced() {
        let log = Log::default();
        let c = toy(vec![1000], &log);
        let err = c
            .delete("zone", Uuid::from_u128(1), DeleteMode::Check)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InUse);
        assert!(
            err.message
                .contains("vm 00000000-0000-0000-0000-0000000003e8"),
            "{}",
            err.message
        );
        assert!(err.message.contains("it is Running"));
        assert!(log.lock().unwrap().is_empty(), "nothing deleted");
        let r = c
            .delete("zone", Uuid::from_u128(1), DeleteMode::Force)
            .await
            .unwrap();
        assert_eq!(r.deleted.len(), 5);
        assert_eq!(log.lock().unwrap()[0], "force vm 1000");
    }

    #[tokio::test]
    async fn children_a_deletion_leaves_behind_go_before_their_parent() {
        let log = Log::default();
        let disks = Edges::default();
        let toy = |kind, parents, edges: Edges, leaves| {
            Arc::new(Toy {
                kind,
                parents,
                edges,
                running: vec![],
                log: log.clone(),
                leaves,
            }) as Arc<dyn CascadeParticipant>
        };
        let vms = Arc::new(Mutex::new(vec![(100, 1000)]));
        // Deleting VM 1000 puts disk 5000 under host 100 (a data volume it detached).
        let c = Cascade::new(&[
            toy("host", &["cluster"], Edges::default(), None),
            toy("vm", &["host"], vms, Some((disks.clone(), (100, 5000)))),
            toy("disk", &["host"], disks, None),
        ]);
        let r = c
            .delete("host", Uuid::from_u128(100), DeleteMode::Check)
            .await
            .unwrap();
        assert_eq!(r.deleted.len(), 3);
        let l = log.lock().unwrap().clone();
        assert_eq!(
            l[..3],
            ["delete vm 1000", "delete disk 5000", "delete host 100"]
        );
    }

    #[tokio::test]
    async fn unknown_kinds_are_refused() {
        let c = toy(vec![], &Log::default());
        let err = c
            .delete("image", Uuid::from_u128(1), DeleteMode::Check)
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
    }
}
