//! The cost of an LLM request, from its JSON body (pure).
//!
//! A route with `cost_rules` buffers the request body (up to
//! `max_body_bytes`) and turns it into an [`Estimate`]:
//!
//! - **tokens**: estimated prompt tokens + `n` × the completion reservation
//!   (`max_tokens` / `max_completion_tokens`, else `default_max_tokens`;
//!   0 on embeddings routes), at least 1. Prompt tokens are estimated as
//!   ceil(characters / 4) over the message text (`messages[].content` as a
//!   string or as `text` parts, plus `prompt`), or over `input` on
//!   embeddings routes (a token-id array counts one token per id).
//! - **standard units**: `cost` × max(1, ceil(tokens × model multiplier ×
//!   feature multiplier / tokens_per_unit)), at most 1,000,000. One unit is
//!   `tokens_per_unit` (default 1000) tokens of a ×1 model, so a short
//!   gpt-3.5-turbo call costs 1 unit and an 8K-token gpt-4 call 160.
//!
//! Client numbers are checked here: a `max_tokens` that is negative,
//! fractional, not a number or above `max_tokens_limit` is a 400 naming the
//! field, never a silent clamp. A body that is missing, over the cap or not
//! a JSON object gets the documented fallback instead.

use crate::config::{self, ConfigError};
use serde_json::{Map, Value};
use sluice_wire::MAX_TOKENS;

/// Most units one request can cost (the quota service's bound).
pub const MAX_UNITS: u64 = 1_000_000;
/// Largest `max_body_bytes`: Envoy's default per-connection buffer limit,
/// which bounds what it buffers for the filter anyway.
pub const MAX_BODY_CAP: u64 = 1024 * 1024;
/// Multipliers are kept in thousandths, so 0.1 or 2.5 are exact.
const MILLI: u64 = 1000;
const MAX_MULTIPLIER_MILLI: u64 = 1_000_000;

/// What the body looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// `POST /v1/chat/completions` (or legacy completions): `messages`/`prompt`.
    Chat,
    /// `POST /v1/embeddings`: `input`, no completion.
    Embeddings,
}

/// Compiled cost rules of one policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CostRules {
    pub kind: BodyKind,
    /// Lower-cased model name -> multiplier in thousandths, longest first.
    models: Vec<(String, u64)>,
    unknown_model_milli: u64,
    tools_milli: u64,
    embeddings_milli: u64,
    tokens_per_unit: u64,
    default_max_tokens: u64,
    max_tokens_limit: u64,
    pub max_body_bytes: usize,
    fallback_units: u64,
    fallback_tokens: u64,
    /// `unpriceable: reject`: a body over `max_body_bytes` is a 413 and one
    /// that is not a JSON object a 400, instead of the fallback price.
    pub reject_unpriceable: bool,
    /// Charge standard units (instead of the plain `cost`) to the query windows.
    pub charge_units: bool,
    /// Reserve the token estimate in the token windows and reconcile it.
    pub reserve_tokens: bool,
    /// Lower-cased response header carrying the real total tokens.
    pub usage_header: Option<String>,
}

/// The body as the filter has it.
#[derive(Debug, Clone, Copy)]
pub enum Body<'a> {
    /// No body at all (end of stream on the headers) or an empty one.
    Missing,
    /// More than `max_body_bytes`; not read.
    TooLarge,
    Bytes(&'a [u8]),
}

/// What a request costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    /// Units charged to the query windows.
    pub units: u64,
    /// Tokens to reserve (0 when the route does not reserve tokens).
    pub tokens: u64,
    /// `"stream": true` in the body.
    pub stream: bool,
    /// The fallback applied (body missing, too large or not JSON).
    pub fallback: bool,
}

/// A client-controlled value that is not acceptable (-> 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError {
    pub field: String,
    pub message: String,
    /// The body was over `max_body_bytes` (-> 413, not 400).
    pub too_large: bool,
}

fn bad<T>(field: &str, message: impl Into<String>) -> Result<T, BodyError> {
    Err(BodyError { field: field.to_string(), message: message.into(), too_large: false })
}

