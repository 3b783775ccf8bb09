//! Usage history: per-tenant daily rollups and their export.
//!
//! The check script adds every decision to the tenant's rollup of the day
//! (`keys::usage_day`, in the tenant's slot, so it costs no extra round
//! trip): `admitted`, `denied`, `shadow_denied`, `cost` (units charged).
//! `POST /v1/report` adds upstream latency: `lat_n`, `lat_sum_ms` and a
//! fixed log-bucket histogram `lat_b<i>` ([`crate::metrics::LATENCY_BUCKETS_MS`]).
//! Fields for other components: `tokens` (token budgets) and `queued` (the
//! overflow queue) are read here and exported as 0 until something counts
//! them (`HINCRBY` on the same key from their own scripts).
//!
//! Tenants are indexed per day (`keys::usage_index`) by each replica the
//! first time it sees a tenant that day, off the request path; an export of
//! one tenant reads its keys directly and needs no index.

use std::collections::BTreeMap;

use serde::Serialize;
use time::Date;

use crate::http::MAX_REPORT_LATENCY_MS;
use crate::metrics::LATENCY_BUCKETS_MS;
use crate::store::{Store, StoreError};
use crate::timefmt;

/// One tenant's day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageRow {
    pub date: String,
    pub tenant: String,
    pub admitted: u64,
    pub denied: u64,
    pub shadow_denied: u64,
    pub queued: u64,
    pub tokens: u64,
    pub cost_units: u64,
    /// Latency reports (admitted requests whose upstream time is known).
    pub latency_count: u64,
    pub latency_mean_ms: Option<f64>,
    /// Upper bound of the histogram bucket holding the 95th percentile.
    pub latency_p95_ms: Option<u64>,
}

/// The p95 bucket bound of a histogram (`counts[i]` for bucket i).
pub fn p95(counts: &[u64]) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // Smallest bucket whose cumulative count reaches 95 % (ceil).
    let need = total.saturating_mul(95).div_ceil(100);
    let mut seen = 0u64;
    for (i, c) in counts.iter().enumerate() {
        seen = seen.saturating_add(*c);
        if seen >= need {
            return Some(
                LATENCY_BUCKETS_MS
                    .get(i)
                    .copied()
                    .unwrap_or(MAX_REPORT_LATENCY_MS),
            );
        }
    }
    None
}

pub fn row(date: Date, tenant: &str, h: &BTreeMap<String, u64>) -> UsageRow {
    let get = |k: &str| h.get(k).copied().unwrap_or(0);
    let buckets: Vec<u64> = (0..=LATENCY_BUCKETS_MS.len())
        .map(|i| get(&format!("lat_b{i}")))
        .collect();
    let n = get("lat_n");
    UsageRow {
        date: timefmt::day_text(date),
        tenant: tenant.to_string(),
        admitted: get("admitted"),
        denied: get("denied"),
        shadow_denied: get("shadow_denied"),
        queued: get("queued"),
        tokens: get("tokens"),
        cost_units: get("cost"),
        latency_count: n,
        latency_mean_ms: (n > 0)
            .then(|| ((get("lat_sum_ms") as f64 / n as f64) * 100.0).round() / 100.0),
        latency_p95_ms: p95(&buckets),
    }
}

/// Every rollup of `[from, to]`, by date then tenant; days without usage are
/// left out.
pub async fn collect(
    store: &Store,
    from: Date,
    to: Date,
    tenant: Option<&str>,
) -> Result<Vec<UsageRow>, StoreError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut dates: Vec<Date> = Vec::new();
    let mut d = from;
    loop {
        let id = timefmt::day_id(d);
        let tenants = match tenant {
            Some(t) => vec![t.to_string()],
            None => store.usage_index(&id).await?,
        };
        for t in tenants {
            pairs.push((t, id.clone()));
            dates.push(d);
        }
        if d >= to {
            break;
        }
        match d.next_day() {
            Some(n) => d = n,
            None => break,
        }
    }
    let mut rows = Vec::new();
    // Pipelines of bounded size: one export never holds Redis for long.
    for (chunk, chunk_dates) in pairs.chunks(500).zip(dates.chunks(500)) {
        let hashes = store.usage_rollups(chunk).await?;
        for (((t, _), date), h) in chunk.iter().zip(chunk_dates).zip(hashes) {
            if !h.is_empty() {
                rows.push(row(*date, t, &h));
            }
        }
    }
    Ok(rows)
}

pub const CSV_HEADER: &str = "date,tenant,admitted,denied,shadow_denied,queued,tokens,cost_units,latency_count,latency_mean_ms,latency_p95_ms";

/// CSV with a header line. No field needs quoting: dates, numbers and
/// tenant ids (whose alphabet has no comma, quote or newline).
pub fn to_csv(rows: &[UsageRow]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in rows {
        let opt_f = |v: Option<f64>| v.map_or(String::new(), |v| v.to_string());
        let opt_u = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{}\n",
            r.date,
            r.tenant,
            r.admitted,
            r.denied,
            r.shadow_denied,
            r.queued,
            r.tokens,
            r.cost_units,
            r.latency_count,
            opt_f(r.latency_mean_ms),
            opt_u(r.latency_p95_ms)
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn p95_is_the_bound_of_the_bucket_holding_the_95th_percentile() {
        assert_eq!(p95(&[]), None);
        assert_eq!(p95(&[0, 0]), None);
        // 100 reports: 94 in <=1 ms, 6 in <=250 ms: the 95th is in the 250 bucket.
        let mut c = vec![0u64; 16];
        c[0] = 94;
        c[7] = 6;
        assert_eq!(p95(&c), Some(250));
        c[0] = 95;
        c[7] = 5;
        assert_eq!(p95(&c), Some(1));
        let mut slow = vec![0u64; 16];
        slow[15] = 1;
        assert_eq!(p95(&slow), Some(MAX_REPORT_LATENCY_MS));
    }

    #[test]
    fn rows_compute_mean_and_render_as_csv() {
        let h: BTreeMap<String, u64> = [
            ("admitted", 3),
            ("denied", 2),
            ("cost", 7),
            ("lat_n", 2),
            ("lat_sum_ms", 30),
            ("lat_b3", 1),
            ("lat_b4", 1),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let d = timefmt::parse_date("2031-03-12").unwrap();
        let r = row(d, "acme", &h);
        assert_eq!((r.admitted, r.denied, r.cost_units), (3, 2, 7));
        assert_eq!(r.latency_mean_ms, Some(15.0));
        assert_eq!(r.latency_p95_ms, Some(25));
        let csv = to_csv(&[r]);
        assert_eq!(csv.lines().nth(1), Some("2031-03-12,acme,3,2,0,0,0,7,2,15,25"));
    }
}
