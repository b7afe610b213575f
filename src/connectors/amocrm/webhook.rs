//! Parsing of amoCRM account webhooks: a form-encoded, PHP-style nested array
//! (`leads[status][0][status_id]=…`, every value a string) plus the `account`
//! block. Only lead status and update items are kept; the rest is ignored.

use std::collections::BTreeMap;

/// Which webhook event an item came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeadAction {
    /// `leads[status]`: the lead changed stage.
    Status,
    /// `leads[update]`: the lead changed.
    Update,
}

impl LeadAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            LeadAction::Status => "lead_status",
            LeadAction::Update => "lead_update",
        }
    }
}

/// One lead item of a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeadChange {
    pub action: LeadAction,
    pub lead_id: u64,
    pub status_id: Option<u64>,
    pub pipeline_id: Option<u64>,
    pub old_status_id: Option<u64>,
    pub old_pipeline_id: Option<u64>,
    pub modified_user_id: Option<u64>,
    pub last_modified: Option<i64>,
    /// Every scalar key of the item, as sent (custom fields excluded).
    pub raw: BTreeMap<String, String>,
}

/// A parsed webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookPayload {
    pub subdomain: String,
    pub account_id: u64,
    pub changes: Vec<LeadChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("the body is not form-encoded: {0}")]
    NotForm(String),
    #[error("key `{0}` is not a PHP-style nested key")]
    BadKey(String),
    #[error("the `account[subdomain]` and `account[id]` block is missing")]
    NoAccount,
    #[error("`{key}` must be a whole number, got `{value}`")]
    NotANumber { key: String, value: String },
    #[error("lead item {action}[{index}] has no id")]
    NoLeadId { action: &'static str, index: String },
}

