//! The node's modules form layers, and no module imports one above it (see the codemap in
//! `src/lib.rs` and `docs/architecture.md`). This test reads the sources: every `crate::X`
//! (and, inside the engine, `super::Y`) outside comments must point down or sideways within
//! the same module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules of `node/src`, by layer (lower first).
const LAYERS: &[(&str, u8)] = &[
    ("config", 0),
    ("identity", 0),
    ("store", 0),
    ("crc32c", 0),
    ("source", 0),
    ("tls", 0),
    ("sockbuf", 0),
    ("admission", 1),
    ("qemu", 1),
    ("net", 1),
    ("answer", 1),
    ("vms", 2),
    ("metrics", 2),
    ("fuzz", 2),
    ("share", 2),
    ("node", 3),
    ("engine", 4),
    ("server", 5),
    ("control", 5),
    ("exporter", 5),
    ("daemon", 6),
];

/// The engine's submodules, by layer; `mod` stands for the items of `engine/mod.rs`.
const ENGINE_LAYERS: &[(&str, u8)] = &[("mod", 0), ("error", 1), ("upload", 2), ("fetch", 2), ("lazy", 3), ("cut", 3), ("gc", 3), ("scrub", 3), ("repair", 3), ("verify", 3), ("restore", 4), ("snapshot", 4)];

fn rank(table: &[(&str, u8)], name: &str) -> Option<u8> {
    table.iter().find(|(n, _)| *n == name).map(|(_, r)| *r)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every identifier that follows `prefix` in the code (not the comments) of `text`.
fn refs(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    // The code without comments, as one line (so that a `use` group may span lines).
    let code: String = text
        .lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
        .map(|l| l.split(" //").next().unwrap_or(l))
        .collect::<Vec<_>>()
        .join(" ");
    {
        let code = code.as_str();
        let mut at = 0;
        while let Some(i) = code[at..].find(prefix) {
            let start = at + i;
            at = start + prefix.len();
            // Only a path that starts here, not the tail of a longer one (`super::super::x`
            // names a module further up, which this check does not follow).
            if code[..start].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let rest = &code[at..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if name.is_empty() {
                // `crate::{a, b}` groups.
                if let Some(group) = rest.strip_prefix('{') {
                    let group = group.split('}').next().unwrap_or("");
                    out.extend(group.split(',').map(|s| s.trim().split("::").next().unwrap_or("").to_string()).filter(|s| !s.is_empty()));
                }
            } else if name != "super" && name != "self" {
                out.push(name);
            }
        }
    }
    out
}

/// This crate's directory: the running test's `CARGO_MANIFEST_DIR` (cargo sets it when it runs
/// tests), else the one it was compiled in (a build directory shared by two checkouts may run
/// a test built in the other, which may be gone).
fn crate_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

#[test]
fn no_module_imports_one_above_it() {
    let src = crate_dir().join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut upward: Vec<String> = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src");
        let parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
        if parts == ["lib"] {
            continue;
        }
        let top = parts[0].clone();
        let Some(my_rank) = rank(LAYERS, &top) else {
            panic!("{}: module {top} has no layer; add it to LAYERS here and to the codemap", rel.display());
        };
        *seen.entry(top.clone()).or_default() += 1;
        let text = std::fs::read_to_string(f).expect("read");
        for dep in refs(&text, "crate::") {
            if dep == top {
                continue;
            }
            match rank(LAYERS, &dep) {
                Some(r) if r < my_rank => {}
                Some(r) => upward.push(format!("{}: {top} (layer {my_rank}) uses {dep} (layer {r})", rel.display())),
                None => upward.push(format!("{}: uses crate::{dep}, which has no layer", rel.display())),
            }
        }
        // Inside the engine, its own submodules are layered too.
        if top == "engine" {
            let me = if parts.len() == 1 || parts[1] == "mod" { "mod".to_string() } else { parts[1].clone() };
            let me_rank = rank(ENGINE_LAYERS, &me).unwrap_or_else(|| panic!("{}: engine::{me} has no layer in ENGINE_LAYERS", rel.display()));
            let mut deps: Vec<String> = refs(&text, "crate::engine::");
            if parts.len() == 2 {
                deps.extend(refs(&text, "super::"));
            }
            for dep in deps {
                let r = rank(ENGINE_LAYERS, &dep).unwrap_or(0); // an item of engine/mod.rs
                if dep != me && r >= me_rank {
                    upward.push(format!("{}: engine::{me} (layer {me_rank}) uses engine::{dep} (layer {r})", rel.display()));
                }
            }
        }
    }
    assert!(upward.is_empty(), "upward imports:\n{}", upward.join("\n"));
    // The check saw the whole tree.
    for (name, _) in LAYERS {
        assert!(seen.contains_key(*name), "module {name} is in LAYERS but not in src");
    }
}

#[test]
fn the_reference_scanner_sees_paths_and_groups() {
    let text = "use crate::node::Node;\nuse crate::{store, net::X};\n// crate::daemon in a comment\nlet a = super::super::cut::x; super::error::E\nuse crate::{\n    vms::A,\n    answer,\n};";
    assert_eq!(refs(text, "crate::"), ["node", "store", "net", "vms", "answer"]);
    assert_eq!(refs(text, "super::"), ["error"]);
}
