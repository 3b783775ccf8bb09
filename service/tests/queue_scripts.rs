//! The capacity and queue scripts against a real Redis, through the Store
//! adapter: fair direct admission, the short-term rate, tickets, bounds,
//! weighted DRR order, expiry, leases and the once-only charge. Time is the
//! test clock offset each call passes (tokens refill with it), never sleeps.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{default_config, RedisServer};
use sluice_service::config::ServeConfig;
use sluice_service::decision::{self, ScriptDecision, ValidCheck, Verdict};
use sluice_service::queue::model;
use sluice_service::store::{Dequeued, Enqueued, Leased, Mode, NewItem, Store, StoreError, TenantStatus};
use sluice_service::tiers::TiersSnapshot;
use sluice_service::upstreams::{Upstream, Upstreams};

/// The store with the tiers the scripts get (as a replica's cached copy).
struct H {
    store: Store,
    tiers: TiersSnapshot,
}

impl H {
    fn new(config: &ServeConfig) -> H {
        H { store: Store::new(config).unwrap(), tiers: TiersSnapshot::new(config.tiers.clone(), 1) }
    }

    async fn chk(&self, c: &ValidCheck, offset: i64, up: Option<&Upstream>, ticket: &str) -> Result<ScriptDecision, StoreError> {
        self.store.check(c, offset, &self.tiers, 86_400, up, ticket).await
    }

    async fn charge(&self, it: &Leased, offset: i64, ttl: std::time::Duration) -> Result<ScriptDecision, StoreError> {
        self.store.charge(it, offset, &self.tiers, 86_400, ttl).await
    }

    async fn status(&self, tenant: &str, offset: i64) -> Result<TenantStatus, StoreError> {
        self.store.status(tenant, offset, &self.tiers).await
    }
}
use serde_json::{json, Value};
use sluice_wire::{CheckRequest, OnQuotaExceeded};

/// An upstream of 1 request/s, burst 1, no debt (unless `changes` say
/// otherwise): time is moved by hand through the test clock offset.
fn setup(redis: &RedisServer, changes: Value) -> (H, Store, Upstream) {
    let mut config = default_config(&redis.url());
    let mut u = json!({"url": "http://127.0.0.1:9", "rate": 1, "burst": 1, "debt": 0, "max_attempts": 2,
        "dispatch_timeout_ms": 1000, "lease_ms": 2000});
    for (k, v) in changes.as_object().unwrap() {
        u[k] = v.clone();
    }
    let ups = json!({"upstreams": {"u": u}}).to_string();
    config.upstreams = Upstreams::from_json(&ups).unwrap();
    let up = config.upstreams.get("u").unwrap().clone();
    let h = H::new(&config);
    let store = h.store.clone();
    (h, store, up)
}

fn check_for(tenant: &str) -> ValidCheck {
    decision::validate(CheckRequest {
        tenant: tenant.into(),
        cost: 1,
        policy: Some("p".into()),
        route_limits: vec![],
        tokens: 0,
        upload: false,
        shadow: false,
        upstream: Some("u".into()),
        can_queue: true,
        on_quota_exceeded: OnQuotaExceeded::Reject,
        max_wait_ms: None,
    })
    .unwrap()
}

fn id(n: usize) -> String {
    format!("{n:032x}")
}

/// Checks until the verdict is `queued`; the ticket of that check.
async fn ticket(h: &H, up: &Upstream, tenant: &str, offset: i64, n: usize) -> String {
    for k in 0..10 {
        let t = id(1_000_000 + n * 100 + k);
        let d = h.chk(&check_for(tenant), offset, Some(up), &t).await.unwrap();
        if d.verdict == Verdict::Queued {
            return t;
        }
    }
    panic!("{tenant} never overflowed");
}

async fn enqueue(h: &H, up: &Upstream, tenant: &str, n: usize, offset: i64) -> Enqueued {
    let ticket = ticket(h, up, tenant, offset, n).await;
    let rid = id(n);
    h.store
        .enqueue(
            up,
            &NewItem {
                id: &rid,
                ticket: &ticket,
                tenant,
                mode: Mode::Async,
                method: "GET",
                path: "/x",
                headers_json: "[]",
                body: b"",
            },
            offset,
        )
        .await
        .unwrap()
}

async fn take(store: &Store, up: &Upstream, offset: i64) -> Option<Leased> {
    for _ in 0..5 {
        match store
            .dequeue(up, offset, &model::failed_answer(), &model::timeout_answer())
            .await
            .unwrap()
        {
            Dequeued::Item(it) => return Some(*it),
            Dequeued::Busy => continue,
            Dequeued::Empty | Dequeued::Wait(_) => return None,
        }
    }
    None
}