const RULE_FIELDS: &[&str] = &[
    "kind",
    "model_multipliers",
    "unknown_model_multiplier",
    "feature_multipliers",
    "tokens_per_unit",
    "default_max_tokens",
    "max_tokens_limit",
    "max_body_bytes",
    "fallback_units",
    "fallback_tokens",
    "unpriceable",
    "charge_units",
    "reserve_tokens",
    "usage_header",
];

/// Built-in model multipliers; `model_multipliers` adds to and overrides them.
pub const DEFAULT_MODELS: &[(&str, u64)] = &[("gpt-4", 20), ("gpt-4-turbo", 10), ("gpt-3.5-turbo", 1)];

/// Compiles a policy's `cost_rules` object (`path` names it in errors).
pub fn compile_rules(v: &Value, path: &str) -> Result<CostRules, ConfigError> {
    let o = config::as_object(v, path)?;
    config::check_known(o, RULE_FIELDS, path)?;
    let f = |k: &str| format!("{path}.{k}");
    let kind = match config::opt_str(o, "kind", &f("kind"))? {
        None | Some("chat") => BodyKind::Chat,
        Some("embeddings") => BodyKind::Embeddings,
        Some(other) => return config::err(&f("kind"), format!("must be \"chat\" or \"embeddings\", not {other:?}")),
    };
    let mut models: Vec<(String, u64)> = DEFAULT_MODELS.iter().map(|(m, x)| (m.to_string(), x * MILLI)).collect();
    if let Some(m) = o.get("model_multipliers") {
        let mpath = f("model_multipliers");
        let mo = config::as_object(m, &mpath)?;
        for (name, value) in mo {
            let field = format!("{mpath}.{name}");
            if name.is_empty() || name.len() > 128 || !name.is_ascii() {
                return config::err(&field, "model names are 1-128 ASCII characters");
            }
            let milli = multiplier(value, &field)?;
            let name = name.to_ascii_lowercase();
            models.retain(|(n, _)| *n != name);
            models.push((name, milli));
        }
    }
    models.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let unknown_model_milli = match o.get("unknown_model_multiplier") {
        Some(v) => multiplier(v, &f("unknown_model_multiplier"))?,
        None => MILLI,
    };
    let (mut tools_milli, mut embeddings_milli) = (2 * MILLI, MILLI / 10);
    if let Some(fm) = o.get("feature_multipliers") {
        let fpath = f("feature_multipliers");
        let fo = config::as_object(fm, &fpath)?;
        config::check_known(fo, &["tools", "embeddings"], &fpath)?;
        if let Some(v) = fo.get("tools") {
            tools_milli = multiplier(v, &format!("{fpath}.tools"))?;
        }
        if let Some(v) = fo.get("embeddings") {
            embeddings_milli = multiplier(v, &format!("{fpath}.embeddings"))?;
        }
    }
    let tokens_per_unit = config::opt_positive(o, "tokens_per_unit", &f("tokens_per_unit"), MAX_TOKENS)?.unwrap_or(1000);
    let max_tokens_limit =
        config::opt_positive(o, "max_tokens_limit", &f("max_tokens_limit"), MAX_TOKENS / 1000)?.unwrap_or(1_000_000);
    let default_max_tokens =
        config::opt_number(o, "default_max_tokens", &f("default_max_tokens"), max_tokens_limit)?.unwrap_or(256);
    let max_body_bytes = config::opt_positive(o, "max_body_bytes", &f("max_body_bytes"), MAX_BODY_CAP)?.unwrap_or(256 * 1024);
    let fallback_units = config::opt_positive(o, "fallback_units", &f("fallback_units"), MAX_UNITS)?.unwrap_or(10);
    let fallback_tokens = config::opt_positive(o, "fallback_tokens", &f("fallback_tokens"), MAX_TOKENS)?.unwrap_or(4096);
    let reject_unpriceable = match config::opt_str(o, "unpriceable", &f("unpriceable"))? {
        None | Some("fallback") => false,
        Some("reject") => true,
        Some(_) => return config::err(&f("unpriceable"), "must be \"fallback\" or \"reject\""),
    };
    let flag = |k: &str| -> Result<bool, ConfigError> {
        match o.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => config::err(&f(k), "must be true or false"),
        }
    };
    let charge_units = flag("charge_units")?;
    let reserve_tokens = flag("reserve_tokens")?;
    if !charge_units && !reserve_tokens {
        return config::err(path, "set charge_units or reserve_tokens (or both): otherwise the body is buffered for nothing");
    }
    let usage_header = match config::opt_str(o, "usage_header", &f("usage_header"))? {
        None => None,
        Some(h) => {
            let h = h.to_ascii_lowercase();
            if !config::is_header_name(&h) {
                return config::err(&f("usage_header"), "must be a header name (letters, digits, - _ .)");
            }
            if !reserve_tokens {
                return config::err(&f("usage_header"), "only means something with reserve_tokens: true");
            }
            Some(h)
        }
    };
    Ok(CostRules {
        kind,
        models,
        unknown_model_milli,
        tools_milli,
        embeddings_milli,
        tokens_per_unit,
        default_max_tokens,
        max_tokens_limit,
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(256 * 1024),
        fallback_units,
        fallback_tokens,
        reject_unpriceable,
        charge_units,
        reserve_tokens,
        usage_header,
    })
}

