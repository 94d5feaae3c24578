//! A JSON tree that borrows its strings from the event's bytes: what validation reads
//! an event as. Parsing it costs no allocation per string without escapes and no
//! `BTreeMap` node per object entry (a `serde_json::Value` allocates both), yet it keeps
//! `Value`'s meaning: an object's keys in sorted order, a repeated key's last value wins,
//! numbers are `serde_json::Number`s made the same way, the same syntax errors (the
//! parser is serde_json's).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// One JSON value; strings borrowed where the text has no escapes.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// An object's entries sorted by key, each key once (a repeated key's last value).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Object<'a>(Vec<(Cow<'a, str>, Json<'a>)>);

impl<'a> Object<'a> {
    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&Json<'a>> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(name))
            .ok()
            .and_then(|i| self.0.get(i))
            .map(|(_, v)| v)
    }

    /// The keys in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| &**k)
    }

    /// The entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.0.iter().map(|(k, v)| (&**k, v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorts entries collected in document order by key; of a repeated key the last one
    /// stays (as a `serde_json::Map` keeps it).
    fn from_entries(mut entries: Vec<(Cow<'a, str>, Json<'a>)>) -> Self {
        // Stable: the copies of a key stay in document order, the last one last.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Cow<'a, str>, Json<'a>)> = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = v,
                _ => out.push((k, v)),
            }
        }
        Self(out)
    }
}

impl<'a> Json<'a> {
    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(&**s),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Object<'a>> {
        match self {
            Json::Object(o) => Some(o),
            _ => None,
        }
    }

    /// A view of a parsed `serde_json::Value` (its strings borrowed).
    pub fn from_value(value: &'a Value) -> Self {
        match value {
            Value::Null => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Number(n) => Json::Number(n.clone()),
            Value::String(s) => Json::String(Cow::Borrowed(s)),
            Value::Array(items) => Json::Array(items.iter().map(Json::from_value).collect()),
            // A Map iterates its keys sorted (no `preserve_order` here) and unique; sorted
            // again anyway, so the order holds whatever serde_json's features.
            Value::Object(map) => Json::Object(Object::from_entries(
                map.iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Json::from_value(v)))
                    .collect(),
            )),
        }
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        // As serde_json's `Value` does (JSON text never gives NaN or an infinity).
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Deserialize::deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).clamp(4, 64));
        while let Some(Key(k)) = map.next_key()? {
            let v: Json<'de> = map.next_value()?;
            entries.push((k, v));
        }
        Ok(Json::Object(Object::from_entries(entries)))
    }
}

/// An object key, borrowed where it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tree `Json` parses equals the view of the `Value` serde_json parses, for
    /// escapes, repeated keys, numbers of each kind and nesting.
    #[test]
    fn parses_as_serde_json_value_does() {
        for text in [
            r#"{"b":1,"a":[1,-2,3.5,1e3,18446744073709551615,-9223372036854775808],"a\u0041":"x\ny","c":null,"d":true}"#,
            r#"{"k":1,"k":{"z":2,"y":[{}]},"j":"\u00e9t\u00e9"}"#,
            r#"[1, "two", {"three": 3}]"#,
            r#""just a string""#,
            "12345678901234567890123",
            "-0.0",
        ] {
            let value: Value = serde_json::from_str(text).unwrap();
            let json: Json<'_> = serde_json::from_str(text).unwrap();
            assert_eq!(json, Json::from_value(&value), "{text}");
        }
    }

    #[test]
    fn strings_without_escapes_are_borrowed() {
        let json: Json<'_> =
            serde_json::from_str(r#"{"plain":"text","esc\"aped":"a\tb"}"#).unwrap();
        let obj = json.as_object().unwrap();
        assert!(obj.keys().eq(["esc\"aped", "plain"]));
        assert!(matches!(
            obj.get("plain"),
            Some(Json::String(Cow::Borrowed("text")))
        ));
        assert!(matches!(obj.get("esc\"aped"), Some(Json::String(Cow::Owned(s))) if s == "a\tb"));
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        let json: Json<'_> = serde_json::from_str(r#"{"a":1,"b":2,"a":3,"a":4}"#).unwrap();
        let obj = json.as_object().unwrap();
        assert_eq!(obj.len(), 2);
        assert_eq!(obj.get("a"), Some(&Json::Number(4.into())));
    }

    #[test]
    fn syntax_errors_read_as_serde_json_values() {
        for text in ["{\"a\":", "{\"a\":1}x", "[1,]", "{a:1}", "\"\\x\""] {
            let value = serde_json::from_str::<Value>(text).unwrap_err().to_string();
            let json = serde_json::from_str::<Json<'_>>(text)
                .unwrap_err()
                .to_string();
            assert_eq!(json, value, "{text}");
        }
    }
}
