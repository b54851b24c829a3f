#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
//! The house has no circles: no import cycle between `src/`'s top-level modules.
//!
//! A top-level module is `src/x.rs` or the folder `src/x/`. A file of module `x` depends on
//! module `y` when its code (comments, strings and test code left out) names `y` in any of
//! these forms:
//!
//! - `crate::y` (a path or a `use`), and inside `use crate::{…}` groups, `y` or `y::…`;
//! - `super::…` climbing out of `x` (from `src/x.rs` or `src/x/mod.rs`, `super::y` is the crate
//!   root's `y`; from `src/x/a.rs`, `super::super::y`);
//! - a name that `src/lib.rs` re-exports from `y` (`pub use y::Name;`), used as `crate::Name`.
//!
//! `module_graph_has_no_cycle` checks the real tree; the other tests plant a cycle in each form
//! in a copy and show the check finds it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// An edge from one top-level module to another, with where it was seen.
type Edges = BTreeMap<(String, String), String>;

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file under `src` (`src/a/b.rs` → [a, b]; `src/a/mod.rs` → [a]).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs").to_string();
    if stem != "mod" {
        parts.push(stem);
    }
    parts
}

/// The code without comments, string and char literals, and test modules.
fn code_only(text: &str) -> String {
    // Test code: a `#[cfg(test)]` item to the end of its braces.
    let mut s = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if text[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if text[i..].starts_with("/*") {
            i = text[i..].find("*/").map_or(b.len(), |j| i + j + 2);
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            s.push_str("\"\"");
        } else if text[i..].starts_with("r#\"") {
            i = text[i + 3..].find("\"#").map_or(b.len(), |j| i + 3 + j + 2);
            s.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal ('x' or '\n'); a lifetime has no closing quote.
            let end = text[i + 1..].find('\'').map_or(i + 1, |j| i + 1 + j + 1);
            i = end;
        } else {
            let c = text[i..].chars().next().unwrap();
            s.push(c);
            i += c.len_utf8();
        }
    }
    strip_test_items(&s)
}

fn strip_test_items(s: &str) -> String {
    let mut out = s.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at..];
        // The item runs to its `;` (a `mod tests;`) or to the end of its braces.
        let semi = rest.find(';');
        let brace = rest.find('{');
        let end = match (semi, brace) {
            (Some(sc), Some(br)) if sc < br => at + sc + 1,
            (_, Some(br)) => {
                let mut depth = 0;
                let mut end = out.len();
                for (k, ch) in rest[br..].char_indices() {
                    match ch {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = at + br + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (Some(sc), None) => at + sc + 1,
            (None, None) => out.len(),
        };
        out.replace_range(at..end, "");
    }
    out
}

fn ident_at(s: &str) -> String {
    s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()
}

/// The names in a `{…}` group starting at `s` (just after `{`): the first segment of each entry.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut start = true;
    for (k, ch) in s.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => start = true,
            c if start && depth == 0 && !c.is_whitespace() => {
                heads.push(ident_at(&s[k..]));
                start = false;
            }
            _ => {}
        }
    }
    heads
}

/// `pub use m::…` in lib.rs: re-exported name → its module.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in code_only(lib).split(';') {
        let stmt = stmt.trim();
        let Some(rest) = stmt.strip_prefix("pub use ") else { continue };
        let rest = rest.trim_start_matches("crate::").trim_start_matches("self::");
        let module = ident_at(rest);
        let after = &rest[module.len()..];
        if let Some(g) = after.find('{') {
            for name in group_heads(&after[g + 1..]) {
                out.insert(name, module.clone());
            }
        } else {
            let name = after.rsplit("::").next().unwrap_or("").trim();
            let name = name.rsplit(" as ").next().unwrap_or(name).trim().to_string();
            if !name.is_empty() {
                out.insert(name, module.clone());
            }
        }
    }
    out
}

