//! Jobs: every mutating operation is accepted at once with a job id; its state, progress and
//! result (or coded error) are stored and can be queried or awaited.

use crate::config::ConfigDef;
use crate::error::{Error, ErrorCode};
use crate::hashring::NodeId;
use crate::ids::Ids;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stratus_store::ErrorClass;
use stratus_store::{Batch, Db, JsonText, Millis, Query, Resource, Row, Update, Value};
use tokio::sync::oneshot;
use uuid::Uuid;

stratus_store::text_enum! {
    /// Life of a job.
    pub enum JobState {
        Running = "Running",
        Succeeded = "Succeeded",
        Failed = "Failed",
    }
}

stratus_store::resource! {
    /// A job: one accepted mutating operation.
    pub struct Job: "job" {
        /// Not indexed: a handful of values shared by every job, read by no query of the
        /// stack (the API's list filters on it by reading the table).
        operation: String [column],
        resource_uuid: Option<Uuid> [index, column],
        state: JobState [index, column],
        /// 0..=100.
        progress: i64 [column, quiet],
        progress_note: Option<String> [quiet],
        result: Option<JsonText>,
        error_code: Option<String>,
        error_message: Option<String>,
        node: Uuid,
        /// Boot id of the node that ran it; a job whose boot is gone was interrupted. Not
        /// indexed: the one query on it asks for boots *not* live, among the `Running` jobs
        /// (found by `state`).
        boot: Uuid,
        finished_ms: Option<Millis>,
        /// The account of the caller that submitted it.
        account_uuid: Option<Uuid> [index, column],
    }
}

impl Job {
    pub fn is_finished(&self) -> bool {
        self.state != JobState::Running
    }

    /// The job's error, if it failed.
    pub fn error(&self) -> Option<Error> {
        let code = self.error_code.as_deref()?;
        let code = serde_json::from_value(serde_json::Value::String(code.to_string()))
            .unwrap_or(ErrorCode::Internal);
        Some(Error::new(
            code,
            self.error_message.clone().unwrap_or_default(),
        ))
    }
}

pub static RETENTION: ConfigDef = ConfigDef::duration(
    "job.retention",
    "How long a finished job stays readable before it is purged",
    "24h",
    60_000,
    90 * 24 * 3_600_000,
);

/// How often each engine purges finished jobs past `job.retention` (see `engine.rs`).
pub const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Jobs deleted per commit when purging.
const PURGE_BATCH: usize = 1000;

/// Jobs one purge query finds at most. A query per commit read the whole job table each time
/// (`finished_ms` has no ordered index in the memory store, and under the scale runs' churn the
/// table is large; docs/perf-log.md); an unbounded query would make a backlog (a lowered
/// `job.retention`, purges failing for a while) one huge read on a SQL store.
const PURGE_PAGE: usize = 20_000;

type Waiters = Arc<Mutex<HashMap<Uuid, Vec<oneshot::Sender<()>>>>>;

tokio::task_local! {
    /// The job the running task works for: set around a job's body, carried by the bus to the
    /// handlers it calls ([`scoped`]), and written by the journal into the chains they start,
    /// so recovery closes a job by what its chain did and the API shows the chain's step.
    static JOB: Uuid;
}

/// The job the running task works for, if any.
pub fn current() -> Option<Uuid> {
    JOB.try_with(|j| *j).ok()
}

/// `fut` working for `job` (when given): how the bus carries the job to a handler's task.
pub async fn scoped<T>(job: Option<Uuid>, fut: impl Future<Output = T>) -> T {
    match job {
        Some(j) => JOB.scope(j, fut).await,
        None => fut.await,
    }
}

/// Unregisters one round's sender of [`Jobs::wait`] when the round ends, however it ends
/// (return, `?`, timeout, or the wait being dropped): `wake` removes only the senders of a job
/// that finishes on this node after they registered. Without it, the round that finds the job
/// finished (every wait's last) left its sender for good, and a wait on another node's job one
/// more every second.
struct Unwait<'a> {
    jobs: &'a Jobs,
    id: Uuid,
}

impl Drop for Unwait<'_> {
    fn drop(&mut self) {
        self.jobs.forget_gone_waiters(self.id);
    }
}

/// The job service of one node. Cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    db: Db,
    ids: Arc<Ids>,
    node: NodeId,
    boot: Uuid,
    waiters: Waiters,
    /// Jobs of this node whose body has not ended yet (a node that stops waits for them).
    in_flight: Arc<AtomicUsize>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Counts a job's body as in flight until it is dropped, however the task ends.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(n: &Arc<AtomicUsize>) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Handed to a job's body to report progress.
