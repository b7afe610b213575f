//! Response bodies (HAL, problem+json, nginx HTML), query-string access,
//! paging, and the per-item validation errors amoCRM reports.

use serde_json::{json, Map, Value};

pub(super) enum Body {
    /// `application/hal+json`
    Hal(Value),
    /// `application/json` (token endpoint)
    Json(Value),
    /// `application/problem+json`
    Problem(Value),
    /// `application/problem+json`, written byte for byte (documented bodies whose key order matters).
    ProblemText(String),
    /// `text/html` (nginx pages)
    Html(String),
    /// `application/hal+json` that is not JSON (a truncated answer).
    Broken(String),
    /// No body (204).
    Empty,
}

pub(super) struct Reply {
    pub status: u16,
    pub body: Body,
}

pub(super) fn problem_body(status: u16, title: &str, detail: &str) -> Value {
    json!({
        "title": title,
        "type": format!("https://httpstatus.es/{status}"),
        "status": status,
        "detail": detail,
    })
}

pub(super) fn nginx_page(status: u16, text: &str) -> String {
    format!(
        "<html>\r\n<head><title>{status} {text}</title></head>\r\n<body>\r\n<center><h1>{status} {text}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
    )
}

impl Reply {
    pub fn hal(v: Value) -> Reply {
        Reply {
            status: 200,
            body: Body::Hal(v),
        }
    }

    pub fn no_content() -> Reply {
        Reply {
            status: 204,
            body: Body::Empty,
        }
    }

    pub fn problem(status: u16, title: &str, detail: &str) -> Reply {
        Reply {
            status,
            body: Body::Problem(problem_body(status, title, detail)),
        }
    }

    pub fn bad_request(detail: &str) -> Reply {
        Reply::problem(400, "Bad Request", detail)
    }

    pub fn empty_request() -> Reply {
        Reply::bad_request("Request data can not be empty")
    }

    pub fn not_found(detail: &str) -> Reply {
        Reply::problem(404, "Not Found", detail)
    }

    pub fn limit(detail: &str) -> Reply {
        Reply::problem(422, "Unprocessable Entity", detail)
    }

    pub fn limit_250() -> Reply {
        Reply::limit("Limit 250 per page")
    }

    pub fn html(status: u16, text: &str) -> Reply {
        Reply {
            status,
            body: Body::Html(nginx_page(status, text)),
        }
    }

    pub fn validation(items: Vec<ItemErrors>) -> Reply {
        let list: Vec<Value> = items
            .into_iter()
            .map(|i| {
                json!({
                    "request_id": i.request_id,
                    "errors": i.errors.into_iter().map(|e| json!({
                        "code": e.code, "path": e.path, "detail": e.detail,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut body = problem_body(400, "Bad Request", "Request validation failed");
        if let Value::Object(map) = &mut body {
            map.insert("validation-errors".into(), Value::Array(list));
        }
        Reply {
            status: 400,
            body: Body::Problem(body),
        }
    }
}

pub(super) struct FieldError {
    pub code: &'static str,
    pub path: String,
    pub detail: &'static str,
}

pub(super) struct ItemErrors {
    pub request_id: String,
    pub errors: Vec<FieldError>,
}

pub(super) const NOT_CHOICE: &str = "The value you selected is not a valid choice.";

/// Collects the errors of one batch item.
#[derive(Default)]
pub(super) struct Check {
    pub errors: Vec<FieldError>,
}

impl Check {
    pub fn err(&mut self, code: &'static str, path: impl Into<String>, detail: &'static str) {
        self.errors.push(FieldError {
            code,
            path: path.into(),
            detail,
        });
    }

    pub fn not_choice(&mut self, path: impl Into<String>) {
        self.err("NotSupportedChoice", path, NOT_CHOICE);
    }

    /// An optional non-negative integer; absent or null is None.
    pub fn opt_u64(&mut self, obj: &Value, key: &str, path: &str) -> Option<u64> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(n) => Some(n),
                None => {
                    self.err("InvalidType", path, "This value should be of type int.");
                    None
                }
            },
        }
    }

    pub fn opt_i64(&mut self, obj: &Value, key: &str, path: &str) -> Option<i64> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_i64() {
                Some(n) => Some(n),
                None => {
                    self.err("InvalidType", path, "This value should be of type int.");
                    None
                }
            },
        }
    }

    pub fn opt_str(&mut self, obj: &Value, key: &str, path: &str) -> Option<String> {
        match obj.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err("InvalidType", path, "This value should be of type string.");
                None
            }
        }
    }

    pub fn finish(self, request_id: String) -> Option<ItemErrors> {
        if self.errors.is_empty() {
            None
        } else {
            Some(ItemErrors {
                request_id,
                errors: self.errors,
            })
        }
    }
}

/// The item's `request_id` as a string, or its index in the batch.
pub(super) fn request_id_of(item: &Value, index: usize) -> String {
    match item.get("request_id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => index.to_string(),
    }
}

