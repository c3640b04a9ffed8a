//! The module graph of `src/`: dependencies run one way.
//!
//! Two rules, checked on the source itself (every `use` and every `crate::`,
//! `super::` and `self::` path, re-exports followed to the module that defines
//! the item):
//! - **Floors.** Every top-level module has a floor, and a module uses only
//!   modules on its own floor or below: cli → http → status → the roles
//!   (ingest, archive, appmetrica, replay) → the adapters (store, kafka, s3) →
//!   the ground (telemetry, config, catalogue and the small helpers).
//! - **No cycle.** Among the children of any module (the top level included), no
//!   two use each other, directly or through others. A child using what its
//!   parent's own file defines is not a cycle: the parent is the room they share.
//!
//! Test modules (`#[cfg(test)] mod … { … }`) are left out, as `cargo modules`
//! leaves them out by default: a test may build its fixtures with anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The floors, lowest first. A new top-level module must be placed here.
const FLOORS: &[&[&str]] = &[
    &["alloc", "backoff", "catalogue", "config", "sample", "telemetry"],
    &["kafka", "s3", "store"],
    &["appmetrica", "archive", "ingest", "replay"],
    &["status"],
    &["http"],
    &["cli"],
];

type ModPath = Vec<String>;

/// The crate's modules, each with its source, and what its file re-exports.
struct Crate {
    sources: BTreeMap<ModPath, String>,
    modules: BTreeSet<ModPath>,
    /// `(module, name)` → the module that `pub use` in `module` takes `name` from.
    reexports: BTreeMap<(ModPath, String), ModPath>,
}

/// A module's path from its file's path under `src/` (`http/mod.rs` → `http`).
fn module_of(file: &str) -> ModPath {
    let file = file.strip_suffix(".rs").expect("a .rs file");
    let mut parts: ModPath = file.split('/').map(str::to_owned).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The source with comments, string and character literals blanked out (their
/// length kept), so that only code is searched for paths.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(if chars[i] == '\n' { '\n' } else { ' ' });
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !ident_char(out.chars().last()) {
            // A raw string: r"…", r#"…"#, …
            let mut hashes = 0;
            let mut j = i + 1;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (1..=hashes).all(|k| chars.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.extend(std::iter::repeat_n(' ', j - i));
            i = j;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                out.push(if chars.get(i) == Some(&'\n') { '\n' } else { ' ' });
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}'), or a lifetime ('a).
            if next == Some('\\') {
                let mut j = i + 2;
                while j < chars.len() && chars[j] != '\'' {
                    j += 1;
                }
                out.extend(std::iter::repeat_n(' ', j + 1 - i));
                i = j + 1;
            } else if chars.get(i + 2) == Some(&'\'') {
                out.push_str("   ");
                i += 3;
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn ident_char(c: Option<char>) -> bool {
    c.is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// Expands a `use` tree (`a::{b, c::{d, e as f}, self}`) into its paths.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    // `x as y` keeps `x`: mark the rename, then drop the whitespace.
    let words: Vec<&str> = tree.split_whitespace().collect();
    let tree: String = words
        .iter()
        .map(|w| if *w == "as" { "@" } else { w })
        .collect::<Vec<_>>()
        .concat();
    let mut out = Vec::new();
    expand_into(&tree, &mut Vec::new(), &mut out);
    out
}

fn expand_into(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').expect("a closing brace")];
        let added: Vec<String> = head.split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
        let n = added.len();
        prefix.extend(added);
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_into(&inner[start..i], prefix, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand_into(&inner[start..], prefix, out);
        prefix.truncate(prefix.len() - n);
    } else if !tree.is_empty() {
        let path = tree.split('@').next().unwrap_or(tree);
        let mut full = prefix.clone();
        full.extend(
            path.split("::")
                .filter(|s| !s.is_empty() && *s != "self")
                .map(str::to_owned),
        );
        out.push(full);
    }
}

/// Every `use` tree of a source, with the position it starts at.
fn use_trees(code: &str) -> Vec<(usize, String, bool)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find("use ") {
        let start = i + at;
        i = start + 4;
        if start > 0 && ident_char(code[..start].chars().last()) {
            continue;
        }
        let before = code[..start].trim_end();
        let public = ["pub", "pub(crate)", "pub(super)"].iter().any(|p| before.ends_with(p));
        let Some(end) = code[i..].find(';') else { break };
        let tree = &code[i..i + end];
        if bytes
            .get(i)
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b':' || *b == b'{')
        {
            out.push((start, tree.to_owned(), public));
        }
        i += end;
    }
    out
}

/// The inline modules of a source (`mod tests { … }`): the span each covers,
/// and whether it is compiled for tests only.
fn inline_modules(code: &str) -> Vec<(usize, usize, String, bool)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while let Some(at) = code[i..].find("mod ") {
        let start = i + at;
        i = start + 4;
        if start > 0 && ident_char(code[..start].chars().last()) {
            continue;
        }
        let rest = &code[i..];
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let after = rest[name.len()..].trim_start();
        if name.is_empty() || !after.starts_with('{') {
            continue;
        }
        let open = i + name.len() + (rest.len() - name.len() - after.len());
        let mut depth = 0;
        let mut end = code.len();
        for (j, b) in bytes.iter().enumerate().skip(open) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = j;
                        break;
                    }
                }
                _ => {}
            }
        }
        let test_only = code[..start].trim_end().ends_with("#[cfg(test)]");
        out.push((open, end, name, test_only));
    }
    out
}