/// A multiplier: a number > 0 and <= 1000 with at most three decimals.
fn multiplier(v: &Value, field: &str) -> Result<u64, ConfigError> {
    let Some(x) = v.as_f64() else { return config::err(field, "must be a number") };
    if x.is_nan() || x <= 0.0 {
        return config::err(field, "must be greater than 0");
    }
    if x > (MAX_MULTIPLIER_MILLI / MILLI) as f64 {
        return config::err(field, format!("must be at most {}", MAX_MULTIPLIER_MILLI / MILLI));
    }
    let milli = (x * MILLI as f64).round();
    if milli < 1.0 || (milli - x * MILLI as f64).abs() > 1e-6 {
        return config::err(field, "must have at most three decimals and be at least 0.001");
    }
    Ok(milli as u64)
}

impl CostRules {
    /// Multiplier (thousandths) of a model: an exact name, else the longest
    /// configured name followed by `-` (`gpt-4-0613` is `gpt-4`, while
    /// `gpt-4o` is a different model and gets `unknown_model_multiplier`).
    pub fn model_milli(&self, model: Option<&str>) -> u64 {
        let Some(model) = model else { return self.unknown_model_milli };
        let model = model.to_ascii_lowercase();
        for (name, milli) in &self.models {
            if model == *name {
                return *milli;
            }
        }
        for (name, milli) in &self.models {
            if model.len() > name.len() && model.starts_with(name.as_str()) && model.as_bytes().get(name.len()) == Some(&b'-') {
                return *milli;
            }
        }
        self.unknown_model_milli
    }

    fn fallback(&self, base_cost: u64) -> Estimate {
        Estimate {
            units: if self.charge_units { self.fallback_units } else { base_cost },
            tokens: if self.reserve_tokens { self.fallback_tokens } else { 0 },
            stream: false,
            fallback: true,
        }
    }

    /// The cost of one request. `base_cost` is the policy's `cost`.
    pub fn estimate(&self, base_cost: u64, body: Body<'_>) -> Result<Estimate, BodyError> {
        let bytes = match body {
            Body::Missing | Body::Bytes([]) => return Ok(self.fallback(base_cost)),
            Body::TooLarge if self.reject_unpriceable => {
                return Err(BodyError {
                    field: "body".into(),
                    message: format!("larger than this route's max_body_bytes ({}), which it prices requests by", self.max_body_bytes),
                    too_large: true,
                })
            }
            Body::TooLarge => return Ok(self.fallback(base_cost)),
            Body::Bytes(b) => b,
        };
        let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(bytes) else {
            if self.reject_unpriceable {
                return bad("body", "must be a JSON object this route can price (at most 128 levels deep)");
            }
            return Ok(self.fallback(base_cost));
        };
        let model = match o.get("model") {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) => Some(m.as_str()),
            Some(_) => return bad("model", "must be a string"),
        };
        let stream = match o.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return bad("stream", "must be true or false"),
        };
        let n = count(&o, "n", 128)?.unwrap_or(1);
        if n == 0 {
            return bad("n", "must be at least 1");
        }
        let completion = match self.kind {
            BodyKind::Embeddings => 0,
            BodyKind::Chat => {
                let a = count(&o, "max_tokens", self.max_tokens_limit)?;
                let b = count(&o, "max_completion_tokens", self.max_tokens_limit)?;
                a.max(b).unwrap_or(self.default_max_tokens)
            }
        };
        let chars = match self.kind {
            BodyKind::Chat => chat_chars(&o)?,
            BodyKind::Embeddings => input_chars(&o)?,
        };
        let prompt = chars.div_ceil(4);
        let tokens = prompt.saturating_add(n.saturating_mul(completion)).clamp(1, MAX_TOKENS);

        let mut feature = MILLI;
        if self.kind == BodyKind::Embeddings {
            feature = self.embeddings_milli;
        }
        let has_tools = ["tools", "functions"].iter().any(|k| o.get(*k).and_then(Value::as_array).is_some_and(|a| !a.is_empty()));
        if has_tools {
            feature = feature.saturating_mul(self.tools_milli) / MILLI;
        }
        let weighted = u128::from(tokens) * u128::from(self.model_milli(model)) * u128::from(feature.max(1));
        let per_unit = u128::from(self.tokens_per_unit) * u128::from(MILLI * MILLI);
        let size_units = weighted.div_ceil(per_unit.max(1)).max(1);
        let units = (u128::from(base_cost) * size_units).min(u128::from(MAX_UNITS));
        Ok(Estimate {
            units: if self.charge_units { u64::try_from(units).unwrap_or(MAX_UNITS) } else { base_cost },
            tokens: if self.reserve_tokens { tokens } else { 0 },
            stream,
            fallback: false,
        })
    }
}

