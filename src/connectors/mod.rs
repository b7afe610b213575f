//! One folder per external API: the client, its private wire types, and the
//! conversion into domain types. Nothing outside a connector's folder sees its
//! wire types.

pub mod amocrm;
pub mod avito;
pub mod kaspi;
pub mod partner;
pub mod throttle;

/// The text of a transport error without its request URL: a URL's query can
/// carry a buyer's phone (a contact search) or other personal data, and this
/// text ends up in logs, `last_error` and attempt rows. The causes are kept
/// ("connection refused", "connection reset", …), any query in them cut off.
pub(crate) fn transport_error_text(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&without_queries(&cause.to_string()));
        source = cause.source();
    }
    text
}

/// Cuts every `?query` (up to the next space, quote or parenthesis) out of a text.
fn without_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_query = false;
    for c in text.chars() {
        if in_query {
            if c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>') {
                in_query = false;
                out.push(c);
            }
            continue;
        }
        if c == '?' {
            in_query = true;
            out.push_str("?…");
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::without_queries;

    #[test]
    fn queries_are_cut_out_of_error_texts() {
        assert_eq!(
            without_queries(
                "error for url (http://x/api/v4/contacts?query=77021234567&limit=1): reset"
            ),
            "error for url (http://x/api/v4/contacts?…): reset"
        );
        assert_eq!(without_queries("connection refused"), "connection refused");
    }
}
