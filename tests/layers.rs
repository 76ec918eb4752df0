//! The layering of the crate's top-level modules (`src/*.rs`, `src/*/`): no
//! module may reach, through any chain of `crate::…` paths in its code, back
//! to itself, and the order written in `src/lib.rs`'s "Layers" paragraph must
//! hold (each module uses only modules on lines above its own). Reads `src/`
//! with std only; comments and string literals are skipped, so a doc link to
//! a higher layer is fine, a `use` of one is not.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            out.push(path);
        }
    }
}

/// `text` with comments and the insides of string and char literals blanked,
/// so only code remains. A small lexer: line and block comments (nested), plain
/// and raw strings, char literals told apart from lifetimes.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == b'/' && next == Some(b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && next == Some(b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(b' ');
        } else if c == b'r'
            && (next == Some(b'"') || next == Some(b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // A raw string: r"…", r#"…"#, …
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && b[j + 1..].iter().take(hashes).filter(|&&h| h == b'#').count() == hashes {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.extend_from_slice(b"\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.extend_from_slice(b"\"\"");
        } else if c == b'\'' {
            if next == Some(b'\\') {
                // An escaped char literal: '\n', '\'', '\u{..}'.
                i += 2;
                while i < b.len() && b[i] != b'\'' {
                    i += 1;
                }
                i += 1;
                out.extend_from_slice(b"' '");
            } else if b.get(i + 2) == Some(&b'\'') {
                i += 3;
                out.extend_from_slice(b"' '");
            } else {
                // A lifetime (or a multi-byte char literal, which holds no path).
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The top-level modules named by `crate::x` paths in `code`, including the
/// braced form `crate::{x, y::z}`.
fn crate_refs(code: &str, out: &mut BTreeSet<String>) {
    let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        let after = &rest[at + "crate::".len()..];
        rest = after;
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `$crate::` stays, `mycrate::` is another crate
        }
        if let Some(group) = after.strip_prefix('{') {
            // Top-level items of the group: split on commas outside nested braces.
            let mut depth = 0;
            let mut start = true;
            for (k, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if c.is_whitespace() => {}
                    _ if start && depth == 0 => {
                        start = false;
                        let name = ident(&group[k..]);
                        if !name.is_empty() {
                            out.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident(after);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
}

/// Per top-level module, the other top-level modules its code references.
fn module_graph() -> Graph {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src/");
        let first = rel.components().next().expect("a path").as_os_str();
        let module = Path::new(first).file_stem().expect("a name").to_string_lossy().into_owned();
        if module == "main" || module == "lib" {
            continue; // the binary and the module map sit above every layer
        }
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
        let refs = graph.entry(module.clone()).or_default();
        crate_refs(&code_only(&text), refs);
        refs.remove(&module);
    }
    // `crate::x` where x is not a module (a macro or item at the root) is no edge.
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for refs in graph.values_mut() {
        refs.retain(|m| modules.contains(m));
    }
    graph
}

/// One cycle of `graph` as `a -> b -> … -> a`, if there is any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'g>(
        graph: &'g Graph,
        node: &'g str,
        marks: &mut BTreeMap<&'g str, Mark>,
        path: &mut Vec<&'g str>,
    ) -> Option<Vec<String>> {
        marks.insert(node, Mark::Open);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = path.iter().position(|n| *n == next.as_str()).expect("on the path");
                    let mut cycle: Vec<String> = path[from..].iter().map(|s| s.to_string()).collect();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(graph, next, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            let mut path = Vec::new();
            if let Some(cycle) = visit(graph, node, &mut marks, &mut path) {
                return Some(cycle);
            }
        }
    }
    None
}

fn show(graph: &Graph) -> String {
    graph.iter().map(|(m, refs)| format!("  {m} -> {}\n", refs.iter().cloned().collect::<Vec<_>>().join(" "))).collect()
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = module_graph();
    assert!(graph.contains_key("shard") && graph.contains_key("event"), "scanned src/: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between top-level modules: {}\nmodule graph (crate:: paths in code):\n{}",
            cycle.join(" -> "),
            show(&graph)
        );
    }
}

/// The layers as `src/lib.rs` writes them: the numbered lines of its `//!`
/// paragraph that starts with "Layers", each naming modules in backticks.
fn documented_layers() -> Vec<Vec<String>> {
    let lib = fs::read_to_string(src_dir().join("lib.rs")).expect("read src/lib.rs");
    let mut layers = Vec::new();
    let mut inside = false;
    for line in lib.lines() {
        let Some(doc) = line.strip_prefix("//!") else { continue };
        if doc.trim_start().starts_with("Layers") {
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if doc.trim().is_empty() {
            break;
        }
        // A layer is a numbered line: `1. leaves: `a`, `b``.
        let numbered = doc.trim_start().split_once(". ").is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        if numbered {
            layers.push(doc.split('`').skip(1).step_by(2).map(str::to_string).collect());
        }
    }
    layers
}

#[test]
fn lib_rs_layers_hold() {
    let graph = module_graph();
    let layers = documented_layers();
    let mut level = BTreeMap::new();
    for (k, names) in layers.iter().enumerate() {
        for name in names {
            assert!(level.insert(name.clone(), k).is_none(), "src/lib.rs lists `{name}` twice under Layers");
        }
    }
    for (module, refs) in &graph {
        let Some(&mine) = level.get(module) else {
            panic!("src/lib.rs's Layers paragraph does not list `{module}`: add it to the lowest layer that holds every module it uses");
        };
        for used in refs {
            let theirs = level[used];
            assert!(
                theirs < mine,
                "`{module}` (layer {}) uses `{used}` (layer {}): a module may use only modules on layers below its own\nmodule graph:\n{}",
                mine + 1,
                theirs + 1,
                show(&graph)
            );
        }
    }
    for name in level.keys() {
        assert!(
            graph.contains_key(name),
            "src/lib.rs's Layers paragraph lists `{name}`, which is no module under src/"
        );
    }
}

#[test]
fn the_scan_sees_paths_and_skips_comments_and_strings() {
    let code = code_only(
        "use crate::a::X; // crate::b\n/* crate::c /* crate::d */ */ let s = \"crate::e\"; \
         let r = r#\"crate::f\"#; let c = '\"'; use crate::{g, h::{i, j}}; fn f<'a>(x: &'a crate::k::T) {}",
    );
    let mut refs = BTreeSet::new();
    crate_refs(&code, &mut refs);
    let got: Vec<&str> = refs.iter().map(String::as_str).collect();
    assert_eq!(got, ["a", "g", "h", "k"]);
    let mut g = Graph::new();
    g.entry("x".into()).or_default().insert("y".into());
    g.entry("y".into()).or_default().insert("z".into());
    g.entry("z".into()).or_default().insert("x".into());
    assert_eq!(find_cycle(&g), Some(vec!["x".into(), "y".into(), "z".into(), "x".into()]));
    g.get_mut("z").unwrap().clear();
    assert_eq!(find_cycle(&g), None);
}