/// A write body: a non-empty JSON array, else 400 "Request data can not be empty".
pub(super) fn array_body(body: &[u8]) -> Result<Vec<Value>, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Array(items)) if !items.is_empty() => Ok(items),
        _ => Err(Reply::empty_request()),
    }
}

/// A JSON object body (single-entity PATCH, webhooks).
pub(super) fn object_body(body: &[u8]) -> Result<Map<String, Value>, Reply> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) if !map.is_empty() => Ok(map),
        _ => Err(Reply::empty_request()),
    }
}

/// The decoded query string, in order.
pub(super) struct Query(pub Vec<(String, String)>);

impl Query {
    pub fn parse(raw: &str) -> Query {
        Query(
            reqwest::Url::parse(&format!("http://q/?{raw}"))
                .map(|u| u.query_pairs().into_owned().collect())
                .unwrap_or_default(),
        )
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Values of `base`, `base[]` and `base[N]`, with comma lists split.
    pub fn multi(&self, base: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| {
                k == base
                    || k.strip_prefix(base)
                        .and_then(|rest| rest.strip_prefix('['))
                        .and_then(|rest| rest.strip_suffix(']'))
                        .is_some_and(|inner| inner.chars().all(|c| c.is_ascii_digit()))
            })
            .flat_map(|(_, v)| v.split(',').map(|s| s.trim().to_string()))
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Integer values of `multi(base)`; Err names the key when one is not a number.
    pub fn multi_u64(&self, base: &str) -> Result<Vec<u64>, Reply> {
        self.multi(base)
            .iter()
            .map(|s| s.parse::<u64>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Reply::bad_request("Request validation failed"))
    }

    pub fn i64_of(&self, key: &str) -> Result<Option<i64>, Reply> {
        match self.get(key) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse::<i64>()
                .map(Some)
                .map_err(|_| Reply::bad_request("Request validation failed")),
        }
    }

    /// `with=a,b` contains `what`.
    pub fn with(&self, what: &str) -> bool {
        self.get("with")
            .is_some_and(|w| w.split(',').any(|x| x.trim() == what))
    }
}

pub(super) struct Paging {
    pub page: usize,
    pub limit: usize,
}

impl Paging {
    /// `page` (from 1) and `limit` (default 50, at most 250, else 422).
    pub fn from_query(q: &Query) -> Result<Paging, Reply> {
        let page = match q.get("page") {
            None | Some("") => 1,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(Reply::bad_request("Request validation failed")),
            },
        };
        let limit = match q.get("limit") {
            None | Some("") => 50,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n > 250 => return Err(Reply::limit_250()),
                Ok(n) if n >= 1 => n,
                _ => return Err(Reply::bad_request("Request validation failed")),
            },
        };
        Ok(Paging { page, limit })
    }

    /// The page's slice of `items` and whether a next page exists.
    pub fn slice<T: Clone>(&self, items: &[T]) -> (Vec<T>, bool) {
        let start = (self.page - 1).saturating_mul(self.limit);
        if start >= items.len() {
            return (Vec::new(), false);
        }
        let end = (start + self.limit).min(items.len());
        (items[start..end].to_vec(), end < items.len())
    }
}

/// `{base}{path}?{query with page replaced}`.
pub(super) fn page_href(base: &str, path: &str, q: &Query, page: usize, limit: usize) -> String {
    let mut url = match reqwest::Url::parse(&format!("{base}{path}")) {
        Ok(u) => u,
        Err(_) => return format!("{base}{path}"),
    };
    {
        let mut pairs = url.query_pairs_mut();
        for (k, v) in q.0.iter().filter(|(k, _)| k != "page" && k != "limit") {
            pairs.append_pair(k, v);
        }
        pairs.append_pair("page", &page.to_string());
        pairs.append_pair("limit", &limit.to_string());
    }
    url.to_string()
}

/// A HAL list page, or 204 when the page is empty.
pub(super) fn hal_page(
    base: &str,
    path: &str,
    q: &Query,
    paging: &Paging,
    key: &str,
    items: Vec<Value>,
    has_next: bool,
) -> Reply {
    if items.is_empty() {
        return Reply::no_content();
    }
    let mut links = Map::new();
    links.insert(
        "self".into(),
        json!({"href": page_href(base, path, q, paging.page, paging.limit)}),
    );
    if has_next {
        links.insert(
            "next".into(),
            json!({"href": page_href(base, path, q, paging.page + 1, paging.limit)}),
        );
    }
    if paging.page > 1 {
        links.insert(
            "prev".into(),
            json!({"href": page_href(base, path, q, paging.page - 1, paging.limit)}),
        );
    }
    let mut embedded = Map::new();
    embedded.insert(key.into(), Value::Array(items));
    Reply::hal(json!({
        "_page": paging.page,
        "_links": links,
        "_embedded": embedded,
    }))
}

pub(super) fn self_link(href: String) -> Value {
    json!({"self": {"href": href}})
}