impl Crate {
    fn from_sources(files: BTreeMap<String, String>) -> Crate {
        let mut sources = BTreeMap::new();
        let mut modules = BTreeSet::new();
        for (file, source) in files {
            let module = module_of(&file);
            let code = code_only(&source);
            for (_, _, name, _) in inline_modules(&code) {
                let mut inner = module.clone();
                inner.push(name);
                modules.insert(inner);
            }
            modules.insert(module.clone());
            sources.insert(module, code);
        }
        let mut krate = Crate {
            sources,
            modules,
            reexports: BTreeMap::new(),
        };
        // Re-exports, followed until none is left unresolved (one may name another).
        for _ in 0..4 {
            let mut found = BTreeMap::new();
            for (module, code) in &krate.sources {
                for (_, tree, public) in use_trees(code) {
                    if !public {
                        continue;
                    }
                    for path in expand_use(&tree) {
                        let Some(name) = path.last().filter(|n| *n != "*") else {
                            continue;
                        };
                        if let Some(target) = krate.resolve(module, &path) {
                            if &target != module {
                                found.insert((module.clone(), name.clone()), target);
                            }
                        }
                    }
                }
            }
            krate.reexports = found;
        }
        krate
    }

    fn from_dir(src: &Path) -> Crate {
        let mut files = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read src") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let rel = path
                        .strip_prefix(src)
                        .expect("under src")
                        .to_string_lossy()
                        .replace('\\', "/");
                    files.insert(rel, std::fs::read_to_string(&path).expect("read"));
                }
            }
        }
        Crate::from_sources(files)
    }

    /// The module a path from `from` names: the longest module prefix, or the
    /// module a re-exported name comes from. `None` for outside crates.
    fn resolve(&self, from: &[String], path: &[String]) -> Option<ModPath> {
        let (mut base, rest): (ModPath, &[String]) = match path.first().map(String::as_str) {
            Some("crate") => (Vec::new(), &path[1..]),
            Some("super" | "self") => {
                let mut base = from.to_vec();
                let mut k = 0;
                while let Some(seg) = path.get(k) {
                    match seg.as_str() {
                        "super" => {
                            base.pop();
                        }
                        "self" => {}
                        _ => break,
                    }
                    k += 1;
                }
                (base, &path[k..])
            }
            // A path from a child module declared in this file (`use tables::X`).
            Some(first) if self.modules.contains(&[from, &[first.to_owned()]].concat()) => (from.to_vec(), path),
            _ => return None,
        };
        for seg in rest {
            let mut next = base.clone();
            next.push(seg.clone());
            if self.modules.contains(&next) {
                base = next;
            } else if let Some(target) = self.reexports.get(&(base.clone(), seg.clone())) {
                return Some(target.clone());
            } else {
                break;
            }
        }
        Some(base)
    }

    /// Every module a module uses, from each of its (file's) inline modules.
    fn edges(&self) -> BTreeSet<(ModPath, ModPath)> {
        let mut edges = BTreeSet::new();
        for (module, code) in &self.sources {
            let inline = inline_modules(code);
            let in_test = |at: usize| {
                inline
                    .iter()
                    .any(|(open, end, _, test)| *test && (*open..*end).contains(&at))
            };
            let scope = |at: usize| {
                let mut m = module.clone();
                for (open, end, name, _) in &inline {
                    if (*open..*end).contains(&at) {
                        m.push(name.clone());
                    }
                }
                m
            };
            for (at, tree, _) in use_trees(code) {
                if in_test(at) {
                    continue;
                }
                let from = scope(at);
                for path in expand_use(&tree) {
                    if let Some(to) = self.resolve(&from, &path) {
                        edges.insert((from.clone(), to));
                    }
                }
            }
            let bytes = code.as_bytes();
            for keyword in ["crate::", "super::", "self::"] {
                let mut i = 0;
                while let Some(at) = code[i..].find(keyword) {
                    let start = i + at;
                    i = start + keyword.len();
                    if start > 0 && (ident_char(code[..start].chars().last()) || bytes[start - 1] == b':') {
                        continue;
                    }
                    let tail: String = code[start..]
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                        .collect();
                    if in_test(start) {
                        continue;
                    }
                    let path: Vec<String> = tail.split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
                    let from = scope(start);
                    if let Some(to) = self.resolve(&from, &path) {
                        edges.insert((from, to));
                    }
                }
            }
        }
        edges
    }

    /// The sibling graphs: for each parent, which child uses which (a module's
    /// use counts for every ancestor up to the siblings it lies under).
    fn sibling_graphs(&self) -> BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> {
        let mut graphs: BTreeMap<ModPath, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for (from, to) in self.edges() {
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue; // into its own subtree, or up to an ancestor's own file
            }
            graphs
                .entry(from[..common].to_vec())
                .or_default()
                .entry(from[common].clone())
                .or_default()
                .insert(to[common].clone());
        }
        graphs
    }
}

