//! The tables API holds records and filters to the schemas it publishes.
//!
//! The topics' decoder is lenient (producers send what they send); the API's
//! contract is its OpenAPI document. A record the decoder reads is also checked
//! against the table's record schema, and a key filter against its query schema,
//! so that what the document allows is accepted and what it does not is refused
//! with 422 (records) or 400 (filters). The validators are compiled once.
//!
//! A record is checked field by field as read into its column slots (each
//! field against its own part of the schema, with the keywords across fields
//! checked on those fields alone), so that no map of the record is built. Only
//! a record that fails is checked whole, which names what is wrong.

use jsonschema::Validator;
use serde_json::{json, Map, Value as Json};

use super::schema;
use crate::catalogue::{self, value, Column, ColumnType, DateWindow, Table};

/// The compiled record and filter schemas of one API (its date window set).
pub struct Validators {
    window: DateWindow,
    /// Each table's validator and record schema (whose descriptions name the
    /// form a refused field takes).
    records: Vec<(Table, Validator, Json)>,
    /// Each table's check of a record's column slots, in table order; `None`
    /// when its schema holds a keyword the check does not cover.
    slots: Vec<Option<SlotCheck>>,
    filters: Vec<(ColumnType, Validator)>,
}

/// The record schema taken apart: what it says of each field, which fields it
/// requires, and what it says across fields (`allOf`), with the fields that reads.
struct SlotCheck {
    columns: Vec<Validator>,
    required: Vec<usize>,
    across: Option<(Validator, Vec<usize>)>,
}

/// The keywords of a record schema that [`SlotCheck`] covers.
const SLOT_KEYWORDS: [&str; 5] = ["type", "description", "required", "properties", "allOf"];

impl SlotCheck {
    /// Takes `record` (the schema at `#/components/schemas/{table}` of `frame`)
    /// apart, or `None` when it says more than the check covers.
    fn new(table: Table, record: &Json, frame: &Json, build: &impl Fn(&Json) -> Validator) -> Option<SlotCheck> {
        let spec = table.spec();
        let object = record.as_object()?;
        if object.keys().any(|k| !SLOT_KEYWORDS.contains(&k.as_str())) || record["type"] != "object" {
            return None;
        }
        let properties = object.get("properties").and_then(Json::as_object)?;
        if properties.keys().any(|name| spec.column(name).is_none()) {
            return None;
        }
        let index = |name: &Json| name.as_str().and_then(|n| spec.index_of(n));
        // The subschemas are referred to where they stand, in the same frame, so
        // that their own references resolve as in the whole record's validator.
        let in_frame = |pointer: String| {
            let mut schema = frame.clone();
            schema["$ref"] = json!(pointer);
            build(&schema)
        };
        let columns = spec
            .columns
            .iter()
            .map(|c| match properties.contains_key(c.name) {
                true => in_frame(format!("#/components/schemas/{}/properties/{}", table.name(), c.name)),
                false => build(&json!(true)),
            })
            .collect();
        let required = match object.get("required") {
            None => Vec::new(),
            Some(names) => names.as_array()?.iter().map(index).collect::<Option<_>>()?,
        };
        let across = match object.get("allOf") {
            None => None,
            Some(all_of) => {
                let mut read = Vec::new();
                fields_named(all_of, &mut read);
                let mut read: Vec<usize> = read.iter().map(|n| spec.index_of(n)).collect::<Option<_>>()?;
                read.sort_unstable();
                read.dedup();
                let mut schema = frame.clone();
                schema["allOf"] = all_of
                    .as_array()?
                    .iter()
                    .enumerate()
                    .map(|(i, _)| json!({ "$ref": format!("#/components/schemas/{}/allOf/{i}", table.name()) }))
                    .collect();
                Some((build(&schema), read))
            }
        };
        Some(SlotCheck {
            columns,
            required,
            across,
        })
    }

