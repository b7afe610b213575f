//! In-process simulator of the amoCRM (Kommo) REST API v4, written from
//! `shared/apis/amocrm.md` and nothing else.
//!
//! It owns one simulated account: OAuth tokens (with refresh-token rotation),
//! the per-account rate limit and the block that follows repeated 429s,
//! pipelines, custom fields, users, leads, contacts, companies, links, notes,
//! tasks, `lead_status_changed` events, account webhooks and their delivery.
//! Tests drive it through [`AmoSim`]: seed data, inject faults, play a manager
//! moving a lead, and inspect what the client did.
//!
//! Layout: `server` is the HTTP front (faults, block, rate limit, auth,
//! routing, logging); `oauth`, `leads` (with `fields` and `links`),
//! `contacts`, `catalog` (pipelines, fields, users, account) and `activity`
//! (notes, tasks, events, webhooks API) answer the endpoints; `hooks` delivers
//! webhooks; `state` holds the data; `wire` has the query, paging and
//! error-body helpers.
//!
//! Choices where the facts are silent are listed on [`AmoSim`].

mod activity;
mod catalog;
mod contacts;
mod fields;
mod hooks;
mod leads;
mod links;
mod oauth;
mod server;
mod state;
mod wire;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use state::State;

/// How the simulated account behaves. `Default` gives the documented limits.
#[derive(Clone, Debug)]
pub struct AmoSimConfig {
    /// The account subdomain, echoed in webhooks (`account[subdomain]`).
    pub subdomain: String,
    /// The account id, echoed in bodies and webhooks.
    pub account_id: u64,
    /// More served requests than this within any 1-second sliding window get 429.
    pub rate_per_second: u32,
    /// After this many rate-limit 429s the account is blocked (403 HTML) until `unblock`.
    pub block_after_429s: u32,
    /// If set, this bearer token is always valid (until `revoke_all_tokens`).
    pub long_lived_token: Option<String>,
    /// OAuth integration id.
    pub client_id: String,
    /// OAuth integration secret.
    pub client_secret: String,
    /// OAuth redirect URI the token requests must repeat.
    pub redirect_uri: String,
    /// A refresh token that is valid at start.
    pub initial_refresh_token: String,
    /// Lifetime of issued access tokens; an expired one gets 401.
    pub access_token_ttl: Duration,
}