/// The cycles of a graph: each strongly connected set of two or more nodes,
/// sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = graph.keys().chain(graph.values().flatten()).collect();
    let reach = |start: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![start.clone()];
        while let Some(n) = stack.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    stack.push(m.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for n in &nodes {
        let mut comp: Vec<String> = nodes
            .iter()
            .filter(|m| reachable[*n].contains(**m) && reachable[**m].contains(*n))
            .map(|m| (*m).clone())
            .collect();
        comp.sort();
        if comp.len() > 1 && !out.contains(&comp) {
            out.push(comp);
        }
    }
    out
}

/// What breaks the two rules, one line each.
fn violations(krate: &Crate) -> Vec<String> {
    let mut out = Vec::new();
    let floor = |m: &str| FLOORS.iter().position(|f| f.contains(&m));
    for module in &krate.modules {
        if module.len() == 1 && floor(&module[0]).is_none() {
            out.push(format!("top-level module `{}` has no floor in FLOORS", module[0]));
        }
    }
    for (parent, graph) in krate.sibling_graphs() {
        let name = if parent.is_empty() {
            "crate".to_owned()
        } else {
            parent.join("::")
        };
        for cycle in cycles(&graph) {
            out.push(format!("a cycle among the children of {name}: {}", cycle.join(", ")));
        }
        if parent.is_empty() {
            for (from, tos) in &graph {
                for to in tos {
                    if let (Some(a), Some(b)) = (floor(from), floor(to)) {
                        if b > a {
                            out.push(format!("`{from}` (floor {a}) uses `{to}` (floor {b}), above it"));
                        }
                    }
                }
            }
        }
    }
    out
}

