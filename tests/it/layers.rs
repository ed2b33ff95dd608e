//! The crate's layers, read from its source: each top-level module imports only modules below
//! it in one order (ARCHITECTURE.md, "Layers"), and no two files of one module import each
//! other, however indirectly. A new import that runs up or sideways fails here, with the file
//! and the module it reached for.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first; modules on one line are side by side and import none of each other.
const ORDER: &[&[&str]] = &[
    &["record"],
    &["error"],
    &["crypto", "store", "wire"],
    &["proof"],
    &["rights"],
    &["capsule"],
    &["member"],
    &["replica"],
    &["sync"],
    &["net", "fs"],
    &["fuse"],
    &["cli"],
];

/// What `lib.rs` re-exports at the crate root, by the module that defines it.
const ROOT_ITEMS: &[(&str, &str)] =
    &[("Error", "error"), ("Fork", "error"), ("Result", "error"), ("StoreError", "error"), ("VerifyError", "error")];

fn rank(module: &str) -> Option<usize> {
    ORDER.iter().position(|layer| layer.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments, so prose that names a module imports nothing.
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every path that `code` reaches through `prefix` (`crate::` or `super::`), as its
/// segments: `crate::a::b::C` gives `[a, b, C]`, and `crate::{a::X, b}` gives `[a, X]` and `[b]`.
fn paths(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(prefix) {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        found.extend(tree(rest));
    }
    found
}

/// The paths of one use-tree at the start of `s`.
fn tree(s: &str) -> Vec<Vec<String>> {
    let s = s.trim_start();
    if let Some(inner) = s.strip_prefix('{') {
        let mut depth = 1;
        let end = inner
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '{' => 1,
                    '}' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map_or(inner.len(), |(i, _)| i);
        let mut out = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner[..end].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.extend(tree(&inner[start..i]));
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.extend(tree(&inner[start..end]));
        return out;
    }
    let name: String = s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    if name.is_empty() || name == "self" {
        return Vec::new();
    }
    match s[name.len()..].strip_prefix("::") {
        Some(more) => {
            let below = tree(more);
            if below.is_empty() {
                return vec![vec![name]];
            }
            below.into_iter().map(|p| [vec![name.clone()], p].concat()).collect()
        }
        None => vec![vec![name]],
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `[a, b]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

struct Source {
    module: Vec<String>,
    code: String,
}

fn read_src() -> Vec<Source> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    files
        .iter()
        .map(|f| Source { module: module_of(&src, f), code: code(&std::fs::read_to_string(f).unwrap()) })
        .filter(|s| !matches!(s.module.as_slice(), [m] if m == "lib" || m == "main"))
        .collect()
}

/// The top-level module a `crate::` path names.
fn top_of(path: &[String]) -> String {
    let first = path[0].as_str();
    ROOT_ITEMS.iter().find(|(item, _)| *item == first).map_or(first, |(_, module)| module).to_string()
}

#[test]
fn every_import_runs_down_the_layers() {
    let mut wrong = BTreeSet::new();
    for s in read_src() {
        let me = &s.module[0];
        let my_rank =
            rank(me).unwrap_or_else(|| panic!("module {me} is in no layer: add it to ORDER and ARCHITECTURE.md"));
        let prefix = if me == "cli" { "capsulefs::" } else { "crate::" };
        for path in paths(&s.code, prefix) {
            let top = top_of(&path);
            if &top == me {
                continue;
            }
            match rank(&top) {
                Some(r) if r < my_rank => {}
                Some(_) => {
                    wrong.insert(format!("{} imports {} (not below it)", s.module.join("::"), path.join("::")));
                }
                None => panic!("{} names crate::{}, which is in no layer", s.module.join("::"), path.join("::")),
            }
        }
    }
    assert!(wrong.is_empty(), "imports that run up or sideways:\n{}", wrong.into_iter().collect::<Vec<_>>().join("\n"));
}

#[test]
fn no_files_of_one_module_import_each_other() {
    let sources = read_src();
    let known: BTreeSet<Vec<String>> = sources.iter().map(|s| s.module.clone()).collect();
    // The longest known module that is a prefix of `path`.
    let resolve = |path: Vec<String>| -> Option<Vec<String>> {
        (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|m| known.contains(m))
    };
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for s in &sources {
        // The binary's modules (cli) name their own files from its root as `crate::cli::`.
        let mut targets: Vec<Vec<String>> = paths(&s.code, "crate::");
        // `super::x` from `a/b.rs` (module a::b) is `a::x`; from `a/mod.rs` (module a) it leaves
        // the module, which the layer test covers.
        if s.module.len() > 1 {
            let parent = &s.module[..s.module.len() - 1];
            targets.extend(paths(&s.code, "super::").into_iter().map(|p| [parent.to_vec(), p].concat()));
        }
        for t in targets {
            if let Some(m) = resolve(t)
                && m[0] == s.module[0]
                && m != s.module
                && !s.module.starts_with(&m)
                && !m.starts_with(&s.module)
            {
                edges.entry(s.module.clone()).or_default().insert(m);
            }
        }
    }
    let mut cycles = BTreeSet::new();
    for start in edges.keys() {
        // Every file reachable from `start`; a path back to it is a cycle.
        let mut seen = BTreeSet::new();
        let mut stack: Vec<Vec<String>> = edges[start].iter().cloned().collect();
        while let Some(m) = stack.pop() {
            if &m == start {
                cycles.insert(start.join("::"));
                break;
            }
            if seen.insert(m.clone()) {
                stack.extend(edges.get(&m).into_iter().flatten().cloned());
            }
        }
    }
    assert!(cycles.is_empty(), "files in an import cycle with files of their own module: {cycles:?}");
}