impl Default for AmoSimConfig {
    fn default() -> Self {
        AmoSimConfig {
            subdomain: "example".to_string(),
            account_id: 31_361_463,
            rate_per_second: 7,
            block_after_429s: 20,
            long_lived_token: None,
            client_id: "sim-client-id".to_string(),
            client_secret: "sim-client-secret".to_string(),
            redirect_uri: "https://bridge.example/oauth/callback".to_string(),
            initial_refresh_token: "def50200initialrefreshtoken".to_string(),
            access_token_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// A failure to answer the next API calls with, instead of their real answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 500 problem+json with a `trace_id`.
    ServerError,
    /// Holds the request ~35 s, then 504 (clients time out first).
    Timeout,
    /// Closes the connection without writing a response.
    ConnectionReset,
    /// 429 with the documented JSON body and `retry_after`.
    TooManyRequests,
    /// 504 with an nginx HTML page.
    GatewayTimeout,
    /// 200 with a truncated HAL body (not JSON).
    MalformedBody,
    /// The request is carried out (a lead created, …), then the connection is
    /// closed without an answer: the client cannot know it succeeded.
    LoseAnswer,
}

/// A pipeline as seeded: stages in order, incoming first, then 142 and 143 last.
#[derive(Clone, Debug)]
pub struct SimPipeline {
    pub id: u64,
    pub name: String,
    pub stages: Vec<(u64, String)>,
}

/// A lead custom field as seeded, with its enum ids in order.
#[derive(Clone, Debug)]
pub struct SimField {
    pub id: u64,
    pub name: String,
    pub enums: Vec<(u64, String)>,
}

#[derive(Clone, Debug)]
pub struct SimLead {
    pub id: u64,
    pub name: String,
    pub price: i64,
    pub pipeline_id: u64,
    pub status_id: u64,
    pub responsible_user_id: u64,
    /// As the API reads it back: an array of `{field_id, field_name, field_code, field_type, values}`, or null.
    pub custom_fields_values: serde_json::Value,
    pub tags: Vec<String>,
    pub contact_ids: Vec<u64>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The `request_id` the lead was created with (the API echoes it but never reads it back).
    pub request_id: Option<String>,
}

#[derive(Clone, Debug)]
pub struct SimContact {
    pub id: u64,
    pub name: String,
    pub phones: Vec<String>,
    pub emails: Vec<String>,
    pub updated_at: i64,
}

#[derive(Clone, Debug)]
pub struct SimNote {
    pub id: u64,
    pub entity_id: u64,
    pub note_type: String,
    pub text: String,
}

#[derive(Clone, Debug)]
pub struct SimTask {
    pub id: u64,
    pub text: String,
    pub complete_till: i64,
    pub entity_id: Option<u64>,
    pub entity_type: Option<String>,
    pub responsible_user_id: u64,
}

#[derive(Clone, Debug)]
pub struct SimLink {
    pub lead_id: u64,
    pub contact_id: u64,
    pub main: bool,
}

#[derive(Clone, Debug)]
pub struct SimWebhook {
    pub id: u64,
    pub destination: String,
    pub settings: Vec<String>,
    pub disabled: bool,
}

/// One request the simulator received. `status` 0 means the connection was
/// dropped without an answer.
#[derive(Clone, Debug)]
pub struct SimRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    pub body: String,
    pub status: u16,
    pub at: Instant,
}

/// One outgoing webhook POST; `status` is None when it failed or timed out (2 s).
#[derive(Clone, Debug)]
pub struct SimDelivery {
    pub destination: String,
    pub form: Vec<(String, String)>,
    pub status: Option<u16>,
}

/// The shared core the server task and the handle both use.
/// A request [`AmoSim::hold_next`] keeps waiting.
pub struct HeldRequest {
    reached: Option<tokio::sync::oneshot::Receiver<()>>,
    release: tokio::sync::oneshot::Sender<()>,
}

impl HeldRequest {
    /// Waits up to `within` for the request to arrive; whether it did.
    pub async fn reached(&mut self, within: Duration) -> bool {
        match self.reached.as_mut() {
            None => true,
            Some(rx) => {
                let arrived = matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())));
                if arrived {
                    self.reached = None;
                }
                arrived
            }
        }
    }

    /// Lets the request be carried out now.
    pub fn release(self) {
        let _ = self.release.send(());
    }
}

