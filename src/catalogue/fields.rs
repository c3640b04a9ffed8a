//! Reads a JSON object's fields straight into its table's column slots.
//!
//! Guarantees: [`read`] accepts exactly the texts `serde_json::from_str` accepts
//! as an object, and fills slot `i` with the value of column `i`'s field (the
//! last one when a field repeats, as a parsed map keeps it). Field names are
//! matched without being copied; fields the table lacks are skipped unread and
//! counted. What a slot holds is the reader's choice ([`Slot`]): the JSON value
//! as parsed, or the column's value read straight from the text.

use std::fmt;
use std::sync::OnceLock;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value as Json;

use super::value::{Read, Reader};
use super::{Column, Table};

/// A record's fields, one slot per column of its table, in catalogue order.
#[derive(Debug)]
pub struct Fields<S = Json> {
    pub values: Vec<Option<S>>,
    /// Fields the table does not have.
    pub unknown: usize,
}

/// What a field's value is read into.
pub trait Slot: Sized {
    /// Reads the value of the field of `column` that `map` is at.
    fn next<'de, A: MapAccess<'de>>(map: &mut A, column: &'static Column) -> Result<Self, A::Error>;
}

/// The value as parsed (what the API checks against its schema).
impl Slot for Json {
    fn next<'de, A: MapAccess<'de>>(map: &mut A, _: &'static Column) -> Result<Json, A::Error> {
        map.next_value()
    }
}

/// The column's value read straight from the text where it can be.
impl Slot for Read<'static> {
    fn next<'de, A: MapAccess<'de>>(map: &mut A, column: &'static Column) -> Result<Read<'static>, A::Error> {
        map.next_value_seed(Reader(column.ty))
    }
}

/// Parses `text`, a JSON object, into `table`'s column slots.
pub fn read<S: Slot>(table: Table, text: &str) -> Result<Fields<S>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let fields = de.deserialize_map(Object {
        table,
        slot: std::marker::PhantomData,
    })?;
    de.end()?;
    Ok(fields)
}

/// Where `name` is among `table`'s column names sorted: its place there and its
/// column's position. The place `guess` and the few after it are tried first,
/// then a binary search: fields read in name order, each guessed after the last
/// one found, are found by an equality test or a few (a record leaves out some
/// columns), and names of another length differ at once.
pub fn locate(table: Table, name: &str, guess: usize) -> Option<(usize, usize)> {
    const AHEAD: usize = 4;
    let names = names(table);
    let near = names
        .iter()
        .enumerate()
        .skip(guess)
        .take(AHEAD)
        .find(|(_, (n, _))| *n == name);
    let sorted = match near {
        Some((sorted, _)) => sorted,
        None => names.binary_search_by(|(n, _)| (*n).cmp(name)).ok()?,
    };
    Some((sorted, names[sorted].1))
}