    fn is_valid(&self, table: Table, slots: &[Option<Json>]) -> bool {
        let columns = table.spec().columns;
        let fields_valid = slots
            .iter()
            .zip(&self.columns)
            .all(|(slot, validator)| slot.as_ref().is_none_or(|value| validator.is_valid(value)));
        if !fields_valid || self.required.iter().any(|&i| slots[i].is_none()) {
            return false;
        }
        self.across.as_ref().is_none_or(|(validator, read)| {
            let fields: Map<String, Json> = read
                .iter()
                .filter_map(|&i| Some((columns[i].name.to_owned(), slots[i].clone()?)))
                .collect();
            validator.is_valid(&Json::Object(fields))
        })
    }
}

/// The field names a schema reads: its `required` entries and `properties` keys,
/// at any depth.
fn fields_named(schema: &Json, names: &mut Vec<String>) {
    match schema {
        Json::Array(items) => items.iter().for_each(|item| fields_named(item, names)),
        Json::Object(object) => {
            for (keyword, value) in object {
                match (keyword.as_str(), value) {
                    ("required", Json::Array(required)) => {
                        names.extend(required.iter().filter_map(Json::as_str).map(str::to_owned))
                    }
                    ("properties", Json::Object(properties)) => {
                        names.extend(properties.keys().cloned());
                        properties.values().for_each(|p| fields_named(p, names));
                    }
                    _ => fields_named(value, names),
                }
            }
        }
        _ => {}
    }
}

impl std::fmt::Debug for Validators {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Validators")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Validators {
    pub fn new(window: &DateWindow) -> Validators {
        let build = |schema: &Json| {
            jsonschema::options()
                .with_draft(jsonschema::Draft::Draft202012)
                .build(schema)
                .expect("the published schemas compile")
        };
        let (records, slots) = Table::ALL
            .iter()
            .map(|&table| {
                // The record schema refers to the JSON value schema inside the
                // document; the validator gets the same frame.
                let record = schema::record_schema(table, window);
                let frame = json!({
                    "components": { "schemas": {
                        table.name(): record.clone(),
                        schema::JSON_VALUE: schema::json_value_schema(),
                    } },
                });
                let mut whole = frame.clone();
                whole["$ref"] = json!(format!("#/components/schemas/{}", table.name()));
                let slots = SlotCheck::new(table, &record, &frame, &build);
                ((table, build(&whole), record), slots)
            })
            .unzip();
        let filters = Table::ALL
            .iter()
            .flat_map(|t| {
                t.spec()
                    .key
                    .iter()
                    .map(|k| t.spec().column(k).expect("key columns exist").ty)
            })
            .fold(Vec::new(), |mut types, ty| {
                if !types.contains(&ty) {
                    types.push(ty);
                }
                types
            })
            .into_iter()
            .map(|ty| (ty, build(&schema::query_schema(ty))))
            .collect();
        Validators {
            window: *window,
            records,
            slots,
            filters,
        }
    }

    /// Whether a record read into `table`'s column slots (`None`: absent) is
    /// what the table's record schema allows; false also when only the whole
    /// record's check ([`Validators::check_record`]) can tell.
    pub fn slots_valid(&self, table: Table, slots: &[Option<Json>]) -> bool {
        let at = Table::ALL
            .iter()
            .position(|t| *t == table)
            .expect("every table is listed");
        self.slots[at]
            .as_ref()
            .is_some_and(|check| check.is_valid(table, slots))
    }