/// Splits `leads[status][0][id]` into `["leads", "status", "0", "id"]`.
fn split_key(key: &str) -> Result<Vec<&str>, WebhookError> {
    let bad = || WebhookError::BadKey(key.chars().take(100).collect());
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if head.is_empty() {
        return Err(bad());
    }
    let mut parts = vec![head];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[').ok_or_else(bad)?;
        let end = inner.find(']').ok_or_else(bad)?;
        parts.push(&inner[..end]);
        rest = &inner[end + 1..];
    }
    Ok(parts)
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, WebhookError> {
    value.trim().parse().map_err(|_| WebhookError::NotANumber {
        key: key.to_string(),
        value: value.chars().take(40).collect(),
    })
}

/// Parses a webhook body.
pub fn parse(body: &[u8]) -> Result<WebhookPayload, WebhookError> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_bytes(body).map_err(|e| WebhookError::NotForm(e.to_string()))?;
    let mut subdomain = None;
    let mut account_id = None;
    // (action, index) → key → value
    let mut items: BTreeMap<(&'static str, String), BTreeMap<String, String>> = BTreeMap::new();
    for (key, value) in &pairs {
        let parts = split_key(key)?;
        match parts.as_slice() {
            ["account", "subdomain"] => subdomain = Some(value.clone()),
            ["account", "id"] => account_id = Some(number::<u64>(key, value)?),
            ["leads", action @ ("status" | "update"), index, field] => {
                let action = if *action == "status" {
                    "status"
                } else {
                    "update"
                };
                items
                    .entry((action, index.to_string()))
                    .or_default()
                    .insert(field.to_string(), value.clone());
            }
            // Custom fields, other entities, links: not needed to route a change.
            _ => {}
        }
    }
    let (Some(subdomain), Some(account_id)) = (subdomain, account_id) else {
        return Err(WebhookError::NoAccount);
    };
    let mut changes = Vec::with_capacity(items.len());
    for ((action, index), fields) in items {
        let opt = |name: &str| -> Result<Option<u64>, WebhookError> {
            fields
                .get(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| number::<u64>(&format!("leads[{action}][{index}][{name}]"), v))
                .transpose()
        };
        let lead_id = opt("id")?.ok_or(WebhookError::NoLeadId {
            action,
            index: index.clone(),
        })?;
        changes.push(LeadChange {
            action: if action == "status" {
                LeadAction::Status
            } else {
                LeadAction::Update
            },
            lead_id,
            status_id: opt("status_id")?,
            pipeline_id: opt("pipeline_id")?,
            old_status_id: opt("old_status_id")?,
            old_pipeline_id: opt("old_pipeline_id")?,
            modified_user_id: opt("modified_user_id")?,
            last_modified: fields
                .get("last_modified")
                .filter(|v| !v.trim().is_empty())
                .map(|v| number::<i64>("last_modified", v))
                .transpose()?,
            raw: fields,
        });
    }
    Ok(WebhookPayload {
        subdomain,
        account_id,
        changes,
    })
}

/// The inbox key of "lead L entered stage (P, S) at T": the same for a status
/// webhook (`last_modified`) and for the events API's `lead_status_changed`
/// (`created_at`), so one change is stored once whichever way it arrives.
pub fn status_change_key(
    account: &str,
    lead_id: u64,
    pipeline_id: u64,
    status_id: u64,
    at: i64,
) -> String {
    format!("amocrm:{account}:lead_status:{lead_id}:{pipeline_id}:{status_id}:{at}")
}

impl LeadChange {
    /// Identifies a change, so a webhook delivered twice (or seen again by the
    /// events poll) is stored once.
    pub fn dedupe_key(&self, account: &str) -> String {
        if let (LeadAction::Status, Some(pipeline_id), Some(status_id), Some(at)) = (
            self.action,
            self.pipeline_id,
            self.status_id,
            self.last_modified,
        ) {
            return status_change_key(account, self.lead_id, pipeline_id, status_id, at);
        }
        format!(
            "amocrm:{account}:{}:{}:{}:{}:{}",
            self.action.as_str(),
            self.lead_id,
            self.pipeline_id.unwrap_or_default(),
            self.status_id.unwrap_or_default(),
            self.last_modified.unwrap_or_default()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "leads%5Bstatus%5D%5B0%5D%5Bid%5D=15318175&leads%5Bstatus%5D%5B0%5D%5Bstatus_id%5D=67548619\
        &leads%5Bstatus%5D%5B0%5D%5Bold_status_id%5D=67548607&leads%5Bstatus%5D%5B0%5D%5Bpipeline_id%5D=8572511\
        &leads%5Bstatus%5D%5B0%5D%5Bmodified_user_id%5D=11087123&leads%5Bstatus%5D%5B0%5D%5Blast_modified%5D=1726572758\
        &leads%5Bstatus%5D%5B0%5D%5Bcustom_fields%5D%5B0%5D%5Bid%5D=1246489\
        &leads%5Bstatus%5D%5B0%5D%5Bcustom_fields%5D%5B0%5D%5Bvalues%5D%5B0%5D%5Benum%5D=908107\
        &account%5Bsubdomain%5D=example&account%5Bid%5D=12345678";

    #[test]
    fn parses_the_documented_status_payload() {
        let payload = parse(SAMPLE.as_bytes()).unwrap();
        assert_eq!(payload.subdomain, "example");
        assert_eq!(payload.account_id, 12345678);
        assert_eq!(payload.changes.len(), 1);
        let change = &payload.changes[0];
        assert_eq!(change.action, LeadAction::Status);
        assert_eq!(change.lead_id, 15318175);
        assert_eq!(change.status_id, Some(67548619));
        assert_eq!(change.old_status_id, Some(67548607));
        assert_eq!(change.pipeline_id, Some(8572511));
        assert_eq!(change.modified_user_id, Some(11087123));
        assert_eq!(change.last_modified, Some(1726572758));
    }

    #[test]
    fn refuses_malformed_bodies() {
        assert!(matches!(
            parse(b"leads[status][0][id]=1"),
            Err(WebhookError::NoAccount)
        ));
        assert!(matches!(
            parse(b"leads[status][0][id]=abc&account[subdomain]=x&account[id]=1"),
            Err(WebhookError::NotANumber { .. })
        ));
        assert!(matches!(
            parse(b"leads[status][0=1&account[subdomain]=x&account[id]=1"),
            Err(WebhookError::BadKey(_))
        ));
        assert!(matches!(
            parse(b"leads[status][0][status_id]=5&account[subdomain]=x&account[id]=1"),
            Err(WebhookError::NoLeadId { .. })
        ));
    }
}