fn sources(files: &[(&str, &str)]) -> Crate {
    Crate::from_sources(files.iter().map(|(f, s)| ((*f).to_owned(), (*s).to_owned())).collect())
}

#[test]
fn the_crate_has_no_module_cycle_and_no_use_from_below() {
    let krate = Crate::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    // The graph is read at all: the CLI reaches the ingest, the ingest the store.
    let edges = krate.edges();
    let uses = |a: &str, b: &str| {
        edges
            .iter()
            .any(|(f, t)| f.first().is_some_and(|x| x == a) && t.first().is_some_and(|x| x == b))
    };
    assert!(uses("cli", "ingest") && uses("ingest", "store") && uses("status", "archive"));
    assert!(krate.modules.len() > 80, "{} modules", krate.modules.len());
    let broken = violations(&krate);
    assert!(
        broken.is_empty(),
        "the module graph breaks its rules:\n{}",
        broken.join("\n")
    );
}

#[test]
fn a_cycle_between_siblings_is_found_through_a_reexport() {
    let krate = sources(&[
        ("lib.rs", "pub mod telemetry; pub mod ingest; pub mod catalogue;"),
        ("catalogue.rs", "pub struct Table;"),
        ("ingest/mod.rs", "mod status;\npub use status::IngestStatus;\nuse crate::telemetry::emit;"),
        ("ingest/status.rs", "pub struct IngestStatus;"),
        (
            "telemetry.rs",
            "// crate::ingest in a comment is no use\nconst S: &str = \"crate::ingest\";\npub fn emit(s: &crate::ingest::IngestStatus, t: crate::catalogue::Table) {}",
        ),
    ]);
    let edges = krate.edges();
    let p = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    assert!(edges.contains(&(p("telemetry"), p("ingest::status"))), "{edges:?}");
    assert!(edges.contains(&(p("ingest"), p("telemetry"))));
    assert_eq!(
        violations(&krate),
        vec![
            "a cycle among the children of crate: ingest, telemetry",
            "`telemetry` (floor 0) uses `ingest` (floor 2), above it"
        ]
    );
}

#[test]
fn a_cycle_deep_in_a_folder_and_an_unplaced_module_are_named() {
    let krate = sources(&[
        ("lib.rs", "pub mod http; pub mod extra;"),
        ("extra.rs", ""),
        ("http/mod.rs", "mod auth; mod error; mod openapi;\nuse auth::require;"),
        ("http/auth.rs", "use super::openapi::{self, DOCS};\npub fn require() {}"),
        (
            "http/openapi.rs",
            "pub const DOCS: &str = \"/docs\";\nfn f() { super::error::not_found(); }",
        ),
        (
            "http/error.rs",
            "pub fn not_found() { super::auth::require() }\n#[cfg(test)]\nmod tests {\n    use super::*;\n}",
        ),
    ]);
    assert_eq!(
        violations(&krate),
        vec![
            "top-level module `extra` has no floor in FLOORS",
            "a cycle among the children of http: auth, error, openapi",
        ]
    );
    // Children using their parent's file, a parent using its children, and a
    // test module using a sibling that uses its module, are no cycle.
    let fine = sources(&[
        ("lib.rs", "pub mod store;"),
        (
            "store/sql.rs",
            "use super::Dwh;\nuse super::rows::Row;\npub fn quote() {}\nmod tests { use super::super::Dwh; }",
        ),
        (
            "store/rows.rs",
            "pub struct Row;\n#[cfg(test)]\nmod tests { use crate::store::sql::quote; }",
        ),
        (
            "store/mod.rs",
            "mod sql; mod rows;\npub struct Dwh;\nfn f() { sql::quote(); }",
        ),
    ]);
    assert_eq!(violations(&fine), Vec::<String>::new());
}
