//! The canonical byte encoding that signatures and hashes cover.
//!
//! Canonical JSON here means: the JSON text `serde_json` would write for each
//! scalar, object keys sorted by their UTF-8 bytes, no whitespace anywhere, no
//! duplicate keys (a parsed [`Value`] cannot hold any). Floats are written by
//! `serde_json` (shortest round-trip form), so parsing canonical bytes and
//! encoding the result again gives the same bytes; the tests and a proptest
//! hold that.
//!
//! The key order is sorted here explicitly rather than left to
//! `serde_json::Map`, because another crate in the build may switch on
//! `serde_json`'s `preserve_order` feature, which would silently change the
//! map's iteration order and with it every signature.

use serde_json::Value;

/// Encodes `value` canonically: sorted keys, no whitespace.
pub(crate) fn to_vec(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out);
    out
}

fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {
            // Writing a scalar into a Vec cannot fail: serde_json refuses only
            // non-string map keys and failing writers, and neither occurs here.
            serde_json::to_writer(&mut *out, value).expect("scalar serialises");
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key).expect("string serialises");
                out.push(b':');
                write(item, out);
            }
            out.push(b'}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_known_documents() {
        let cases = [
            (
                r#"{ "b": 1, "a": [true, null, "x"] }"#,
                r#"{"a":[true,null,"x"],"b":1}"#,
            ),
            (
                r#"{"z":{"y":1,"x":2},"é":0,"A":0}"#,
                r#"{"A":0,"z":{"x":2,"y":1},"é":0}"#,
            ),
            (
                r#"{"f": 1.0, "g": 0.1, "h": -2.5e-8}"#,
                r#"{"f":1.0,"g":0.1,"h":-2.5e-8}"#,
            ),
            (
                r#"{"s": "line\nbreak \"quoted\" \u0001"}"#,
                r#"{"s":"line\nbreak \"quoted\" \u0001"}"#,
            ),
            (r#"[ ]"#, r#"[]"#),
            (r#"{ }"#, r#"{}"#),
            (r#"18446744073709551615"#, r#"18446744073709551615"#),
        ];
        for (input, want) in cases {
            let value: Value = serde_json::from_str(input).unwrap();
            assert_eq!(
                String::from_utf8(to_vec(&value)).unwrap(),
                want,
                "input {input}"
            );
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn canonical_bytes_are_a_fixed_point(value in arb_json()) {
            let bytes = to_vec(&value);
            let parsed: Value = serde_json::from_slice(&bytes).unwrap();
            prop_assert_eq!(&parsed, &value);
            prop_assert_eq!(to_vec(&parsed), bytes);
        }

        #[test]
        fn whitespace_and_key_order_do_not_matter(value in arb_json()) {
            let pretty = serde_json::to_vec_pretty(&value).unwrap();
            let reparsed: Value = serde_json::from_slice(&pretty).unwrap();
            prop_assert_eq!(to_vec(&reparsed), to_vec(&value));
        }
    }
}