/// A client count: absent/null, or a whole number in 0..=max.
fn count(o: &Map<String, Value>, key: &str, max: u64) -> Result<Option<u64>, BodyError> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                if u > max {
                    return bad(key, format!("must be at most {max}, got {u}"));
                }
                return Ok(Some(u));
            }
            if n.as_i64().is_some() || n.as_f64().is_some_and(|f| f < 0.0) {
                return bad(key, format!("must not be negative, got {n}"));
            }
            // A whole number written with a fraction part (`100.0`) is that number.
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0) {
                if f <= max as f64 {
                    return Ok(Some(f as u64));
                }
                return bad(key, format!("must be at most {max}, got {n}"));
            }
            bad(key, format!("must be a whole number, got {n}"))
        }
        Some(_) => bad(key, "must be a number"),
    }
}

fn text_chars(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.chars().count() as u64,
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.chars().count() as u64,
                Value::Object(po) => po.get("text").and_then(Value::as_str).map_or(0, |s| s.chars().count() as u64),
                _ => 0,
            })
            .fold(0u64, u64::saturating_add),
        _ => 0,
    }
}

fn chat_chars(o: &Map<String, Value>) -> Result<u64, BodyError> {
    let mut chars = 0u64;
    match o.get("messages") {
        None | Some(Value::Null) => {}
        Some(Value::Array(msgs)) => {
            for m in msgs {
                if let Some(c) = m.get("content") {
                    chars = chars.saturating_add(text_chars(c));
                }
            }
        }
        Some(_) => return bad("messages", "must be an array"),
    }
    if let Some(p) = o.get("prompt") {
        chars = chars.saturating_add(text_chars(p));
    }
    Ok(chars)
}

