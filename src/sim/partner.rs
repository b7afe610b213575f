//! A simulated partner programme (Avito-style buyout / trade-in requests),
//! written from the buyout issue's description, not from the connector:
//!
//! - leads: it makes realistic requests (a used Apple device, its defects,
//!   the buyout and the client price, the seller with a phone, a city) and
//!   pushes them to the bridge's webhook ([`PartnerSim::push_lead`]), or
//!   serves them to a poller: `GET /leads?cursor=N` answers
//!   `{"leads": [...], "next_cursor": "M"}` (pages of 50);
//! - status reports: `POST /leads/{id}/status` with a JSON body
//!   `{"status": "…", "changed_at": "…", "seq": n}` and `Authorization:
//!   Bearer <token>` (else 401); an unknown lead is 404, an unknown status or
//!   a body that is not JSON 400; beyond its limits (per second and per minute,
//!   counted on arrival over sliding windows) 429 with `Retry-After: 1`;
//!   faults can be injected (500s);
//! - its own ledger: every accepted report with its arrival time, reports out
//!   of order (a `seq` that is not the next one), and the weekly report it
//!   exports as CSV (`lead_id,status,commission`): per lead with a report in
//!   the week, the last status of the week; a lead earns `rate` × its buyout
//!   price in the week it first reaches a counting status.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The statuses this partner knows (its side of the funnel).
pub const PARTNER_STATUSES: &[&str] = &[
    "accepted",
    "contacted",
    "price_agreed",
    "pickup",
    "in_transit",
    "inspection",
    "bought",
    "listed",
    "reserved",
    "shipped",
    "sold",
    "seller_declined",
    "rejected",
    "no_contact",
];

/// The statuses after which a deal earns the partner its commission.
pub const COUNTING_STATUSES: &[&str] = &["bought", "listed", "reserved", "shipped", "sold"];

/// How the simulated partner behaves.
#[derive(Debug, Clone)]
pub struct PartnerSimConfig {
    pub token: String,
    pub per_second: usize,
    pub per_minute: usize,
    /// The commission rate on the buyout price.
    pub rate: f64,
    pub seed: u64,
}

impl Default for PartnerSimConfig {
    fn default() -> Self {
        PartnerSimConfig {
            token: "partner-report-token".into(),
            per_second: 5,
            per_minute: 300,
            rate: 0.05,
            seed: 1,
        }
    }
}

/// One report the partner accepted.
#[derive(Debug, Clone)]
pub struct LedgerEntry {
    pub lead_id: String,
    pub status: String,
    pub seq: Option<i64>,
    pub received_at: DateTime<Utc>,
    /// The bridge's `changed_at`, when it sent one.
    pub changed_at: Option<DateTime<Utc>>,
}

/// What the partner counted.
#[derive(Debug, Clone, Default)]
pub struct PartnerStats {
    pub report_requests: usize,
    pub accepted: usize,
    pub http_429: usize,
    pub out_of_order: usize,
    /// The most requests that arrived within any one second.
    pub max_in_any_second: usize,
    pub poll_requests: usize,
    /// Leads the partner made.
    pub leads_made: usize,
}

struct SimState {
    config: PartnerSimConfig,
    rng: rand::rngs::StdRng,
    /// The partner's leads by id, with their buyout price.
    leads: BTreeMap<String, Value>,
    /// Leads in the order they were offered (for polls).
    offered: Vec<String>,
    ledger: Vec<LedgerEntry>,
    last_seq: BTreeMap<String, i64>,
    arrivals: VecDeque<Instant>,
    all_arrivals: Vec<Instant>,
    faults: usize,
    stats: PartnerStats,
    next_id: u64,
}

/// A running simulated partner.
#[derive(Clone)]
pub struct PartnerSim {
    state: Arc<Mutex<SimState>>,
    base_url: String,
    _server: Arc<crate::sim::support::ServerGuard>,
    http: reqwest::Client,
}

