//! `POST /oauth2/access_token`: the refresh-token grant with rotation (the
//! previous refresh token stays usable until the new one is first used).
//! The authorization-code grant is not simulated (400).

use serde_json::{json, Value};

use super::server::Req;
use super::state::{now_ts, State};
use super::wire::{Body, Reply};

fn oauth_problem(status: u16, hint: &str) -> Reply {
    // Written in the documented key order: some clients match the body text.
    let hint = Value::String(hint.to_string());
    Reply {
        status,
        body: Body::ProblemText(format!(
            r#"{{"hint":{hint},"title":"Некорректный запрос","type":"https://developers.amocrm.ru/v3/errors/OAuthProblemJson","status":{status},"detail":"В запросе отсутствует ряд параметров или параметры невалидны"}}"#
        )),
    }
}

pub(super) fn token(st: &mut State, req: &Req) -> Reply {
    let body: Value = match serde_json::from_slice(req.body) {
        Ok(v @ Value::Object(_)) => v,
        _ => return oauth_problem(400, "Request body must be a JSON object"),
    };
    let field = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default();
    let grant = field("grant_type");
    if grant == "refresh_token" {
        st.refresh_calls += 1;
    }
    match grant {
        "refresh_token" => {}
        "authorization_code" => {
            return oauth_problem(400, "The authorization code grant is not simulated")
        }
        "" => return oauth_problem(400, "Check the `grant_type` parameter"),
        _ => return oauth_problem(400, "The authorization grant type is not supported"),
    }
    if field("client_id") != st.cfg.client_id || field("client_secret") != st.cfg.client_secret {
        return oauth_problem(401, "Client authentication failed");
    }
    if field("redirect_uri") != st.cfg.redirect_uri {
        return oauth_problem(400, "Check the `redirect_uri` parameter");
    }
    let presented = field("refresh_token");
    if presented.is_empty() {
        return oauth_problem(400, "Check the `refresh_token` parameter");
    }
    let ttl = st.cfg.access_token_ttl;
    match st.tokens.refresh(presented, ttl) {
        Some((access, refresh)) => Reply {
            status: 200,
            body: Body::Json(json!({
                "token_type": "Bearer",
                "expires_in": ttl.as_secs(),
                "server_time": now_ts(),
                "access_token": access,
                "refresh_token": refresh,
            })),
        },
        None => oauth_problem(401, "Token has been revoked"),
    }
}
