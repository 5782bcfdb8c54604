//! Owned partitions: each partition of an owned stage is held by one live consumer at a
//! time, through an expiring lease in Redis.
//!
//! - **Membership.** Every consumer of the group keeps an entry in a sorted set scored by
//!   its expiry (by the Redis clock), refreshed every third of the lease time.
//! - **Assignment.** The live members, sorted by name, take partitions round-robin:
//!   partition `p` belongs to member `p mod n`. Every member computes the same answer, so
//!   partitions spread evenly and move when a member joins or dies.
//! - **Leases.** A member takes an assigned partition with `SET lease token NX PX ttl` and
//!   renews it while it lives. The token is unique per acquisition; every script that claims
//!   or acknowledges for the partition checks it (fencing), so a member that lost its lease
//!   (paused, cut off, slow) can neither ack nor forward for it. Entries it still reads stay
//!   pending, and the owner's commits are refused until it has claimed them back in order.
//! - **Hand-over.** A member that is no longer assigned a partition finishes its batch,
//!   then deletes its lease; the new owner takes it on its next tick, and first handles
//!   the partition's pending entries in id order, then reads new ones.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use redis::Value;
use tokio::{sync::Notify, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    connection::Redis,
    keys::{KeySpace, Partition},
    scripts::{as_int, as_string, scripts},
};

/// The lease manager of one owned stage loop.
pub(crate) struct Ownership {
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    /// Ends the manager. Separate from the stage's shutdown: leases must be renewed until
    /// the loop has finished the batch in hand, or its commit would be refused.
    stop: CancellationToken,
    ttl: Duration,
    redis: Redis,
    leases: BTreeMap<Partition, String>,
    members_key: String,
    consumer: String,
}

struct Shared {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    assigned: BTreeSet<Partition>,
    held: BTreeMap<Partition, Held>,
}

struct Held {
    token: String,
    announced: bool,
}

/// What changed since the stage loop last looked.
#[derive(Debug, Default)]
pub(crate) struct OwnershipChanges {
    /// Newly acquired partitions and their tokens: load state, drain pending, then read.
    pub(crate) acquired: Vec<(Partition, String)>,
    /// Partitions held but now assigned elsewhere: finish, then release.
    pub(crate) to_release: Vec<Partition>,
    /// Partitions whose lease could not be renewed: stop at once.
    pub(crate) lost: Vec<Partition>,
}