/// `table`'s column names with their positions, sorted by name.
fn names(table: Table) -> &'static [(&'static str, usize)] {
    static NAMES: OnceLock<Vec<Vec<(&'static str, usize)>>> = OnceLock::new();
    let all = NAMES.get_or_init(|| {
        Table::ALL
            .iter()
            .map(|t| {
                let mut names: Vec<_> = t.spec().columns.iter().enumerate().map(|(i, c)| (c.name, i)).collect();
                names.sort_unstable();
                names
            })
            .collect()
    });
    let index = Table::ALL.iter().position(|t| *t == table).unwrap_or_default();
    &all[index]
}

struct Object<S> {
    table: Table,
    slot: std::marker::PhantomData<S>,
}

impl<'de, S: Slot> Visitor<'de> for Object<S> {
    type Value = Fields<S>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<S>, A::Error> {
        let columns = self.table.spec().columns;
        let mut values: Vec<Option<S>> = std::iter::repeat_with(|| None).take(columns.len()).collect();
        let mut unknown = 0;
        // Producers that write fields in name order (serde_json's default) are
        // matched with one comparison each: the name after the last one found.
        let mut guess = 0;
        while let Some(found) = map.next_key_seed(Name {
            table: self.table,
            guess,
        })? {
            match found {
                Some((sorted, column)) => {
                    guess = sorted + 1;
                    values[column] = Some(S::next(&mut map, &columns[column])?);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                    unknown += 1;
                }
            }
        }
        Ok(Fields { values, unknown })
    }
}

/// A field name, resolved by [`locate`] (`None`: not a column).
struct Name {
    table: Table,
    guess: usize,
}

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Option<(usize, usize)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Option<(usize, usize)>, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
    type Value = Option<(usize, usize)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Option<(usize, usize)>, E> {
        Ok(locate(self.table, name, self.guess))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_column_is_found_at_its_position_and_nothing_else_is() {
        for table in Table::ALL {
            for (i, column) in table.spec().columns.iter().enumerate() {
                // Found with no guess, a wrong guess, and the right one alike.
                let (sorted, found) = locate(table, column.name, usize::MAX).expect("a column");
                assert_eq!(found, i, "{table}.{}", column.name);
                for guess in [
                    0,
                    sorted.saturating_sub(2),
                    sorted.saturating_sub(5),
                    sorted + 1,
                    sorted,
                ] {
                    assert_eq!(
                        locate(table, column.name, guess),
                        Some((sorted, i)),
                        "{table}.{}",
                        column.name
                    );
                }
            }
            for name in ["", "id", "zzz", "Event_name", "event_name "] {
                assert_eq!(locate(table, name, 0), None, "{table}: {name:?}");
            }
        }
    }

    #[test]
    fn slots_follow_the_columns_and_a_repeated_field_keeps_its_last_value() {
        let table = Table::UserLocations;
        let columns = table.spec().columns;
        let text = format!(
            r#"{{"{a}": 1, "nope": {{"deep": [1, 2]}}, "{b}": "x\"y", "{a}": 2, "also\u0020nope": null}}"#,
            a = columns[0].name,
            b = columns[1].name
        );
        let fields = read::<Json>(table, &text).expect("an object");
        assert_eq!(fields.values.len(), columns.len());
        assert_eq!(fields.values[0], Some(Json::from(2)));
        assert_eq!(fields.values[1], Some(Json::from("x\"y")));
        assert!(fields.values[2..].iter().all(Option::is_none));
        assert_eq!(fields.unknown, 2);
    }

    #[test]
    fn fields_in_any_order_fill_the_same_slots() {
        let table = Table::EventsPart;
        let columns = table.spec().columns;
        let object = |names: Vec<&str>| {
            let fields: Vec<String> = names.iter().map(|n| format!("\"{n}\": \"{n}\"")).collect();
            format!("{{{}}}", fields.join(", "))
        };
        let mut sorted: Vec<&str> = columns.iter().map(|c| c.name).collect();
        sorted.sort_unstable();
        let mut reversed = sorted.clone();
        reversed.reverse();
        let catalogue: Vec<&str> = columns.iter().map(|c| c.name).collect();
        for names in [sorted, reversed, catalogue] {
            let fields = read::<Json>(table, &object(names)).expect("an object");
            for (column, value) in columns.iter().zip(&fields.values) {
                assert_eq!(value.as_ref(), Some(&Json::from(column.name)));
            }
            assert_eq!(fields.unknown, 0);
        }
    }

    #[test]
    fn an_escaped_field_name_matches_its_column() {
        let table = Table::UserLocations;
        let name = table.spec().columns[0].name;
        let escaped: String = name.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
        let fields = read::<Json>(table, &format!(r#"{{"{escaped}": 7}}"#)).expect("an object");
        assert_eq!(fields.values[0], Some(Json::from(7)));
    }

    #[test]
    fn texts_the_json_parser_refuses_are_refused_with_its_words() {
        for text in [
            "{",
            r#"{"a": 1} x"#,
            r#"{"a" 1}"#,
            r#"{"a": tru}"#,
            "[1]",
            "{\"a\": 1,}",
        ] {
            let ours = read::<Json>(Table::UserLocations, text).expect_err(text).to_string();
            let theirs = serde_json::from_str::<serde_json::Map<String, Json>>(text)
                .expect_err(text)
                .to_string();
            assert!(ours.contains(" at line "), "{text}: {ours}");
            assert_eq!(ours.split(" at ").nth(1), theirs.split(" at ").nth(1), "{text}");
        }
    }
}