/// Every edge between top-level modules of the tree at `src`.
fn edges(src: &Path) -> Edges {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap_or_default();
    let re = reexports(&lib);
    let tops: BTreeSet<String> = files.iter().filter_map(|f| module_path(src, f).first().cloned()).collect();
    let mut out = Edges::new();
    for f in &files {
        let path = module_path(src, f);
        let Some(me) = path.first().cloned() else { continue }; // lib.rs, main.rs: the root
        if f.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        let mut add = |target: &str, how: &str, at: usize| {
            let target = re.get(target).map_or(target, String::as_str);
            if target != me && tops.contains(target) {
                let line = code[..at].matches('\n').count() + 1;
                let where_ = format!("{}:{line} ({how})", f.strip_prefix(src).unwrap().display());
                out.entry((me.clone(), target.to_string())).or_insert(where_);
            }
        };
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + 7..];
            if let Some(g) = rest.strip_prefix('{') {
                for h in group_heads(g) {
                    add(&h, "use crate::{…}", at);
                }
            } else {
                add(&ident_at(rest), "crate::", at);
            }
        }
        for (at, _) in code.match_indices("super::") {
            // Skip the inner `super::` of a `super::super::` chain: count from the chain's start.
            if code[..at].ends_with("super::") {
                continue;
            }
            let mut rest = &code[at..];
            let mut ups = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                ups += 1;
                rest = r;
            }
            // The module `super` names: this file's path less one segment per `super`.
            if ups >= path.len() {
                // Climbed to the crate root: the next segment is a top-level module (or a group).
                if let Some(g) = rest.strip_prefix('{') {
                    for h in group_heads(g) {
                        add(&h, "super::{…}", at);
                    }
                } else {
                    add(&ident_at(rest), "super::", at);
                }
            }
        }
    }
    out
}

/// The cycles: each strongly connected set of more than one module, with one edge of each.
fn cycles(e: &Edges) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = e.keys().flat_map(|(a, b)| [a, b]).collect();
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for ((a, b), _) in e.range((n.clone(), String::new())..) {
                if *a != n {
                    break;
                }
                if seen.insert(b.clone()) {
                    stack.push(b.clone());
                }
            }
        }
        seen
    };
    let r: BTreeMap<&String, BTreeSet<String>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &nodes {
        if done.contains(*n) || !r[n].contains(*n) {
            continue;
        }
        let scc: Vec<String> =
            nodes.iter().filter(|m| r[n].contains(**m) && r[*m].contains(*n)).map(|m| (*m).clone()).collect();
        let mut desc = Vec::new();
        for ((a, b), w) in e {
            if scc.contains(a) && scc.contains(b) {
                desc.push(format!("{a} → {b} at {w}"));
            }
        }
        done.extend(scc);
        out.push(desc);
    }
    out
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn module_graph_has_no_cycle() {
    let e = edges(&src_dir());
    assert!(e.len() > 40, "the graph was read ({} edges)", e.len());
    assert!(e.contains_key(&("daemon".into(), "store".into())), "a known edge is seen");
    let found = cycles(&e);
    assert!(
        found.is_empty(),
        "import cycles between top-level modules:\n{}",
        found.iter().map(|c| c.join("\n  ")).collect::<Vec<_>>().join("\n\n")
    );
}

/// A copy of the real tree with `line` added to the end of `file`.
fn planted(file: &str, line: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    for f in files {
        let rel = f.strip_prefix(src_dir()).unwrap();
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        let mut text = std::fs::read_to_string(&f).unwrap();
        if rel == Path::new(file) {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(to, text).unwrap();
    }
    dir
}

fn assert_cycle(dir: &Path, a: &str, b: &str) {
    let found = cycles(&edges(dir));
    assert!(
        found.iter().any(|c| c.iter().any(|l| l.starts_with(&format!("{a} → {b}")))),
        "a cycle through {a} → {b} is found: {found:?}"
    );
}

#[test]
fn a_cycle_planted_as_a_crate_path_is_found() {
    let d = planted("store/mod.rs", "fn planted() { let _ = crate::daemon::status::gather; }");
    assert_cycle(d.path(), "store", "daemon");
}

#[test]
fn a_cycle_planted_in_a_use_group_is_found() {
    let d = planted("config/mod.rs", "use crate::{clock, face::engine::Engine};");
    assert_cycle(d.path(), "config", "face");
}

#[test]
fn a_cycle_planted_through_super_is_found() {
    // From src/store/roster.rs, `super::super::privacy` is the crate root's `privacy`.
    let d = planted("store/roster.rs", "use super::super::privacy::keys::KeyId;");
    assert_cycle(d.path(), "store", "privacy");
    // From src/policy.rs (a top-level file), one `super` is the root.
    let d = planted("policy.rs", "use super::daemon::Topology;");
    assert_cycle(d.path(), "policy", "daemon");
}

#[test]
fn a_cycle_planted_through_a_lib_reexport_is_found() {
    let d = planted("lib.rs", "pub use daemon::Topology;");
    let text = std::fs::read_to_string(d.path().join("bus.rs")).unwrap();
    std::fs::write(d.path().join("bus.rs"), format!("{text}\nfn planted(_: crate::Topology) {{}}\n")).unwrap();
    assert_cycle(d.path(), "bus", "daemon");
}

#[test]
fn comments_strings_and_test_code_make_no_edge() {
    let d = planted(
        "bus.rs",
        "// crate::daemon in a comment\nconst S: &str = \"crate::daemon\";\n#[cfg(test)]\nmod t { use crate::daemon; }",
    );
    assert!(cycles(&edges(d.path())).is_empty());
}
