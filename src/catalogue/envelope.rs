//! The `{"data": [ … ]}` envelope, streamed: the API's POST bodies and the
//! AppMetrica Logs API's exports both carry their records in it. The first
//! `data` array's elements go to a [`Sink`] one by one as they are parsed;
//! every other field (and a repeated `data`) is skipped unread.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// Where the elements of `data` go.
pub trait Sink<'de> {
    type Item: serde::Deserialize<'de>;
    /// Takes element `index`; an `Err` stops the parse with that message.
    fn push(&mut self, index: u64, item: Self::Item) -> Result<(), String>;
}

/// Streams `deserializer`'s envelope into `sink`: `Some(elements)`, or `None`
/// when the object has no `data` field.
pub fn stream<'de, D: Deserializer<'de>, S: Sink<'de>>(deserializer: D, sink: &mut S) -> Result<Option<u64>, D::Error> {
    deserializer.deserialize_map(Envelope(sink))
}

struct Envelope<'s, S>(&'s mut S);

impl<'de, S: Sink<'de>> Visitor<'de> for Envelope<'_, S> {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with a \"data\" array")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
        let mut count = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == "data" && count.is_none() {
                count = Some(map.next_value_seed(Elements(&mut *self.0))?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(count)
    }
}

struct Elements<'s, S>(&'s mut S);

impl<'de, S: Sink<'de>> DeserializeSeed<'de> for Elements<'_, S> {
    type Value = u64;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<u64, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, S: Sink<'de>> Visitor<'de> for Elements<'_, S> {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u64, A::Error> {
        let mut index = 0;
        while let Some(item) = seq.next_element::<S::Item>()? {
            self.0.push(index, item).map_err(A::Error::custom)?;
            index += 1;
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Collect {
        items: Vec<serde_json::Value>,
        stop_at: Option<u64>,
    }

    impl<'de> Sink<'de> for Collect {
        type Item = serde_json::Value;
        fn push(&mut self, index: u64, item: serde_json::Value) -> Result<(), String> {
            if self.stop_at == Some(index) {
                return Err(format!("stopped at {index}"));
            }
            self.items.push(item);
            Ok(())
        }
    }

    fn run(text: &str, stop_at: Option<u64>) -> (Result<Option<u64>, String>, Vec<serde_json::Value>) {
        let mut sink = Collect {
            items: Vec::new(),
            stop_at,
        };
        let mut de = serde_json::Deserializer::from_str(text);
        let result = stream(&mut de, &mut sink).and_then(|n| de.end().map(|()| n));
        (result.map_err(|e| e.to_string()), sink.items)
    }

    #[test]
    fn the_first_data_array_streams_and_the_rest_is_skipped() {
        let (n, items) = run(
            r#"{"meta": {"data": [9]}, "data": [1, {"a": 2}], "data": [3], "x": "y"}"#,
            None,
        );
        assert_eq!(n, Ok(Some(2)));
        assert_eq!(items, vec![serde_json::json!(1), serde_json::json!({"a": 2})]);
        assert_eq!(run(r#"{"rows": []}"#, None), (Ok(None), vec![]));
        assert_eq!(run(r#"{"data": []}"#, None), (Ok(Some(0)), vec![]));
    }

    #[test]
    fn a_sink_stops_the_parse_and_bad_shapes_are_named() {
        let (n, items) = run(r#"{"data": [1, 2, 3]}"#, Some(1));
        assert!(n.unwrap_err().starts_with("stopped at 1"));
        assert_eq!(items, vec![serde_json::json!(1)]);
        let (n, _) = run("[1]", None);
        assert!(n.unwrap_err().contains("expected an object with a \"data\" array"));
        let (n, _) = run(r#"{"data": 5}"#, None);
        assert!(n.unwrap_err().contains("expected an array of records"));
        let (n, items) = run(r#"{"data": [1, {"a": "#, None);
        assert!(n.unwrap_err().contains("EOF"));
        assert_eq!(items.len(), 1, "what came before the cut was handed over");
    }
}