const MODELS: &[(&str, f64)] = &[
    ("iPhone 11", 18_000.0),
    ("iPhone 12", 24_000.0),
    ("iPhone 13", 33_000.0),
    ("iPhone 13 Pro", 42_000.0),
    ("iPhone 14", 45_000.0),
    ("iPhone 15 Pro", 78_000.0),
    ("iPad Air 5", 36_000.0),
    ("MacBook Air M1", 52_000.0),
];
const COLOURS: &[&str] = &["чёрный", "белый", "синий", "красный", "серебристый"];
const CONDITIONS: &[&str] = &["отличное", "хорошее", "среднее"];
const DEFECTS: &[&str] = &[
    "царапины на корпусе",
    "скол на экране",
    "аккумулятор 78%",
    "не работает Face ID",
    "замена дисплея",
];
const CITIES: &[&str] = &[
    "Москва",
    "Санкт-Петербург",
    "Казань",
    "Екатеринбург",
    "Новосибирск",
];
const NAMES: &[&str] = &["Ирина", "Алексей", "Мария", "Дмитрий", "Ольга", "Сергей"];

impl PartnerSim {
    /// Binds `127.0.0.1:0` and serves in a spawned task.
    pub async fn start(config: PartnerSimConfig) -> std::io::Result<PartnerSim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let state = Arc::new(Mutex::new(SimState {
            rng: rand::rngs::StdRng::seed_from_u64(config.seed),
            config,
            leads: BTreeMap::new(),
            offered: Vec::new(),
            ledger: Vec::new(),
            last_seq: BTreeMap::new(),
            arrivals: VecDeque::new(),
            all_arrivals: Vec::new(),
            faults: 0,
            stats: PartnerStats::default(),
            next_id: 1000,
        }));
        let app = Router::new()
            .route("/leads", get(list_leads))
            .route("/leads/{id}/status", post(report_status))
            .with_state(state.clone());
        let server =
            tokio::spawn(crate::sim::support::serve(listener, app, "partner")).abort_handle();
        Ok(PartnerSim {
            state,
            base_url,
            _server: Arc::new(crate::sim::support::ServerGuard(server)),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(std::io::Error::other)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `[partners.<source>]` configuration an operator would write for
    /// this partner's format: its JSON pointers, its report endpoint, body and
    /// token, and its limits, with the funnel `map`; `extra` lines go into
    /// the source's table.
    pub fn source_toml(
        &self,
        source: &str,
        crm_account: &str,
        map: &str,
        secret: &str,
        extra: &str,
    ) -> String {
        let c = self.lock().config.clone();
        format!(
            r#"
[partners.{source}]
crm_account = "{crm_account}"
map = "{map}"
webhook_secret = "{secret}"
{extra}
[partners.{source}.fields]
lead_id = "/id"
status = "/status"
model = "/device/model"
memory = "/device/memory"
colour = "/device/color"
condition = "/device/condition"
defects = "/device/defects"
buyout_price = "/prices/buyout"
client_price = "/prices/client"
seller_name = "/seller/name"
seller_phone = "/seller/phone"
city = "/city"
[partners.{source}.report]
url = "{base}/leads/{{lead_id}}/status"
body = '{{"status": "{{status}}", "changed_at": "{{changed_at}}", "seq": {{seq}}}}'
auth_header = "Authorization"
auth_value = "Bearer {token}"
per_second = {per_second}
per_minute = {per_minute}
[partners.{source}.commission]
counts_when = [{counting}]
rate = {rate}
"#,
            base = self.base_url,
            token = c.token,
            per_second = c.per_second,
            per_minute = c.per_minute,
            counting = COUNTING_STATUSES
                .iter()
                .map(|s| format!("\"{s}\""))
                .collect::<Vec<_>>()
                .join(", "),
            rate = c.rate,
        )
    }

    /// `http://127.0.0.1:PORT`: `GET /leads`, `POST /leads/{id}/status`.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Makes a new request (a random device and seller; the same phone
    /// repeats now and then) and keeps it; returns its JSON.
    pub fn new_lead(&self) -> Value {
        let mut s = self.lock();
        s.next_id += 1;
        let id = format!("AV-{}", s.next_id);
        let (model, base) = MODELS[s.rng.random_range(0..MODELS.len())];
        let memory = [64, 128, 256, 512][s.rng.random_range(0..4)];
        let defects: Vec<&str> = DEFECTS
            .iter()
            .copied()
            .filter(|_| s.rng.random_bool(0.25))
            .collect();
        let buyout = (base * s.rng.random_range(0.8..1.1) / 100.0).round() * 100.0;
        let client = (buyout * s.rng.random_range(1.05..1.3) / 100.0).round() * 100.0;
        let phone = format!(
            "+7 9{:02} {:03}-{:02}-{:02}",
            s.rng.random_range(0..100),
            s.rng.random_range(0..1000),
            s.rng.random_range(0..100),
            s.rng.random_range(0..100)
        );
        let lead = json!({
            "id": id,
            "status": "new",
            "created_at": Utc::now().to_rfc3339(),
            "device": {
                "model": model,
                "memory": format!("{memory} ГБ"),
                "color": COLOURS[s.rng.random_range(0..COLOURS.len())],
                "condition": CONDITIONS[s.rng.random_range(0..CONDITIONS.len())],
                "defects": defects,
            },
            "prices": { "buyout": buyout, "client": client },
            "seller": {
                "name": NAMES[s.rng.random_range(0..NAMES.len())],
                "phone": phone,
            },
            "city": CITIES[s.rng.random_range(0..CITIES.len())],
        });
        s.leads.insert(id.clone(), lead.clone());
        s.offered.push(id);
        lead
    }

    /// Keeps a lead the test wrote itself (so its reports are accepted).
    pub fn offer(&self, lead: Value) {
        let mut s = self.lock();
        if let Some(id) = lead["id"].as_str().map(str::to_string) {
            s.leads.insert(id.clone(), lead);
            s.offered.push(id);
        }
    }

    /// Pushes a lead to the bridge's webhook URL; the answer's status and body.
    pub async fn push_lead(&self, url: &str, lead: &Value) -> Result<(u16, Value), reqwest::Error> {
        let answer = self.http.post(url).json(lead).send().await?;
        let status = answer.status().as_u16();
        let body = answer.json::<Value>().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// The next `n` report requests are answered 500.
    pub fn fail_next(&self, n: usize) {
        self.lock().faults = n;
    }

    pub fn stats(&self) -> PartnerStats {
        let s = self.lock();
        let mut stats = s.stats.clone();
        stats.max_in_any_second = max_in_window(&s.all_arrivals, Duration::from_secs(1));
        stats.leads_made = s.leads.len();
        stats
    }

    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.lock().ledger.clone()
    }

    /// The statuses reported for a lead, in the order they arrived.
    pub fn statuses_of(&self, lead_id: &str) -> Vec<String> {
        self.lock()
            .ledger
            .iter()
            .filter(|e| e.lead_id == lead_id)
            .map(|e| e.status.clone())
            .collect()
    }

    /// The partner's weekly report, `[from, to)` by the bridge's change times
    /// (the arrival time where none was sent), as CSV.
    pub fn weekly_csv(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> String {
        let s = self.lock();
        let mut out = String::from("lead_id,status,commission\n");
        let mut per_lead: BTreeMap<&str, Vec<&LedgerEntry>> = BTreeMap::new();
        for entry in &s.ledger {
            per_lead.entry(&entry.lead_id).or_default().push(entry);
        }
        for (lead_id, entries) in per_lead {
            let when = |e: &LedgerEntry| e.changed_at.unwrap_or(e.received_at);
            let in_week: Vec<&&LedgerEntry> = entries
                .iter()
                .filter(|e| when(e) >= from && when(e) < to)
                .collect();
            let Some(last) = in_week.iter().max_by_key(|e| (when(e), e.seq.unwrap_or(0))) else {
                continue;
            };
            let counted_before = entries
                .iter()
                .any(|e| when(e) < from && COUNTING_STATUSES.contains(&e.status.as_str()));
            let counts = COUNTING_STATUSES.contains(&last.status.as_str()) && !counted_before;
            let buyout = s
                .leads
                .get(lead_id)
                .and_then(|l| l["prices"]["buyout"].as_f64())
                .unwrap_or(0.0);
            let commission = if counts { buyout * s.config.rate } else { 0.0 };
            out.push_str(&format!("{lead_id},{},{commission:.2}\n", last.status));
        }
        out
    }
}

fn max_in_window(arrivals: &[Instant], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (i, at) in arrivals.iter().enumerate() {
        while *at - arrivals[start] >= window {
            start += 1;
        }
        best = best.max(i + 1 - start);
    }
    best
}

type Shared = Arc<Mutex<SimState>>;

fn lock(state: &Shared) -> MutexGuard<'_, SimState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({ "error": message }))).into_response()
}

async fn list_leads(
    State(state): State<Shared>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let mut s = lock(&state);
    s.stats.poll_requests += 1;
    let from: usize = query
        .get("cursor")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let page: Vec<Value> = s
        .offered
        .iter()
        .skip(from)
        .take(50)
        .filter_map(|id| s.leads.get(id).cloned())
        .collect();
    let next = from + page.len();
    axum::Json(json!({ "leads": page, "next_cursor": next.to_string() })).into_response()
}

async fn report_status(
    State(state): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let mut s = lock(&state);
    let now = Instant::now();
    s.stats.report_requests += 1;
    s.all_arrivals.push(now);
    let expected = format!("Bearer {}", s.config.token);
    if headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        != Some(expected.as_str())
    {
        return error(StatusCode::UNAUTHORIZED, "bad token");
    }
    // Sliding windows on arrival: the last second and the last minute.
    while s
        .arrivals
        .front()
        .is_some_and(|t| now - *t >= Duration::from_secs(60))
    {
        s.arrivals.pop_front();
    }
    let last_second = s
        .arrivals
        .iter()
        .filter(|t| now - **t < Duration::from_secs(1))
        .count();
    if last_second >= s.config.per_second || s.arrivals.len() >= s.config.per_minute {
        s.stats.http_429 += 1;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, "1")],
            axum::Json(json!({"error": "too many requests"})),
        )
            .into_response();
    }
    s.arrivals.push_back(now);
    if s.faults > 0 {
        s.faults -= 1;
        return error(StatusCode::INTERNAL_SERVER_ERROR, "temporarily unavailable");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    if !s.leads.contains_key(&id) {
        return error(StatusCode::NOT_FOUND, "no such lead");
    }
    let Some(status) = body["status"].as_str().map(str::to_string) else {
        return error(StatusCode::BAD_REQUEST, "`status` is missing");
    };
    if !PARTNER_STATUSES.contains(&status.as_str()) {
        return error(StatusCode::BAD_REQUEST, "unknown status");
    }
    let seq = body["seq"].as_i64();
    if let Some(seq) = seq {
        let last = s.last_seq.get(&id).copied().unwrap_or(0);
        if seq != last + 1 {
            s.stats.out_of_order += 1;
        }
        s.last_seq.insert(id.clone(), seq.max(last));
    }
    let changed_at = body["changed_at"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    s.stats.accepted += 1;
    s.ledger.push(LedgerEntry {
        lead_id: id,
        status,
        seq,
        received_at: Utc::now(),
        changed_at,
    });
    axum::Json(json!({ "ok": true })).into_response()
}

#[cfg(test)]
mod tests {
    use super::max_in_window;
    use std::time::{Duration, Instant};

    #[test]
    fn the_busiest_second_is_counted() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let arrivals = [at(0), at(100), at(900), at(1000), at(1050), at(2500)];
        assert_eq!(max_in_window(&arrivals, Duration::from_secs(1)), 4);
    }
}
