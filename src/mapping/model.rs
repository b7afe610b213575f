//! The map file's model, with spans so that every problem can name its line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

/// A map file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapFile {
    pub pipeline: Spanned<PipelineRef>,
    #[serde(default)]
    pub roles: BTreeMap<Spanned<String>, Spanned<RoleDef>>,
    #[serde(default)]
    pub statuses: BTreeMap<Spanned<String>, Spanned<StatusRow>>,
    #[serde(default)]
    pub actions: BTreeMap<Spanned<String>, Spanned<ActionRow>>,
    /// What goes into the lead: its name, tags and custom fields.
    #[serde(default)]
    pub lead: Option<Spanned<LeadDef>>,
    /// Avito only: leads from buyers' first messages in the messenger.
    #[serde(default)]
    pub messenger: Option<Spanned<MessengerDef>>,
}

/// Messenger leads: a buyer's first message in a chat becomes a lead in
/// `stage` of the map's pipeline, named by `name`, with `tags`; the item's
/// title and link go into the `[lead.fields]` slots `item_title` and `item_url`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessengerDef {
    pub stage: Spanned<toml::Value>,
    /// e.g. `"Avito: {item}"`; placeholders: see `validate::MESSENGER_FIELDS`.
    pub name: Spanned<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The lead's name template, tags, and which order data goes into which amoCRM field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeadDef {
    /// e.g. `"Kaspi {code}"`; placeholders: see `validate::TEMPLATE_FIELDS`.
    pub name: Spanned<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Order data slot → amoCRM lead custom field (name or id).
    #[serde(default)]
    pub fields: BTreeMap<Spanned<String>, Spanned<toml::Value>>,
    /// Slot → (marketplace value → the select field's option label).
    #[serde(default)]
    pub enums: BTreeMap<Spanned<String>, BTreeMap<String, Spanned<String>>>,
}

/// The CRM pipeline the map's stages belong to (name as admins see it, or id).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineRef {
    pub name: Spanned<toml::Value>,
}

/// Who may be responsible, and how one is chosen.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleDef {
    /// amoCRM user names or ids.
    pub users: Spanned<Vec<toml::Value>>,
    #[serde(default)]
    pub pick: Option<Spanned<String>>,
}

/// What a status key means in the CRM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRow {
    pub stage: Option<Spanned<toml::Value>>,
    pub role: Option<Spanned<String>>,
    /// `15m`, `2h`, `1d`, or `end_of_day`.
    pub sla: Option<Spanned<String>>,
    /// Explicitly no stage for this status.
    #[serde(default)]
    pub ignore: bool,
}

/// The marketplace action a CRM stage stands for.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRow {
    pub action: Spanned<String>,
    /// Cancellation reason (Kaspi `cancel`).
    pub reason: Option<Spanned<String>>,
    /// Optional cancellation comment.
    pub comment: Option<Spanned<String>>,
    /// Parcels (Kaspi `assemble`), 1–50.
    pub spaces: Option<Spanned<i64>>,
}

/// A map that could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("{file}: cannot read the map: {error}")]
    Read { file: String, error: String },
    #[error("{file}:{line}: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
}

/// The 1-based line of a byte offset (one inside a multi-byte character, as
/// a TOML error's span may give in Cyrillic text, counts as that character's).
pub fn line_of(text: &str, offset: usize) -> usize {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].matches('\n').count() + 1
}

/// Reads and parses a map file (syntax and shape only; see `validate`).
pub fn load(path: &Path) -> Result<(MapFile, String), MapError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| MapError::Read {
        file: file.clone(),
        error: e.to_string(),
    })?;
    parse(&file, &text).map(|map| (map, text))
}

/// Parses map text named `file` in messages.
pub fn parse(file: &str, text: &str) -> Result<MapFile, MapError> {
    toml::from_str(text).map_err(|e| MapError::Syntax {
        file: file.to_string(),
        line: e.span().map(|s| line_of(text, s.start)).unwrap_or(1),
        message: e.message().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::line_of;

    #[test]
    fn an_offset_inside_a_cyrillic_letter_counts_as_that_letters_line() {
        let text = "a = 1\nstage = \"Новая\"\n";
        // Byte 16 is inside «о» (each Cyrillic letter is two bytes).
        assert!(!text.is_char_boundary(16));
        assert_eq!(line_of(text, 16), 2);
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 10_000), 3);
    }
}
