//! The tables API holds records and filters to the schemas it publishes.
//!
//! The topics' decoder is lenient (producers send what they send); the API's
//! contract is its OpenAPI document. A record the decoder reads is also checked
//! against the table's record schema, and a key filter against its query schema,
//! so that what the document allows is accepted and what it does not is refused
//! with 422 (records) or 400 (filters). The validators are compiled once.

use jsonschema::Validator;
use serde_json::{json, Value as Json};

use super::openapi;
use crate::catalogue::{self, value, Column, ColumnType, DateWindow, Table};

/// The compiled record and filter schemas of one API (its date window set).
pub struct Validators {
    window: DateWindow,
    /// Each table's validator and record schema (whose descriptions name the
    /// form a refused field takes).
    records: Vec<(Table, Validator, Json)>,
    filters: Vec<(ColumnType, Validator)>,
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
        let records = Table::ALL
            .iter()
            .map(|&table| {
                // The record schema refers to the JSON value schema inside the
                // document; the validator gets the same frame.
                let record = openapi::record_schema(table, window);
                let schema = json!({
                    "$ref": format!("#/components/schemas/{}", table.name()),
                    "components": { "schemas": {
                        table.name(): record.clone(),
                        openapi::JSON_VALUE: openapi::json_value_schema(),
                    } },
                });
                (table, build(&schema), record)
            })
            .collect();
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
            .map(|ty| (ty, build(&openapi::query_schema(ty))))
            .collect();
        Validators {
            window: *window,
            records,
            filters,
        }
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