impl Ownership {
    /// Starts the membership/lease task for `consumer` in `group`. Once `shutdown` is
    /// cancelled it takes no new partition, but renews those it holds until [`Self::stop`].
    pub(crate) fn start(
        redis: Redis,
        keys: &KeySpace,
        group: &str,
        consumer: &str,
        leases: BTreeMap<Partition, String>,
        ttl: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
        });
        let members_key = keys.members(group);
        let stop = CancellationToken::new();
        let task = tokio::spawn(manage(
            redis.clone(),
            shared.clone(),
            leases.clone(),
            members_key.clone(),
            consumer.to_owned(),
            ttl,
            shutdown,
            stop.clone(),
        ));
        Self {
            shared,
            task,
            stop,
            ttl,
            redis,
            leases,
            members_key,
            consumer: consumer.to_owned(),
        }
    }

    /// Changes relative to the partitions the loop reads now.
    pub(crate) fn changes(&self, active: &BTreeSet<Partition>) -> OwnershipChanges {
        let mut state = self.shared.state.lock().expect("ownership state poisoned");
        let mut changes = OwnershipChanges::default();
        let assigned = state.assigned.clone();
        for (partition, held) in state.held.iter_mut() {
            if !held.announced {
                held.announced = true;
                changes.acquired.push((*partition, held.token.clone()));
            } else if active.contains(partition) && !assigned.contains(partition) {
                changes.to_release.push(*partition);
            }
        }
        changes.lost = active
            .iter()
            .filter(|p| !state.held.contains_key(p))
            .copied()
            .collect();
        changes
    }

    /// Resolves when the manager has news (a lease won or lost, a new assignment).
    pub(crate) async fn changed(&self) {
        self.shared.notify.notified().await;
    }

    /// Gives up `partition` (after its batch is finished): deletes the lease if still ours.
    pub(crate) async fn release(&self, partition: Partition, token: &str) {
        self.forget(partition, token);
        let Some(lease) = self.leases.get(&partition) else {
            return;
        };
        let result = async {
            let mut conn = self.redis.pooled().await?;
            scripts()
                .release_lease
                .run(&mut *conn, &[lease], &[token])
                .await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(partition, error = %e, "could not release lease; it will expire");
        }
    }

    /// Stops tracking `partition` under `token` (that lease is gone). A newer lease on it,
    /// taken since, is kept: the loop learns of it as acquired.
    pub(crate) fn forget(&self, partition: Partition, token: &str) {
        let mut state = self.shared.state.lock().expect("ownership state poisoned");
        if state.held.get(&partition).is_some_and(|h| h.token == token) {
            state.held.remove(&partition);
        }
    }

    /// Stops the manager, releases every lease it still holds (also those taken while the
    /// last batch was in hand, which the loop never read) and leaves the membership, so
    /// peers rebalance at once.
    pub(crate) async fn stop(mut self) {
        self.stop.cancel();
        // Wait for the manager's round to end, so that it cannot take a lease after the
        // releases below; a round stuck on an unreachable Redis is cut short.
        if tokio::time::timeout(self.ttl, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        let held: Vec<(Partition, String)> = {
            let mut state = self.shared.state.lock().expect("ownership state poisoned");
            std::mem::take(&mut state.held)
                .into_iter()
                .map(|(p, h)| (p, h.token))
                .collect()
        };
        for (partition, token) in held {
            self.release(partition, &token).await;
        }
        let result = async {
            let mut conn = self.redis.pooled().await?;
            scripts()
                .membership
                .run(
                    &mut *conn,
                    &[&self.members_key],
                    &[self.consumer.as_str(), "0", "leave"],
                )
                .await
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not leave membership; it will expire");
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The partitions member `me` is assigned when `members` (sorted) are alive.
pub(crate) fn assignment(
    members: &[String],
    me: &str,
    partitions: impl Iterator<Item = Partition>,
) -> BTreeSet<Partition> {
    // The membership script returns members by score (their expiry), which differs from
    // one consumer's view to another's as they refresh at different times: sort by name so
    // that every member computes the same assignment.
    let mut members = members.to_vec();
    if !members.iter().any(|m| m == me) {
        members.push(me.to_owned());
    }
    members.sort();
    members.dedup();
    let index = members.iter().position(|m| m == me).unwrap_or(0);
    let count = members.len() as u32;
    partitions
        .enumerate()
        .filter(|(i, _)| (*i as u32) % count == index as u32)
        .map(|(_, p)| p)
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn manage(
    redis: Redis,
    shared: Arc<Shared>,
    leases: BTreeMap<Partition, String>,
    members_key: String,
    consumer: String,
    ttl: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let tick = ttl / 3;
    let ttl_ms = (ttl.as_millis() as u64).to_string();
    loop {
        let acquire = !shutdown.is_cancelled();
        match tick_once(
            &redis,
            &shared,
            &leases,
            &members_key,
            &consumer,
            &ttl_ms,
            acquire,
        )
        .await
        {
            Ok(true) => shared.notify.notify_one(),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "lease maintenance failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One round: refresh membership, renew held leases, take free assigned partitions (if
/// `acquire`). Returns whether anything changed.
async fn tick_once(
    redis: &Redis,
    shared: &Shared,
    leases: &BTreeMap<Partition, String>,
    members_key: &str,
    consumer: &str,
    ttl_ms: &str,
    acquire: bool,
) -> crate::error::Result<bool> {
    let mut conn = redis.pooled().await?;
    let reply = scripts()
        .membership
        .run(&mut *conn, &[members_key], &[consumer, ttl_ms, "join"])
        .await?;
    let members: Vec<String> = match reply {
        Value::Array(values) => values
            .into_iter()
            .map(as_string)
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    let assigned = assignment(&members, consumer, leases.keys().copied());
    let held: Vec<(Partition, String)> = {
        let mut state = shared.state.lock().expect("ownership state poisoned");
        let changed = state.assigned != assigned;
        state.assigned = assigned.clone();
        if changed {
            shared.notify.notify_one();
        }
        state
            .held
            .iter()
            .map(|(p, h)| (*p, h.token.clone()))
            .collect()
    };
    let mut changed = false;
    let renewals = held.iter().map(|(partition, token)| {
        let mut conn = conn.clone();
        let lease = leases[partition].clone();
        async move {
            let r = scripts()
                .renew_lease
                .run(&mut conn, &[lease], &[token.as_str(), ttl_ms])
                .await;
            (*partition, r)
        }
    });
    for (partition, result) in futures::future::join_all(renewals).await {
        match result {
            Ok(v) if as_int(&v).unwrap_or(0) == 1 => {}
            Ok(_) => {
                tracing::warn!(partition, "lease expired before renewal");
                shared
                    .state
                    .lock()
                    .expect("ownership state poisoned")
                    .held
                    .remove(&partition);
                changed = true;
            }
            Err(e) => return Err(e),
        }
    }
    if !acquire {
        return Ok(changed);
    }
    let held_now: BTreeSet<Partition> = held.iter().map(|(p, _)| *p).collect();
    for partition in assigned.difference(&held_now) {
        let token = format!("{consumer}#{:016x}", rand::random::<u64>());
        let won: Option<String> = redis::cmd("SET")
            .arg(&leases[partition])
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut *conn)
            .await?;
        if won.is_some() {
            shared
                .state
                .lock()
                .expect("ownership state poisoned")
                .held
                .insert(
                    *partition,
                    Held {
                        token,
                        announced: false,
                    },
                );
            changed = true;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_evenly_and_completely() {
        let members: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut all = BTreeSet::new();
        let mut sizes = Vec::new();
        for me in &members {
            let mine = assignment(&members, me, 0..16);
            sizes.push(mine.len());
            assert!(all.is_disjoint(&mine));
            all.extend(mine);
        }
        assert_eq!(all, (0..16).collect());
        sizes.sort();
        assert_eq!(sizes, vec![5, 5, 6]);
    }

    #[test]
    fn every_member_computes_the_same_assignment_whatever_the_list_order() {
        // As ZRANGE by expiry returns them: each member sees itself last after refreshing.
        let seen_by_a: Vec<String> = ["b", "a"].map(String::from).to_vec();
        let seen_by_b: Vec<String> = ["a", "b"].map(String::from).to_vec();
        let a = assignment(&seen_by_a, "a", 0..4);
        let b = assignment(&seen_by_b, "b", 0..4);
        assert!(a.is_disjoint(&b), "{a:?} {b:?}");
        assert_eq!(a.len() + b.len(), 4);
    }

    #[test]
    fn a_member_missing_from_the_list_counts_itself() {
        let mine = assignment(&["b".to_owned()], "a", 0..4);
        assert_eq!(mine, BTreeSet::from([0, 2]));
    }
}