pub(crate) struct Shared {
    state: Mutex<State>,
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a test panicked mid-request; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Owner {
    shared: Arc<Shared>,
    base_url: String,
    /// Stops the server when the last handle goes away.
    _server: crate::sim::support::ServerGuard,
}

/// A running simulated amoCRM account on `127.0.0.1:PORT`. Clones share it;
/// the server stops when the last clone is dropped.
///
/// Behaviour where the API facts are silent:
/// - Order of the front: blocked (403) → injected fault → rate limit → auth → route.
///   Injected faults neither count in the rate window nor towards the block;
///   `unblock` also clears the 429 count and the window.
/// - The refresh token given last and the one used to get it are both valid; using
///   either retires all others (so a lost response can be retried once with the old one).
/// - `If-Modified-Since` on lead and contact lists keeps entities updated at or after it.
/// - The API user (`created_by`, `modified_user_id` of API changes) is the first
///   seeded user, or 1 when none is seeded.
/// - A lead created without `status_id` goes to the first regular stage (after the
///   incoming one) of its pipeline (`pipeline_id`, else the main, first seeded pipeline);
///   a `status_id` without `pipeline_id` selects the pipeline that has it (142/143:
///   the main pipeline on create, the lead's current pipeline on update).
///   A `pipeline_id` without `status_id` on update moves to that pipeline's first regular stage.
/// - `POST /leads/complex` with more than 50 leads → 422 "Limit 50 per request".
/// - `POST /leads/{id}/link` for a missing lead → 404 problem+json "Lead not found".
/// - `PATCH /leads/{id}` for a missing lead → 400 validation-errors (request_id "0").
/// - Events are listed newest first; `filter[created_at]=TS` means created at or after TS.
/// - Leads are listed by id ascending unless `order[...]` says otherwise.
/// - The account timezone is Europe/Moscow (UTC+3): `date` and `birthday` field
///   values are moved to local midnight, `date_time` values are kept.
/// - 504 (fault or timeout) answers with an nginx HTML page, like the 403 block.
/// - Webhooks are delivered once (no retry ladder); a webhook is disabled after
///   more than 100 failed deliveries within 2 hours when the latest also failed.
#[derive(Clone)]
pub struct AmoSim {
    owner: Arc<Owner>,
}

impl AmoSim {
    /// Binds `127.0.0.1:0` and serves in a spawned task.
    pub async fn start(config: AmoSimConfig) -> std::io::Result<AmoSim> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let base_url = format!("http://{addr}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(std::io::Error::other)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(config, base_url.clone())),
            http,
            runtime: tokio::runtime::Handle::current(),
        });
        let server = tokio::spawn(server::serve(listener, shared.clone())).abort_handle();
        Ok(AmoSim {
            owner: Arc::new(Owner {
                shared,
                base_url,
                _server: crate::sim::support::ServerGuard(server),
            }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.owner.shared
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.owner.shared.lock()
    }

    /// `http://127.0.0.1:PORT`; the API is under `/api/v4/...`, the token under `/oauth2/access_token`.
    pub fn base_url(&self) -> String {
        self.owner.base_url.clone()
    }

    /// Adds a pipeline: the incoming stage (type 1), the named stages, then 142 and 143.
    /// The first seeded pipeline is the main one.
    pub fn seed_pipeline(&self, name: &str, stages: &[&str]) -> SimPipeline {
        self.lock().add_pipeline(name, stages)
    }

    /// The account's pipelines with their stages (id, name), as seeded.
    pub fn pipelines(&self) -> Vec<SimPipeline> {
        self.lock()
            .pipelines
            .iter()
            .map(|p| SimPipeline {
                id: p.id,
                name: p.name.clone(),
                stages: p.statuses.iter().map(|s| (s.id, s.name.clone())).collect(),
            })
            .collect()
    }

    pub fn seed_user(&self, name: &str) -> u64 {
        self.lock().add_user(name)
    }

    /// Adds a lead custom field of `field_type` (`text`, `select`, `date`, …) with these enum labels.
    pub fn seed_lead_field(&self, name: &str, field_type: &str, enums: &[&str]) -> SimField {
        self.lock().add_lead_field(name, field_type, enums)
    }

    /// Adds a contact; phones and emails are stored exactly as given.
    /// The id of the user called `name`.
    pub fn user_id(&self, name: &str) -> Option<u64> {
        self.lock()
            .users
            .iter()
            .find(|u| u.name == name)
            .map(|u| u.id)
    }

    /// An admin deactivates the user: it stays in `/api/v4/users` with
    /// `rights.is_active: false`.
    pub fn deactivate_user(&self, id: u64) {
        if let Some(user) = self.lock().users.iter_mut().find(|u| u.id == id) {
            user.active = false;
        }
    }

    pub fn seed_contact(&self, name: &str, phones: &[&str], emails: &[&str]) -> u64 {
        self.lock().add_seed_contact(name, phones, emails)
    }

    /// The next `times` calls to any endpoint (token endpoint included) get `fault`.
    pub fn inject(&self, fault: Fault, times: usize) {
        let mut st = self.lock();
        for _ in 0..times {
            st.faults.push_back(fault);
        }
    }

    /// From now on every `every`-th call gets `fault` (5: a 20 % error rate;
    /// 1: a storm) until [`AmoSim::lift_steady_fault`].
    pub fn fault_every(&self, fault: Fault, every: usize) {
        self.lock().steady_fault = Some(crate::sim::support::SteadyFault::new(fault, every));
    }

    pub fn lift_steady_fault(&self) {
        self.lock().steady_fault = None;
    }

    /// The account is blocked as after repeated 429s: every call gets the
    /// 403 nginx page until [`AmoSim::unblock`].
    pub fn block(&self) {
        self.lock().blocked = true;
    }

    /// 429s the account's rate limit gave so far (injected ones not counted).
    pub fn rate_limited(&self) -> usize {
        self.lock().rate_limited
    }

    /// Every stage change of a lead, in the order made: (lead, status before,
    /// status after, by user).
    pub fn stage_changes(&self) -> Vec<(u64, u64, u64, u64)> {
        self.lock()
            .events
            .iter()
            .map(|e| (e.entity_id, e.before.0, e.after.0, e.created_by))
            .collect()
    }

    /// The next `times` calls whose path starts with `path` get `fault`
    /// (before any unscoped fault); `LoseAnswer` is not scoped.
    pub fn inject_on(&self, path: &str, fault: Fault, times: usize) {
        let mut st = self.lock();
        for _ in 0..times {
            st.path_faults.push((path.to_string(), fault));
        }
    }

    /// A manager moves the lead in the UI: the lead changes, a `lead_status_changed`
    /// event is recorded with `created_by = user_id`, and webhooks fire.
    /// An unknown lead is ignored.
    pub fn manager_moves_lead(&self, lead_id: u64, pipeline_id: u64, status_id: u64, user_id: u64) {
        let jobs = {
            let mut st = self.lock();
            let Some(change) = st.move_lead(lead_id, pipeline_id, status_id, user_id) else {
                tracing::warn!(lead_id, "simulated manager moved an unknown lead");
                return;
            };
            st.hook_jobs(&[change])
        };
        hooks::spawn_all(self.shared(), jobs);
    }

    /// Someone deletes a lead in the UI: the API no longer returns it (its
    /// links go with it). No webhook or event reports it.
    pub fn delete_lead(&self, lead_id: u64) {
        let mut st = self.lock();
        st.leads.remove(&lead_id);
        st.links.retain(|l| l.lead_id != lead_id);
    }

    /// The lead's stage changes without any webhook or event (an import, a
    /// broken integration, a change the bridge never heard of).
    pub fn drift_lead_stage(&self, lead_id: u64, pipeline_id: u64, status_id: u64) {
        let mut st = self.lock();
        if let Some(lead) = st.leads.get_mut(&lead_id) {
            lead.pipeline_id = pipeline_id;
            lead.status_id = status_id;
        }
    }

    /// A manager types a value into a lead's text field in the UI: the lead
    /// changes and `update_lead` webhooks fire. An unknown lead or field is ignored.
    pub fn manager_sets_lead_field(
        &self,
        lead_id: u64,
        field_name: &str,
        value: &str,
        user_id: u64,
    ) {
        let jobs = {
            let mut st = self.lock();
            let Some(change) = st.set_lead_text_field(lead_id, field_name, value, user_id) else {
                tracing::warn!(
                    lead_id,
                    field_name,
                    "simulated manager edited an unknown lead or field"
                );
                return;
            };
            st.hook_jobs(&[change])
        };
        hooks::spawn_all(self.shared(), jobs);
    }

    /// From now on amoCRM refuses a new contact (in `/leads/complex`) whose
    /// fields contain `value`, with a validation error on the contact's field.
    pub fn refuse_contact_value(&self, value: &str) {
        self.lock().refused_contact_values.push(value.to_string());
    }

    /// From now on amoCRM refuses a lead item of `/leads/complex` whose name
    /// contains `value`, with a validation error on the lead's name (the
    /// whole request is refused, the item named by its `request_id`).
    pub fn refuse_lead_value(&self, value: &str) {
        self.lock().refused_lead_values.push(value.to_string());
    }

    /// From now on every answer (faults included) takes `delay` after the
    /// request was carried out, as a real account's latency.
    pub fn set_answer_delay(&self, delay: Duration) {
        self.lock().answer_delay = delay;
    }

    /// The next `method` request to exactly `path` that carries the query
    /// parameter `query_key` waits, before it is carried out, until the
    /// returned hold is released or dropped: a client's reading caught between
    /// its other steps, so a test can change the account meanwhile.
    pub fn hold_next(&self, method: &str, path: &str, query_key: &str) -> HeldRequest {
        let (reached_tx, reached) = tokio::sync::oneshot::channel();
        let (release, release_rx) = tokio::sync::oneshot::channel();
        self.lock().holds.push(state::PendingHold {
            method: method.to_string(),
            path: path.to_string(),
            query_key: query_key.to_string(),
            reached: reached_tx,
            release: release_rx,
        });
        HeldRequest {
            reached: Some(reached),
            release,
        }
    }

    pub fn unblock(&self) {
        let mut st = self.lock();
        st.blocked = false;
        st.too_many = 0;
        st.window.clear();
    }

    pub fn is_blocked(&self) -> bool {
        self.lock().blocked
    }

    /// The integration is uninstalled: every access, refresh and long-lived token now gets 401.
    pub fn revoke_all_tokens(&self) {
        self.lock().tokens.revoke_all();
    }

    pub fn leads(&self) -> Vec<SimLead> {
        let st = self.lock();
        st.leads.keys().filter_map(|id| st.sim_lead(*id)).collect()
    }

    /// The ids of the leads in stage `status_id` (cheap: nothing else copied,
    /// the account stays free for the API meanwhile).
    pub fn lead_ids_in_stage(&self, status_id: u64) -> Vec<u64> {
        let st = self.lock();
        st.leads
            .values()
            .filter(|l| l.status_id == status_id)
            .map(|l| l.id)
            .collect()
    }

    pub fn lead(&self, id: u64) -> Option<SimLead> {
        self.lock().sim_lead(id)
    }

    pub fn contacts(&self) -> Vec<SimContact> {
        self.lock()
            .contacts
            .values()
            .map(|c| SimContact {
                id: c.id,
                name: c.name.clone(),
                phones: c.phones.iter().map(|p| p.0.clone()).collect(),
                emails: c.emails.iter().map(|e| e.0.clone()).collect(),
                updated_at: c.updated_at,
            })
            .collect()
    }

    pub fn notes(&self) -> Vec<SimNote> {
        self.lock().notes.clone()
    }

    pub fn tasks(&self) -> Vec<SimTask> {
        self.lock().tasks.clone()
    }

    pub fn links(&self) -> Vec<SimLink> {
        self.lock().links.clone()
    }

    pub fn webhooks(&self) -> Vec<SimWebhook> {
        self.lock()
            .webhooks
            .iter()
            .map(|w| SimWebhook {
                id: w.id,
                destination: w.destination.clone(),
                settings: w.settings.clone(),
                disabled: w.disabled,
            })
            .collect()
    }

    pub fn set_webhook_disabled(&self, destination: &str, disabled: bool) {
        let mut st = self.lock();
        for w in st
            .webhooks
            .iter_mut()
            .filter(|w| w.destination == destination)
        {
            w.disabled = disabled;
        }
    }

    /// Every request received (API and token endpoint), in order of their answers.
    pub fn requests(&self) -> Vec<SimRequest> {
        self.lock().requests.clone()
    }

    /// The most requests received within any one second (sliding): what
    /// amoCRM's 7-a-second limit is judged by.
    pub fn max_requests_in_any_second(&self) -> usize {
        let mut times: Vec<Instant> = self.lock().requests.iter().map(|r| r.at).collect();
        times.sort();
        (0..times.len())
            .map(|i| {
                times[i..]
                    .iter()
                    .take_while(|t| t.duration_since(times[i]) < Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    /// How many responses had this status (0: dropped connections).
    pub fn count_status(&self, status: u16) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.status == status)
            .count()
    }

    /// Token calls with `grant_type=refresh_token`, accepted or not.
    pub fn refresh_calls(&self) -> usize {
        self.lock().refresh_calls
    }

    pub fn webhook_deliveries(&self) -> Vec<SimDelivery> {
        self.lock().deliveries.clone()
    }
}
