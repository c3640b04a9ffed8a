//! `dwh-helper produce --table T [FILE|-]`: JSON lines onto a table's topic.
//!
//! Every line is validated with the catalogue first; with any invalid line nothing
//! is published unless `--skip-invalid`. Records are keyed by their natural key and
//! published with the idempotent producer; the count printed is of acknowledged
//! records.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal as _, Seek as _, Write as _};
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;

use crate::catalogue::{self, Table};
use crate::config::Config;
use crate::kafka::{self, Publisher};

/// Invalid lines listed before the rest are only counted.
const SHOWN_ERRORS: usize = 20;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// The table whose topic receives the records
    #[arg(long)]
    table: Table,
    /// JSON lines file; `-` or nothing reads standard input
    file: Option<PathBuf>,
    /// Publish the valid lines even when some are invalid
    #[arg(long)]
    skip_invalid: bool,
}

pub async fn produce(config: Config, args: ProduceArgs) -> anyhow::Result<()> {
    let mut input = open(args.file.as_ref())?;
    let table = args.table;
    let (valid, invalid) = validate(table, &mut input)?;
    if invalid > 0 && !args.skip_invalid {
        bail!("nothing published: {invalid} invalid line(s) (--skip-invalid publishes the {valid} valid ones)");
    }
    if valid == 0 {
        println!("published 0 records (no valid lines)");
        return Ok(());
    }
    input.rewind().context("cannot reread the input")?;
    let topic = kafka::topic_name(&config.kafka.topic_prefix, table);
    let publisher = Publisher::new(&config.kafka)?;
    let progress = indicatif::ProgressBar::with_draw_target(Some(valid), indicatif::ProgressDrawTarget::stderr());
    if !std::io::stderr().is_terminal() || valid < 10_000 {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut batch = publisher.batch();
    let spec = table.spec();
    for line in lines(&mut input) {
        let (_, line) = line?;
        let Ok(decoded) = catalogue::decode_bytes(table, &line) else {
            continue;
        };
        let key = catalogue::natural_key(spec, &decoded.row);
        batch.send(&topic, key.as_bytes(), &line).await?;
        progress.set_position(batch.collect_ready().await?);
    }
    let published = batch.finish().await?;
    progress.finish_and_clear();
    println!("published {published} records to {topic}");
    Ok(())
}

/// The input as a seekable file: standard input is spooled to a temporary file so
/// it can be validated whole before anything is published.
fn open(file: Option<&PathBuf>) -> anyhow::Result<File> {
    match file.filter(|p| p.as_os_str() != "-") {
        Some(path) => File::open(path).with_context(|| format!("cannot open {}", path.display())),
        None => {
            let mut spool = tempfile::tempfile().context("cannot create a temporary file for standard input")?;
            std::io::copy(&mut std::io::stdin().lock(), &mut spool).context("cannot read standard input")?;
            spool.rewind().context("cannot reread standard input")?;
            Ok(spool)
        }
    }
}

/// Counts valid and invalid lines, reporting invalid ones with their line number.
fn validate(table: Table, input: &mut File) -> anyhow::Result<(u64, u64)> {
    let (mut valid, mut invalid) = (0u64, 0u64);
    let mut stderr = std::io::stderr().lock();
    for line in lines(input) {
        let (number, line) = line?;
        match catalogue::decode_bytes(table, &line) {
            Ok(_) => valid += 1,
            Err(e) => {
                invalid += 1;
                if invalid as usize <= SHOWN_ERRORS {
                    let _ = writeln!(stderr, "line {number}: {e}");
                }
            }
        }
    }
    if invalid as usize > SHOWN_ERRORS {
        let _ = writeln!(
            stderr,
            "... and {} more invalid line(s)",
            invalid as usize - SHOWN_ERRORS
        );
    }
    Ok((valid, invalid))
}

/// The non-blank lines of `input` as bytes (invalid UTF-8 is the catalogue's to
/// report), with their 1-based line numbers.
fn lines(input: &mut File) -> impl Iterator<Item = anyhow::Result<(usize, Vec<u8>)>> + '_ {
    let mut reader = BufReader::new(input);
    let mut number = 0;
    std::iter::from_fn(move || loop {
        let mut line = Vec::new();
        number += 1;
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return None,
            Ok(_) => {
                while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(Ok((number, line)));
            }
            Err(e) => {
                return Some(Err(
                    anyhow::Error::new(e).context(format!("line {number}: cannot be read"))
                ))
            }
        }
    })
}
