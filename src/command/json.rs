//! Strict JSON for commands, and the parser's errors said in a BMS's terms. Pure.
//!
//! `serde_json` keeps the last of two equal keys (`{"door":"front","door":"side"}` is `side`),
//! where a validator on the BMS side may keep the first: [`parse_strict`] refuses them. Its
//! error texts name Rust types (`expected u64`, `expected string or map`, `there are no
//! fields`); [`plain`] rewrites them with JSON's words.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

/// The text of a duplicate-key error starts with this.
pub const DUPLICATE_KEY: &str = "duplicate key";

/// Parse JSON text into a [`Value`], refusing an object with the same key twice (at any depth).
pub fn parse_strict(text: &str) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let v = de.deserialize_any(StrictVisitor)?;
    de.end()?;
    Ok(v)
}

struct Strict(Value);

impl<'de> de::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Strict(v) = map.next_value()?;
            if out.contains_key(&k) {
                let shown: String = k.chars().take(64).collect();
                return Err(de::Error::custom(format!("{DUPLICATE_KEY} `{shown}`: each key may appear once")));
            }
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// A serde message in JSON's terms: what was found, and what the field takes.
pub fn plain(msg: &str) -> String {
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        if let Some((got, want)) = rest.split_once(", expected ") {
            return format!("wrong JSON type: {} where {} is expected", found(got), expected(want));
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        if let Some((got, want)) = rest.split_once(", expected ") {
            return format!("{} is not {}", found(got), expected(want));
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        if let Some((field, _)) = rest.split_once(", there are no fields") {
            return format!(
                "unknown field {field}: this command takes no fields (besides request_id, reply_to, expires_at)"
            );
        }
        if let Some((field, known)) = rest.split_once(", expected one of ") {
            return format!("unknown field {field}; the fields are {known}");
        }
        if let Some((field, known)) = rest.split_once(", expected ") {
            return format!("unknown field {field}; the only field is {known}");
        }
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        if let Some((got, known)) = rest.split_once(", expected one of ") {
            return format!("{got} is not one of {known}");
        }
        if let Some((got, known)) = rest.split_once(", expected ") {
            return format!("{got} is not {known}");
        }
    }
    if let Some(field) = msg.strip_prefix("missing field ") {
        return format!("the field {field} is required");
    }
    msg.to_string()
}

/// serde's "integer `1`", "string \"x\"", "map" … as JSON says it.
fn found(got: &str) -> String {
    let unquote = |s: &str| s.trim_matches('`').to_string();
    if let Some(n) = got.strip_prefix("integer ").or_else(|| got.strip_prefix("floating point ")) {
        return format!("the number {}", unquote(n));
    }
    if let Some(b) = got.strip_prefix("boolean ") {
        return unquote(b);
    }
    if let Some(s) = got.strip_prefix("string ") {
        return format!("the string {s}");
    }
    match got {
        "map" => "an object".into(),
        "sequence" => "an array".into(),
        "unit value" | "null" => "null".into(),
        other => other.to_string(),
    }
}

/// serde's "u64", "string or map", "struct CardArgs" … as JSON says it.
fn expected(want: &str) -> &'static str {
    let w = want.trim();
    if ["u8", "u16", "u32", "u64", "usize"].contains(&w) || w.starts_with("a nonnegative") {
        "a whole number ≥ 0"
    } else if ["i8", "i16", "i32", "i64", "isize"].contains(&w) {
        "a whole number"
    } else if w == "f32" || w == "f64" {
        "a number"
    } else if w == "a boolean" || w == "bool" {
        "true or false"
    } else if w.starts_with("struct ") || w == "a map" || w.starts_with("map") {
        "an object"
    } else if w.starts_with("a sequence") || w.starts_with("tuple") {
        "an array"
    } else if w.contains("string") || w.starts_with("a valid") || w.starts_with("enum ") {
        "a string"
    } else {
        "another value"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_twice_is_refused_at_any_depth_and_once_is_fine() {
        assert!(parse_strict(r#"{"door":"front","door":"side"}"#).unwrap_err().to_string().starts_with(DUPLICATE_KEY));
        assert!(parse_strict(r#"{"a":[{"b":1,"c":{"d":1,"d":2}}]}"#).is_err());
        let v = parse_strict(r#"{"a":[1,2.5,"x",true,null,{"b":{}}],"c":-3}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a":[1,2.5,"x",true,null,{"b":{}}],"c":-3}));
        // Trailing garbage and bad JSON still fail as JSON errors.
        assert!(parse_strict("{} x").is_err());
        assert!(parse_strict("{\"a\":").is_err());
    }

    #[test]
    fn serde_wording_is_said_in_json_terms() {
        let cases = [
            (
                "invalid type: integer `1`, expected string or map",
                "wrong JSON type: the number 1 where a string is expected",
            ),
            (
                "invalid type: string \"1\", expected u64",
                "wrong JSON type: the string \"1\" where a whole number ≥ 0 is expected",
            ),
            ("invalid value: integer `-3`, expected u64", "the number -3 is not a whole number ≥ 0"),
            (
                "unknown field `verbose`, there are no fields",
                "unknown field `verbose`: this command takes no fields (besides request_id, reply_to, expires_at)",
            ),
            ("unknown field `force`, expected `resident`", "unknown field `force`; the only field is `resident`"),
            ("missing field `mode`", "the field `mode` is required"),
            (
                "invalid type: sequence, expected struct CardArgs",
                "wrong JSON type: an array where an object is expected",
            ),
        ];
        for (serde, ours) in cases {
            assert_eq!(plain(serde), ours);
        }
    }
}