async fn done(store: &Store, up: &Upstream, it: &Leased, offset: i64) {
    let a = model::upstream_error_answer("test");
    assert!(store.complete(up, &it.id, &a, false, offset).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncontended_a_tenant_takes_the_capacity_and_contended_it_overflows() {
    let redis = RedisServer::start();
    let (h, _store, up) = setup(&redis, json!({}));
    let t = id(1);
    let first = h.chk(&check_for("a"), 0, Some(&up), &t).await.unwrap();
    assert_eq!(first.verdict, Verdict::Allow, "a full bucket admits anyone");
    let second = h.chk(&check_for("a"), 0, Some(&up), &t).await.unwrap();
    assert_eq!(second.verdict, Verdict::Queued, "no token and no debt: overflow");
    let later = h.chk(&check_for("a"), 1_500, Some(&up), &t).await.unwrap();
    assert_eq!(later.verdict, Verdict::Allow, "the bucket refilled with the clock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_contention_the_tenant_over_its_fair_share_overflows_while_a_light_one_is_admitted_directly() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({"rate": 10, "burst": 1, "debt": 2}));
    for n in 0..25 {
        assert!(matches!(enqueue(&h, &up, "heavy", n, 0).await, Enqueued::Ok { .. }));
    }
    // Workers dispatch heavy's backlog at the capacity, 10/s, for ~2.8 s.
    let mut dispatched = 0;
    for k in 1..=28 {
        if let Some(it) = take(&store, &up, k * 100).await {
            done(&store, &up, &it, k * 100).await;
            dispatched += 1;
        }
    }
    assert_eq!(dispatched, 25, "all of the backlog went at the capacity");
    let now = 2_850;
    let light = h.chk(&check_for("light"), now, Some(&up), &id(900)).await.unwrap();
    assert_eq!(light.verdict, Verdict::Allow);
    // The bucket is empty now: contended. heavy used ~7/s lately, over its
    // share of 10/s between two active tenants; light used nothing.
    let heavy = h.chk(&check_for("heavy"), now, Some(&up), &id(901)).await.unwrap();
    assert_eq!(heavy.verdict, Verdict::Queued, "over its fair share: overflow");
    let light = h.chk(&check_for("light"), now, Some(&up), &id(902)).await.unwrap();
    assert_eq!(light.verdict, Verdict::Allow, "under its share: admitted, borrowing within the debt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_and_reserved_pools_are_never_queued_or_held_by_the_shared_capacity() {
    let redis = RedisServer::start();
    let (h, _store, up) = setup(&redis, json!({}));
    assert_eq!(h.chk(&check_for("a"), 0, Some(&up), &id(1)).await.unwrap().verdict, Verdict::Allow);
    assert_eq!(h.chk(&check_for("a"), 0, Some(&up), &id(2)).await.unwrap().verdict, Verdict::Queued);
    let mut shadow = check_for("a");
    shadow.shadow = true;
    let d = h.chk(&shadow, 0, Some(&up), &id(3)).await.unwrap();
    assert_eq!((d.verdict, d.allowed), (Verdict::Allow, true), "shadow mode never blocks or queues");
    redis::cmd("HSET").arg(sluice_service::keys::cfg("gold")).arg("pool").arg("gold").query::<()>(&mut redis.conn()).unwrap();
    let d = h.chk(&check_for("gold"), 0, Some(&up), &id(4)).await.unwrap();
    assert_eq!((d.verdict, d.pool.as_deref()), (Verdict::Allow, Some("gold")), "a reserved pool has its own capacity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_queue_overflow_is_capacity_exceeded_and_issues_no_ticket() {
    let redis = RedisServer::start();
    let (h, _store, up) = setup(&redis, json!({}));
    let mut c = check_for("a");
    c.can_queue = false;
    assert_eq!(h.chk(&c, 0, Some(&up), "").await.unwrap().verdict, Verdict::Allow);
    let d = h.chk(&c, 0, Some(&up), "").await.unwrap();
    assert_eq!((d.verdict, d.extra), (Verdict::Capacity, 1));
    assert!(redis.keys().iter().all(|k| !k.contains(":tk:")), "{:?}", redis.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_short_term_rate_denies_with_window_second_and_charges_nothing_else() {
    let redis = RedisServer::start();
    let mut config = default_config(&redis.url());
    config.tiers = common::tiers(r#"{"tiers":{"free":{"hour":100,"rate_per_s":2,"burst":2}}}"#);
    let h = H::new(&config);
    let mut c = check_for("r");
    c.upstream = None;
    c.can_queue = false;
    for _ in 0..2 {
        assert_eq!(h.chk(&c, 0, None, "").await.unwrap().verdict, Verdict::Allow);
    }
    let d = h.chk(&c, 0, None, "").await.unwrap();
    assert_eq!(d.verdict, Verdict::Rate);
    let resp = decision::respond(d, 1, Some("p"), None);
    let binding = &resp.windows[resp.binding];
    assert_eq!((binding.name.as_str(), binding.limit, binding.remaining), ("second", 2, 0));
    assert_eq!(resp.retry_after, Some(1));
    let hour = resp.windows.iter().find(|w| w.name == "hour").unwrap();
    assert_eq!(hour.used, 2, "the denied request consumed no quota");
    assert_eq!(h.chk(&c, 600, None, "").await.unwrap().verdict, Verdict::Allow, "one token back after 0.5 s");
    let ttl = redis.ttl(&sluice_service::keys::rate_bucket("r"));
    assert!((1..=3).contains(&ttl), "the bucket expires once it would be full again, ttl {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_admits_exactly_one_request_and_only_for_its_tenant() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({}));
    let t = ticket(&h, &up, "a", 0, 1).await;
    let item = |rid: &'static str, tenant: &'static str| NewItem {
        id: rid,
        ticket: &t,
        tenant,
        mode: Mode::Wait,
        method: "GET",
        path: "/",
        headers_json: "[]",
        body: b"",
    };
    let r1 = "00000000000000000000000000000001";
    let r2 = "00000000000000000000000000000002";
    assert_eq!(store.enqueue(&up, &item(r2, "b"), 0).await.unwrap(), Enqueued::BadTicket, "another tenant");
    let t2 = ticket(&h, &up, "a", 0, 2).await;
    let mut ok = item(r1, "a");
    ok.ticket = &t2;
    assert!(matches!(store.enqueue(&up, &ok, 0).await.unwrap(), Enqueued::Ok { .. }));
    assert_eq!(store.enqueue(&up, &ok, 0).await.unwrap(), Enqueued::BadTicket, "a ticket is used once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h18_bounds_refuse_newcomers_and_never_evict_another_tenants_work() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({"tenant_queue_depth": 3, "global_queue_depth": 5}));
    for n in 0..3 {
        assert!(matches!(enqueue(&h, &up, "a", n, 0).await, Enqueued::Ok { .. }));
    }
    // The tenant bound is also answered by the check itself, before a ticket.
    let d = h.chk(&check_for("a"), 0, Some(&up), &id(50)).await.unwrap();
    assert_eq!(d.verdict, Verdict::QueueFull);
    assert!(d.extra >= 1, "a Retry-After estimate");
    for n in 10..12 {
        assert!(matches!(enqueue(&h, &up, "b", n, 0).await, Enqueued::Ok { .. }));
    }
    let d = h.chk(&check_for("c"), 0, Some(&up), &id(51)).await.unwrap();
    assert_eq!(d.verdict, Verdict::Overloaded, "global bound");
    let stats = store.queue_stats("u", 0, 10).await.unwrap();
    assert_eq!(stats.queued, 5);
    let depth: Vec<(String, u64)> = stats.tenants.iter().map(|t| (t.tenant.clone(), t.depth)).collect();
    assert_eq!(depth, [("a".to_string(), 3), ("b".to_string(), 2)], "nothing was evicted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h18_drr_alternates_backlogged_tenants_and_a_newcomer_is_served_within_one_round() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({}));
    for n in 0..6 {
        enqueue(&h, &up, "a", n, 0).await;
    }
    let mut order = Vec::new();
    let mut clock = 0;
    // a's backlog is being served when b arrives.
    for _ in 0..2 {
        clock += 1_000;
        let it = take(&store, &up, clock).await.unwrap();
        order.push(it.tenant.clone());
        done(&store, &up, &it, clock).await;
    }
    for n in 10..12 {
        enqueue(&h, &up, "b", n, clock).await;
    }
    loop {
        clock += 1_000;
        let Some(it) = take(&store, &up, clock).await else { break };
        order.push(it.tenant.clone());
        done(&store, &up, &it, clock).await;
    }
    // b joined at the tail while a held the turn: served right after it.
    assert_eq!(order, ["a", "a", "b", "a", "b", "a", "a", "a"]);
    // Empty per-tenant state is dropped.
    let left: Vec<String> = redis.keys().into_iter().filter(|k| k.starts_with("sluice:{u:") && (k.contains(":q:") || k.ends_with(":ring"))).collect();
    assert!(left.is_empty(), "{left:?}");
    for hash in ["tn", "w", "drr"] {
        let key = format!("sluice:{{u:u}}:{hash}");
        let fields: Vec<String> = redis::cmd("HKEYS").arg(&key).query(&mut redis.conn()).unwrap();
        assert!(fields.is_empty(), "{key}: {fields:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tier_weight_of_two_gets_two_dispatches_per_turn() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({}));
    redis::cmd("HSET").arg(sluice_service::keys::cfg("pro")).arg("tier").arg("pro").query::<()>(&mut redis.conn()).unwrap();
    for n in 0..4 {
        enqueue(&h, &up, "free", n, 0).await;
        enqueue(&h, &up, "pro", 100 + n, 0).await;
    }
    let mut order = Vec::new();
    for k in 1..=6 {
        let it = take(&store, &up, k * 1_000).await.unwrap();
        order.push(it.tenant.clone());
        done(&store, &up, &it, k * 1_000).await;
    }
    assert_eq!(order, ["free", "pro", "pro", "free", "pro", "pro"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_is_dropped_never_handed_out_and_its_answer_is_queue_timeout() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({"max_wait_ms": 5000}));
    enqueue(&h, &up, "a", 1, 0).await;
    assert!(take(&store, &up, 6_000).await.is_none(), "past the 5 s max wait");
    let view = store.item("u", &id(1)).await.unwrap().unwrap();
    assert_eq!(view.state, "expired");
    assert_eq!(view.answer.unwrap().status, 503);
    assert_eq!(store.queue_stats("u", 6_000, 10).await.unwrap().queued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h19_an_expired_lease_is_requeued_at_the_front_then_failed_after_max_attempts() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({}));
    enqueue(&h, &up, "a", 1, 0).await;
    enqueue(&h, &up, "a", 2, 0).await;
    let first = take(&store, &up, 1_000).await.unwrap();
    assert_eq!((first.id.clone(), first.attempt), (id(1), 1));
    // The worker dies. 2 s later the lease is reaped: the request is again
    // the first in its tenant's queue, with the same id.
    let again = take(&store, &up, 3_500).await.unwrap();
    assert_eq!((again.id.clone(), again.attempt), (id(1), 2));
    // It dies again: max_attempts (2) is used up, the answer is visible.
    let next = take(&store, &up, 6_000).await.unwrap();
    assert_eq!(next.id, id(2), "id 1 is not handed out a third time");
    let view = store.item("u", &id(1)).await.unwrap().unwrap();
    assert_eq!(view.state, "failed");
    assert_eq!(view.answer.unwrap().status, 502);
    let stats = store.queue_stats("u", 6_000, 10).await.unwrap();
    assert_eq!((stats.queued, stats.in_flight), (0, 1), "only id 2 is in flight");
    // A late answer of the dead worker is ignored: the first final answer wins.
    assert!(!store.complete(&up, &id(1), &model::timeout_answer(), false, 6_000).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_is_removed_atomically_and_a_leased_one_is_not() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({}));
    enqueue(&h, &up, "a", 1, 0).await;
    enqueue(&h, &up, "a", 2, 0).await;
    let leased = take(&store, &up, 1_000).await.unwrap();
    assert_eq!(store.cancel(&up, &leased.id, true, &model::timeout_answer(), 1_000).await.unwrap(), "leased");
    assert_eq!(store.cancel(&up, &id(2), false, &model::timeout_answer(), 1_000).await.unwrap(), "removed");
    assert!(store.item("u", &id(2)).await.unwrap().is_none());
    assert!(take(&store, &up, 2_000).await.is_none(), "the cancelled request is never handed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h05_a_queued_request_is_charged_once_even_when_its_dispatch_is_replayed() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({}));
    enqueue(&h, &up, "h05q", 1, 0).await;
    let status_before = h.status("h05q", 0).await.unwrap();
    let hour = |st: &TenantStatus| st.limits.iter().find(|l| l.name == "hour").unwrap().current.unwrap_or(0);
    let hour_before = hour(&status_before);
    let it = take(&store, &up, 1_000).await.unwrap();
    let ttl = std::time::Duration::from_secs(60);
    assert_eq!(h.charge(&it, 1_000, ttl).await.unwrap().verdict, Verdict::Allow);
    assert_eq!(h.charge(&it, 1_000, ttl).await.unwrap().verdict, Verdict::Charged, "a replay");
    let hour_after = hour(&h.status("h05q", 1_000).await.unwrap());
    assert_eq!(hour_after, hour_before + 1, "charged exactly once, at dispatch (the overflowed checks charged nothing)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_queue_key_has_a_ttl_or_is_owned_by_the_queue_scripts() {
    let redis = RedisServer::start();
    let (h, store, up) = setup(&redis, json!({}));
    for n in 0..3 {
        enqueue(&h, &up, "a", n, 0).await;
    }
    let it = take(&store, &up, 1_000).await.unwrap();
    done(&store, &up, &it, 1_000).await;
    // Owned, deleted by the scripts when empty (docs/design.md "Queue keys").
    let owned = ["ring", "tn", "w", "drr", "n", "lease", "delay"];
    for key in redis.keys() {
        let suffix = key.rsplit("}:").next().unwrap_or("");
        let is_owned = owned.contains(&suffix) || suffix.starts_with("q:");
        if !is_owned {
            assert!(redis.ttl(&key) > 0, "{key} has no TTL");
        }
    }
}