#[derive(Clone)]
pub struct JobHandle {
    jobs: Jobs,
    pub id: Uuid,
}

impl JobHandle {
    /// Record progress (percent 0..=100 and a note). Best effort: a failed write is logged.
    pub async fn progress(&self, percent: u8, note: &str) {
        if let Err(e) = self.jobs.progress(self.id, percent, note).await {
            tracing::warn!(job = %self.id, error = %e, "cannot record job progress");
        }
    }
}

impl Jobs {
    pub fn new(db: Db, ids: Arc<Ids>, node: NodeId, boot: Uuid) -> Self {
        Jobs {
            db,
            ids,
            node,
            boot,
            waiters: Arc::default(),
            in_flight: Arc::default(),
            metrics: Arc::default(),
        }
    }

    /// Count job durations in `metrics` (the node's).
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Jobs submitted on this node whose body is still running.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Record a new running job submitted by a caller of `account` (none: the node's own).
    pub async fn create(
        &self,
        account: Option<Uuid>,
        operation: &str,
        resource: Option<Uuid>,
    ) -> Result<Uuid, Error> {
        let id = self.ids.uuid();
        let job = Job {
            operation: operation.to_string(),
            resource_uuid: resource,
            state: JobState::Running,
            progress: 0,
            progress_note: None,
            result: None,
            error_code: None,
            error_message: None,
            node: self.node,
            boot: self.boot,
            finished_ms: None,
            account_uuid: account,
        };
        // Patiently too: a job row whose insert applied but was reported failed would be
        // Running with nobody to finish it.
        self.db
            .commit_patiently(
                Batch::new().insert(&Row::new(id, job)),
                crate::flow::BOOKKEEPING_PATIENCE,
            )
            .await?;
        Ok(id)
    }

    pub async fn progress(&self, id: Uuid, percent: u8, note: &str) -> Result<(), Error> {
        self.db
            .commit(
                Batch::new().update(
                    Update::of::<Job>(id)
                        .if_exists()
                        .when_eq("state", JobState::Running.as_str())
                        .set("progress", i64::from(percent.min(100)))
                        .set("progress_note", note),
                ),
            )
            .await?;
        Ok(())
    }

    /// Record the outcome and wake local waiters. Finishing twice keeps the first outcome.
    pub async fn finish(&self, id: Uuid, outcome: Result<JsonText, Error>) -> Result<(), Error> {
        let u = Update::of::<Job>(id)
            .when_eq("state", JobState::Running.as_str())
            .set(
                "finished_ms",
                stratus_store::Value::Time(stratus_rt::clock::now_ms()),
            );
        let u = match outcome {
            Ok(v) => u
                .set("state", JobState::Succeeded.as_str())
                .set("progress", 100i64)
                .set("result", Value::Json(v)),
            Err(e) => u
                .set("state", JobState::Failed.as_str())
                .set("error_code", e.code.as_str())
                .set("error_message", e.message),
        };
        let res = self
            .db
            .commit_patiently(Batch::new().update(u), crate::flow::BOOKKEEPING_PATIENCE)
            .await;
        self.wake(id);
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.class() == ErrorClass::ConditionFailed => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Delete the jobs that finished more than `keep` ago; returns how many went. Every node
    /// may run this at once: deletes of rows already gone are no-ops.
    pub async fn purge_finished(&self, keep: Duration) -> Result<usize, Error> {
        let cutoff = stratus_rt::clock::now_ms().saturating_sub(keep.as_millis() as i64);
        self.purge_finished_before(cutoff, PURGE_PAGE, PURGE_BATCH)
            .await
    }

    /// Finds them `page` at a time (uuids only) and deletes them `batch` to a commit.
    async fn purge_finished_before(
        &self,
        cutoff: i64,
        page: usize,
        batch: usize,
    ) -> Result<usize, Error> {
        let q = Query::of::<Job>()
            .not_null("finished_ms")
            .lt("finished_ms", Value::Time(cutoff))
            .limit(page as u64);
        Ok(self.db.delete_matching(&q, batch).await?)
    }

    /// Forget the waiters of `id` that stopped waiting, and the entry once none is left.
    fn forget_gone_waiters(&self, id: Uuid) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(senders) = w.get_mut(&id) {
            senders.retain(|s| !s.is_closed());
            if senders.is_empty() {
                w.remove(&id);
            }
        }
    }

    fn wake(&self, id: Uuid) {
        let senders = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        for s in senders.into_iter().flatten() {
            let _ = s.send(());
        }
    }

    pub async fn get(&self, id: Uuid) -> Result<Row<Job>, Error> {
        Ok(self.db.must_get::<Job>(id).await?)
    }

    /// Create a job, run `body` in its own task (as [`current`]'s job), record its outcome.
    /// Returns the job id at once.
    pub async fn submit<F, Fut>(
        &self,
        account: Option<Uuid>,
        operation: &str,
        resource: Option<Uuid>,
        body: F,
    ) -> Result<Uuid, Error>
    where
        F: FnOnce(JobHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<JsonText, Error>> + Send + 'static,
    {
        let id = self.create(account, operation, resource).await?;
        let in_flight = InFlight::new(&self.in_flight);
        let (started, operation) = (tokio::time::Instant::now(), operation.to_string());
        let jobs = self.clone();
        let handle = JobHandle {
            jobs: self.clone(),
            id,
        };
        tokio::spawn(async move {
            let outcome = JOB.scope(id, body(handle)).await;
            let how = outcome.as_ref().map_or_else(|e| e.code.as_str(), |_| "ok");
            let took = started.elapsed().as_secs_f64();
            jobs.metrics.job_ended(&operation, how, took);
            if let Err(e) = jobs.finish(id, outcome).await {
                tracing::error!(job = %id, error = %e, "cannot record job outcome");
            }
            drop(in_flight);
        });
        Ok(id)
    }

    /// Wait until the job finishes (or `timeout` passes) and return it.
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Result<Row<Job>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Declared before the receiver, so dropped after it: see `Unwait`.
            let _unwait = Unwait { jobs: self, id };
            let (tx, rx) = oneshot::channel();
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id)
                .or_default()
                .push(tx);
            // Its state and boot only: the whole job is read once it has finished.
            let (state, boot) = self
                .db
                .peek::<Job, _>(id, |r| {
                    Ok((r.decode::<JobState>("state")?, r.decode::<Uuid>("boot")?))
                })
                .await?
                .ok_or_else(|| Error::not_found(Job::META.name, id))?;
            if state != JobState::Running {
                return self.get(id).await;
            }
            // A job of this boot wakes its waiters when it finishes (finish() runs here); one
            // run elsewhere is re-read every second.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let step = if boot == self.boot {
                left
            } else {
                Duration::from_secs(1).min(left)
            };
            if step.is_zero() {
                return Err(Error::timeout(format!(
                    "job {id} still running after {} ms",
                    timeout.as_millis()
                )));
            }
            let _ = stratus_rt::deadline::timeout(step, rx).await;
        }
    }

    /// Mark running jobs of boots that are gone as failed (they were interrupted). The flow
    /// journal's recovery finishes their work; this only closes the job records. A job in
    /// `working` is left: a workflow of a live node works for it (the node that took the job
    /// is gone, the resource's owner runs its work) and closes it when it ends.
    pub async fn fail_orphans(
        &self,
        live_boots: &[Uuid],
        working: &std::collections::HashSet<Uuid>,
    ) -> Result<usize, Error> {
        let mut q = Query::of::<Job>().eq("state", JobState::Running.as_str());
        if !live_boots.is_empty() {
            q = q.not_in("boot", live_boots.iter().copied());
        }
        let orphans: Vec<_> = self
            .db
            .select::<Job>(&q)
            .await?
            .into_iter()
            .filter(|j| !working.contains(&j.uuid))
            .collect();
        for j in &orphans {
            self.finish(
                j.uuid,
                Err(Error::new(
                    ErrorCode::NodeUnavailable,
                    "interrupted: the management node running this job stopped, and no workflow of it was left for recovery to finish",
                )),
            )
            .await?;
        }
        Ok(orphans.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stratus_store::{MemStore, Schema};

    fn jobs() -> Jobs {
        let db = Db::new(Arc::new(MemStore::new(
            Schema::new().with(<Job as stratus_store::Resource>::META),
        )));
        Jobs::new(
            db,
            Arc::new(Ids::from_seed(1)),
            Uuid::from_u128(1),
            Uuid::from_u128(11),
        )
    }

    #[tokio::test]
    async fn submitted_job_records_progress_and_result() {
        let j = jobs();
        let id = j
            .submit(
                None,
                "vm.create",
                Some(Uuid::from_u128(5)),
                |h| async move {
                    h.progress(40, "allocated host").await;
                    Ok(JsonText::of(&serde_json::json!({"vm": "ok"})))
                },
            )
            .await
            .unwrap();
        let done = j.wait(id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(done.progress, 100);
        assert_eq!(
            done.result.as_ref().map(|r| r.to_value()),
            Some(serde_json::json!({"vm": "ok"}))
        );
        assert!(done.finished_ms.is_some());
        assert_eq!(done.progress_note.as_deref(), Some("allocated host"));
    }

    #[tokio::test]
    async fn failed_job_keeps_its_coded_error_and_first_outcome_wins() {
        let j = jobs();
        let id = j
            .submit(None, "vm.start", None, |_| async move {
                Err(Error::new(ErrorCode::CapacityExhausted, "no host fits"))
            })
            .await
            .unwrap();
        let done = j.wait(id, Duration::from_secs(5)).await.unwrap();
        assert_eq!(done.state, JobState::Failed);
        assert_eq!(done.error().unwrap().code, ErrorCode::CapacityExhausted);
        j.finish(id, Ok(JsonText::of(&()))).await.unwrap();
        assert_eq!(j.get(id).await.unwrap().state, JobState::Failed);
    }

    #[tokio::test]
    async fn finished_jobs_past_retention_are_purged_and_others_kept() {
        let j = jobs();
        let running = j.create(None, "vm.stop", None).await.unwrap();
        let recent = j.create(None, "vm.start", None).await.unwrap();
        j.finish(recent, Ok(JsonText::of(&()))).await.unwrap();
        let mut old = Vec::new();
        for _ in 0..3 {
            let id = j.create(None, "vm.reboot", None).await.unwrap();
            j.finish(id, Err(Error::timeout("x"))).await.unwrap();
            let two_hours_ago = stratus_rt::clock::now_ms() - 2 * 3_600_000;
            j.db.commit(
                Batch::new()
                    .update(Update::of::<Job>(id).set("finished_ms", Value::Time(two_hours_ago))),
            )
            .await
            .unwrap();
            old.push(id);
        }
        let hour = Duration::from_secs(3600);
        let cutoff = stratus_rt::clock::now_ms() - hour.as_millis() as i64;
        // Pages of two, commits of one: every page and every commit goes, not only the first.
        assert_eq!(j.purge_finished_before(cutoff, 2, 1).await.unwrap(), 3);
        for id in old {
            assert_eq!(j.get(id).await.unwrap_err().code, ErrorCode::NotFound);
        }
        assert_eq!(j.get(running).await.unwrap().state, JobState::Running);
        assert_eq!(j.get(recent).await.unwrap().state, JobState::Succeeded);
        assert_eq!(j.purge_finished(hour).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_wait_leaves_no_waiter_behind_however_it_ends() {
        let j = jobs();
        let waiting = || j.waiters.lock().unwrap().len();
        // Woken by the finish, then reading the finished job.
        let woken = j
            .submit(None, "vm.start", None, |_| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(JsonText::of(&()))
            })
            .await
            .unwrap();
        j.wait(woken, Duration::from_secs(5)).await.unwrap();
        assert_eq!(waiting(), 0, "after a wake-up");
        // Finished before the wait began.
        j.wait(woken, Duration::from_secs(5)).await.unwrap();
        assert_eq!(waiting(), 0, "after finding it finished");
        // Timed out, the job still running.
        let running = j.create(None, "vm.stop", None).await.unwrap();
        j.wait(running, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(waiting(), 0, "after a timeout");
        // Dropped while it waits (a client that went away).
        let dropped = tokio::time::timeout(
            Duration::from_millis(20),
            j.wait(running, Duration::from_secs(5)),
        )
        .await;
        assert!(dropped.is_err(), "the wait was still waiting");
        assert_eq!(waiting(), 0, "after being dropped");
        // Another waiter of the same job stays registered.
        let (tx, _rx) = oneshot::channel();
        j.waiters.lock().unwrap().insert(running, vec![tx]);
        j.wait(running, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(
            j.waiters.lock().unwrap()[&running].len(),
            1,
            "the other one"
        );
    }

    #[tokio::test]
    async fn orphaned_jobs_are_failed_and_waiting_times_out_cleanly() {
        let j = jobs();
        let id = j.create(None, "vm.stop", None).await.unwrap();
        let err = j.wait(id, Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Timeout);
        let none = std::collections::HashSet::new();
        assert_eq!(
            j.fail_orphans(&[Uuid::from_u128(11)], &none).await.unwrap(),
            0,
            "own boot is live"
        );
        let working = std::collections::HashSet::from([id]);
        assert_eq!(
            j.fail_orphans(&[], &working).await.unwrap(),
            0,
            "a live node's workflow works for it"
        );
        assert_eq!(j.get(id).await.unwrap().state, JobState::Running);
        assert_eq!(j.fail_orphans(&[], &none).await.unwrap(), 1);
        assert_eq!(
            j.get(id).await.unwrap().error().unwrap().code,
            ErrorCode::NodeUnavailable
        );
    }
}