fn input_chars(o: &Map<String, Value>) -> Result<u64, BodyError> {
    match o.get("input") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::String(s)) => Ok(s.chars().count() as u64),
        Some(Value::Array(items)) => Ok(items
            .iter()
            .map(|i| match i {
                Value::String(s) => s.chars().count() as u64,
                // A token id is one token: 4 "characters" in the estimator.
                Value::Number(_) => 4,
                Value::Array(ids) => 4 * ids.len() as u64,
                _ => 0,
            })
            .fold(0u64, u64::saturating_add)),
        Some(_) => bad("input", "must be a string or an array"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules(v: Value) -> CostRules {
        compile_rules(&v, "policies[0].cost_rules").unwrap()
    }

    fn est(r: &CostRules, body: Value) -> Result<Estimate, BodyError> {
        r.estimate(1, Body::Bytes(body.to_string().as_bytes()))
    }

    #[test]
    fn models_match_exactly_or_by_the_longest_dash_prefix() {
        let r = rules(json!({"charge_units": true, "model_multipliers": {"Claude-3": 15, "gpt-4": 30}}));
        assert_eq!(r.model_milli(Some("gpt-4")), 30_000, "config overrides the default");
        assert_eq!(r.model_milli(Some("gpt-4-0613")), 30_000);
        assert_eq!(r.model_milli(Some("gpt-4-turbo-2024-04-09")), 10_000, "longest prefix wins");
        assert_eq!(r.model_milli(Some("GPT-3.5-TURBO-16k")), 1_000);
        assert_eq!(r.model_milli(Some("claude-3-opus")), 15_000);
        assert_eq!(r.model_milli(Some("gpt-4o")), 1_000, "gpt-4o is not gpt-4");
        assert_eq!(r.model_milli(None), 1_000);
    }

    #[test]
    fn standard_units_weigh_tokens_by_model_and_features() {
        let r = rules(json!({"charge_units": true, "reserve_tokens": true}));
        // 8000 prompt tokens (32000 chars) + 192 completion to gpt-4: 8192 tokens x 20 / 1000 -> 164 units.
        let big = json!({"model": "gpt-4", "max_tokens": 192, "messages": [{"role": "user", "content": "a".repeat(32_000)}]});
        let e = est(&r, big).unwrap();
        assert_eq!((e.tokens, e.units, e.stream, e.fallback), (8192, 164, false, false));
        // A short gpt-3.5 question is one unit, like a plain request.
        let small = json!({"model": "gpt-3.5-turbo", "max_tokens": 50, "messages": [{"role": "user", "content": "hi there"}]});
        assert_eq!(est(&r, small.clone()).unwrap().units, 1);
        assert_eq!(est(&r, small).unwrap().tokens, 52);
        // Tools double the units; n multiplies the completion reservation.
        let tools = json!({"model": "gpt-4", "max_tokens": 1000, "n": 2, "tools": [{"type": "function"}], "messages": []});
        let e = est(&r, tools).unwrap();
        assert_eq!((e.tokens, e.units), (2000, 80));
        // The default completion reservation applies when max_tokens is absent.
        assert_eq!(est(&r, json!({"messages": [{"content": [{"type": "text", "text": "abcdefgh"}]}]})).unwrap().tokens, 2 + 256);
        assert!(est(&r, json!({"stream": true})).unwrap().stream);
    }

    #[test]
    fn embeddings_routes_count_input_and_reserve_no_completion() {
        let r = rules(json!({"kind": "embeddings", "charge_units": true, "reserve_tokens": true, "feature_multipliers": {"embeddings": 0.5}}));
        let e = est(&r, json!({"model": "x", "input": ["abcd", "efgh"], "max_tokens": 999})).unwrap();
        assert_eq!((e.tokens, e.units), (2, 1));
        let e = est(&r, json!({"input": "a".repeat(16_000)})).unwrap();
        assert_eq!((e.tokens, e.units), (4000, 2));
        assert_eq!(est(&r, json!({"input": [[1, 2, 3]]})).unwrap().tokens, 3);
    }

    #[test]
    fn h15_bad_client_numbers_are_400s_naming_the_field() {
        let r = rules(json!({"reserve_tokens": true, "max_tokens_limit": 100000}));
        for (body, field, words) in [
            (json!({"max_tokens": -1000}), "max_tokens", "negative"),
            (json!({"max_tokens": "lots"}), "max_tokens", "number"),
            (json!({"max_tokens": 250.5}), "max_tokens", "whole"),
            (json!({"max_tokens": 1e30}), "max_tokens", "at most"),
            (json!({"max_tokens": 100001.0}), "max_tokens", "at most"),
            (json!({"max_tokens": 100001}), "max_tokens", "at most"),
            (json!({"max_completion_tokens": -1}), "max_completion_tokens", "negative"),
            (json!({"n": 0}), "n", "at least 1"),
            (json!({"n": 1000}), "n", "at most"),
            (json!({"model": 4}), "model", "string"),
            (json!({"stream": "yes"}), "stream", "true or false"),
            (json!({"messages": "hi"}), "messages", "array"),
        ] {
            let e = est(&r, body.clone()).unwrap_err();
            assert_eq!(e.field, field, "{body}");
            assert!(e.message.contains(words), "{body}: {}", e.message);
        }
        // Zero is a number a client may send: the estimate is then the
        // prompt alone, and never below the documented minimum of 1 token.
        assert_eq!(est(&r, json!({"max_tokens": 0})).unwrap().tokens, 1);
        assert_eq!(est(&r, json!({"max_tokens": 0, "messages": [{"content": "abcdefgh"}]})).unwrap().tokens, 2);
        // A whole number with a fraction part is that number.
        assert_eq!(est(&r, json!({"max_tokens": 100.0})).unwrap().tokens, est(&r, json!({"max_tokens": 100})).unwrap().tokens);
    }

    #[test]
    fn missing_oversized_and_non_json_bodies_get_the_fallback() {
        let r = rules(json!({"charge_units": true, "reserve_tokens": true, "fallback_units": 7, "fallback_tokens": 900}));
        let want = Estimate { units: 7, tokens: 900, stream: false, fallback: true };
        for body in [Body::Missing, Body::TooLarge, Body::Bytes(b""), Body::Bytes(b"not json"), Body::Bytes(b"[1,2]"), Body::Bytes(b"\xff\xfe")] {
            assert_eq!(r.estimate(3, body).unwrap(), want, "{body:?}");
        }
        let only_tokens = rules(json!({"reserve_tokens": true}));
        assert_eq!(only_tokens.estimate(3, Body::Missing).unwrap().units, 3, "without charge_units the plain cost applies");
    }

    #[test]
    fn with_unpriceable_reject_oversized_and_unparseable_bodies_are_refused_never_priced_at_the_fallback() {
        let r = rules(json!({"charge_units": true, "unpriceable": "reject", "fallback_units": 7}));
        let e = r.estimate(3, Body::TooLarge).unwrap_err();
        assert_eq!((e.field.as_str(), e.too_large), ("body", true));
        let mut deep = "[".repeat(200);
        deep.push_str(&"]".repeat(200));
        let nested = format!("{{\"model\":\"gpt-4\",\"max_tokens\":100000,\"x\":{deep}}}");
        for body in [b"not json".as_slice(), b"[1,2]", b"\xff\xfe", nested.as_bytes()] {
            let e = r.estimate(3, Body::Bytes(body)).unwrap_err();
            assert_eq!((e.field.as_str(), e.too_large), ("body", false), "{:?}", String::from_utf8_lossy(body));
        }
        // Nothing hidden in a request without a body: the fallback still applies.
        assert_eq!(r.estimate(3, Body::Missing).unwrap().units, 7);
        assert_eq!(compile_rules(&json!({"charge_units": true, "unpriceable": "maybe"}), "p.cost_rules").unwrap_err().field, "p.cost_rules.unpriceable");
    }

    #[test]
    fn cost_rules_are_validated_naming_the_field() {
        let e = |v: Value| compile_rules(&v, "p.cost_rules").unwrap_err().field;
        assert_eq!(e(json!({})), "p.cost_rules");
        assert_eq!(e(json!({"charge_units": true, "model_multipliers": {"gpt-4": -2}})), "p.cost_rules.model_multipliers.gpt-4");
        assert_eq!(e(json!({"charge_units": true, "model_multipliers": {"gpt-4": 0}})), "p.cost_rules.model_multipliers.gpt-4");
        assert_eq!(e(json!({"charge_units": true, "unknown_model_multiplier": 0.0001})), "p.cost_rules.unknown_model_multiplier");
        assert_eq!(e(json!({"charge_units": true, "feature_multipliers": {"images": 2}})), "p.cost_rules.feature_multipliers.images");
        assert_eq!(e(json!({"charge_units": true, "max_body_bytes": 2_000_000})), "p.cost_rules.max_body_bytes");
        assert_eq!(e(json!({"charge_units": true, "kind": "images"})), "p.cost_rules.kind");
        assert_eq!(e(json!({"charge_units": true, "usage_header": "x-usage"})), "p.cost_rules.usage_header");
        assert_eq!(e(json!({"reserve_tokens": true, "usage_header": "bad header"})), "p.cost_rules.usage_header");
        assert_eq!(e(json!({"charge_units": "yes"})), "p.cost_rules.charge_units");
        assert_eq!(e(json!({"charge_units": true, "fallback_units": -1})), "p.cost_rules.fallback_units");
        assert_eq!(e(json!({"charge_units": true, "colour": 1})), "p.cost_rules.colour");
    }
}
