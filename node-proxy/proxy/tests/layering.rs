//! The crate's layering rule (written at the top of `src/lib.rs`), checked
//! over its source: a module imports only the layers below its own, inbound
//! and outbound never import each other, `state`, `policy` and `telemetry`
//! touch no socket, and only `pods` touches network namespaces or the
//! redirector. Cargo holds the rest: the leaves are crates of their own.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers from the top; a layer may import those after it.
const LAYERS: &[&[&str]] = &[
    &["pods", "admin"],
    &["proxy"],
    &["l7"],
    &["transport"],
    &["policy"],
    &["telemetry"],
    &["state"],
];

/// Files outside the layers: the binary wires everything; the test helpers
/// stand in for `pods`.
const OUTSIDE: &[&str] = &["main.rs", "lib.rs", "testing.rs"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`proxy/inbound/delivery.rs` →
/// `proxy`), and its path below `src` with `/` separators.
fn module_of(src: &Path, file: &Path) -> (String, String) {
    let rel = file.strip_prefix(src).expect("below src");
    let rel = rel.to_string_lossy().replace('\\', "/");
    let top = rel.split('/').next().unwrap_or_default();
    (top.trim_end_matches(".rs").to_string(), rel)
}

/// Every `crate::NAME` in a file's code (comments left out), with its line.
fn crate_references(text: &str) -> Vec<(usize, String, String)> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // The full path, for the inbound/outbound rule.
            let path: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            found.push((i + 1, name, path));
            rest = after;
        }
    }
    found
}

/// Whether `text` has one of `words` in its code (comments left out).
fn mentions(text: &str, words: &[&str]) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .filter_map(|(i, l)| {
            words
                .iter()
                .find(|w| l.contains(*w))
                .map(|w| (i + 1, w.to_string()))
        })
        .collect()
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    let mut broken = Vec::new();
    let mut modules = BTreeSet::new();
    for file in &files {
        let (module, rel) = module_of(&src, file);
        if OUTSIDE.contains(&rel.as_str()) {
            continue;
        }
        let Some(own) = rank(&module) else {
            broken.push(format!(
                "{rel}: module `{module}` is in no layer (add it to src/lib.rs's rule and LAYERS)"
            ));
            continue;
        };
        modules.insert(module.clone());
        let text = std::fs::read_to_string(file).expect("read source");
        for (line, name, path) in crate_references(&text) {
            if name == module {
                // Within a layer, the inbound and outbound sides still
                // keep apart.
                let crosses = (rel.starts_with("proxy/inbound")
                    && path.starts_with("proxy::outbound"))
                    || (rel.starts_with("proxy/outbound") && path.starts_with("proxy::inbound"));
                if crosses {
                    broken.push(format!(
                        "{rel}:{line}: inbound and outbound never import each other (crate::{path}); move what both need below them"
                    ));
                }
                continue;
            }
            if name == "testing" {
                // Test helpers are only in `#[cfg(test)]` code.
                continue;
            }
            match rank(&name) {
                Some(r) if r > own => {}
                Some(_) => broken.push(format!(
                    "{rel}:{line}: `{module}` may not import `{name}` (crate::{path}): imports point down the layers"
                )),
                None => broken.push(format!(
                    "{rel}:{line}: crate::{path}: `{name}` is in no layer"
                )),
            }
        }
        // `super::outbound::…` from inbound is an import too.
        let other_side = if rel.starts_with("proxy/inbound") {
            Some("outbound::")
        } else if rel.starts_with("proxy/outbound") {
            Some("inbound::")
        } else {
            None
        };
        for (line, word) in other_side
            .map(|w| mentions(&text, &[w]))
            .unwrap_or_default()
        {
            broken.push(format!(
                "{rel}:{line}: inbound and outbound never import each other (`{word}`)"
            ));
        }
        if ["state", "policy", "telemetry"].contains(&module.as_str()) {
            for (line, word) in mentions(
                &text,
                &[
                    "tokio::net",
                    "TcpStream",
                    "TcpListener",
                    "socket2",
                    "std::net::Tcp",
                ],
            ) {
                broken.push(format!(
                    "{rel}:{line}: `{module}` touches no socket, but names `{word}`"
                ));
            }
        }
        if module != "pods" {
            for (line, word) in mentions(&text, &["weft_redirector", "Netns", "weft_registration"])
            {
                broken.push(format!(
                    "{rel}:{line}: only `pods` touches network namespaces and the redirector, but `{module}` names `{word}`"
                ));
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
    // The check saw every layer (a rename would otherwise pass silently).
    let expected: BTreeSet<String> = LAYERS
        .iter()
        .flat_map(|l| l.iter().map(|s| s.to_string()))
        .collect();
    assert_eq!(modules, expected, "layers found in src/");
}

#[test]
fn the_check_catches_an_upward_import() {
    let refs = crate_references(
        "use crate::proxy::ProxyInputs;\n// crate::pods in a comment\nlet x = crate::state::route(v);",
    );
    let names: Vec<_> = refs.iter().map(|(_, n, _)| n.as_str()).collect();
    assert_eq!(names, ["proxy", "state"]);
    assert!(
        rank("proxy") < rank("l7"),
        "l7 importing proxy would be upward"
    );
    assert_eq!(
        mentions("let s: TcpStream;\n// TcpStream", &["TcpStream"]).len(),
        1
    );
}