    /// Checks a record the decoder has read against the table's record schema;
    /// the error names the field and the form the API takes.
    pub fn check_record(&self, table: Table, record: &Json) -> Result<(), String> {
        let (_, validator, schema) = self
            .records
            .iter()
            .find(|(t, _, _)| *t == table)
            .expect("every table has a validator");
        // The quick answer first; the error, with its place, only when there is one.
        if validator.is_valid(record) {
            return Ok(());
        }
        let Err(error) = validator.validate(record) else {
            return Ok(());
        };
        let spec = table.spec();
        let field = error
            .instance_path()
            .as_str()
            .trim_start_matches('/')
            .split('/')
            .next()
            .filter(|f| !f.is_empty())
            .map(|f| f.replace("~1", "/").replace("~0", "~"));
        if let Some(field) = field {
            let raw = &record[&field];
            let column = spec.column(&field);
            let form = column.map_or_else(String::new, |c| {
                schema["properties"][c.name]["description"]
                    .as_str()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            });
            return Err(format!(
                "field \"{field}\": {} is not in the form the API takes{form}",
                value::describe(raw)
            ));
        }
        // At the record's level only a derivation fails: a derived column left out
        // whose source cannot give it.
        for column in spec.columns {
            let absent = record.get(column.name).is_none_or(Json::is_null);
            if let (true, Some(source)) = (absent, catalogue::derivation_source(table, column.name)) {
                return Err(format!(
                    "field \"{source}\": {} cannot give \"{}\", which is left out: send {} or Unix seconds \
                     of a date the API takes in {source}",
                    value::describe(record.get(source).unwrap_or(&Json::Null)),
                    column.name,
                    column.name,
                ));
            }
        }
        Err(format!("the record does not match the schema of {}", spec.name))
    }

    /// Checks a key filter's text against its query schema.
    pub fn check_filter(&self, column: &Column, raw: &str) -> Result<(), String> {
        let validator = &self
            .filters
            .iter()
            .find(|(ty, _)| *ty == column.ty)
            .expect("every key column type has a validator")
            .1;
        if validator.is_valid(&Json::String(raw.to_owned())) {
            return Ok(());
        }
        Err(format!(
            "filter \"{}\": {} is not in the form the API takes (see /openapi.json)",
            column.name,
            value::describe(&Json::String(raw.to_owned()))
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validators() -> &'static Validators {
        static VALIDATORS: std::sync::OnceLock<Validators> = std::sync::OnceLock::new();
        VALIDATORS.get_or_init(|| Validators::new(&DateWindow::default()))
    }

    fn check_record(table: Table, record: &Json) -> Result<(), String> {
        validators().check_record(table, record)
    }

    fn check_filter(column: &Column, raw: &str) -> Result<(), String> {
        validators().check_filter(column, raw)
    }

    fn field(table: Table, name: &str, value: Json) -> Result<(), String> {
        let mut record = crate::sample::records(table, 1, 1).remove(0);
        record[name] = value;
        check_record(table, &record)
    }

    #[test]
    fn the_sample_records_match_their_schemas() {
        for table in Table::ALL {
            for record in crate::sample::records(table, 20, 3) {
                assert_eq!(check_record(table, &record), Ok(()), "{table}: {record}");
            }
        }
    }

    #[test]
    fn canonical_forms_pass_and_lenient_ones_are_named() {
        // tmp_event_properties' dates: any year; events_part's: the window's years.
        for (t, ok, bad) in [
            (
                Table::TmpEventProperties,
                &["2024-02-29", "0001-01-01", "9999-12-31"][..],
                &["0000-01-01"][..],
            ),
            (
                Table::EventsPart,
                &["2024-02-29", "2000-01-01"][..],
                &["1999-12-31", "9999-12-31"][..],
            ),
        ] {
            for date in ok.iter().map(|d| json!(d)).chain([json!(1_700_000_000)]) {
                assert_eq!(field(t, "event_date", date.clone()), Ok(()), "{t}: {date}");
            }
            for date in bad
                .iter()
                .chain(&["2023-02-29", "2023-1-01", " 2023-01-01", "2023-04-31"])
            {
                let err = field(t, "event_date", json!(date)).unwrap_err();
                assert!(err.starts_with("field \"event_date\""), "{err}");
                assert!(err.contains("YYYY-MM-DD"), "{err}");
            }
        }
        let t = Table::EventsPart;
        for ok in [
            "2024-01-02T03:04:05Z",
            "2024-01-02 03:04:05",
            "2024-01-02T03:04:05.123456789+14:00",
            "1000-01-01T00:00:00-23:59",
        ] {
            assert_eq!(field(t, "event_datetime", json!(ok)), Ok(()), "{ok}");
        }
        for bad in ["2024-01-02T24:00:00Z", "2024-01-02", "9999-12-31T23:00:00-01:00"] {
            assert!(field(t, "event_datetime", json!(bad)).is_err(), "{bad}");
        }
        assert_eq!(field(t, "application_id", json!("42")), Ok(()));
        assert!(field(t, "application_id", json!(" 42")).is_err());
        assert!(field(t, "application_id", json!("1e3")).is_err());
        assert!(field(t, "mcc", json!(2_147_483_648_i64)).is_err());
        assert_eq!(field(t, "application_id", json!(2_147_483_648_i64)), Ok(()));
        assert!(field(t, "event_name", json!("a\u{0}b")).is_err());
        let err = field(Table::UserLocations, "latitude", json!("45.5")).unwrap_err();
        assert!(err.contains("a number from -90 to 90"), "{err}");
    }

    /// The field-by-field check and the whole record's check agree on every
    /// sample record, on each with one field left out, and on each with one
    /// field set to each of many values, lawful and not.
    #[test]
    fn the_slot_check_agrees_with_the_whole_record_check() {
        let probes = [
            json!(null),
            json!(true),
            json!(0),
            json!(-1),
            json!(42),
            json!(1.5),
            json!(2_147_483_648_i64),
            json!(1_700_000_000),
            json!(99_999_999_999_999_i64),
            json!(u64::MAX),
            json!(""),
            json!("42"),
            json!(" 42"),
            json!("1e3"),
            json!("2024-02-29"),
            json!("2023-02-29"),
            json!("1999-12-31"),
            json!("2024-01-02T03:04:05Z"),
            json!("2024-01-02 03:04:05"),
            json!("a\u{0}b"),
            json!("x".repeat(300)),
            json!("00000000-0000-4000-8000-000000000001"),
            json!([1, 2]),
            json!({ "k": "v", "n": [1, { "m": null }] }),
        ];
        let mut compared = 0;
        let mut refused = 0;
        for table in Table::ALL {
            let at = Table::ALL.iter().position(|t| *t == table).unwrap();
            assert!(
                validators().slots[at].is_some(),
                "{table}: the slot check covers its schema"
            );
            for record in crate::sample::records(table, 3, 7) {
                let mut variants = vec![record.clone()];
                for column in table.spec().columns {
                    let mut without = record.clone();
                    without.as_object_mut().unwrap().remove(column.name);
                    variants.push(without);
                    for probe in &probes {
                        let mut with = record.clone();
                        with[column.name] = probe.clone();
                        variants.push(with);
                    }
                }
                for variant in variants {
                    let slots = catalogue::read_record(table, &variant.to_string()).unwrap();
                    let whole = check_record(table, &variant).is_ok();
                    assert_eq!(
                        validators().slots_valid(table, &slots.values),
                        whole,
                        "{table}: {variant}"
                    );
                    compared += 1;
                    refused += usize::from(!whole);
                }
            }
        }
        // Both answers occur often: the comparison is not of trivial cases.
        assert!(
            refused > compared / 4 && refused < compared * 3 / 4,
            "{refused} of {compared}"
        );
    }

    #[test]
    fn a_derived_date_needs_usable_seconds() {
        let mut record = crate::sample::records(Table::EventsPart, 1, 1).remove(0);
        record.as_object_mut().unwrap().remove("event_date");
        assert_eq!(check_record(Table::EventsPart, &record), Ok(()));
        record["event_timestamp"] = json!(99_999_999_999_999_i64);
        let err = check_record(Table::EventsPart, &record).unwrap_err();
        assert!(err.starts_with("field \"event_timestamp\""), "{err}");
        assert!(err.contains("event_date"), "{err}");
    }

    #[test]
    fn filters_take_the_canonical_text() {
        let spec = Table::MobileDevices.spec();
        let device = spec.column("appmetrica_device_id").unwrap();
        assert_eq!(check_filter(device, "18446744073709551615"), Ok(()));
        assert!(check_filter(device, "").is_err());
        assert!(check_filter(device, "-1").is_err());
        let date = Table::EventsPart.spec().column("event_date").unwrap();
        assert_eq!(check_filter(date, "2024-01-31"), Ok(()));
        assert!(check_filter(date, "2024-01-31T00:00:00Z").is_err());
    }
}
